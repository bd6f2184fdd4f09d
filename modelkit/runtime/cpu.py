"""What this CPU can do, and a way to pretend it can do less.

modelkit's CPU speed options (oneDNN Linear layers, bfloat16, int8 weights, the native decode step)
depend on the instruction sets of the machine: oneDNN, for one, has a bfloat16 inner product only
with AVX-512 (``avx512_core``), AVX2-VNNI-2 or AMX, so an AVX2 laptop or server must run bfloat16
Linear layers another way. Each speed option therefore probes, once per process, whether its kernel
computes correctly here (:func:`modelkit.runtime.onednn.onednn_dtypes`, :func:`modelkit.runtime.quantize.int8_kernel_available`)
and takes PyTorch's own path where it does not. This module names what was detected, for
``modelkit info --device`` and for error messages.

**Forcing a lower capability.** ``MODELKIT_CPU_CAPABILITY=avx2`` (or ``default``, ``avx512``) makes
modelkit behave as on a CPU with at most that instruction set, on any machine: it sets PyTorch's
``ATEN_CPU_CAPABILITY`` and oneDNN's ``ONEDNN_MAX_CPU_ISA`` (unless they are set already) when
``modelkit`` is imported. Both libraries read them once, at their first kernel, so the variable must
be in the environment before anything runs a tensor operation (as it is for the ``modelkit`` CLI and
for pytest). CI runs the speed-option tests a second time under it, so the fallback paths are tested
on every machine.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["CAPABILITIES", "CPUInfo", "apply_forced_capability", "aten_linear_works", "cpu_info",
           "forced_capability_problem", "hardware_flags"]

ENV = "MODELKIT_CPU_CAPABILITY"

#: MODELKIT_CPU_CAPABILITY values -> (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA): ceilings that stand for
#: a CPU without vector extensions, an AVX2 CPU (Haswell to Zen 3: no AVX-512, no AVX2-VNNI) and an
#: AVX-512 CPU without VNNI, BF16 or AMX (Skylake-SP).
CAPABILITIES: dict[str, tuple[str, str]] = {
    "default": ("default", "SSE41"),
    "avx2": ("avx2", "AVX2"),
    "avx512": ("avx512", "AVX512_CORE"),
}

# oneDNN's x86 ISA levels (ONEDNN_MAX_CPU_ISA's names, lower-cased), lowest first, with the
# /proc/cpuinfo flags each needs and the level it extends.
_ONEDNN_ISAS: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("sse41", ("sse4_1",), None),
    ("avx", ("avx",), "sse41"),
    ("avx2", ("avx2", "fma"), "avx"),
    ("avx2_vnni", ("avx_vnni",), "avx2"),
    ("avx2_vnni_2", ("avx_vnni_int8", "avx_ne_convert"), "avx2_vnni"),
    ("avx512_core", ("avx512f", "avx512bw", "avx512vl", "avx512dq"), "avx2"),
    ("avx512_core_vnni", ("avx512_vnni",), "avx512_core"),
    ("avx512_core_bf16", ("avx512_bf16",), "avx512_core_vnni"),
    ("avx512_core_fp16", ("avx512_fp16",), "avx512_core_bf16"),
    ("avx512_core_amx", ("amx_tile", "amx_bf16", "amx_int8"), "avx512_core_bf16"),
)

#: The flags worth showing a user (what decides the kernels), in this order.
SHOWN_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
               "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _forced_value() -> str:
    return os.environ.get(ENV, "").strip().lower()


def forced_capability_problem() -> str | None:
    """Why ``MODELKIT_CPU_CAPABILITY`` is unusable (an unknown value), or None when it is unset or valid."""
    value = _forced_value()
    if value and value not in CAPABILITIES:
        return f"{ENV}={os.environ[ENV]!r} is not one of: {', '.join(CAPABILITIES)}"
    return None


def apply_forced_capability() -> str | None:
    """Translate ``MODELKIT_CPU_CAPABILITY`` into PyTorch's and oneDNN's variables (kept if already set).

    Returns the forced capability, or None. Called when ``modelkit`` is imported, where an unknown
    value is left alone: the CLI refuses it (exit status 2) and so does
    :func:`~modelkit.runtime.optimize.optimize_for_inference` (:class:`~modelkit.errors.SpeedOptionError`).
    """
    value = _forced_value()
    if value not in CAPABILITIES:
        return None
    aten, onednn = CAPABILITIES[value]
    os.environ.setdefault("ATEN_CPU_CAPABILITY", aten)
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", onednn)
    return value


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name: value`` line's value in ``/proc/cpuinfo`` (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def hardware_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none: not Linux)."""
    return frozenset((_cpuinfo_field("flags") or "").split())


def _cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown"


def onednn_isas(flags: frozenset[str]) -> list[str]:
    """The oneDNN ISA levels these CPU flags allow, lowest first (oneDNN's names, lower-cased)."""
    allowed: list[str] = []
    for isa, needs, extends in _ONEDNN_ISAS:
        if (extends is None or extends in allowed) and all(flag in flags for flag in needs):
            allowed.append(isa)
    return allowed


def onednn_isa(flags: frozenset[str], limit: str | None = None) -> str | None:
    """The best oneDNN ISA level the flags allow, at most ``limit`` (an ``ONEDNN_MAX_CPU_ISA`` value;
    ``ALL``, unset or unknown: no cap), or None without x86 flags."""
    order = [isa for isa, _, _ in _ONEDNN_ISAS]
    cap = order.index(limit.lower()) if limit and limit.lower() in order else len(order)
    allowed = [isa for isa in onednn_isas(flags) if order.index(isa) <= cap]
    return allowed[-1] if allowed else None


@dataclass(frozen=True)
class CPUInfo:
    """What modelkit detected: the processor, its flags, what PyTorch and oneDNN run, and the probes."""

    model: str
    machine: str
    threads: int
    flags: frozenset[str] = field(repr=False)
    aten_capability: str
    onednn_isa: str | None
    forced: str | None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def shown_flags(self) -> list[str]:
        return [flag for flag in SHOWN_FLAGS if flag in self.flags]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "machine": self.machine, "threads": self.threads,
                "flags": self.shown_flags, "aten_capability": self.aten_capability,
                "onednn_isa": self.onednn_isa, "forced": self.forced, "env": self.env}


def cpu_info() -> CPUInfo:
    """The processor and the instruction sets PyTorch and oneDNN use here (cheap: no kernel runs).

    ``aten_capability`` is PyTorch's choice (``torch.backends.cpu.get_cpu_capability()``: DEFAULT,
    AVX2, AVX512, ...); ``onednn_isa`` is the best level oneDNN may use, from the CPU's flags capped
    by ``ONEDNN_MAX_CPU_ISA``.
    """
    import torch

    flags = hardware_flags()
    env = {name: os.environ[name] for name in (ENV, "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
           if name in os.environ}
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    forced = _forced_value()
    return CPUInfo(model=_cpu_model(), machine=platform.machine(), threads=torch.get_num_threads(), flags=flags,
                   aten_capability=torch.backends.cpu.get_cpu_capability(),
                   onednn_isa=onednn_isa(flags, limit), forced=forced if forced in CAPABILITIES else None,
                   env=env)


@functools.cache
def aten_linear_works(dtype: torch.dtype) -> bool:
    """Whether PyTorch's own ``F.linear`` computes a small layer in this dtype on this CPU (probed once:
    with a capped ``ONEDNN_MAX_CPU_ISA`` PyTorch may hand a bfloat16 matmul to a oneDNN kernel that
    is not there)."""
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 40, generator=gen).to(dtype), torch.randn(24, 40, generator=gen).to(dtype)
    try:
        out = F.linear(x, w).float()
    except RuntimeError:
        return False
    return bool(torch.allclose(out, x.float() @ w.float().t(), atol=0.1, rtol=2e-2))
