"""Sizing a model before it is built: its exact parameter count, the ``MAX_PARAMETERS`` limit, and
whether the device it is built on has the memory for it.

The count comes from building, on the meta device, one of each part the spec names (the positional
component, ONE block with its norm/attention/feed-forward, the final norm) and multiplying the block
by ``n_layers``; the token embedding and the output head are ``vocab_size · emb_dim`` each (one when
tied). That is exact for any component, a plugin's included, and costs milliseconds whatever
``n_layers`` is, since nothing is allocated and only one block is constructed.

:class:`~modelkit.model.GPTModel` runs :func:`check_model_size` first thing, so every way of building
a model (``build_model``, ``GPTModel(...)``, ``modelkit info/generate/compare/import-hf``) refuses a
spec over ``MAX_PARAMETERS`` with a :class:`SpecError`, and a build on a real device that would not
fit its free memory with a :class:`ModelTooLargeError`, before a single weight is allocated. It lives
here rather than in :func:`~modelkit.spec.load_spec` because load_spec is called often (on every spec
a command or checkpoint touches) and must stay a cheap check of the JSON; the field ceilings in
:mod:`modelkit.limits` already bound each size there.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .components.build import SpecBlockParts, build_component
from .errors import ModelkitError, ModelTooLargeError, SpecError, SpecIssue
from .limits import MAX_PARAMETERS
from .spec import ComponentSpec, ModelSpec

#: Calls that only set values, which a meta tensor does not have: the ``torch.nn.init`` functions,
#: the in-place random fills they come down to, and the clamp and erfinv of ``trunc_normal_``.
_VALUE_SETTERS: frozenset[Any] = frozenset(
    [getattr(nn.init, name) for name in nn.init.__all__ if name.endswith("_")]
    + [getattr(Tensor, name) for name in ("normal_", "uniform_", "exponential_", "log_normal_", "cauchy_",
                                          "geometric_", "bernoulli_", "random_", "erfinv_", "clamp_")]
)


class _SkipValuesOnMeta(TorchFunctionMode):
    """While active, the calls in :data:`_VALUE_SETTERS` return their meta tensor untouched.

    They would compute nothing on the meta device, yet PyTorch runs them through Python meta kernels,
    some of which import ``torch._dynamo`` (and so Inductor's dependencies): seconds of start-up for
    ``modelkit info``. Every other call runs as usual; no random number is drawn either way.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _VALUE_SETTERS:
            tensor = args[0] if args else kwargs.get("tensor")  # nn.init passes it by keyword
            if isinstance(tensor, Tensor) and tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def skip_values_on_meta() -> contextlib.AbstractContextManager[Any]:
    """A context in which initialising a meta tensor costs nothing (see :class:`_SkipValuesOnMeta`);
    for building models whose parameters are on the meta device."""
    return _SkipValuesOnMeta()


@dataclass(frozen=True)
class SizeEstimate:
    """A model's size, exact, from a meta build of one block. Counts are elements (not bytes)."""

    tok_emb: int  #: the token embedding's parameters
    positional: int  #: the positional component's parameters
    per_block: int  #: parameters of one block
    n_layers: int
    final_norm: int  #: the final norm's parameters, and the embedding norm's if the spec has one
    head: int  #: the output head's own parameters (its weight unless tied to tok_emb, its bias if any)
    buffers: int  #: elements of all buffers (the positional's, the final norm's, every block's)

    @property
    def parameters(self) -> int:
        """Every parameter of the model, a tied head counted once (as ``count_parameters`` does)."""
        return self.tok_emb + self.positional + self.per_block * self.n_layers + self.final_norm + self.head

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes the parameters and buffers take in ``dtype``."""
        return (self.parameters + self.buffers) * torch.empty((), dtype=dtype, device="meta").element_size()


def _count(module: nn.Module) -> tuple[int, int]:
    """(parameter elements, buffer elements) of a module."""
    return sum(p.numel() for p in module.parameters()), sum(b.numel() for b in module.buffers())


def _build_on_meta(path: str, build: Any) -> nn.Module:
    """Run ``build()`` on the meta device; a failure other than a ModelkitError (say, a plugin whose
    unbounded parameter overflows a tensor size) becomes a :class:`SpecError` at ``path``."""
    try:
        with torch.device("meta"), skip_values_on_meta():
            return build()
    except ModelkitError:
        raise
    except (ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecError([SpecIssue(path, f"cannot be built: {reason}")]) from None


def estimate_size(spec: ModelSpec) -> SizeEstimate:
    """The exact size of the model ``spec`` describes, from a meta build of one block (milliseconds)."""
    dims = spec.dims

    def part(kind: str, ref: ComponentSpec, *args: Any, path: str | None = None) -> nn.Module:
        return _build_on_meta(path or kind, lambda: build_component(kind, ref, dims, *args))

    positional = part("positional", spec.positional)
    block = part("block", spec.block, SpecBlockParts(spec, dims))
    final_norm = part("norm", spec.norm)
    (pos_params, pos_buffers), (block_params, block_buffers) = _count(positional), _count(block)
    norm_params, norm_buffers = _count(final_norm)
    if spec.embedding_norm is not None:  # counted with the final norm: the norms outside the blocks
        emb_norm_params, emb_norm_buffers = _count(part("norm", spec.embedding_norm, path="embedding_norm"))
        norm_params, norm_buffers = norm_params + emb_norm_params, norm_buffers + emb_norm_buffers
    table = spec.vocab_size * spec.emb_dim
    head = (0 if spec.tie_embeddings else table) + (spec.vocab_size if spec.head_bias else 0)
    return SizeEstimate(
        tok_emb=table, positional=pos_params, per_block=block_params, n_layers=spec.n_layers, final_norm=norm_params,
        head=head, buffers=pos_buffers + norm_buffers + block_buffers * spec.n_layers,
    )


def check_parameter_limit(spec: ModelSpec, estimate: SizeEstimate, source: str | None = None) -> None:
    """Raise :class:`SpecError` if the model has more than ``MAX_PARAMETERS`` parameters, at the path
    of the field to change: the one behind the largest part (``n_layers``, or ``emb_dim`` when one
    block alone is over the limit; ``vocab_size`` for the token tables; ``context_length`` for the
    positional component). ``source`` names the spec in the message (a file path)."""
    total = estimate.parameters
    if total <= MAX_PARAMETERS:
        return
    blocks = estimate.per_block * estimate.n_layers
    tables = estimate.tok_emb + estimate.head
    parts = {
        "blocks": (blocks, "n_layers" if estimate.per_block <= MAX_PARAMETERS else "emb_dim",
                   f"{spec.n_layers:,} blocks of {estimate.per_block:,}"),
        "tables": (tables, "vocab_size", f"{tables:,} in the token embedding and output head"),
        "positional": (estimate.positional, "context_length", f"{estimate.positional:,} in the positional component"),
    }
    _, path, why = max(parts.values(), key=lambda part: part[0])
    raise SpecError([SpecIssue(path, f"the model would have {total:,} parameters ({why}); the limit is "
                                     f"{MAX_PARAMETERS:,} (MAX_PARAMETERS in modelkit.limits)")], source)


def _meminfo_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, else free physical pages; None if neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What this process's cgroup (v2) still lets it use, in bytes: its limit less what it holds, page
    cache excepted (the kernel reclaims that before refusing memory); None when it sets no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        stat_lines = (root / "memory.stat").read_text().splitlines()
        cache = next((int(line.split()[1]) for line in stat_lines if line.startswith("file ")), 0)
        return max(int(limit) - used + cache, 0)
    except (OSError, ValueError, IndexError):
        return None


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: for the CPU the smaller of MemAvailable and what the
    cgroup allows, for CUDA ``torch.cuda.mem_get_info``; None where unknown (other devices)."""
    if device.type == "cpu":
        known = [n for n in (_meminfo_available(), _cgroup_available()) if n is not None]
        return min(known) if known else None
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.mem_get_info(device)[0]
    return None


def check_memory(estimate: SizeEstimate, device: torch.device, dtype: torch.dtype) -> None:
    """Raise :class:`ModelTooLargeError` if the parameters and buffers in ``dtype`` need more memory
    than ``device`` has free (unknown free memory is not checked)."""
    needed = estimate.nbytes(dtype)
    free = available_memory(device)
    if free is not None and needed > free:
        raise ModelTooLargeError(needed, free, str(device), estimate.parameters, str(dtype).removeprefix("torch."))


def check_model_size(spec: ModelSpec, device: torch.device | None = None,
                     dtype: torch.dtype | None = None) -> SizeEstimate:
    """Size ``spec`` and refuse it before anything is allocated: over ``MAX_PARAMETERS``
    (:class:`SpecError`), or more than ``device`` has free in ``dtype`` (:class:`ModelTooLargeError`;
    never checked on the meta device). ``device``/``dtype`` default to torch's current defaults, which
    are where and how :class:`~modelkit.model.GPTModel` creates its parameters."""
    estimate = estimate_size(spec)
    check_parameter_limit(spec, estimate)
    device = device if device is not None else torch.get_default_device()
    if device.type != "meta":
        check_memory(estimate, device, dtype if dtype is not None else torch.get_default_dtype())
    return estimate
