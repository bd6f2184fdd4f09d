"""The JSON model spec: pydantic models, validation with JSON paths, and the live JSON Schema.

A spec is the book's ``GPT_CONFIG_124M`` fields plus ``name``, ``tie_embeddings``, ``init``, the
model-level fields other architectures need (``head_dim``, ``embedding_scale``, ``head_bias``,
``final_logit_softcap``; each defaults to the book's behaviour) and one component reference per slot
(``positional``, ``norm``, ``attention``, ``feedforward``, ``block``, and the optional
``embedding_norm``, a norm applied to the embeddings, absent by default).
A reference is a bare name (``"layernorm"``) or an object ``{"type": "layernorm", "eps": 1e-5}``
whose other keys are that component's parameters. Every slot defaults to the book's part, so the
book's flat config dict is a valid spec.

Validation collects every problem at once (unknown fields and components with a did-you-mean,
bad parameter values, cross-field checks) and raises one :class:`SpecError`; nothing is built until
the whole spec is valid. A validated :class:`ModelSpec` has every default filled in.

Types are JSON's, exactly as the JSON Schema states them, for the fields and for every component's
parameters: ``true`` is not an integer, ``"8"`` is not a number, ``1`` is not a boolean; an integer
is a number (``"drop_rate": 0`` is fine). A wrong type is reported at its path as
``n_layers: expected an integer, got true``.

Sizes have ceilings (``n_layers <= 1024``, ``vocab_size <= 2**24``...), the table in
:mod:`modelkit.limits`; a larger value is refused at its path, naming the limit. JSON is read
defensively: a spec file must be a regular file of at most ``MAX_SPEC_BYTES`` (a device, FIFO or
directory is refused without reading it), nesting is limited to ``MAX_JSON_DEPTH``, duplicate keys
and the non-JSON constants ``NaN``/``Infinity`` are refused.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer
from pydantic_core import ErrorDetails, PydanticSerializationError, to_json

from .components.base import ModelDims
from .errors import PluginError, RegistryError, SpecError, SpecIssue, did_you_mean
from .limits import (MAX_CONTEXT_LENGTH, MAX_EMB_DIM, MAX_JSON_DEPTH, MAX_N_HEADS, MAX_N_LAYERS, MAX_SPEC_BYTES,
                     MAX_VOCAB_SIZE)
from .registry import COMPONENT_SCHEMA_KEY, KINDS, get_registry

# slot -> default component (the book's part). Each slot holds a component of the kind of its name.
SLOT_DEFAULTS: dict[str, str] = {
    "positional": "learned",
    "norm": "layernorm",
    "attention": "mha",
    "feedforward": "mlp",
    "block": "pre_norm",
}
#: Optional slots: slot -> the kind of component it holds; absent (null) means the book's model has none.
OPTIONAL_SLOTS: dict[str, str] = {
    "embedding_norm": "norm",
}
SCHEMA_URL = "https://json-schema.org/draft/2020-12/schema"


class ComponentSpec(BaseModel):
    """A resolved component reference: its registered ``type`` and every parameter, defaults filled.

    Nested references (e.g. the feed-forward's ``activation``) are ComponentSpecs themselves.
    Serialises to the JSON form ``{"type": name, **params}``.
    """

    model_config = ConfigDict(extra="forbid")

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @model_serializer
    def _serialize(self) -> dict[str, Any]:
        return {"type": self.type, **{
            k: v.model_dump() if isinstance(v, ComponentSpec) else v for k, v in self.params.items()
        }}


class _Sizes(BaseModel):
    """The top-level fields (everything but the component slots), with JSON's types (strict)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: Annotated[str, Field(min_length=1, description="a label for the model (default: the file's stem)")] = "gpt"
    vocab_size: Annotated[int, Field(gt=0, le=MAX_VOCAB_SIZE, description="number of token ids (GPT-2: 50257)")]
    context_length: Annotated[int, Field(gt=0, le=MAX_CONTEXT_LENGTH, description="maximum sequence length")]
    emb_dim: Annotated[int, Field(gt=0, le=MAX_EMB_DIM, description="embedding / residual width")]
    n_heads: Annotated[int, Field(gt=0, le=MAX_N_HEADS, description="attention heads; must divide emb_dim")]
    n_layers: Annotated[int, Field(gt=0, le=MAX_N_LAYERS, description="transformer blocks")]
    drop_rate: Annotated[float, Field(ge=0, lt=1, description="dropout probability")] = 0.1
    qkv_bias: Annotated[bool, Field(description="biases in the query/key/value projections")] = False
    tie_embeddings: Annotated[bool, Field(description="out_head shares tok_emb's weight")] = False
    init: Annotated[Literal["default", "gpt2"], Field(
        description="'default': PyTorch's (the book's); 'gpt2': N(0, 0.02), residual projections "
                    "scaled by 1/sqrt(2*n_layers)")] = "default"
    head_dim: Annotated[int | None, Field(
        gt=0, le=MAX_EMB_DIM, description="size of each attention head; null: emb_dim / n_heads (which must "
                                          "then divide); given: attention projects emb_dim to n_heads * head_dim")] = None
    embedding_scale: Annotated[float, Field(
        gt=0, le=1e6, description="token embeddings are multiplied by this (in their dtype) before anything is "
                                  "added (Gemma: sqrt(emb_dim))")] = 1.0
    head_bias: Annotated[bool, Field(description="a bias in out_head, the output layer (Phi-2)")] = False
    final_logit_softcap: Annotated[float | None, Field(
        gt=0, le=1e6, description="logits become c * tanh(logits / c) for this c (Gemma 2: 30); null: none")] = None


class ModelSpec(_Sizes):
    """A validated model spec with every default filled in. Make one with :func:`load_spec`."""

    positional: ComponentSpec
    norm: ComponentSpec
    attention: ComponentSpec
    feedforward: ComponentSpec
    block: ComponentSpec
    embedding_norm: ComponentSpec | None = None

    @property
    def dims(self) -> ModelDims:
        return _dims(self)

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved spec as JSON-ready data; ``load_spec(spec.to_dict()) == spec``."""
        return self.model_dump(mode="json")

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def slots(self) -> list[tuple[str, str, ComponentSpec]]:
        """(slot, kind, reference) for every slot that holds a component (optional ones when set)."""
        found = [(slot, slot, getattr(self, slot)) for slot in SLOT_DEFAULTS]
        for slot, kind in OPTIONAL_SLOTS.items():
            ref = getattr(self, slot)
            if ref is not None:
                found.append((slot, kind, ref))
        return found

    def components(self) -> list[tuple[str, ComponentSpec]]:
        """(JSON path, reference) for every component in the spec, nested ones included."""
        found: list[tuple[str, ComponentSpec]] = []

        def walk(path: str, ref: ComponentSpec) -> None:
            found.append((path, ref))
            for key, value in ref.params.items():
                if isinstance(value, ComponentSpec):
                    walk(f"{path}.{key}", value)

        for slot, _, ref in self.slots():
            walk(slot, ref)
        return found


def model_level_features(spec: ModelSpec) -> list[str]:
    """The model-level fields of ``spec`` that differ from the book's model, as ``"name value"`` strings
    (``head_dim`` only when it differs from ``emb_dim / n_heads``). Code that implements only the book's
    composition (an export format, a native step) refuses a spec for which this is not empty."""
    found = []
    if spec.head_dim is not None and spec.head_dim * spec.n_heads != spec.emb_dim:
        found.append(f"head_dim {spec.head_dim}")
    if spec.embedding_scale != 1.0:
        found.append(f"embedding_scale {spec.embedding_scale}")
    if spec.embedding_norm is not None:
        found.append(f"embedding_norm '{spec.embedding_norm.type}'")
    if spec.head_bias:
        found.append("head_bias true")
    if spec.final_logit_softcap is not None:
        found.append(f"final_logit_softcap {spec.final_logit_softcap}")
    return found


def _dims(sizes: _Sizes) -> ModelDims:
    return ModelDims(sizes.vocab_size, sizes.context_length, sizes.emb_dim, sizes.n_heads, sizes.n_layers,
                     sizes.drop_rate, sizes.qkv_bias, sizes.head_dim)


# -- validation ---------------------------------------------------------------------------------

def _join(path: str, loc: tuple[Any, ...]) -> str:
    parts = [path] if path else []
    for item in loc:
        parts.append(f"[{item}]" if isinstance(item, int) else str(item))
    return ".".join(parts).replace(".[", "[")


def describe_json(value: Any) -> str:
    """A value as JSON spells it (``true``, ``"8"``, ``null``), else its repr; at most 60 characters."""
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# pydantic's error type for a value of the wrong JSON type -> the JSON type that was expected
_EXPECTED_JSON_TYPE: dict[str, str] = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "a boolean (true or false)",
    "string_type": "a string",
    "dict_type": "an object",
    "list_type": "an array",
    "tuple_type": "an array",
    "none_required": "null",
}


def expected_json_type(err: ErrorDetails) -> str | None:
    """The JSON type a pydantic error says a value should have had (``"an integer"``), or None
    if the error is not about the type."""
    return _EXPECTED_JSON_TYPE.get(err["type"])


def _message(err: ErrorDetails) -> str:
    """What is wrong with one value: the JSON type expected and given, or pydantic's own words."""
    got = describe_json(err.get("input"))
    expected = expected_json_type(err)
    if expected is not None:
        return f"expected {expected}, got {got}"
    if err["type"] == "less_than_equal" and isinstance((err.get("ctx") or {}).get("le"), int):
        return f"must be at most {err['ctx']['le']:,} (a ceiling from modelkit.limits), got {got}"
    if err["type"] == "finite_number":
        return f"must be a finite number, got {got}"
    return f"{err['msg'].removeprefix('Value error, ')} (got {got})"


def _translate(error: ValidationError, path: str, known: list[str], what: str,
               references: Collection[str] = ()) -> list[SpecIssue]:
    """pydantic errors -> SpecIssues with full JSON paths and friendlier wording.

    Errors in the ``references`` parameters (nested components) are left to :func:`_resolve`,
    which reports a bad reference once, in its own words.
    """
    issues = []
    for err in error.errors():
        loc = tuple(err["loc"])
        if loc and loc[0] in references:
            continue
        where = _join(path, loc)
        if err["type"] == "extra_forbidden" and len(loc) == 1:
            name = str(loc[0])
            msg = f"unknown {what} '{name}'{did_you_mean(name, known)} (known: {', '.join(known) or 'none'})"
        elif err["type"] == "missing":
            msg = "required, but missing"
        else:
            msg = _message(err)
        issues.append(SpecIssue(where, msg))
    return issues


def _not_json(params: Mapping[str, Any], path: str) -> list[SpecIssue]:
    """One issue per parameter whose value has no JSON form (only possible in a Python dict)."""
    issues = []
    for key, value in params.items():
        try:
            to_json(value)
        except PydanticSerializationError:
            issues.append(SpecIssue(f"{path}.{key}", f"expected a JSON value, got {describe_json(value)}"))
    return issues


def _a(kind: str) -> str:
    """``"a norm"``, ``"an activation"``."""
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _resolve(kind: str, raw: Any, path: str, issues: list[SpecIssue]) -> ComponentSpec | None:
    """Check one component reference and fill its defaults; append problems to ``issues``."""
    if isinstance(raw, ComponentSpec):
        raw = raw.model_dump()
    if isinstance(raw, str):
        name, params = raw, {}
    elif isinstance(raw, Mapping):
        if "type" not in raw:
            known = ", ".join(get_registry(kind).names())
            issues.append(SpecIssue(path, f"{_a(kind)} object needs a 'type' naming the component (known: {known})"))
            return None
        name, params = raw["type"], {k: v for k, v in raw.items() if k != "type"}
        if not isinstance(name, str):
            issues.append(SpecIssue(f"{path}.type", f"must be {_a(kind)} name, got {describe_json(name)}"))
            return None
    else:
        issues.append(SpecIssue(path, f"must be {_a(kind)} name or an object with a 'type', got {describe_json(raw)}"))
        return None
    try:
        entry = get_registry(kind).get(name)
    except (PluginError, RegistryError) as exc:
        issues.append(SpecIssue(path, str(exc)))
        return None

    fields = entry.params_model.model_fields
    values: dict[str, Any] | None = None
    try:
        values = entry.validate_params(params)
    except ValidationError as exc:
        issues.extend(_translate(exc, path, list(fields), f"parameter for {kind} '{name}'", entry.sub_components))
    except PydanticSerializationError as exc:
        issues.extend(_not_json(params, path) or [SpecIssue(path, f"expected JSON values: {exc}")])
    filled: dict[str, Any] = {}
    for pname, sub_kind in entry.sub_components.items():  # check nested references even if the rest failed
        sub_raw = params.get(pname, fields[pname].default)
        filled[pname] = _resolve(sub_kind, sub_raw, f"{path}.{pname}", issues)
    if values is None or any(v is None for v in filled.values()):
        return None
    return ComponentSpec(type=name, params={**values, **filled})


def _heads_issue(emb_dim: Any, n_heads: Any, head_dim: Any) -> SpecIssue | None:
    """The emb_dim/n_heads check (only without an explicit ``head_dim``), run whenever both values are
    themselves valid."""
    valid = all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= ceiling
                for v, ceiling in ((emb_dim, MAX_EMB_DIM), (n_heads, MAX_N_HEADS)))
    if valid and head_dim is None and emb_dim % n_heads:
        return SpecIssue("n_heads", f"emb_dim {emb_dim} is not divisible by n_heads {n_heads} "
                                    "(or give head_dim)")
    if valid and isinstance(head_dim, int) and not isinstance(head_dim, bool) and n_heads * head_dim > MAX_EMB_DIM:
        return SpecIssue("head_dim", f"n_heads * head_dim = {n_heads * head_dim:,} is over {MAX_EMB_DIM:,} "
                                     "(MAX_EMB_DIM in modelkit.limits)")
    return None


def _cross_checks(sizes: _Sizes, slots: dict[str, ComponentSpec | None]) -> list[SpecIssue]:
    issues: list[SpecIssue] = []
    if _heads_issue(sizes.emb_dim, sizes.n_heads, sizes.head_dim) is not None:
        return issues  # reported by _heads_issue; component checks assume a valid head size
    dims = _dims(sizes)

    def check(kind: str, path: str, ref: ComponentSpec) -> None:
        entry = get_registry(kind).get(ref.type)
        plain = {k: v for k, v in ref.params.items() if k not in entry.sub_components}
        for message in entry.cls.check_dims(dims, **plain):
            issues.append(SpecIssue(path, message))
        for pname, sub_kind in entry.sub_components.items():
            check(sub_kind, f"{path}.{pname}", ref.params[pname])

    for slot, ref in slots.items():
        if ref is not None:
            check(OPTIONAL_SLOTS.get(slot, slot), slot, ref)
    return issues


def validate_spec(data: Mapping[str, Any], source: str | None = None) -> ModelSpec:
    """Validate a spec given as parsed JSON; raise :class:`SpecError` listing every problem."""
    if not isinstance(data, Mapping):
        raise SpecError([SpecIssue("", f"a spec must be a JSON object, got {type(data).__name__}")], source)
    depth = data_depth(data)
    if depth > MAX_JSON_DEPTH:
        raise _too_deep(source or "<dict>")
    data = {k: v for k, v in data.items() if k != "$schema"}
    issues: list[SpecIssue] = []
    sizes: _Sizes | None = None
    top = {k: v for k, v in data.items() if k not in SLOT_DEFAULTS and k not in OPTIONAL_SLOTS}
    try:
        sizes = _Sizes.model_validate(top)
    except ValidationError as exc:
        issues.extend(_translate(exc, "", [*_Sizes.model_fields, *SLOT_DEFAULTS, *OPTIONAL_SLOTS], "field"))
    heads = _heads_issue(data.get("emb_dim"), data.get("n_heads"), data.get("head_dim"))
    if heads is not None:
        issues.append(heads)
    slots = {slot: _resolve(slot, data.get(slot, default), slot, issues) for slot, default in SLOT_DEFAULTS.items()}
    optional = {slot: _resolve(kind, data[slot], slot, issues) for slot, kind in OPTIONAL_SLOTS.items()
                if data.get(slot) is not None}
    if sizes is not None:
        issues.extend(_cross_checks(sizes, {**slots, **optional}))
    if issues or sizes is None:
        raise SpecError(issues, source)
    return ModelSpec(**sizes.model_dump(), **slots, **optional)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key '{key}'")
        seen[key] = value
    return seen


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:30]} is too large for a float")
    return value


_MAX_PATH_CHARS = 4096  # Linux's PATH_MAX
def data_depth(data: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply lists and mappings nest in ``data``, counted iteratively and only up to ``limit + 1``
    (so a self-referencing dict also terminates)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, Mapping) else node if isinstance(node, (list, tuple)) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        if depth > limit:
            return deepest
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _too_deep(source: str) -> SpecError:
    return SpecError([SpecIssue("", f"arrays and objects nest more than {MAX_JSON_DEPTH} deep "
                                    "(MAX_JSON_DEPTH in modelkit.limits)")], source)


def parse_json(text: str, source: str) -> Any:
    """Parse JSON, reporting syntax errors with line and column; refuse duplicate keys, ``NaN``,
    ``Infinity`` and numbers too large for a float, text longer than ``MAX_SPEC_BYTES`` characters
    and nesting deeper than ``MAX_JSON_DEPTH``, each as one :class:`SpecError` (never a
    ``RecursionError``: the parser's own recursion guard stops hostile nesting, and the depth of
    what parsed is measured without recursion)."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([SpecIssue("", f"the JSON text is {len(text):,} characters; a spec may be at most "
                                       f"{MAX_SPEC_BYTES:,} (MAX_SPEC_BYTES)")], source)
    try:
        data = json.loads(text, object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant,
                          parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise SpecError([SpecIssue("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")],
                        source) from None
    except RecursionError:
        raise _too_deep(source) from None
    except ValueError as exc:
        raise SpecError([SpecIssue("", f"invalid JSON: {exc}")], source) from None
    if data_depth(data) > MAX_JSON_DEPTH:
        raise _too_deep(source)
    return data


def read_spec_file(path: str | os.PathLike[str]) -> str:
    """The text of a spec file, read defensively: it must be a regular file of at most
    ``MAX_SPEC_BYTES`` bytes, in UTF-8. A directory, device (``/dev/zero``), FIFO or socket is
    refused without reading from it (the file is opened non-blocking and checked with ``fstat``, so
    a FIFO cannot block). Raises :class:`SpecError` naming the path."""
    where = str(path)

    def refuse(message: str) -> SpecError:
        return SpecError([SpecIssue("", message)], where)

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise refuse(f"cannot read the spec file: {exc.strerror or exc}") from None
    too_big = f"a spec file may be at most {MAX_SPEC_BYTES:,} bytes (MAX_SPEC_BYTES)"
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise refuse("is a directory, not a spec file")
        if not stat.S_ISREG(info.st_mode):
            raise refuse("is not a regular file (a device, FIFO or socket); give a JSON spec file")
        if info.st_size > MAX_SPEC_BYTES:
            raise refuse(f"the file is {info.st_size:,} bytes; {too_big}")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as fh:
        try:
            raw = fh.read(MAX_SPEC_BYTES + 1)
        except OSError as exc:
            raise refuse(f"cannot read the spec file: {exc.strerror or exc}") from None
    if len(raw) > MAX_SPEC_BYTES:
        raise refuse(f"the file grew past {MAX_SPEC_BYTES:,} bytes while read; {too_big}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise refuse("not a JSON spec (the file is not UTF-8 text)") from None


def load_spec(source: ModelSpec | Mapping[str, Any] | str | os.PathLike[str]) -> ModelSpec:
    """Load and validate a spec from a :class:`ModelSpec`, a dict, a JSON string or a file path.

    A string starting with ``{`` is JSON text; any other string is a path. Raises
    :class:`SpecError` (a ``ValueError``) naming the source and every problem with its JSON path.
    Files and text are read defensively (see :func:`read_spec_file` and :func:`parse_json`).
    """
    if isinstance(source, ModelSpec):
        return source
    if isinstance(source, Mapping):
        return validate_spec(source, "<dict>")
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return validate_spec(parse_json(source, "<json string>"), "<json string>")
    if isinstance(source, str) and len(source) > _MAX_PATH_CHARS:
        raise SpecError([SpecIssue("", f"a string of {len(source):,} characters is neither JSON text (which starts "
                                       f"with '{{') nor a path (at most {_MAX_PATH_CHARS:,} characters)")], "<string>")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        data = parse_json(read_spec_file(path), str(path))
        if isinstance(data, dict) and "name" not in data:
            data["name"] = path.stem
        return validate_spec(data, str(path))
    raise SpecError([SpecIssue("", f"cannot load a spec from {type(source).__name__}")])


# -- JSON Schema ----------------------------------------------------------------------------------

def _link_component_refs(node: Any) -> Any:
    """Replace the registry's nested-component markers with $refs to the kind's definition."""
    if isinstance(node, dict):
        if COMPONENT_SCHEMA_KEY in node:
            kind = node.pop(COMPONENT_SCHEMA_KEY)
            node.pop("anyOf", None)
            node["$ref"] = f"#/$defs/{kind}"
        for value in node.values():
            _link_component_refs(value)
    elif isinstance(node, list):
        for value in node:
            _link_component_refs(value)
    return node


def spec_json_schema() -> tuple[dict[str, Any], list[PluginError]]:
    """The JSON Schema of a spec, built from the live registry (plugins included).

    Each slot is a ``$ref`` to its kind: a component name, or an object whose ``type`` selects the
    component and whose other keys are that component's parameters. Broken plugins are left out
    and returned as errors, so one bad plugin never hides the rest.
    """
    schema = _Sizes.model_json_schema()
    defs: dict[str, Any] = schema.pop("$defs", {})
    failures: list[PluginError] = []
    for kind in KINDS:
        entries, errors = get_registry(kind).load_all()
        failures.extend(errors)
        variants = []
        for entry in entries:
            part = entry.params_model.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(part.pop("$defs", {}))
            part["properties"] = {"type": {"const": entry.name, "description": entry.summary},
                                  **part.get("properties", {})}
            part["required"] = ["type", *part.get("required", [])]
            part["additionalProperties"] = False
            part["title"] = f"{kind} '{entry.name}'"
            variants.append(part)
        defs[kind] = {
            "description": f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} component: its name, or an object "
                           "with 'type' and its parameters",
            "anyOf": [{"type": "string", "enum": [e.name for e in entries]}, {"oneOf": variants}],
        }
    _link_component_refs(defs)
    props = schema["properties"]
    for slot, default in SLOT_DEFAULTS.items():
        props[slot] = {"$ref": f"#/$defs/{slot}", "default": default}
    for slot, kind in OPTIONAL_SLOTS.items():
        props[slot] = {"anyOf": [{"$ref": f"#/$defs/{kind}"}, {"type": "null"}], "default": None,
                       "description": f"an optional {kind} (null: none)"}
    props["$schema"] = {"type": "string", "description": "the JSON Schema this file follows"}
    schema.update({"$schema": SCHEMA_URL, "title": "modelkit model spec", "$defs": defs})
    return schema, failures
