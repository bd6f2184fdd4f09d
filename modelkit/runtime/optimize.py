"""Speed options for inference in one call: dtype, weight layout, int8 weights, torch.compile, threads,
huge pages.

``optimize_for_inference(model, dtype=torch.bfloat16, quantize="int8")`` returns a model ready for
:func:`modelkit.generate`. Only ``dtype`` and ``quantize`` change the numbers (slightly); the weight
layout, threads, huge pages and compile leave them as they are. The figures for gpt2-small on a CPU are in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import functools
import os
from typing import Literal, TypeVar

import torch
from torch import Tensor, nn

from ..errors import SpeedOptionError
from .cpu import aten_linear_works, cpu_info, forced_capability_problem
from .hugepages import advise_huge_pages_, model_tensors
from .onednn import fuse_linear_activations_, onednn_linear_available, use_onednn_linear_
from .stacking import stack_linears_
from .steps import load_runtime_extensions

__all__ = ["DTYPES", "KERNELS", "LAYOUTS", "QUANTIZE", "default_path", "kernel_report", "onednn_trains_faster", "native_build_problem", "optimize_for_inference",
           "parse_dtype", "set_weight_layout_"]

#: dtype names accepted by :func:`parse_dtype` (and the CLI's ``--dtype``).
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                                  "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
#: values of ``quantize`` (and the CLI's ``--quantize``).
QUANTIZE = ("none", "int8")
#: values of ``weight_layout``.
LAYOUTS = ("auto", "rows", "columns")
#: values of ``linear_kernel``.
KERNELS = ("auto", "aten", "onednn")

#: What oneDNN needs for bfloat16 (and float16) Linear kernels, in oneDNN's ISA names.
ONEDNN_BF16_ISAS = "avx512_core, avx2_vnni_2 or AMX"

M = TypeVar("M", bound=nn.Module)


def parse_dtype(name: str) -> torch.dtype:
    """``"bf16"``/``"bfloat16"`` -> ``torch.bfloat16`` etc.; unknown names raise :class:`SpeedOptionError`."""
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise SpeedOptionError(f"unknown dtype '{name}' (known: {', '.join(DTYPES)})") from None


def set_weight_layout_(model: nn.Module, layout: Literal["rows", "columns"]) -> nn.Module:
    """Store every ``nn.Linear`` weight of ``model`` row-major or column-major, in place; return ``model``.

    The weight keeps its shape ``(out, in)``, values, dtype, device, ``Parameter`` object and
    state-dict name; only its strides change (``"columns"``: strides ``(1, out)``, i.e. the
    ``(in, out)`` matrix is contiguous, Hugging Face ``Conv1D``'s layout; ``"rows"``: an ordinary
    contiguous tensor). Batch-1 decoding reads each weight once per token through a ``(1, in) @ W``
    matmul, whose speed depends on this layout; larger matmuls (prefill, training) run at the same
    speed either way. Weights shared with another module (a head tied to the embedding) are left as
    they are. Checkpoints are unaffected (savers write contiguous tensors).
    """
    if layout not in ("rows", "columns"):
        raise SpeedOptionError(f"unknown weight layout '{layout}' (known: rows, columns)")
    shared = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(recurse=False)}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and id(module.weight) not in shared:
                w = module.weight
                if layout == "columns" and not w.t().is_contiguous():
                    w.data = w.t().contiguous().t()
                elif layout == "rows" and not w.is_contiguous():
                    w.data = w.contiguous()
    return model


@functools.cache
def _columns_pay_off() -> bool:
    """Whether column-major float32 weights are the faster layout on this CPU: where oneDNN may use
    AVX-512. Measured with ``python benchmarks/cpu_defaults.py`` (``docs/performance.md``): there,
    column-major decodes gpt2-small 12-20% faster at the same prefill speed; on an AVX2 CPU it decodes
    no faster and prefills 18-23% slower."""
    return (cpu_info().onednn_isa or "").startswith("avx512")


@functools.cache
def onednn_trains_faster() -> bool:
    """Whether ``linear_kernel="auto"`` trains on oneDNN (forward and backward) on this CPU: where
    oneDNN may use AVX-512. Measured with ``python benchmarks/peers.py`` (gpt2-small, 4x256 training
    step; ``benchmarks/RESULTS.md``): 1.39-1.61x PyTorch's kernels on the AVX-512 EPYC, 0.87x on the
    AVX2 EPYC, whose oneDNN backward matmuls are the slower."""
    return onednn_linear_available(torch.float32) and (cpu_info().onednn_isa or "").startswith("avx512")


def _auto_layout(model: nn.Module) -> Literal["rows", "columns"]:
    """``weight_layout="auto"``: column-major for float32 CPU weights where that pays off
    (:func:`_columns_pay_off`), else row-major (bfloat16 column-major is slower everywhere)."""
    weight = next((m.weight for m in model.modules() if isinstance(m, nn.Linear)), None)
    if weight is not None and weight.dtype == torch.float32 and weight.device.type == "cpu" and _columns_pay_off():
        return "columns"
    return "rows"


def default_path() -> str:
    """What ``optimize_for_inference(model)`` (and so ``modelkit generate``) uses on this CPU, in words."""
    kernel = "oneDNN" if onednn_linear_available(torch.float32) else "PyTorch's F.linear"
    layout = "column-major" if _columns_pay_off() else "row-major"
    bf16 = "oneDNN" if onednn_linear_available(torch.bfloat16) else "PyTorch's F.linear (no oneDNN bf16 kernel)"
    trains = "oneDNN" if onednn_trains_faster() else "PyTorch's F.linear"
    return f"float32 Linear layers on {kernel}, weights {layout}; bfloat16 on {bf16}, row-major; training on {trains}"


def _first_linear_weight(model: nn.Module) -> Tensor | None:
    return next((m.weight for m in model.modules() if type(m) is nn.Linear), None)


def _onednn_suits(model: nn.Module) -> bool:
    """Whether ``linear_kernel="auto"`` puts the model's Linear layers on oneDNN: CPU weights in a
    dtype that oneDNN computes correctly on this CPU (bfloat16 needs AVX-512, AVX2-VNNI-2 or AMX)."""
    weight = _first_linear_weight(model)
    return weight is not None and weight.device.type == "cpu" and onednn_linear_available(weight.dtype)


def _onednn_missing(dtype: torch.dtype) -> str:
    """Why oneDNN has no ``dtype`` Linear here, naming the instruction sets (for error messages)."""
    if not onednn_linear_available(torch.float32):
        return "this PyTorch build has no working oneDNN linear op"
    isa = cpu_info().onednn_isa or "unknown"
    return (f"oneDNN has no {str(dtype).removeprefix('torch.')} inner product for this CPU's instruction set, "
            f"{isa} (it needs {ONEDNN_BF16_ISAS})")


def _check_cpu_runs(model: nn.Module, dtype: torch.dtype | None, linear_kernel: str, compile: bool) -> None:
    """Raise :class:`SpeedOptionError`, naming what this CPU lacks, when a chosen option has no kernel
    that works here: no Linear kernel for ``dtype``, no oneDNN one with ``linear_kernel="onednn"``, or
    no Inductor code with ``compile``. A model off the CPU is not this check's business."""
    weight = _first_linear_weight(model)
    if weight is None or weight.device.type != "cpu":
        return
    dtype = dtype or weight.dtype
    name = str(dtype).removeprefix("torch.")
    if dtype != torch.float32 and not (onednn_linear_available(dtype) or aten_linear_works(dtype)):
        raise SpeedOptionError(f"dtype {name}: no Linear kernel works on this CPU: {_onednn_missing(dtype)}, "
                               "and PyTorch's F.linear failed; use float32")
    if linear_kernel == "onednn" and not onednn_linear_available(dtype):
        raise SpeedOptionError(f"linear_kernel='onednn': {_onednn_missing(dtype)}; use linear_kernel='auto'")
    if compile and inductor_cpu_problem() is not None:
        raise SpeedOptionError(f"compile=True: {inductor_cpu_problem()}; use compile=False")


def optimize_for_inference(
    model: M,
    *,
    dtype: torch.dtype | str | None = None,
    quantize: Literal["none", "int8"] | None = None,
    weight_layout: Literal["auto", "rows", "columns"] = "auto",
    linear_kernel: Literal["auto", "aten", "onednn"] = "auto",
    compile: bool = False,
    threads: int | None = None,
    huge_pages: bool = False,
    native: bool = False,
) -> M:
    """Put ``model`` in eval mode and apply the chosen speed options, in place; return the model to use.

    - ``dtype``: cast parameters and buffers (``torch.bfloat16``: half the weight bytes, faster
      prefill where oneDNN has bf16 kernels; logits move by a few 1e-2).
    - ``quantize="int8"``: weight-only int8 Linear layers (:func:`~modelkit.runtime.quantize.quantize_int8_`),
      applied after the cast; fewest bytes per decoded token.
    - ``linear_kernel``: ``"onednn"`` computes Linear layers with oneDNN (:mod:`~modelkit.runtime.onednn`;
      on AMD CPUs MKL does not use AVX-512 and oneDNN does), runs the activation after a Linear in a
      feed-forward ``nn.Sequential`` inside the same call, and stores the Linear layers a component
      reads with one input (the groups registered for its class, :mod:`~modelkit.runtime.stacking`)
      as one matrix, read by one matmul; results differ by summation order only (~1e-6 relative).
      ``"aten"`` keeps ``F.linear``; ``"auto"`` is oneDNN when PyTorch has it and the weights are
      float32 or bfloat16 on the CPU.
    - ``weight_layout``: how Linear weights are stored (see :func:`set_weight_layout_`); ``"auto"``
      picks the faster layout on this CPU (:func:`default_path`). Values are unchanged.
    - ``compile``: wrap in ``torch.compile`` (the returned module is the compiled wrapper; the first
      calls compile, which takes a while). oneDNN Linear layers stay on oneDNN inside the compiled
      code (a custom op Inductor keeps) and Inductor fuses the rest; Linear groups are not stacked,
      since compiled code cannot check that their parameters still live in the stacked matrix.
    - ``threads``: ``torch.set_num_threads(threads)`` (process-wide).
    - ``huge_pages``: move the parameters and buffers to 2 MiB pages where Linux allows
      (:mod:`~modelkit.runtime.hugepages`; in place, values and addresses unchanged): faster decoding,
      for a one-off cost that long runs repay. A no-op elsewhere.
    - ``native``: decode with the native step (:mod:`~modelkit.runtime.native`): ``generate`` runs each
      cached step of the GPT-2 composition as one C++ call (the same kernels, logits equal bit for
      bit). Compiled here on first use (a C++ compiler and ninja: ``pip install 'modelkit[native]'``),
      then cached by PyTorch. Raises :class:`~modelkit.runtime.native.NativeBuildError` when it cannot
      be built, :class:`~modelkit.runtime.native.NativeUnsupportedError` when the model is not that
      composition (the message says which part). The choice is held by the runtime
      (:mod:`~modelkit.runtime.decode`), not stored on the model.

    ``docs/performance.md`` has what each option is worth on gpt2-small and the commands that measure it.

    Invalid options (an unknown name, ``threads < 1``, ``native`` with ``compile``) and options this
    CPU cannot run raise :class:`~modelkit.errors.SpeedOptionError` (a ``ValueError``) before the
    model is touched.

    The weights' state-dict names are kept unless ``quantize`` is set (see :mod:`modelkit.runtime.quantize`).
    Forward hooks registered on Linear layers are not carried over to the replaced layers.
    """
    problem = forced_capability_problem()
    if problem is not None:
        raise SpeedOptionError(problem)
    if threads is not None:
        if threads < 1:
            raise SpeedOptionError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    if quantize not in (None, *QUANTIZE):
        raise SpeedOptionError(f"unknown quantize '{quantize}' (known: {', '.join(QUANTIZE)})")
    if linear_kernel not in KERNELS:
        raise SpeedOptionError(f"unknown linear_kernel '{linear_kernel}' (known: {', '.join(KERNELS)})")
    if weight_layout not in LAYOUTS:
        raise SpeedOptionError(f"unknown weight_layout '{weight_layout}' (known: {', '.join(LAYOUTS)})")
    if native and compile:
        raise SpeedOptionError("native=True and compile=True exclude each other: the native step replaces the "
                               "Python that compile would trace")
    if dtype is not None and not dtype.is_floating_point:
        raise SpeedOptionError(f"dtype must be a floating point dtype, got {dtype}")
    _check_cpu_runs(model, dtype, linear_kernel, compile)  # before the model is touched
    load_runtime_extensions()  # the post-ops and Linear groups registered for the model's components
    model.eval()
    if dtype is not None:
        model.to(dtype)
    if quantize == "int8":  # int8 layers keep their own layout
        from .quantize import quantize_int8_

        quantize_int8_(model)
    if linear_kernel == "onednn" or (linear_kernel == "auto" and _onednn_suits(model)):
        use_onednn_linear_(model)
        fuse_linear_activations_(model)
    set_weight_layout_(model, _auto_layout(model) if weight_layout == "auto" else weight_layout)
    if not compile:  # compiled code cannot check the stacked matrix's addresses: layers stay apart
        stack_linears_(model)
    if huge_pages:
        advise_huge_pages_(model_tensors(model))
    if native:
        _prepare_native(model)
    if compile:
        return torch.compile(model)  # type: ignore[return-value]  # an OptimizedModule wrapping model
    return model


def _prepare_native(model: nn.Module) -> None:
    """Check that ``model`` is the native step's composition, build (or load) the extension, check its
    logits against the Python steps, and choose it as the model's decoder."""
    from .decode import choose_native_decoder
    from .native import NativeUnsupportedError, native_extension, native_unsupported_reason, verify_native_step

    reason = native_unsupported_reason(model)
    if reason is not None:
        raise NativeUnsupportedError(f"native=True: the native decode step implements GPT-2's composition on "
                                     f"oneDNN in float32, and {reason}")
    native_extension()  # compile now (or load the cached build), not in the first generate call
    verify_native_step(model)  # same logits as the Python steps, bit for bit, or an error now
    choose_native_decoder(model)


@functools.cache
def inductor_cpu_problem() -> str | None:
    """Why ``torch.compile`` cannot compile a model for this CPU, or None. PyTorch's Inductor writes C++
    for the CPU's vector instruction set; without one (a CPU below AVX2, or
    ``MODELKIT_CPU_CAPABILITY=default``) its scalar code for the norms' reductions does not compile
    (torch 2.13: "'at::vec' has not been declared"). Checked once per process, on first use."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:  # another PyTorch: let compile speak for itself
        return None
    if not pick_vec_isa():
        return (f"PyTorch's Inductor has no vector instruction set for this CPU (PyTorch kernels: "
                f"{torch.backends.cpu.get_cpu_capability()}), and its scalar C++ for GPT blocks does not compile")
    return _mixed_isa_caps()


def _mixed_isa_caps() -> str | None:
    """Why compiled code is unsafe when ``ONEDNN_MAX_CPU_ISA`` caps oneDNN below AVX-512 while PyTorch's
    kernels (and Inductor's code) use it: with torch 2.13 on an AVX-512 EPYC that mix corrupted the heap
    in compiled inference (``malloc(): unaligned tcache chunk detected``), where capping both, with
    ``MODELKIT_CPU_CAPABILITY=avx2``, ran correctly."""
    aten = torch.backends.cpu.get_cpu_capability()
    onednn = cpu_info().onednn_isa or ""
    if aten.startswith("AVX512") and os.environ.get("ONEDNN_MAX_CPU_ISA") and not onednn.startswith("avx512"):
        return (f"ONEDNN_MAX_CPU_ISA caps oneDNN at {onednn or 'none'} while PyTorch's kernels use {aten}; "
                "compiled code corrupts memory with that mix: cap both with MODELKIT_CPU_CAPABILITY=avx2")
    return None


def native_build_problem() -> str | None:
    """Why the native decode step could not be built here (no oneDNN, no ninja, no C++ compiler), or
    None when it can be (cheap: nothing is compiled)."""
    import shutil

    if not onednn_linear_available(torch.float32):
        return "it runs oneDNN float32 kernels, and this PyTorch build has no working oneDNN linear op"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install 'modelkit[native]')"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) on PATH"
    return None


def kernel_report() -> list[tuple[str, str]]:
    """Which kernel each CPU speed option uses on this machine, as (option, kernel and why) rows, for
    ``modelkit info --device``. Runs the once-per-process kernel probes (a few milliseconds)."""
    from .quantize import SMALL_BATCH, int8_kernel_available

    fp32 = onednn_linear_available(torch.float32)
    rows = [("float32 Linear", "oneDNN (linear_kernel=auto)" if fp32 else "PyTorch F.linear: no working oneDNN linear op")]
    if onednn_linear_available(torch.bfloat16):
        bf16 = "oneDNN (linear_kernel=auto)"
    elif aten_linear_works(torch.bfloat16):
        bf16 = f"PyTorch F.linear (slower than float32): {_onednn_missing(torch.bfloat16)}"
    else:
        bf16 = f"none: {_onednn_missing(torch.bfloat16)}, and PyTorch's F.linear fails (--dtype bfloat16 exits 2)"
    rows.append(("bfloat16 Linear (--dtype)", bf16))
    int8 = (f"aten._weight_int8pack_mm up to {SMALL_BATCH} rows, dequantised float matmul above"
            if int8_kernel_available() else "dequantised float matmul: aten._weight_int8pack_mm does not work here")
    rows.append(("int8 Linear (--quantize)", int8))
    problem = native_build_problem()
    rows.append(("native decode step (--native)", f"unavailable: {problem}" if problem else
                 "available (float32, GPT-2's composition on oneDNN; compiled on first use, then cached)"))
    rows.append(("training Linear (train --linear-kernel auto)", "oneDNN forward and backward" if onednn_trains_faster()
                 else "PyTorch F.linear (oneDNN's backward is slower without AVX-512)"))
    rows.append(("weight layout (auto)", "columns for float32 CPU weights, rows otherwise" if _columns_pay_off()
                 else "rows (columns decode no faster and prefill slower without AVX-512)"))
    return rows
