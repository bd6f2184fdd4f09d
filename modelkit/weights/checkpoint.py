"""modelkit checkpoints: one safetensors file holding the weights and everything needed to rebuild the model.

The file's metadata holds the fully resolved spec (every default filled in), the checkpoint format
version, the modelkit and torch versions, the distribution and version of every plugin component the
spec uses, which tensors are tied, and any metadata the caller adds. Tied weights are stored once
(``out_head.weight`` is not written when it is ``tok_emb.weight``) and re-tied on load.

Loading never unpickles anything: modelkit checkpoints are safetensors; the book's
``torch.save(model.state_dict())`` files go through ``torch.load(weights_only=True)``. A model is
built with its parameters on the meta device (buffers real), the tensor names and shapes are checked
against it before any tensor data is read, and the weights are then *assigned* (memory-mapped from
the file, not copied), so loading needs about one copy of the weights in memory. Any problem raises
:class:`~modelkit.CheckpointError` and no model is returned.

**The tokenizer.** ``modelkit.tokenizer`` records which tokenizer the model's ids belong to:
``{"type": "gpt2"}`` (the built-in :mod:`modelkit.tokenizer`; also what a checkpoint without the
record means, so older checkpoints read as before), ``{"type": "tokenizer.json", "sha256", "size",
"eos_token_id"}`` (a Hugging Face file, stored in the checkpoint), or ``{"type": "none"}`` (a model
imported without one). The file is stored *inside* the checkpoint, as the metadata text
``modelkit.tokenizer.json``, rather than beside it: a checkpoint stays one file that can be copied,
renamed or replaced atomically (:func:`save_checkpoint`) without a companion going stale or
missing, and it still names no path to read. The header is the right place for it: safetensors
reads headers up to 100 MB, and a tokenizer of at most :data:`~modelkit.limits.MAX_TOKENIZER_BYTES`
(40 MiB; published ones are up to ~33 MB) stays under that even escaped as JSON text, while every
tensor reader (``safetensors.torch.load_file`` + ``load_state_dict`` included) sees only the model's
tensors. The recorded SHA-256 is checked whenever the file is used (:func:`checkpoint_tokenizer`,
:func:`stored_tokenizer_file`), so an edited or truncated copy is refused, never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError
from torch import Tensor, nn

from ..errors import CheckpointError, PluginError, RegistryError, SpecError, SpecIssue
from ..registry import KINDS
from ..spec import ComponentSpec, ModelSpec, load_spec, parse_json, validate_spec
from .safetensors_file import (
    ST_DTYPES, Header, describe_json, loads_json, map_tensors, open_file, pydantic_lines, read_header, read_header_of,
)

if TYPE_CHECKING:
    import tiktoken

    from ..hf_tokenizer import HFTokenizer
    from ..model import GPTModel

FORMAT_NAME = "modelkit-checkpoint"
FORMAT_VERSION = 1
# Metadata keys modelkit writes; callers may not use these names (or anything starting "modelkit.").
KEY_FORMAT = "modelkit.format"
KEY_FORMAT_VERSION = "modelkit.format_version"
KEY_VERSION = "modelkit.version"
KEY_SPEC = "modelkit.spec"
KEY_PLUGINS = "modelkit.plugins"
KEY_TIED = "modelkit.tied"
KEY_TORCH = "torch.version"
KEY_TOKENIZER = "modelkit.tokenizer"
KEY_TOKENIZER_JSON = "modelkit.tokenizer.json"
_RESERVED = {"format", KEY_TORCH}
_MAX_LISTED = 20  # names listed per kind of problem before "... and N more"
_MAX_TEXT = 1000  # characters of a name or version recorded in the metadata
_MAX_PLUGINS = 1000
_ST_DTYPES = ST_DTYPES  # safetensors dtype codes -> torch dtypes (those torch has)
_BLOCK = re.compile(r"^trf_blocks\.(\d+)\.")


# -- what a checkpoint holds --------------------------------------------------------------------

@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the file's header describes it (no data read)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors code: "F32", "BF16", ...

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _ST_DTYPES.get(self.dtype)


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`read_checkpoint` learns from a checkpoint's header alone.

    ``metadata`` is the file's whole metadata; ``user_metadata`` the part the caller of
    :func:`save_checkpoint` added. ``plugins`` lists the spec's non-built-in components with the
    distribution and version they came from. ``tied`` maps each tied tensor name to the one stored.
    """

    path: Path
    spec: ModelSpec
    format_version: int
    modelkit_version: str
    metadata: dict[str, str]
    user_metadata: dict[str, str]
    plugins: list[dict[str, str | None]]
    tied: dict[str, str]
    tensors: dict[str, TensorInfo]
    file_size: int
    data_offset: int  # where tensor data starts (8 + header length)
    data_size: int = field(default=0)  # bytes of tensor data the header promises
    tokenizer: TokenizerRecord = field(default_factory=lambda: TokenizerRecord(type="gpt2"))

    @property
    def n_parameters(self) -> int:
        """Elements stored in the file (tied tensors counted once)."""
        return sum(t.numel for t in self.tensors.values())

    @property
    def dtypes(self) -> list[str]:
        return sorted({t.dtype for t in self.tensors.values()})


# -- component provenance -----------------------------------------------------------------------

def _walk_components(spec: ModelSpec) -> Iterator[tuple[str, str, ComponentSpec]]:
    """(JSON path, kind, reference) for every component of ``spec``, nested ones included."""
    from ..registry import get_registry

    def walk(path: str, kind: str, ref: ComponentSpec) -> Iterator[tuple[str, str, ComponentSpec]]:
        yield path, kind, ref
        subs = get_registry(kind).get(ref.type).sub_components
        for key, value in ref.params.items():
            if isinstance(value, ComponentSpec) and key in subs:
                yield from walk(f"{path}.{key}", subs[key], value)

    for slot, kind, ref in spec.slots():
        yield from walk(slot, kind, ref)


def component_provenance(spec: ModelSpec) -> list[dict[str, str | None]]:
    """Every component of ``spec`` that is not one of modelkit's built-ins, with where it came from:
    ``{"path", "kind", "type", "distribution", "version", "module"}`` (distribution and version are
    None for a component registered at runtime rather than through a plugin's entry point)."""
    from ..registry import get_registry

    found = []
    for path, kind, ref in _walk_components(spec):
        entry = get_registry(kind).get(ref.type)
        if entry.distribution is None and entry.origin == "modelkit (built-in)":
            continue
        found.append({"path": path, "kind": kind, "type": ref.type, "distribution": entry.distribution,
                      "version": entry.version, "module": entry.module})
    return found


def _check_plugins_installed(plugins: list[dict[str, str | None]], source: str) -> None:
    """Raise naming each component the checkpoint needs that this installation cannot provide."""
    from ..registry import get_registry

    problems = []
    for p in plugins:
        kind, name = str(p.get("kind")), str(p.get("type"))
        try:
            entry = get_registry(kind).get(name)
        except (PluginError, RegistryError) as exc:
            if p.get("distribution"):
                need = f"the plugin {p['distribution']}=={p.get('version')} (pip install {p['distribution']})"
            else:
                need = f"the module {p.get('module')} to be imported first (it registers it at runtime)"
            reason = f": {exc.reason}" if isinstance(exc, PluginError) else " is not installed"
            problems.append(f"{p.get('path')}: {kind} '{name}' needs {need}{reason}")
            continue
        if p.get("distribution") and entry.version and entry.version != p.get("version"):
            import warnings

            warnings.warn(f"{source}: {kind} '{name}' was saved with {p['distribution']}=={p.get('version')}, "
                          f"installed is {entry.distribution}=={entry.version}", stacklevel=3)
    if problems:
        raise CheckpointError(f"{source}: the checkpoint uses components that are not available here:\n  "
                              + "\n  ".join(problems))


# -- tied tensors ---------------------------------------------------------------------------------

def tied_names(model: nn.Module) -> dict[str, str]:
    """``{alias: stored name}`` for parameters/buffers reachable under more than one name
    (the first name in ``state_dict`` order is the one stored)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def _retie(model: nn.Module, aliases: Mapping[str, str]) -> None:
    """Make each alias the very same Parameter as its stored name again."""
    for alias, name in aliases.items():
        target = model.get_parameter(name) if _is_param(model, name) else model.get_buffer(name)
        owner_path, _, leaf = alias.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        setattr(owner, leaf, target)


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


# -- building without allocating parameters --------------------------------------------------------

@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Within the block, every parameter a module registers is moved to the meta device (no memory,
    no initialisation work); buffers stay real, so derived state (masks, tables) is valid after the
    parameters are assigned. Parameters already on meta (e.g. a re-assigned tied weight) keep their
    identity."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_empty(spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str],
                dtype: torch.dtype | None = None) -> GPTModel:
    """A :class:`GPTModel` for ``spec`` whose parameters are on the meta device (to be assigned by
    :func:`load_state_dict_into`) and whose buffers are real, on the CPU, in ``dtype``."""
    from ..builder import build_model, skip_values_on_meta

    with _parameters_on_meta(), skip_values_on_meta():
        return build_model(spec, dtype=dtype)


# -- checking names and shapes before any data is read ---------------------------------------------

@dataclass
class _Source:
    """A tensor to load: its shape and dtype now, its data on demand."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None
    get: Callable[[], Tensor]


def _shape(s: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(d) for d in s) + ")"


def _listing(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    shown = lines[:_MAX_LISTED]
    more = [f"    ... and {len(lines) - len(shown)} more"] if len(lines) > len(shown) else []
    return [f"  {title} ({len(lines)}):", *(f"    {line}" for line in shown), *more]


def check_state_dict(model: GPTModel, sources: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]
                     ) -> list[str]:
    """Problems loading tensors ``{name: (shape, dtype)}`` into ``model``, found without any data:
    lines for missing, unexpected and mis-shaped tensors (each with its shapes). Empty if they fit.

    Names are matched the way ``load_state_dict`` matches them (module hooks included, so the book's
    ``att.mask`` buffers are accepted), against a meta-device twin of the model.
    """
    return _fit_problems(model.spec, sources)


def _fit_problems(spec: ModelSpec, sources: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]]
                  ) -> list[str]:
    """:func:`check_state_dict` for the model ``spec`` describes."""
    from ..builder import build_model

    twin = build_model(spec, device="meta")
    expected = twin.state_dict(keep_vars=True)
    aliases = tied_names(twin)
    misshaped, wrong_dtype = [], []
    probe: dict[str, Tensor] = {}
    for name, (shape, dtype) in sources.items():
        want = expected.get(name)
        if want is not None and tuple(want.shape) != tuple(shape):
            misshaped.append(f"{name}: checkpoint {_shape(shape)}, model {_shape(want.shape)}")
            continue
        if want is not None and want.is_floating_point() and dtype is not None and not dtype.is_floating_point:
            wrong_dtype.append(f"{name}: checkpoint {dtype}, model needs a floating point tensor")
            continue
        probe[name] = torch.empty(shape, dtype=dtype or torch.float32, device="meta")
    result = twin.load_state_dict(probe, strict=False, assign=True)
    bad = {n.split(":")[0] for n in misshaped + wrong_dtype}
    missing = [f"{n} (model {_shape(expected[n].shape)})" for n in result.missing_keys
               if n not in bad and not (n in aliases and aliases[n] in sources)]
    unexpected = [f"{n} (checkpoint {_shape(sources[n][0])})" for n in result.unexpected_keys]
    return (_listing("missing from the checkpoint", missing)
            + _listing("unexpected (not in the model)", unexpected)
            + _listing("mis-shaped", misshaped)
            + _listing("wrong dtype", wrong_dtype))


def _size(n: int) -> str:
    """A size for a message: as is, or its first digits and length when absurdly long."""
    text = str(n)
    return text if len(text) <= 20 else f"{text[:6]}...({len(text)} digits)"


def _spec_summary(spec: ModelSpec) -> str:
    return (f"'{spec.name}' (vocab {_size(spec.vocab_size)}, context {_size(spec.context_length)}, "
            f"emb {_size(spec.emb_dim)}, heads {_size(spec.n_heads)}, layers {_size(spec.n_layers)}, "
            f"qkv_bias {spec.qkv_bias}, tie_embeddings {spec.tie_embeddings})")


def _load_sources(model: GPTModel, sources: Mapping[str, _Source], source: str, *,
                  dtype: torch.dtype | None = None, device: torch.device | None = None,
                  checked: bool = False) -> GPTModel:
    """Check (unless ``checked``: :func:`check_spec_fits_tensors` passed), then load ``sources`` into
    ``model`` (assigning when its parameters are on meta)."""
    problems = [] if checked else check_state_dict(model, {k: (s.shape, s.dtype) for k, s in sources.items()})
    if problems:
        raise CheckpointError("\n".join([f"{source} does not fit the spec {_spec_summary(model.spec)}:",
                                         *problems]))
    aliases = tied_names(model)
    tensors: dict[str, Tensor] = {}
    for name, src in sources.items():
        t = src.get()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if device is not None and t.device != device:
            t = t.to(device)
        tensors[name] = t
    for alias, name in aliases.items():
        if alias in tensors and name in tensors:
            if not torch.equal(tensors[alias].to(tensors[name].device), tensors[name]):
                raise CheckpointError(f"{source}: the spec ties {alias} to {name}, but the checkpoint holds "
                                      f"different values for them; use a spec with tie_embeddings false")
            del tensors[alias]
    assign = any(p.device.type == "meta" for p in model.parameters())
    model.load_state_dict(tensors, strict=False, assign=assign)
    _retie(model, aliases)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{source}: no data for {', '.join(left)}")
    return model


def load_state_dict_into(model: GPTModel, state_dict: Mapping[str, Tensor], *, source: str = "state dict"
                         ) -> GPTModel:
    """Load ``state_dict`` (modelkit/book parameter names) into ``model`` and return it.

    Every name and shape is checked first; on any problem a :class:`CheckpointError` lists the
    missing, unexpected and mis-shaped tensors (with both shapes) and ``model`` is left untouched.
    A model whose parameters are on the meta device (see :func:`build_empty`) takes the tensors
    themselves (``assign``); otherwise values are copied into its parameters. Tied weights stay tied.
    """
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{source}: expected a mapping of names to tensors")
    sources = {k: _Source(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in state_dict.items()}
    return _load_sources(model, sources, source)


# -- reading the header -------------------------------------------------------------------------

_Text = Annotated[str, StringConstraints(max_length=_MAX_TEXT)]


class _PluginRecord(BaseModel):
    """One entry of ``modelkit.plugins``: a non-built-in component and where it came from."""

    model_config = ConfigDict(strict=True, extra="forbid")

    path: _Text
    kind: Literal[KINDS]  # type: ignore[valid-type]
    type: _Text
    distribution: _Text | None
    version: _Text | None
    module: _Text | None


class TokenizerRecord(BaseModel):
    """``modelkit.tokenizer``: which tokenizer the model's ids belong to (see the module docstring).

    ``sha256`` and ``size`` describe the stored ``tokenizer.json`` (and only it); ``eos_token_id`` is
    its end-of-text id, when the Hugging Face config named one."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    type: Literal["gpt2", "tokenizer.json", "none"]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    size: Annotated[int, Field(ge=0)] | None = None
    eos_token_id: Annotated[int, Field(ge=0)] | None = None

    def problems(self) -> list[str]:
        """What is inconsistent in the record: a stored file without its hash and size, or the reverse."""
        stored = self.type == "tokenizer.json"
        given = [name for name in ("sha256", "size", "eos_token_id") if getattr(self, name) is not None]
        if stored and (self.sha256 is None or self.size is None):
            return [f"metadata.{KEY_TOKENIZER}: a stored tokenizer.json needs its sha256 and size"]
        if not stored and given:
            return [f"metadata.{KEY_TOKENIZER}: {', '.join(given)} belong to a stored tokenizer.json only, "
                    f"not to type {self.type!r}"]
        return []


_METADATA = TypeAdapter(dict[str, str], config=ConfigDict(strict=True))
_PLUGINS = TypeAdapter(Annotated[list[_PluginRecord], Field(max_length=_MAX_PLUGINS)])
_TIED = TypeAdapter(dict[_Text, _Text], config=ConfigDict(strict=True))
_TOKENIZER = TypeAdapter(TokenizerRecord)
_VERSION_TEXT = re.compile(r"[0-9]{1,9}")


def _metadata_text(raw: Any, path: Path) -> dict[str, str]:
    """The header's ``__metadata__``: an object of text values that names a modelkit spec."""
    if raw is None or (isinstance(raw, dict) and KEY_SPEC not in raw):
        raise CheckpointError(f"{path} is a safetensors file but not a modelkit checkpoint (no modelkit spec in "
                              "its metadata); for a Hugging Face GPT-2 folder use `modelkit import-hf`")
    try:
        return _METADATA.validate_python(raw)
    except ValidationError as exc:
        raise CheckpointError(f"{path}: invalid modelkit metadata (safetensors metadata is an object of "
                              "strings):\n  " + "\n  ".join(pydantic_lines(exc, "metadata")[:_MAX_LISTED])) from None


def _format_version(meta: Mapping[str, str], path: Path) -> int:
    """The checkpoint's format version; raises unless it is one this modelkit reads."""
    text = meta.get(KEY_FORMAT_VERSION)
    if text is None or not _VERSION_TEXT.fullmatch(text):
        got = "missing" if text is None else f"got {describe_json(text)}"
        raise CheckpointError(f"{path}: invalid modelkit metadata:\n  metadata.{KEY_FORMAT_VERSION}: expected a "
                              f"whole number as text, {got}")
    if meta.get(KEY_FORMAT, FORMAT_NAME) != FORMAT_NAME:
        raise CheckpointError(f"{path}: invalid modelkit metadata:\n  metadata.{KEY_FORMAT}: expected "
                              f"{FORMAT_NAME!r}, got {describe_json(meta[KEY_FORMAT])}")
    version = int(text)
    if version < 1 or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {text!r} is not one this "
                              f"modelkit reads (it reads 1..{FORMAT_VERSION}); upgrade modelkit")
    return version


def _json_field(meta: Mapping[str, str], key: str, default: str, adapter: TypeAdapter[Any],
                problems: list[str]) -> Any:
    """The JSON text ``meta[key]`` parsed and validated by ``adapter``; None (and a problem) if it is not."""
    where = f"metadata.{key}"
    try:
        value = loads_json(meta.get(key, default))
    except ValueError as exc:
        problems.append(f"{where}: not JSON text ({exc})")
        return None
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        problems.extend(pydantic_lines(exc, where)[:_MAX_LISTED])
        return None


def _spec_field(meta: Mapping[str, str], path: Path) -> ModelSpec:
    """The checkpoint's spec: ``modelkit.spec`` parsed as JSON text (never a path) and validated."""
    where = f"metadata.{KEY_SPEC}"
    try:
        try:
            data = parse_json(meta[KEY_SPEC], where)
        except RecursionError:
            raise SpecError([SpecIssue("", "invalid JSON: nested too deeply")], where) from None
        spec = validate_spec(data, where)
    except SpecError as exc:
        lines = [f"{where}.{i.path}: {i.message}" if i.path else f"{where}: {i.message}" for i in exc.issues]
        raise CheckpointError(f"{path}: the checkpoint's spec is not valid with this modelkit:\n  "
                              + "\n  ".join(lines)) from None
    return spec


def _tokenizer_field(meta: Mapping[str, str], problems: list[str]) -> TokenizerRecord | None:
    """The checkpoint's tokenizer record (GPT-2's when absent); None (and problems) if it is invalid."""
    record = _json_field(meta, KEY_TOKENIZER, '{"type": "gpt2"}', _TOKENIZER, problems)
    if record is None:
        return None
    found = record.problems()
    if record.type != "tokenizer.json" and KEY_TOKENIZER_JSON in meta:
        found.append(f"metadata.{KEY_TOKENIZER_JSON}: a stored tokenizer.json, but "
                     f"metadata.{KEY_TOKENIZER} records type {record.type!r}")
    problems.extend(found)
    return None if found else record


def check_spec_fits_tensors(spec: ModelSpec, sources: Mapping[str, tuple[tuple[int, ...], torch.dtype | None]],
                            source: str) -> None:
    """Raise :class:`CheckpointError` unless tensors ``{name: (shape, dtype)}`` fit ``spec``: the lines
    of :func:`check_state_dict`, found on a meta-device twin, before anything real is built.

    The number of blocks is checked first: a spec with far more blocks than the tensors hold
    (``n_layers`` 10**12 against ``trf_blocks.0`` .. ``11``) is refused at once instead of being
    built without end; near misses get the full listing. Sizes too large to build even on the meta
    device are refused too.
    """
    blocks = {int(m.group(1)) for name in sources if (m := _BLOCK.match(name))}
    stored = max(blocks) + 1 if blocks else 0
    if spec.n_layers > 2 * stored + 8:  # building the twin costs time in proportion to the file, at most
        held = f"trf_blocks.0 .. {stored - 1}" if blocks else "no trf_blocks tensors"
        raise CheckpointError(f"{source} does not fit the spec {_spec_summary(spec)}: it holds {len(blocks)} "
                              f"blocks ({held}), the spec has n_layers {_size(spec.n_layers)}")
    try:
        problems = _fit_problems(spec, sources)
    except (RuntimeError, ValueError, TypeError, OverflowError) as exc:  # sizes torch cannot even describe
        raise CheckpointError(f"{source}: the spec {_spec_summary(spec)} cannot be built: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    if problems:
        raise CheckpointError("\n".join([f"{source} does not fit the spec {_spec_summary(spec)}:", *problems]))


def _checkpoint_info(path: Path, header: Header) -> CheckpointInfo:
    """What a validated safetensors header says as a modelkit checkpoint; every field checked."""
    meta = _metadata_text(header.metadata, path)
    version = _format_version(meta, path)
    problems: list[str] = []
    if len(meta.get(KEY_VERSION, "")) > _MAX_TEXT:
        problems.append(f"metadata.{KEY_VERSION}: longer than {_MAX_TEXT} characters")
    records = _json_field(meta, KEY_PLUGINS, "[]", _PLUGINS, problems)
    tied = _json_field(meta, KEY_TIED, "{}", _TIED, problems)
    tokenizer = _tokenizer_field(meta, problems)
    if problems:
        raise CheckpointError(f"{path}: invalid modelkit metadata:\n  " + "\n  ".join(problems))
    plugins = [r.model_dump() for r in records]
    _check_plugins_installed(plugins, str(path))
    spec = _spec_field(meta, path)
    tensors = {name: TensorInfo(e.shape, e.dtype) for name, e in header.entries.items()}
    check_spec_fits_tensors(spec, {n: (t.shape, t.torch_dtype) for n, t in tensors.items()}, str(path))
    user = {k: v for k, v in meta.items() if not k.startswith("modelkit.") and k not in _RESERVED}
    return CheckpointInfo(path, spec, version, meta.get(KEY_VERSION, "?"), dict(meta), user, plugins, tied,
                          tensors, header.file_size, header.data_offset, header.data_size, tokenizer)


def read_checkpoint(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Describe a modelkit checkpoint from its header alone (no tensor data is read).

    The file is data only: its spec is JSON text (never a path), and every metadata field is
    validated. Raises :class:`CheckpointError` if the file is not a safetensors file, its header or
    metadata is malformed (each problem with its JSON path, e.g. ``metadata.modelkit.spec.n_layers``),
    it is a safetensors file without a modelkit spec (e.g. a Hugging Face model: use
    :func:`modelkit.weights.hf.load_hf_gpt2`), was written by a newer format, or needs components
    this installation lacks.
    """
    path = Path(path)
    return _checkpoint_info(path, read_header_of(path))


def is_checkpoint_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a safetensors file (by its header), without raising."""
    try:
        read_header_of(Path(path))
        return True
    except CheckpointError:
        return False


# -- saving ------------------------------------------------------------------------------------------

def tokenizer_metadata(tokenizer: HFTokenizer | Literal["gpt2"] | None) -> dict[str, str]:
    """The metadata recording ``tokenizer``: ``"gpt2"`` (the built-in), an :class:`HFTokenizer`
    (stored, with its hash, size and end-of-text id) or None (no tokenizer is known)."""
    from ..hf_tokenizer import HFTokenizer

    if tokenizer is None or tokenizer == "gpt2":
        record = TokenizerRecord(type="none" if tokenizer is None else "gpt2")
        return {KEY_TOKENIZER: record.model_dump_json(exclude_none=True)}
    if not isinstance(tokenizer, HFTokenizer):
        raise CheckpointError(f"tokenizer must be 'gpt2', an HFTokenizer or None, got {type(tokenizer).__name__}")
    record = TokenizerRecord(type="tokenizer.json", sha256=tokenizer.sha256, size=len(tokenizer.data),
                             eos_token_id=tokenizer.eot_token)
    return {KEY_TOKENIZER: record.model_dump_json(exclude_none=True),
            KEY_TOKENIZER_JSON: tokenizer.data.decode("utf-8")}


def checkpoint_metadata(model: GPTModel, metadata: Mapping[str, str] | None = None,
                        tokenizer: HFTokenizer | Literal["gpt2"] | None = "gpt2") -> dict[str, str]:
    """The metadata :func:`save_checkpoint` writes for ``model``, ``metadata`` and the record of
    ``tokenizer`` (:func:`tokenizer_metadata`) included.

    Raises :class:`CheckpointError` if a caller key is reserved or a value is not a string.
    """
    from ..version import __version__

    extra = dict(metadata or {})
    for key, value in extra.items():
        if not isinstance(key, str) or key.startswith("modelkit.") or key in _RESERVED:
            raise CheckpointError(f"metadata key {key!r} is reserved by modelkit; choose another name")
        if not isinstance(value, str):
            raise CheckpointError(f"metadata values must be strings (safetensors stores text); "
                                  f"got {type(value).__name__} for {key!r}")
    spec: ModelSpec = model.spec
    return {
        **extra,
        "format": "pt",
        KEY_FORMAT: FORMAT_NAME,
        KEY_FORMAT_VERSION: str(FORMAT_VERSION),
        KEY_VERSION: __version__,
        KEY_TORCH: torch.__version__,
        KEY_SPEC: spec.to_json(indent=None),
        KEY_PLUGINS: json.dumps(component_provenance(spec)),
        KEY_TIED: json.dumps(tied_names(model)),
        **tokenizer_metadata(tokenizer),
    }


def checkpoint_tensors(model: GPTModel) -> dict[str, Tensor]:
    """The tensors :func:`save_checkpoint` writes for ``model``: every parameter and persistent buffer
    once (tied weights once), on the CPU, contiguous, no two sharing storage.

    Raises :class:`CheckpointError` if ``model`` is not a modelkit model or a tensor has no data."""
    if not hasattr(model, "spec") or not isinstance(model.spec, ModelSpec):
        raise CheckpointError(f"save_checkpoint needs a modelkit GPTModel (with a .spec), got {type(model).__name__}")
    aliases = tied_names(model)
    tensors: dict[str, Tensor] = {}
    storages: set[tuple[int, int]] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name in aliases:
            continue
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save: {name} has no data (it is on the meta device); load weights first")
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and key in storages:  # views of one storage: safetensors needs separate tensors
            t = t.clone()
        storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        tensors[name] = t
    return tensors


def save_checkpoint(model: GPTModel, path: str | os.PathLike[str], *,
                    metadata: dict[str, str] | None = None,
                    tokenizer: HFTokenizer | Literal["gpt2"] | None = "gpt2") -> None:
    """Write ``model`` to ``path`` as a modelkit checkpoint (safetensors).

    The file holds :func:`checkpoint_tensors` (every parameter and persistent buffer once, tied
    weights once) and the metadata of :func:`checkpoint_metadata`, which records ``tokenizer``
    (default GPT-2's; an :class:`HFTokenizer`'s file is stored in the checkpoint, after a check
    that the model has an output for each of its ids). It is written to a temporary file
    in the same folder, synced and renamed over ``path``, so ``path`` is either the old file or the
    complete new one; a failure to write (a full disk included) raises :class:`CheckpointError` with
    the path and the OS reason and leaves no temporary file.
    """
    from ..files import write_safetensors

    tensors = checkpoint_tensors(model)
    md = checkpoint_metadata(model, metadata, tokenizer)
    n_vocab, source = getattr(tokenizer, "n_vocab", 0), getattr(tokenizer, "source", "")  # an HFTokenizer's
    if n_vocab > model.spec.vocab_size:
        raise CheckpointError(f"the tokenizer {source} has {n_vocab:,} tokens, more than the model's vocab_size "
                              f"{model.spec.vocab_size:,}: they belong to different models")
    write_safetensors(tensors, Path(path), metadata=md, what="checkpoint", error=CheckpointError)


# -- loading -----------------------------------------------------------------------------------------

def _resolve_device(device: str | torch.device | None) -> torch.device | None:
    return torch.device(device) if device is not None else None


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> GPTModel:
    """Rebuild the model saved in a modelkit checkpoint, in eval mode.

    The spec comes from the file. The file is opened once: the header and the tensors come from
    that one open file (memory-mapped, copy-on-write), so a checkpoint replaced while it is loaded
    (``os.replace``, as :func:`save_checkpoint` does) gives the old or the new model, whole. The
    parameters are built on the meta device and the mapped tensors assigned to them, so loading
    needs about one copy of the weights. ``dtype`` converts floating point weights (default: as
    stored); ``device`` places them. Raises :class:`CheckpointError` (missing/unexpected/mis-shaped
    tensors listed with their shapes, malformed metadata, not a checkpoint, truncated file, missing
    plugin); no model is returned then.
    """
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating point dtype, got {dtype}")
    path = Path(path)
    target = _resolve_device(device)
    with open_file(path) as fh:
        try:
            header = read_header(fh, path)
            info = _checkpoint_info(path, header)
            getters = map_tensors(fh, header, path)
        except OSError as exc:
            raise CheckpointError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    float_dtypes = {t.torch_dtype for t in info.tensors.values() if t.torch_dtype and t.torch_dtype.is_floating_point}
    build_dtype = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else None)
    model = build_empty(info.spec, dtype=build_dtype)
    sources = {name: _Source(t.shape, t.torch_dtype, getters[name]) for name, t in info.tensors.items()}
    _load_sources(model, sources, str(path), dtype=dtype, device=target, checked=True)
    if target is not None:
        model.to(target)  # buffers
    return model.eval()


def _tokenizer_of(checkpoint: CheckpointInfo | str | os.PathLike[str]
                  ) -> tuple[Path, Mapping[str, str], TokenizerRecord]:
    """(path, metadata, tokenizer record) of a checkpoint; from a path, only the header's metadata
    and the record are read and checked (no spec is built)."""
    if isinstance(checkpoint, CheckpointInfo):
        return checkpoint.path, checkpoint.metadata, checkpoint.tokenizer
    path = Path(checkpoint)
    meta = _metadata_text(read_header_of(path).metadata, path)
    _format_version(meta, path)
    problems: list[str] = []
    record = _tokenizer_field(meta, problems)
    if record is None:
        raise CheckpointError(f"{path}: invalid modelkit metadata:\n  " + "\n  ".join(problems))
    return path, meta, record


def stored_tokenizer_file(checkpoint: CheckpointInfo | str | os.PathLike[str]) -> bytes | None:
    """The ``tokenizer.json`` stored in a checkpoint (its :class:`CheckpointInfo` or path), exactly as
    it was imported, or None when it records GPT-2's or none. Raises :class:`CheckpointError` if the
    record names a stored file that is missing or whose size or SHA-256 differs from the record's."""
    return _stored_file(*_tokenizer_of(checkpoint))


def _stored_file(path: Path, meta: Mapping[str, str], record: TokenizerRecord) -> bytes | None:
    """:func:`stored_tokenizer_file` of the checkpoint ``path`` with metadata ``meta`` and ``record``."""
    if record.type != "tokenizer.json":
        return None
    text = meta.get(KEY_TOKENIZER_JSON)
    if text is None:
        raise CheckpointError(f"{path}: metadata.{KEY_TOKENIZER} records a stored tokenizer.json, but "
                              f"metadata.{KEY_TOKENIZER_JSON} is missing; import the model again")
    data = text.encode("utf-8")
    actual = hashlib.sha256(data).hexdigest()
    if len(data) != record.size or actual != record.sha256:
        raise CheckpointError(f"{path}: the stored tokenizer.json was altered: the record says "
                              f"{record.size:,} bytes with sha256 {record.sha256}, it holds {len(data):,} bytes "
                              f"with sha256 {actual}; import the model again")
    return data


def checkpoint_tokenizer(checkpoint: CheckpointInfo | str | os.PathLike[str]
                         ) -> tiktoken.Encoding | HFTokenizer | None:
    """The tokenizer a checkpoint (its :class:`CheckpointInfo` or path) records: GPT-2's (also for
    checkpoints without a record), its stored ``tokenizer.json`` as an
    :class:`~modelkit.hf_tokenizer.HFTokenizer` (checked by :func:`stored_tokenizer_file`), or None
    when it records none. Raises :class:`CheckpointError` for an invalid record or a missing,
    altered or unreadable stored file."""
    from ..hf_tokenizer import HFTokenizer, TokenizerFileError
    from ..tokenizer import get_tokenizer

    path, meta, record = _tokenizer_of(checkpoint)
    if record.type == "gpt2":
        return get_tokenizer()
    data = _stored_file(path, meta, record)
    if data is None:
        return None
    try:
        return HFTokenizer(data, f"{path} (its stored tokenizer.json)", record.eos_token_id)
    except TokenizerFileError as exc:
        raise CheckpointError(str(exc)) from None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, memory-mapped when the file format allows it."""
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from None
    zipped = magic == b"PK\x03\x04"
    if not zipped and not magic.startswith(b"\x80"):  # neither torch's zip format nor a legacy pickle
        raise CheckpointError(f"{path} is not a torch.save file (nor a safetensors checkpoint)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            detail = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error" in line),
                          text.strip().splitlines()[0])
            raise CheckpointError(f"{path} holds Python objects besides tensors; refusing to unpickle them "
                                  f"(torch.load(weights_only=True) says: {detail})") from None
        raise CheckpointError(f"{path} is not a readable torch.save file ({type(exc).__name__}: {text[:200]})") from None


def load_book_checkpoint(path: str | os.PathLike[str],
                         spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str], *,
                         device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> GPTModel:
    """Load a ``torch.save(model.state_dict())`` of the book's GPTModel (or of a modelkit model) with
    the matching ``spec`` (e.g. the book's ``GPT_CONFIG_124M`` dict), in eval mode.

    Read with ``torch.load(weights_only=True)``: nothing is unpickled. The book's chapter-5 dict
    ``{"model_state_dict": ..., "optimizer_state_dict": ...}`` is accepted too (the model part is
    used). Errors as in :func:`load_checkpoint`.
    """
    path = Path(path)
    resolved = load_spec(spec)
    obj = _torch_load(path)
    if isinstance(obj, Mapping) and "model_state_dict" in obj and isinstance(obj["model_state_dict"], Mapping):
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict (a mapping of names to tensors); "
                              f"found {type(obj).__name__}")
    target = _resolve_device(device)
    model = build_empty(resolved, dtype=dtype)
    sources = {k: _Source(tuple(v.shape), v.dtype, lambda v=v: v) for k, v in obj.items()}
    _load_sources(model, sources, str(path), dtype=dtype, device=target)
    if target is not None:
        model.to(target)
    return model.eval()
