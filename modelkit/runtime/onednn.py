"""oneDNN matmuls on the CPU: ``nn.Linear`` layers that run on oneDNN's JIT kernels.

PyTorch computes a float32 ``nn.Linear`` on the CPU with MKL's sgemm. MKL does not use its AVX-512
code on AMD processors, while oneDNN (also inside every CPU build of PyTorch) JIT-compiles for the
machine it runs on. Measured on a 2-core AMD EPYC (AVX-512), torch 2.13, twelve 3072x768 fp32
weights (``python benchmarks/linear_kernels.py``): 1 row (a decode step) 6.9 ms with MKL (row-major
weights) or 5.4 ms (column-major), 3.1 ms with oneDNN; 1024 rows (a prefill) 306 ms vs 134-157 ms.
On Intel CPUs both use AVX-512.

:class:`OneDNNLinear` is an ``nn.Linear`` (same parameters, names, ``isinstance`` checks, state
dict) whose forward calls ``torch.ops.mkldnn._linear_pointwise`` for CPU tensors of float32 or
bfloat16 with matching dtypes; when autograd is recording, its backward computes both gradients
with the same op (a gpt2-small training step, 4x256 tokens, in ``benchmarks/peers.py``: 173 -> 257
tokens/s). Other devices, other or mixed dtypes and autocast run ``F.linear``. Under
``torch.compile`` inference calls go through ``torch.ops.modelkit.onednn_linear``, a custom op that
Inductor keeps as an opaque call (its own lowering of the oneDNN op rejects plain weights, and its
fp32 weight packing uses MKL), so a compiled model keeps the oneDNN matmuls and Inductor fuses
everything around them; compiled training takes ``F.linear``. The numbers differ from MKL's only
by summation order (float32: ~1e-6 relative).

The op is a private PyTorch API (it backs Inductor's CPU fusions); :func:`onednn_linear_available`
checks that it exists and computes a linear layer correctly before anything uses it.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .steps import Step, register_step

__all__ = ["OneDNNLinear", "OneDNNLinearActivation", "fuse_linear_activations_", "onednn_applies", "onednn_dtypes",
           "onednn_linear", "onednn_linear_available", "register_post_op", "use_onednn_linear_"]

#: The dtypes whose Linear products the oneDNN op computes correctly on this CPU: set by the probe in
#: :func:`onednn_dtypes` (empty until then, so a layer used before any probe takes ``F.linear``).
_DTYPES: frozenset[torch.dtype] = frozenset()
_CANDIDATES = (torch.float32, torch.bfloat16)


def _products_correct(op: Callable[..., Tensor], dtype: torch.dtype) -> bool:
    """Whether ``op`` computes a layer's three products (forward, and both gradients, with the strided
    operands they use) in ``dtype`` like ``F.linear`` in float32 on bf16-exact inputs."""
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((3, 40), (24, 40), (24,)))
    tol = {"atol": 1e-4, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 0.1, "rtol": 2e-2}
    try:
        with torch.no_grad():  # the three products a layer needs: forward, and both gradients (strided)
            g = (x.float() @ w.float().t()).to(dtype)  # stands for the gradient of the output
            checks = ((op(x, w, b, "none", [], ""), F.linear(x.float(), w.float(), b.float())),
                      (op(g, w.t(), None, "none", [], ""), g.float() @ w.float()),
                      (op(g.t(), x.t(), None, "none", [], ""), g.float().t() @ x.float()))
            return all(out.dtype == dtype and torch.allclose(out.float(), ref, **tol) for out, ref in checks)
    except (RuntimeError, TypeError):  # e.g. "could not create a primitive descriptor": no kernel for this ISA
        return False


@functools.cache
def onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes (of float32 and bfloat16) in which this PyTorch's oneDNN linear op computes a layer's
    forward and gradient products correctly on this CPU (probed once per process, on tiny matrices).

    bfloat16 needs an ISA with oneDNN bf16 kernels (AVX-512, AVX2-VNNI-2 or AMX): on an AVX2 CPU,
    or under ``MODELKIT_CPU_CAPABILITY=avx2``, only float32 is here (see :mod:`modelkit.runtime.cpu`).
    """
    global _DTYPES
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return frozenset()
    _DTYPES = frozenset(dtype for dtype in _CANDIDATES if _products_correct(op, dtype))
    if _DTYPES:
        _register_compiled_op()
    return _DTYPES


def onednn_linear_available(dtype: torch.dtype = torch.float32) -> bool:
    """True when this PyTorch build has the oneDNN linear op and it computes a layer's forward and
    gradient products correctly in ``dtype`` on this CPU (see :func:`onednn_dtypes`)."""
    return dtype in onednn_dtypes()


def _register_compiled_op() -> None:
    """Define ``torch.ops.modelkit.onednn_linear``: the oneDNN op as a custom op, which Inductor calls
    as it is instead of lowering it (see the module docstring). Defined once, on first use, not on import."""
    if not hasattr(torch.ops.modelkit, "onednn_linear"):

        @torch.library.custom_op("modelkit::onednn_linear", mutates_args=(),
                                 schema="(Tensor x, Tensor weight, Tensor? bias, str post_op, str algorithm) -> Tensor")
        def _compiled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, post_op: str, algorithm: str) -> Tensor:
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)

        @_compiled_linear.register_fake
        def _(x: Tensor, weight: Tensor, bias: Tensor | None, post_op: str, algorithm: str) -> Tensor:
            return x.new_empty((*x.shape[:-1], weight.shape[0]))


def onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, post_op: str = "none",
                  algorithm: str = "") -> Tensor:
    """``post_op(x @ weightᵀ + bias)`` computed by oneDNN, without autograd (inference).

    ``post_op`` is a oneDNN eltwise name (``"none"``, ``"gelu"`` with ``algorithm`` ``"tanh"`` or
    ``"none"``, ``"relu"``, ``"swish"``). The caller checks :func:`onednn_applies` and
    :func:`onednn_linear_available` first. Inside ``torch.compile`` it is the custom op
    ``torch.ops.modelkit.onednn_linear``, which Inductor keeps as a call to the same kernel.
    """
    if torch.compiler.is_compiling():
        return torch.ops.modelkit.onednn_linear(x, weight, bias, post_op, algorithm)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, post_op, [], algorithm)


class _LinearFunction(torch.autograd.Function):
    """``x @ wᵀ + b`` with oneDNN forward and backward (gradients are oneDNN matmuls too)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, w = ctx.saved_tensors
        op = torch.ops.mkldnn._linear_pointwise
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # grad @ w, as a linear layer whose weight is wᵀ
            grad_x = op(grad, w.t(), None, "none", [], "")
        grad2 = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:  # gradᵀ @ x
            grad_w = op(grad2.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", [], "")
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad2.sum(0)
        return grad_x, grad_w, grad_b


def onednn_applies(x: Tensor, w: Tensor) -> bool:
    """Whether the oneDNN op may compute ``x @ wᵀ``: CPU tensors of one dtype that the probe found
    oneDNN computing correctly here (:func:`onednn_dtypes`; False before it ran), no autocast (it
    would change the dtype)."""
    return x.is_cpu and x.dtype == w.dtype and x.dtype in _DTYPES and not torch.is_autocast_enabled("cpu")


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` computed by oneDNN on the CPU (see the module docstring)."""

    #: oneDNN's eltwise post-op (name, algorithm) applied in the same call; none for a plain layer.
    post_op: tuple[str, str] = ("none", "")

    def forward(self, x: Tensor) -> Tensor:
        # The hot path of every decode step (37 calls per gpt2-small token), so the checks are
        # written out here rather than in helpers: onednn_applies, then "is autograd recording?".
        w, b = self.weight, self.bias  # each attribute read goes through nn.Module.__getattr__: once
        if (x.is_cpu and x.dtype == w.dtype and x.dtype in _DTYPES and not torch.is_autocast_enabled("cpu")
                and (w.is_contiguous() or w.t().is_contiguous())):  # a block of a wider matrix: F.linear
            if not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad
                                                 or (b is not None and b.requires_grad))):
                name, algorithm = self.post_op
                if torch.compiler.is_compiling():
                    return torch.ops.modelkit.onednn_linear(x, w, b, name, algorithm)
                return torch.ops.mkldnn._linear_pointwise(x, w, b, name, [], algorithm)
            if not torch.compiler.is_compiling():  # compiled training: Inductor differentiates F.linear
                return self._activate(_LinearFunction.apply(x, w, b))
        return self._activate(F.linear(x, w, b))

    def _activate(self, y: Tensor) -> Tensor:
        """The post-op, for the paths that do not fuse it (none here)."""
        return y

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> OneDNNLinear:
        """A OneDNNLinear holding the very same parameters (shared, so tied weights stay tied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        return new


@register_step(OneDNNLinear)
def onednn_linear_step(layer: OneDNNLinear) -> Step | None:
    """``forward`` for inference: the checks on the weight made once, the input's dtype and device and
    the grad mode checked per call (anything else: ``forward``)."""
    w, b = layer.weight, layer.bias
    if not (w.is_cpu and onednn_linear_available(w.dtype) and (w.is_contiguous() or w.t().is_contiguous())):
        return None
    op, dtype, forward = torch.ops.mkldnn._linear_pointwise, w.dtype, layer.forward
    name, algorithm = layer.post_op
    grad_enabled = torch.is_grad_enabled

    def step(x: Tensor) -> Tensor:
        if x.dtype is dtype and x.is_cpu and not grad_enabled():
            return op(x, w, b, name, [], algorithm)
        return forward(x)

    return step


def use_onednn_linear_(model: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` of ``model`` (in place) by a :class:`OneDNNLinear`.

    Parameters are shared, not copied: names, values, ties and the state dict are unchanged.
    Returns how many layers were replaced (0 when the oneDNN op works in no dtype here,
    :func:`onednn_dtypes`). A layer whose dtype oneDNN cannot compute here runs ``F.linear``.
    """
    if not onednn_dtypes():
        return 0
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, OneDNNLinear.from_linear(child))
                replaced += 1
    return replaced


#: oneDNN eltwise post-ops (name, algorithm) that compute an activation class exactly.
_POST_OPS: dict[type[nn.Module], tuple[str, str]] = {}


def register_post_op(cls: type[nn.Module], name: str, algorithm: str = "") -> None:
    """Declare that oneDNN's eltwise post-op ``name`` (with ``algorithm``) computes activations of
    exactly class ``cls``, so :func:`fuse_linear_activations_` may run it inside the Linear before it."""
    _POST_OPS[cls] = (name, algorithm)


class OneDNNLinearActivation(OneDNNLinear):
    """A :class:`OneDNNLinear` and the activation after it, one oneDNN call in inference.

    ``activation`` is kept as a child module (it has no parameters, so the state dict is
    unchanged); training and the F.linear cases compute ``activation(linear(x))`` as before.
    """

    activation: nn.Module

    def _activate(self, y: Tensor) -> Tensor:
        return self.activation(y)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused post-op={self.post_op[0]}"


def fuse_linear_activations_(model: nn.Module) -> int:
    """In every ``nn.Sequential`` of ``model``, fuse a :class:`OneDNNLinear` with the activation after
    it when a post-op computes that activation (:func:`register_post_op`; the built-ins register
    gelu, gelu_exact, relu and silu): the Linear's slot gets a :class:`OneDNNLinearActivation`, the
    activation's an ``nn.Identity`` (indices and state-dict names unchanged), so the activation is
    no separate pass over the hidden values. Returns how many pairs were fused."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            linear, activation = seq._modules[first], seq._modules[second]
            post_op = _POST_OPS.get(type(activation)) if activation is not None else None
            if type(linear) is OneDNNLinear and post_op is not None:
                new = OneDNNLinearActivation.from_linear(linear)
                new.activation = activation
                new.post_op = post_op
                seq._modules[first], seq._modules[second] = new, nn.Identity()
                fused += 1
    return fused
