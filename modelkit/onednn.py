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

import copy
import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["OneDNNLinear", "OneDNNLinearActivation", "StackedLinears", "apply_linears", "fuse_linear_activations_",
           "linears_step", "onednn_applies", "onednn_dtypes", "onednn_linear", "onednn_linear_available",
           "stack_linears", "use_onednn_linear_"]

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
    or under ``MODELKIT_CPU_CAPABILITY=avx2``, only float32 is here (see :mod:`modelkit.cpu`).
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

    def inference_step(self) -> Callable[[Tensor], Tensor] | None:
        """``forward`` for inference (:mod:`modelkit.plan`): the checks on the weight made once, the
        input's dtype and device and the grad mode checked per call (anything else: ``forward``)."""
        w, b = self.weight, self.bias
        if not (w.is_cpu and onednn_linear_available(w.dtype) and (w.is_contiguous() or w.t().is_contiguous())):
            return None
        op, dtype, forward = torch.ops.mkldnn._linear_pointwise, w.dtype, self.forward
        name, algorithm = self.post_op
        grad_enabled = torch.is_grad_enabled

        def step(x: Tensor) -> Tensor:
            if x.dtype is dtype and x.is_cpu and not grad_enabled():
                return op(x, w, b, name, [], algorithm)
            return forward(x)

        return step

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> OneDNNLinear:
        """A OneDNNLinear holding the very same parameters (shared, so tied weights stay tied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        return new


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


def _post_op(activation: nn.Module) -> tuple[str, str] | None:
    """oneDNN's eltwise post-op (name, algorithm) computing ``activation`` exactly, or None."""
    from .components.activation import GELU, GELUExact, ReLU, SiLU

    post_ops: dict[type[nn.Module], tuple[str, str]] = {
        GELU: ("gelu", "tanh"), GELUExact: ("gelu", "none"), ReLU: ("relu", ""), SiLU: ("swish", ""),
    }
    return post_ops.get(type(activation))


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
    it when oneDNN has that activation as a post-op (gelu, gelu_exact, relu, silu): the Linear's
    slot gets a :class:`OneDNNLinearActivation`, the activation's an ``nn.Identity`` (indices and
    state-dict names unchanged). Returns how many pairs were fused. Measured (in-process A/B,
    gpt2-small, 200 greedy tokens): 14.25 -> 13.83 ms per token, the GELU no longer being a
    separate pass over 3072 values."""
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for first, second in itertools.pairwise(names):
            linear, activation = seq._modules[first], seq._modules[second]
            post_op = _post_op(activation) if activation is not None else None
            if type(linear) is OneDNNLinear and post_op is not None:
                new = OneDNNLinearActivation.from_linear(linear)
                new.activation = activation
                new.post_op = post_op
                seq._modules[first], seq._modules[second] = new, nn.Identity()
                fused += 1
    return fused


class StackedLinears:
    """Linear layers that read the same input (an attention's q/k/v projections), stored as one matrix
    so that inference reads all their weights in one matmul.

    Construction moves the layers' weights (and biases, when every layer has one) into one
    ``(sum of out_features, in_features)`` matrix, in the weights' current layout (column-major
    stays column-major), and points each ``Parameter`` at its block: parameter objects, names,
    values and the state dict are unchanged. Calling it with the layers returns their outputs from
    one oneDNN call when that is exact and safe: autograd off, the very same layers (same objects
    and type, no hooks), their parameters still blocks of this matrix and the oneDNN op applicable.
    Compiled code cannot compare data pointers: under ``torch.compile`` that one check is made
    before each call by :class:`StackedLinearsCheck`, the hook ``optimize_for_inference(...,
    compile=True)`` registers (a group used by compiled code without it is not checked). Otherwise
    it returns None and the caller calls the layers one by one (a block of the stacked matrix is
    then computed by ``F.linear``). ``.to()``, :func:`~modelkit.speed.set_weight_layout_` or a
    re-assigned weight move a parameter out of the matrix; the group then lets the matrix go for good. Measured: gpt2-small's weights are read 3-9%
    faster with each attention's q/k/v stacked (``benchmarks/peers.py``, weight-read bound, six
    runs), and decoding is ~0.5-0.8 ms per token faster (in-process A/B, ~17 ms per token).
    """

    def __init__(self, layers: list[nn.Linear]) -> None:
        w0 = layers[0].weight
        if not all(type(m) is OneDNNLinear for m in layers):
            raise ValueError("StackedLinears stacks plain OneDNNLinear layers")
        if any(m.weight.dtype != w0.dtype or m.weight.device != w0.device or m.in_features != layers[0].in_features
               for m in layers):
            raise ValueError("stacked layers need one dtype, device and in_features")
        if len({m.bias is None for m in layers}) > 1:
            raise ValueError("stacked layers need biases in all of them or in none")
        self.sizes = [m.out_features for m in layers]
        total, n_in = sum(self.sizes), layers[0].in_features
        columns = all(m.weight.t().is_contiguous() and not m.weight.is_contiguous() for m in layers)
        with torch.no_grad():
            weight = (torch.empty(n_in, total, dtype=w0.dtype, device=w0.device).t() if columns
                      else torch.empty(total, n_in, dtype=w0.dtype, device=w0.device))
            for m, block in zip(layers, weight.split(self.sizes)):
                block.copy_(m.weight)
                m.weight.data = block
            bias = None
            if all(m.bias is not None for m in layers):
                bias = torch.empty(total, dtype=layers[0].bias.dtype, device=w0.device)
                for m, block in zip(layers, bias.split(self.sizes)):
                    block.copy_(m.bias)
                    m.bias.data = block
        self.layers = list(layers)
        self.weight: Tensor | None = weight
        self.bias = bias
        self._offsets = self._offsets_of(layers)

    def __deepcopy__(self, memo: dict[int, Any]) -> StackedLinears:
        # Parameter.__deepcopy__ clones each parameter on its own, so the copies are no longer blocks
        # of one matrix: stack the copied layers again (a released group stays released).
        layers = [copy.deepcopy(m, memo) for m in self.layers]
        if self.weight is None:
            new = copy.copy(self)
            new.layers = layers
            return new
        return StackedLinears(layers)

    def _offsets_of(self, layers: tuple[nn.Module, ...] | list[nn.Linear]) -> list[tuple[int, int]]:
        """Where each layer's weight and bias start, in bytes from the stacked matrix and bias."""
        assert self.weight is not None
        w0, b0 = self.weight.data_ptr(), self.bias.data_ptr() if self.bias is not None else 0
        return [(m.weight.data_ptr() - w0, m.bias.data_ptr() - b0 if m.bias is not None else 0) for m in layers]

    def check_(self) -> None:
        """Let the matrix go for good if a layer's parameters are no longer blocks of it (``.to()``, a new
        layout, a re-assigned weight): the pointer comparison that compiled code cannot make, run before
        each compiled call by :class:`StackedLinearsCheck`."""
        if self.weight is not None and self._offsets_of(self.layers) != self._offsets:
            self.weight = self.bias = None

    def usable(self, layers: tuple[nn.Module, ...]) -> bool:
        """Whether one matmul may stand for ``layers`` now, whatever the input: the matrix is kept
        (pointers checked, :meth:`check_`), the layers are the stacked ones, plain OneDNNLinear without
        hooks, no global module hooks, no autocast, and the oneDNN op works."""
        self.check_()
        if self.weight is None or len(layers) != len(self.layers):
            return False
        if any(m is not mine for m, mine in zip(layers, self.layers)):
            return False
        if any(type(m) is not OneDNNLinear or m._forward_hooks or m._forward_pre_hooks for m in layers):
            return False
        return not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
                    or torch.is_autocast_enabled("cpu")) and onednn_linear_available(self.weight.dtype)

    def __call__(self, x: Tensor, layers: tuple[nn.Module, ...]) -> list[Tensor] | None:
        """``[layer(x) for layer in layers]`` from one matmul, or None: the caller calls the layers."""
        w = self.weight
        if w is None:
            return None
        if any(m is not mine for m, mine in zip(layers, self.layers)):
            self.weight = self.bias = None  # a layer was replaced: release the matrix
            return None
        # Under torch.compile the pointers were checked before the graph ran (StackedLinearsCheck);
        # everything else here is traced and guarded.
        if not torch.compiler.is_compiling() and self._offsets_of(layers) != self._offsets:
            self.weight = self.bias = None  # moved out of the matrix (.to()): release it
            return None
        if any(type(m) is not OneDNNLinear or m._forward_hooks or m._forward_pre_hooks for m in layers):
            return None
        if (torch.is_grad_enabled() or not onednn_applies(x, w)
                or nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks):
            return None
        return list(onednn_linear(x, w, self.bias).split(self.sizes, dim=-1))


def stack_linears(layers: list[nn.Module]) -> StackedLinears | None:
    """A :class:`StackedLinears` of ``layers`` when every one is a plain :class:`OneDNNLinear` (what
    ``optimize_for_inference`` leaves), else None. For a component's ``stack_linears_()``::

        def stack_linears_(self) -> None:
            self.stacked_qkv = stack_linears([self.W_query, self.W_key, self.W_value])
    """
    if layers and all(type(m) is OneDNNLinear for m in layers):
        return StackedLinears(layers)  # type: ignore[arg-type]
    return None


def apply_linears(stacked: StackedLinears | None, x: Tensor, layers: tuple[nn.Module, ...]) -> list[Tensor]:
    """``[layer(x) for layer in layers]``, from one matmul when ``stacked`` (from :func:`stack_linears`,
    or None) can vouch for it, else by calling the layers (hooks, autograd and all)."""
    out = stacked(x, layers) if stacked is not None else None
    return out if out is not None else [m(x) for m in layers]


def linears_step(stacked: StackedLinears | None, layers: tuple[nn.Module, ...]) -> Callable[[Tensor], Sequence[Tensor]]:
    """:func:`apply_linears` as an inference step (:mod:`modelkit.plan`): ``[layer(x) for layer in
    layers]`` from one matmul when ``stacked`` can vouch for it now (checked once; the input's dtype
    and device and the grad mode per call), else from each layer's step."""
    from .plan import step_of

    steps = [step_of(m) for m in layers]

    def each(x: Tensor) -> list[Tensor]:
        return [step(x) for step in steps]

    if stacked is None or not stacked.usable(layers):
        return each
    op, w, b, sizes = torch.ops.mkldnn._linear_pointwise, stacked.weight, stacked.bias, stacked.sizes
    assert w is not None  # usable() checked it
    dtype, grad_enabled = w.dtype, torch.is_grad_enabled

    def one_matmul(x: Tensor) -> Sequence[Tensor]:
        if x.dtype is dtype and x.is_cpu and not grad_enabled():
            return op(x, w, b, "none", [], "").split(sizes, dim=-1)
        return each(x)

    return one_matmul


def stacked_linears_of(model: nn.Module) -> list[StackedLinears]:
    """Every :class:`StackedLinears` held by a module of ``model`` (as a plain attribute)."""
    return [value for m in model.modules() for value in vars(m).values() if isinstance(value, StackedLinears)]


class StackedLinearsCheck:
    """A forward pre-hook for a model that will run compiled: runs every group's pointer check
    (:meth:`StackedLinears.check_`) eagerly before the compiled code, which cannot make it. A released
    group changes an attribute the compiled code is guarded on, so the next call recompiles without it.
    The hook itself runs outside the compiled code. Measured (gpt2-small, 200 greedy tokens,
    in-process, 6-8 rounds, two runs): compiled decoding 4-7% faster with the stacked matrices."""

    #: :func:`_check_groups` kept out of compiled code (run eagerly). Made by the first instance, not
    #: at class definition: ``torch.compiler.disable`` imports ``torch._dynamo``, which only the
    #: compile path should pay for.
    _check_eagerly: ClassVar[Callable[[list[StackedLinears]], None] | None] = None

    def __init__(self, groups: list[StackedLinears]) -> None:
        self.groups = groups
        if StackedLinearsCheck._check_eagerly is None:
            StackedLinearsCheck._check_eagerly = torch.compiler.disable(_check_groups)

    def __call__(self, module: nn.Module, args: Any) -> None:
        check = StackedLinearsCheck._check_eagerly  # read from the class: a plain function, not a method
        assert check is not None  # set by __init__
        check(self.groups)


def _check_groups(groups: list[StackedLinears]) -> None:
    """Run each group's pointer check (:meth:`StackedLinears.check_`)."""
    for group in groups:
        group.check_()
