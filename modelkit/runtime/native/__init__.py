"""The native decode step: GPT-2's cached forward pass in C++, for ``optimize_for_inference(native=True)``.

A decode step streams every weight once (494 MB for gpt2-small), which evicts the caches in every
layer; the Python between the kernels (the inference steps of :mod:`modelkit.runtime.steps`) then runs with
cold caches too. ``python benchmarks/decode_breakdown.py`` measures it: besides its matmuls, which
read the weights as fast as the weight-read bound's, a gpt2-small token takes ~1.7 ms, ~1.2 ms of
it because of the cold caches, where 90% of the bound leaves ~0.9 ms.

:func:`native_step` returns the model's forward as one C++ call per token
(``decode_step.cpp`` beside this module) when the model is exactly the composition it implements:

- learned positions (offset 0), pre-norm blocks, LayerNorm norms, multi-head attention with the ``sdpa``
  backend and its q/k/v stacked into one matrix, the MLP feed-forward with its activation fused
  into the first matmul, a final LayerNorm and the head, all on oneDNN (what ``optimize_for_inference``
  makes of the GPT-2 specs);
- float32 weights on the CPU, eval mode, no hooks, no autocast.

It calls the same kernels as the Python steps with the same arguments in the same order, so the
logits are equal bit for bit (the tests compare them). Any other model, and any call it does not
cover (no cache, all logits, a multi-token input after cached tokens, autograd on), takes the
Python steps, so the option never changes what a model computes.

The extension is compiled on first use with PyTorch's ``torch.utils.cpp_extension`` (a C++ compiler
and ``ninja`` are needed: ``pip install 'modelkit[native]'``) and cached in PyTorch's extensions
folder (``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), so later processes load it
in well under a second. Configs never trigger it: it is the same source, shipped with the package.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import ModelkitError, SpeedOptionError
from ..steps import Step, global_hooks, has_hooks, identity_step, step_of

__all__ = ["NativeBuildError", "NativeUnsupportedError", "native_extension", "native_step", "native_unsupported_reason",
           "verify_native_step"]

SOURCE = Path(__file__).parent / "decode_step.cpp"


class NativeBuildError(ModelkitError, RuntimeError):
    """The native decode step could not be compiled or loaded here (no compiler, no ninja, ...)."""


class NativeUnsupportedError(SpeedOptionError):
    """``native=True`` for a model that is not the composition the native step implements; the
    message names the part that differs."""


@functools.cache
def native_extension() -> ModuleType:
    """The compiled extension, built on first call (tens of seconds) or loaded from PyTorch's cache.

    Raises :class:`NativeBuildError` with the reason when it cannot be built here.
    """
    try:
        from torch.utils.cpp_extension import load, verify_ninja_availability

        verify_ninja_availability()
    except (ImportError, RuntimeError) as exc:
        raise NativeBuildError(
            f"the native decode step is compiled on first use and needs ninja: pip install 'modelkit[native]' ({exc})"
        ) from None
    try:
        return load(name="modelkit_native_decode", sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False)
    except (OSError, RuntimeError, ImportError) as exc:
        message = str(exc).strip().splitlines()
        raise NativeBuildError(
            "could not compile the native decode step (a C++ compiler such as g++ is needed): "
            + (message[-1] if message else type(exc).__name__)
        ) from None


def _layout(model: nn.Module) -> tuple[list[Tensor | None], list[float], int, str, str] | str:
    """The tensors and settings :func:`native_step` passes to C++, or why ``model`` is not the
    composition it implements."""
    from ...components.attention import MultiHeadAttention
    from ...components.block import PreNormBlock
    from ...components.feedforward import MLP
    from ...components.kernels import sdpa_attention
    from ...components.norm import LayerNorm
    from ...components.positional import LearnedPositional
    from ...model import GPTModel
    from ...spec import model_level_features
    from ..onednn import OneDNNLinear, OneDNNLinearActivation, onednn_linear_available
    from ..stacking import StackedLinear

    if type(model) is not GPTModel:
        return f"not a GPTModel ({type(model).__name__})"
    beyond = model_level_features(model.spec)
    if beyond:
        return f"the spec sets {', '.join(beyond)} (the native step is GPT-2's composition)"
    if model.training:
        return "the model is in training mode"
    if not onednn_linear_available():
        return "this PyTorch has no oneDNN linear op"
    hooked = next((name or "the model" for name, m in model.named_modules() if has_hooks(m)), None)
    if hooked is not None:
        return f"{hooked} has hooks"
    if type(model.pos_emb) is not LearnedPositional:
        return f"positional is {type(model.pos_emb).__name__}, not learned"
    if model.pos_emb.offset:
        return f"learned positions have offset {model.pos_emb.offset} (the native step reads rows from 0)"
    emb = model.tok_emb
    if type(emb) is not nn.Embedding or emb.max_norm is not None:
        return "the token embedding is not a plain nn.Embedding"
    if step_of(model.drop_emb) is not identity_step:
        return "embedding dropout is active"

    def linear(m: nn.Module, where: str, post: bool = False) -> str | None:
        if type(m) is not (OneDNNLinearActivation if post else OneDNNLinear):
            return f"{where} is not a {'fused ' if post else ''}oneDNN Linear (optimize_for_inference)"
        w = m.weight
        if w.dtype != torch.float32 or not w.is_cpu or not (w.is_contiguous() or w.t().is_contiguous()):
            return f"{where}'s weight is not a float32 CPU matrix"
        return None

    def norm(m: nn.Module, where: str) -> str | None:
        return None if type(m) is LayerNorm and m.scale.dtype == torch.float32 else f"{where} is not a float32 LayerNorm"

    params: list[Tensor | None] = []
    eps: list[float] = []
    posts: set[tuple[str, str]] = set()
    heads = 0
    for i, block in enumerate(model.trf_blocks):
        where = f"trf_blocks.{i}"
        if type(block) is not PreNormBlock:
            return f"{where} is {type(block).__name__}, not pre_norm"
        if step_of(block.drop_shortcut) is not identity_step:
            return f"{where}'s shortcut dropout is active"
        att, ff = block.att, block.ff
        if type(att) is not MultiHeadAttention or att.kernel is not sdpa_attention:
            return f"{where}.att is not mha with the sdpa backend"
        layers = [att.W_query, att.W_key, att.W_value]
        stacked = att.W_query.group if type(att.W_query) is StackedLinear else None
        if (stacked is None or stacked.members != layers or not stacked.usable() or stacked.sizes != [att.d_out] * 3
                or any(has_hooks(m) for m in layers)):
            return f"{where}.att's q/k/v are not stacked into one matrix (optimize_for_inference)"
        if type(ff) is not MLP or len(ff.layers) != 3 or type(ff.layers[1]) is not nn.Identity:
            return f"{where}.ff is not an MLP with its activation fused (optimize_for_inference)"
        reason = (norm(block.norm1, f"{where}.norm1") or norm(block.norm2, f"{where}.norm2")
                  or linear(att.out_proj, f"{where}.att.out_proj") or linear(ff.layers[0], f"{where}.ff.layers.0", True)
                  or linear(ff.layers[2], f"{where}.ff.layers.2"))
        if reason:
            return reason
        if stacked.weight is None or stacked.weight.dtype != torch.float32:
            return f"{where}.att's stacked matrix is not float32"
        posts.add(ff.layers[0].post_op)
        heads = att.num_heads
        params += [block.norm1.scale, block.norm1.shift, stacked.weight, stacked.bias, att.out_proj.weight,
                   att.out_proj.bias, block.norm2.scale, block.norm2.shift, ff.layers[0].weight, ff.layers[0].bias,
                   ff.layers[2].weight, ff.layers[2].bias]
        eps += [block.norm1.eps, block.norm2.eps]
    if len(posts) != 1:
        return "the feed-forward activations differ between blocks"
    reason = norm(model.final_norm, "final_norm") or linear(model.out_head, "out_head")
    if reason:
        return reason
    params += [model.final_norm.scale, model.final_norm.shift, model.out_head.weight, model.out_head.bias,
               emb.weight, model.pos_emb.weight]
    eps.append(model.final_norm.eps)
    post, algorithm = posts.pop()
    return [p.detach() if p is not None else None for p in params], eps, heads, post, algorithm


def native_unsupported_reason(model: nn.Module) -> str | None:
    """None when :func:`native_step` can run ``model`` natively, else why not (for error messages)."""
    found = _layout(model)
    return found if isinstance(found, str) else None


def native_step(model: nn.Module) -> Step | None:
    """``model``'s forward for :func:`modelkit.generate` as one C++ call per cached step, or None when
    the model is not the composition the native step implements (see the module docstring).

    Same arguments and logits as the model; calls the C++ step cannot take (no cache, ``last_only``
    False, several new tokens after cached ones, autograd on, a full cache) go to the Python steps.
    Like any step, valid for the model as it is now. Builds the extension if needed
    (:class:`NativeBuildError` when that fails).
    """
    if global_hooks() or torch.is_autocast_enabled("cpu"):
        return None
    found = _layout(model)
    if isinstance(found, str):
        return None
    params, eps, heads, post, algorithm = found
    decoder = native_extension().GPT2Decoder(params, eps, heads, post, algorithm)
    python_step: list[Callable[..., Tensor]] = []  # the Python steps, built when a call first needs them
    n_layers, head_dim = len(eps) // 2, params[-1].shape[1] // heads  # eps: two norms per layer, then one
    bound: list[Any] = [None, None]  # the cache whose storage the decoder holds, and its first key storage

    def step(in_idx: Tensor, *, cache: Any = None, last_only: bool = False) -> Tensor:
        b, s = in_idx.shape
        if (cache is None or not last_only or (s > 1 and cache.length > 0) or torch.is_grad_enabled()
                or cache.length + s > cache.max_length or len(cache.layers) != n_layers):
            if cache is None and bound[0] is not None:  # generate dropped its cache: let its storage go
                decoder.set_cache([], [])
                bound[:] = [None, None]
            if not python_step:
                python_step.append(step_of(model))
            return python_step[0](in_idx, cache=cache, last_only=last_only)
        first = cache.layers[0].k
        if cache is not bound[0] or first is not bound[1] or first.shape[0] != b:
            probe = params[-1].new_empty(b, heads, 0, head_dim)  # shaped like the new keys and values
            stores = [layer.storage(probe, probe) for layer in cache.layers]
            decoder.set_cache([k for k, _ in stores], [v for _, v in stores])
            bound[:] = [cache, stores[0][0]]
        logits = decoder.step(in_idx, cache.length)
        cache.advance(s)
        return logits

    return step


def verify_native_step(model: nn.Module) -> None:
    """Run a 2-token prompt and one cached token through the native step and the Python steps and
    require equal logits, bit for bit; raises :class:`NativeBuildError` otherwise (a build whose
    kernels differ from this PyTorch's, which would be a bug to report). Costs two small forward
    passes; ``optimize_for_inference(native=True)`` calls it once."""
    native = native_step(model)
    if native is None:
        raise NativeUnsupportedError(f"the native decode step cannot run this model: "
                                     f"{native_unsupported_reason(model)}")
    python = step_of(model)
    vocab = model.spec.vocab_size  # type: ignore[union-attr]  # a GPTModel (native_step checked)
    prompt = torch.tensor([[0, vocab - 1]])
    with torch.inference_mode():
        caches = model.new_cache(), model.new_cache()  # type: ignore[operator]
        pairs = [(native(prompt, cache=caches[0], last_only=True), python(prompt, cache=caches[1], last_only=True))]
        token = torch.tensor([[vocab // 2]])
        pairs.append((native(token, cache=caches[0], last_only=True), python(token, cache=caches[1], last_only=True)))
    if not all(torch.equal(a, b) for a, b in pairs):
        diff = max(float((a - b).abs().max()) for a, b in pairs)
        raise NativeBuildError(f"the native decode step's logits differ from the Python steps' (max |diff| {diff:.3g}); "
                               "use the model without native=True and report this")
