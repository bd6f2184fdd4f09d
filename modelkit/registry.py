"""Component registries: one per kind, mapping a name to a component class.

A component is an ``nn.Module`` subclass registered under a name with one decorator line::

    @register("norm", "layernorm")
    class LayerNorm(Norm):
        def __init__(self, dims: ModelDims, *, eps: Annotated[float, Field(gt=0)] = 1e-5): ...

Its JSON parameters are its keyword-only constructor arguments; the registry turns their type hints
into a pydantic model with unknown keys forbidden, so every parameter is validated, documented and
exported to JSON Schema. Values are checked with JSON's own types, as the schema states them: a
boolean is not an integer, a string is not a number, an integer is not a boolean (an integer is a
number, as in JSON Schema). Positional arguments are what the builder passes (``dims``, and ``parts``
for blocks).

Precedence is fixed: modelkit's built-ins, then explicit :func:`register` calls, then plugins found
through the entry-point groups ``modelkit.<kind>``. A duplicate name is always an error. Plugins are
read lazily: the entry-point *names* are scanned on first lookup, a plugin's *module* is imported only
when one of its components is asked for, and a failing plugin fails only where it is used.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import re
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, create_model
from pydantic_core import to_json

from .errors import PluginError, RegistryError, UnknownComponentError

KINDS: tuple[str, ...] = ("activation", "norm", "attention", "feedforward", "positional", "block")
ENTRY_POINT_GROUP_PREFIX = "modelkit."
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
# Positional constructor arguments the builder passes, per kind.
_BUILDER_ARGS: dict[str, tuple[str, ...]] = {kind: ("dims",) for kind in KINDS} | {"block": ("dims", "parts")}

C = TypeVar("C", bound=type)
COMPONENT_SCHEMA_KEY = "x-modelkit-component"


@dataclass(frozen=True)
class SubComponent:
    """Marks a constructor parameter whose value is another component of ``kind``.

    In JSON the parameter is a component reference (a name or ``{"type": ..., ...}``); the builder
    builds it and passes the constructed module. Use it as
    ``activation: Annotated[nn.Module, SubComponent("activation")] = "gelu"``.
    """

    kind: str

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: Any) -> dict[str, Any]:
        # A marker, not a $ref: pydantic resolves $refs against its own definitions. The spec's
        # schema (modelkit.spec.spec_json_schema) replaces it with a $ref to the kind's definition.
        return {COMPONENT_SCHEMA_KEY: self.kind, "description": f"{'an' if self.kind[0] in 'aeiou' else 'a'} {self.kind} component"}


@dataclass(frozen=True)
class ComponentEntry:
    """A registered component: its class, parameter model and where it came from."""

    kind: str
    name: str
    cls: type
    params_model: type[BaseModel]
    sub_components: Mapping[str, str] = field(default_factory=dict)  # parameter -> kind
    distribution: str | None = None
    version: str | None = None

    @property
    def module(self) -> str:
        return self.cls.__module__

    @property
    def is_builtin(self) -> bool:
        """True for modelkit's own components (not plugins, not runtime registrations)."""
        return self.distribution is None and _is_core(self.cls)

    @property
    def source(self) -> str:
        """``file:line`` of the class definition (computed on demand, never at import)."""
        try:
            path = inspect.getsourcefile(self.cls) or "?"
            line = inspect.getsourcelines(self.cls)[1]
            return f"{path}:{line}"
        except (OSError, TypeError):
            return self.module

    @property
    def origin(self) -> str:
        """``modelkit (built-in)``, ``dist==version``, or the defining module for runtime registrations."""
        if self.distribution:
            return f"{self.distribution}=={self.version}"
        return "modelkit (built-in)" if _is_core(self.cls) else self.module

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""

    def validate_params(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Check JSON parameter values and fill the defaults; return them as JSON-ready data.

        The values are checked as the JSON text they stand for (pydantic's strict JSON mode): each
        must have the JSON type its schema states (an integer for ``int``, a number for ``float``,
        ``true``/``false`` for ``bool``), while what JSON cannot spell otherwise is read as JSON
        reads it (a string for an ``Enum`` member, an array for a ``tuple``). Raises pydantic's
        ``ValidationError`` for a bad value, ``PydanticSerializationError`` for a value that has no
        JSON form (e.g. a tensor in a Python dict).
        """
        return self.params_model.model_validate_json(to_json(params)).model_dump(mode="json")

    def choices(self) -> dict[str, list[Any]]:
        """The allowed values of each parameter that has a fixed set (a ``Literal``, an ``Enum``, or an
        ``enum`` in its JSON schema, such as ``mha``'s ``backend``: the registered attention kernels)."""
        try:
            schema = self.params_model.model_json_schema()
        except Exception:  # a parameter type without a JSON schema: described by its annotation instead
            return {}
        defs = schema.get("$defs", {})
        found = {name: _allowed_values(prop, defs) for name, prop in schema.get("properties", {}).items()
                 if name not in self.sub_components}
        return {name: values for name, values in found.items() if values is not None}

    def parameters(self) -> list[tuple[str, str, Any]]:
        """(name, type description, default or "required") for each JSON parameter.

        A parameter with a fixed set of values is described by them (``'eager' | 'sdpa'``; see
        :meth:`choices`), any other by its type (``float``, ``int | None``).
        """
        choices = self.choices()
        rows = []
        for pname, finfo in self.params_model.model_fields.items():
            if pname in self.sub_components:
                tname = f"{self.sub_components[pname]} component"
            elif pname in choices:
                tname = " | ".join(repr(v) for v in choices[pname])
            else:
                tname = _type_name(finfo.annotation)
            default = "required" if finfo.is_required() else finfo.default
            rows.append((pname, tname, default))
        return rows


@dataclass(frozen=True)
class _PluginRef:
    name: str
    value: str
    distribution: str | None
    version: str | None
    entry_point: importlib.metadata.EntryPoint


def import_failure(exc: BaseException) -> str:
    """How a plugin module's failed import reads in a :class:`PluginError`: ``Type: message``.

    A ``SystemExit`` (the module called ``sys.exit``) says so, since its message is only the exit code.
    """
    if isinstance(exc, SystemExit):
        return f"SystemExit: the module called sys.exit({exc.code!r}) while being imported"
    return f"{type(exc).__name__}: {exc}"


def _dist_of(ep: importlib.metadata.EntryPoint) -> tuple[str | None, str | None]:
    """(distribution name, version) that declares ``ep``, or (None, None) if unknown."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None, None
    try:
        return dist.metadata["Name"], dist.version
    except Exception:  # unreadable METADATA: still usable, just unnamed
        return None, None


def _is_core(cls: type) -> bool:
    return cls.__module__ == "modelkit" or cls.__module__.startswith("modelkit.")


def _allowed_values(prop: Mapping[str, Any], defs: Mapping[str, Any]) -> list[Any] | None:
    """The values a JSON-schema property allows (``enum``, ``const``, an ``anyOf`` of those and
    ``null``, through a ``$ref``), or None if it allows any value of its type."""
    if "$ref" in prop:
        prop = defs.get(str(prop["$ref"]).rsplit("/", 1)[-1], {})
    if "enum" in prop:
        return list(prop["enum"])
    if "const" in prop:
        return [prop["const"]]
    if "anyOf" not in prop:
        return None
    values: list[Any] = []
    for option in prop["anyOf"]:
        sub = [None] if option.get("type") == "null" else _allowed_values(option, defs)
        if sub is None:
            return None
        values += sub
    return values


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def params_model_for(cls: type, kind: str, name: str) -> tuple[type[BaseModel], dict[str, str]]:
    """Derive the pydantic parameter model of a component class from its constructor signature.

    Keyword-only parameters become fields (their defaults and ``Annotated`` constraints included);
    unknown keys are forbidden and types are strict (see :meth:`ComponentEntry.validate_params`).
    Returns the model and the sub-component parameters by kind.
    Raises :class:`RegistryError` if the signature cannot describe a component of ``kind``.
    """
    where = f"{kind} '{name}' ({cls.__module__}.{cls.__qualname__})"
    try:
        sig = inspect.signature(cls.__init__)
        hints = typing.get_type_hints(cls.__init__, include_extras=True)
    except (TypeError, ValueError, NameError) as exc:
        raise RegistryError(f"{where}: cannot read the constructor signature: {exc}") from exc
    params = list(sig.parameters.values())[1:]  # drop self
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    expected = _BUILDER_ARGS[kind]
    if len(positional) != len(expected):
        raise RegistryError(
            f"{where}: a {kind} constructor takes ({', '.join(expected)}) positionally, then its JSON "
            f"parameters keyword-only after '*'; found positional ({', '.join(positional)})"
        )
    fields: dict[str, Any] = {}
    subs: dict[str, str] = {}
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            continue
        if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            raise RegistryError(f"{where}: declare each JSON parameter explicitly; *args/**kwargs are not allowed")
        if p.name == "type":
            raise RegistryError(f"{where}: 'type' is reserved for the component name in JSON")
        if p.name not in hints:
            raise RegistryError(f"{where}: parameter '{p.name}' needs a type annotation")
        annotation = hints[p.name]
        sub = None
        if typing.get_origin(annotation) is Annotated:
            sub = next((m for m in typing.get_args(annotation)[1:] if isinstance(m, SubComponent)), None)
        if sub is not None:
            if sub.kind not in KINDS:
                raise RegistryError(f"{where}: parameter '{p.name}' refers to unknown kind '{sub.kind}'")
            subs[p.name] = sub.kind
            annotation = Annotated[str | dict[str, Any], sub]
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (annotation, default)
    try:
        model = create_model(  # type: ignore[call-overload]
            f"{cls.__name__}Params",
            __config__=ConfigDict(extra="forbid", strict=True, arbitrary_types_allowed=False, allow_inf_nan=False),
            __doc__=inspect.getdoc(cls),
            **fields,
        )
    except Exception as exc:  # pydantic raises several types for unusable annotations
        raise RegistryError(f"{where}: its parameters cannot be turned into a schema: {exc}") from exc
    return model, subs


class Registry:
    """The registry of one component kind (see the module docstring for the rules)."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind = kind
        self.base = base
        self.group = ENTRY_POINT_GROUP_PREFIX + kind
        self._entries: dict[str, ComponentEntry] = {}
        self._plugins: dict[str, list[_PluginRef]] | None = None
        self._failed: dict[str, PluginError] = {}
        self._scan_errors: list[PluginError] = []

    def __repr__(self) -> str:
        return f"<Registry {self.kind}: {', '.join(self.names())}>"

    # -- registration -----------------------------------------------------------------------
    def register(self, name: str, cls: type | None = None) -> Any:
        """Register ``cls`` under ``name``; usable as ``@registry.register("name")``.

        Bare names are reserved for modelkit's own components; anyone else uses a namespace
        (``"mylab.fancynorm"``). Registering a taken name raises :class:`RegistryError`.
        """

        def decorator(klass: C) -> C:
            self._add(name, klass, distribution=None, version=None)
            return klass

        return decorator(cls) if cls is not None else decorator

    def _add(self, name: str, cls: Any, *, distribution: str | None, version: str | None) -> ComponentEntry:
        if not _NAME_RE.match(name):
            raise RegistryError(
                f"invalid {self.kind} name '{name}': use lowercase letters, digits and '_', "
                "with '.' separating a namespace (e.g. 'mylab.swiglu')"
            )
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise RegistryError(
                f"{self.kind} '{name}' must be a subclass of {self.base.__module__}.{self.base.__qualname__}, "
                f"got {cls!r}"
            )
        existing = self._entries.get(name)
        if existing is not None:
            raise RegistryError(
                f"{self.kind} '{name}' is already registered by {existing.origin} "
                f"({existing.module}.{existing.cls.__qualname__}); refusing to overwrite it with "
                f"{cls.__module__}.{cls.__qualname__}"
                + (f" from {distribution}=={version}" if distribution else "")
            )
        if "." not in name and (distribution is not None or not _is_core(cls)):
            raise RegistryError(
                f"{self.kind} '{name}': bare names are reserved for modelkit's built-in components; "
                f"register third-party components under a namespace, e.g. 'yourpackage.{name}'"
            )
        if distribution is None:
            self._check_no_plugin_claims(name, cls)
        params_model, subs = params_model_for(cls, self.kind, name)
        entry = ComponentEntry(self.kind, name, cls, params_model, subs, distribution, version)
        self._entries[name] = entry
        return entry

    def _check_no_plugin_claims(self, name: str, cls: type) -> None:
        """Refuse a runtime registration of a name a plugin provides (reads entry-point names only)."""
        if _is_core(cls):
            return
        refs = self._scan_plugins().get(name)
        if refs:
            other = refs[0]
            if other.value == f"{cls.__module__}:{cls.__qualname__}":
                raise RegistryError(
                    f"{self.kind} '{name}' is registered by its entry point {self.group}: {name} = "
                    f"{other.value}; remove the register() call from its module (importing a plugin "
                    "must not register anything)"
                )
            raise RegistryError(
                f"{self.kind} '{name}' is also provided by the plugin {other.distribution}=={other.version} "
                f"(entry point {self.group}: {name} = {other.value}); choose another name"
            )

    def unregister(self, name: str) -> None:
        """Remove a runtime registration (for tests and notebooks). Built-ins cannot be removed."""
        entry = self._entries.get(name)
        if entry is not None and _is_core(entry.cls) and entry.distribution is None:
            raise RegistryError(f"cannot unregister built-in {self.kind} '{name}'")
        self._entries.pop(name, None)
        self._failed.pop(name, None)

    # -- plugins ------------------------------------------------------------------------------
    def _scan_plugins(self) -> dict[str, list[_PluginRef]]:
        """Read entry-point names for this kind once; imports no plugin code.

        Uses ``importlib.metadata.entry_points(group=...)``. If some installed distribution's
        metadata cannot be parsed (that call then fails for everyone), the distributions are read
        one by one instead and the unreadable ones are reported by :meth:`load_all`.
        """
        if self._plugins is None:
            self._scan_errors = []
            try:
                eps: list[importlib.metadata.EntryPoint] = list(importlib.metadata.entry_points(group=self.group))
            except Exception:
                eps = self._entry_points_one_by_one()
            found: dict[str, list[_PluginRef]] = {}
            for ep in eps:
                dist_name, version = _dist_of(ep)
                refs = found.setdefault(ep.name, [])
                # The same distribution seen twice on sys.path is one provider, not a collision.
                if not any(r.distribution == dist_name and r.value == ep.value for r in refs):
                    refs.append(_PluginRef(ep.name, ep.value, dist_name, version, ep))
            self._plugins = found
        return self._plugins

    def _entry_points_one_by_one(self) -> list[importlib.metadata.EntryPoint]:
        """This kind's entry points, distribution by distribution, recording unreadable ones."""
        eps: list[importlib.metadata.EntryPoint] = []
        seen: set[str] = set()
        for dist in importlib.metadata.distributions():
            name = dist.metadata["Name"] or "?"
            key = re.sub(r"[-_.]+", "-", name).lower()
            if key in seen:  # shadowed by an earlier copy on sys.path, as entry_points() does
                continue
            seen.add(key)
            try:
                eps.extend(dist.entry_points.select(group=self.group))
            except Exception as exc:
                self._scan_errors.append(PluginError(
                    self.kind, None, None, name, dist.version,
                    f"its entry_points.txt cannot be read: {type(exc).__name__}: {exc}"))
        return eps

    def refresh(self) -> None:
        """Forget the scanned entry points and loaded plugins (after installing or removing a plugin
        in a running process); runtime registrations and built-ins stay."""
        importlib.invalidate_caches()
        self._plugins = None
        self._scan_errors = []
        self._failed.clear()
        for name in [n for n, e in self._entries.items() if e.distribution is not None]:
            del self._entries[name]

    def _load_plugin(self, name: str) -> ComponentEntry:
        refs = self._scan_plugins()[name]
        ref = refs[0]
        if len(refs) > 1:
            who = " and ".join(f"{r.distribution}=={r.version} ({r.value})" for r in refs)
            raise PluginError(self.kind, name, ref.value, ref.distribution, ref.version,
                              f"the name is registered by more than one distribution: {who}; "
                              "uninstall one of them")
        if "." not in name:
            raise PluginError(self.kind, name, ref.value, ref.distribution, ref.version,
                              "bare names are reserved for modelkit's built-in components; "
                              f"use a namespaced name such as '{(ref.distribution or 'plugin').lower()}.{name}'")
        if name in self._entries:
            existing = self._entries[name]
            raise PluginError(self.kind, name, ref.value, ref.distribution, ref.version,
                              f"the name is already registered by {existing.origin}")
        try:
            obj = ref.entry_point.load()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # SystemExit too: importing a plugin must not end the process
            raise PluginError(self.kind, name, ref.value, ref.distribution, ref.version,
                              import_failure(exc)) from exc
        try:
            return self._add(name, obj, distribution=ref.distribution or "?", version=ref.version)
        except RegistryError as exc:
            raise PluginError(self.kind, name, ref.value, ref.distribution, ref.version, str(exc)) from exc

    # -- lookup ---------------------------------------------------------------------------------
    def get(self, name: str) -> ComponentEntry:
        """The entry registered as ``name``, importing its plugin on first use.

        Raises :class:`UnknownComponentError` (listing the known names and the closest one) or
        :class:`PluginError` if the providing plugin is broken.
        """
        _ensure_builtins()
        if name in self._entries:
            entry = self._entries[name]
            if entry.distribution is None and not entry.is_builtin:
                self._check_no_plugin_claims(name, entry.cls)  # a plugin installed after register()
            return entry
        if name in self._failed:
            raise self._failed[name]
        if name in self._scan_plugins():
            try:
                return self._load_plugin(name)
            except PluginError as exc:
                self._failed[name] = exc
                raise
        raise UnknownComponentError(self.kind, name, self.names())

    def __contains__(self, name: object) -> bool:
        _ensure_builtins()
        return isinstance(name, str) and (name in self._entries or name in self._scan_plugins())

    def names(self) -> list[str]:
        """All known names: built-ins first, then the rest sorted (plugins are not imported)."""
        _ensure_builtins()
        names = set(self._entries) | set(self._scan_plugins())
        return sorted(names, key=lambda n: ("." in n, n))

    def builtins(self) -> list[ComponentEntry]:
        """modelkit's own components of this kind (imports no plugin code)."""
        _ensure_builtins()
        return [e for e in self._entries.values() if e.is_builtin]

    def load_all(self) -> tuple[list[ComponentEntry], list[PluginError]]:
        """Load every component of this kind, each plugin on its own: (working entries, failures).

        Failures include plugins that cannot be imported or registered, and entry points refused
        because their name belongs to a built-in or a runtime registration (the holder keeps it).
        """
        entries: list[ComponentEntry] = []
        plugins = self._scan_plugins()
        errors: list[PluginError] = list(self._scan_errors)
        for name in self.names():
            try:
                entry = self.get(name)
            except RegistryError as exc:
                errors.append(exc if isinstance(exc, PluginError) else PluginError(
                    self.kind, name, plugins[name][0].value, plugins[name][0].distribution,
                    plugins[name][0].version, str(exc)))
                continue
            entries.append(entry)
            if entry.distribution is None and name in plugins:
                for ref in plugins[name]:
                    reason = ("bare names are reserved for modelkit's built-in components"
                              if "." not in name else f"the name is already registered by {entry.origin}")
                    errors.append(PluginError(self.kind, name, ref.value, ref.distribution, ref.version,
                                              f"refused: {reason}"))
        return entries, errors


_builtins_loaded = False


def _ensure_builtins() -> None:
    """Import modelkit's built-in components once (their modules register them)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        importlib.import_module("modelkit.components")


def _make_registries() -> dict[str, Registry]:
    from .components import base  # the base classes only; built-ins load in _ensure_builtins()

    bases: dict[str, type] = {
        "activation": base.Activation, "norm": base.Norm, "attention": base.Attention,
        "feedforward": base.FeedForward, "positional": base.Positional, "block": base.Block,
    }
    return {kind: Registry(kind, bases[kind]) for kind in KINDS}


registries: dict[str, Registry] = _make_registries()


def get_registry(kind: str) -> Registry:
    """The registry for ``kind``; raises :class:`RegistryError` naming the valid kinds."""
    try:
        return registries[kind]
    except KeyError:
        from .errors import did_you_mean

        raise RegistryError(
            f"unknown component kind '{kind}'{did_you_mean(kind, KINDS)} (kinds: {', '.join(KINDS)})"
        ) from None


def register(kind: str, name: str) -> Callable[[C], C]:
    """Class decorator: register a component of ``kind`` under ``name``. ``@register("norm", "mylab.rms")``."""
    return get_registry(kind).register(name)
