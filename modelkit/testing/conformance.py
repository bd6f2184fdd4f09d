"""Conformance checks for components: what a component (built-in or plugin) must satisfy.

Plugin authors run the check on their component once it is registered (installed with its entry
points, or registered with :func:`modelkit.register`)::

    from modelkit.testing import check_component

    def test_my_norm_conforms():
        check_component("norm", "mylab.rmsnorm")                       # raises AssertionError on failure
        check_component("attention", {"type": "mylab.gqa", "num_kv_heads": 2})

:func:`check_component` builds the component at tiny sizes (:func:`tiny_dims`), alone and inside a
tiny model whose spec puts it in its slot (:func:`tiny_spec`), and checks each property in
:data:`CHECKS`:

- ``construct``: the spec validates and the component builds, alone and in a model.
- ``shapes``: forward keeps ``(b, s, emb_dim)`` (positionals: ``embedding`` is ``(s, emb_dim)``,
  ``rotate`` keeps q ``(b, h, s, d)`` and k ``(b, h_kv, s, d)``, ``attention_bias`` broadcasts to
  ``(b, h, s_q, s_k)``), same dtype, finite.
- ``causality``: changing a later token never changes an earlier output (alone and in the model).
- ``eval_determinism``: in eval mode two runs give identical outputs whatever the RNG state.
- ``state_dict_round_trip``: a fresh instance loading the state dict (strictly, through
  ``torch.save``/``torch.load(weights_only=True)``) computes the same outputs.
- ``meta_device``: it builds under ``torch.device("meta")`` with the same state-dict keys and shapes,
  and after ``to_empty()`` + ``load_state_dict()`` computes the same outputs (nothing it needs is
  computed at construction and left out of the state dict).
- ``kv_cache``: a model using it gives the same logits decoding with a KV cache (prefill, a chunk,
  then token by token) as recomputing the whole sequence.
- ``inference_step``: its inference step (:func:`modelkit.runtime.steps.step_of`: the step the runtime
  has registered for its class, else the module itself) computes exactly the same outputs as its
  forward, alone and in a model (with and without the KV cache, before and after
  ``optimize_for_inference``, which stacks the Linear groups registered for it).
- ``positional_hooks`` (attention only): it applies ``ctx.positional.rotate`` to q and k and adds
  ``ctx.positional.attention_bias`` to the scores, with the cache too (checked with a probe
  positional that rotates and biases).

The result is a :class:`ConformanceReport` naming each property that failed and why.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..builder import build_model
from ..components.build import SpecBlockParts, build_component
from ..components.base import LayerContext, ModelDims, NoPositional, Positional
from ..registry import KINDS, get_registry
from ..spec import ComponentSpec, ModelSpec, load_spec

__all__ = [
    "CHECKS", "CheckResult", "ConformanceReport", "ProbePositional", "builtin_components", "check_component",
    "tiny_dims", "tiny_spec",
]

# -- tiny models ----------------------------------------------------------------------------------

_TINY = ModelDims(vocab_size=64, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1,
                  qkv_bias=False)


def tiny_dims(**overrides: Any) -> ModelDims:
    """Small sizes for tests: vocab 64, context 32, emb 32, 4 heads, 2 layers, dropout 0.1 (overridable)."""
    return replace(_TINY, **overrides)


def tiny_spec(kind: str, component: str | Mapping[str, Any], dims: ModelDims | None = None,
              **slots: Any) -> dict[str, Any]:
    """A spec dict of a tiny model with ``component`` in the slot of ``kind``.

    An activation goes into the feed-forward (``mlp``)'s ``activation``; other slots keep their
    defaults unless given in ``slots`` (e.g. ``positional="sinusoidal"``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown component kind '{kind}' (kinds: {', '.join(KINDS)})")
    d = dims or _TINY
    spec: dict[str, Any] = {
        "name": "conformance", "vocab_size": d.vocab_size, "context_length": d.context_length,
        "emb_dim": d.emb_dim, "n_heads": d.n_heads, "n_layers": d.n_layers, "drop_rate": d.drop_rate,
        "qkv_bias": d.qkv_bias, **slots,
    }
    if kind == "activation":
        spec["feedforward"] = {"type": "mlp", "activation": component}
    else:
        spec[kind] = component
    return spec


def builtin_components(kind: str | None = None) -> list[tuple[str, str]]:
    """``(kind, name)`` of every built-in component (of ``kind``, or of every kind); no plugins."""
    kinds = [kind] if kind else list(KINDS)
    return [(k, e.name) for k in kinds for e in get_registry(k).builtins()]


# -- the subject: one component, built alone or in a model -------------------------------------------

@dataclass
class _Subject:
    """The component under test: its resolved reference and how to build and run it."""

    kind: str
    ref: ComponentSpec
    spec: ModelSpec
    batch: int = 2
    seq: int = 8

    @property
    def dims(self) -> ModelDims:
        return self.spec.dims

    def build(self, seed: int = 0) -> nn.Module:
        """A new instance, built as the builder builds it, after ``torch.manual_seed(seed)``."""
        torch.manual_seed(seed)
        extra = (SpecBlockParts(self.spec, self.dims),) if self.kind == "block" else ()
        return build_component(self.kind, self.ref, self.dims, *extra)

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(self.spec).eval()

    def inputs(self, seed: int = 0) -> Tensor:
        """``(batch, seq, emb_dim)`` hidden states (positionals: unused)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, self.seq, self.dims.emb_dim, generator=g)

    def token_ids(self, seed: int = 0, length: int | None = None) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        n = min(length or self.dims.context_length, self.dims.context_length)
        return torch.randint(0, self.dims.vocab_size, (self.batch, n), generator=g)

    def run(self, module: nn.Module, x: Tensor) -> tuple[Tensor | None, ...]:
        """The component's outputs for hidden states ``x`` as a tuple of tensors (or None).

        Runs after ``torch.manual_seed(0)``, so comparing two runs never trips over randomness
        (which only ``eval_determinism`` looks for).
        """
        torch.manual_seed(0)
        return self.run_unseeded(module, x)

    def run_unseeded(self, module: nn.Module, x: Tensor, forward: Callable[..., Tensor] | None = None
                     ) -> tuple[Tensor | None, ...]:
        """Outputs of ``module`` (called through ``forward`` when given: its inference step)."""
        if self.kind == "positional":
            assert isinstance(module, Positional)
            return _positional_outputs(module, self.dims, x)
        call = forward or module
        if self.kind in ("attention", "block"):
            ctx = LayerContext(torch.arange(x.shape[1]), NoPositional())
            return (call(x, ctx),)
        return (call(x),)


def _qk(dims: ModelDims, b: int, s: int, seed: int) -> tuple[Tensor, Tensor]:
    """Queries ``(b, h, s, d)`` and keys with half as many heads (as grouped-query attention has)."""
    g = torch.Generator().manual_seed(seed)
    h_kv = max(1, dims.n_heads // 2)
    return (torch.randn(b, dims.n_heads, s, dims.head_dim, generator=g),
            torch.randn(b, h_kv, s, dims.head_dim, generator=g))


def _positional_outputs(module: Positional, dims: ModelDims, x: Tensor) -> tuple[Tensor | None, ...]:
    """embedding, rotated q, rotated k, and the bias of the last 3 queries over all keys."""
    b, s = x.shape[0], x.shape[1]
    positions = torch.arange(s)
    q, k = _qk(dims, b, s, seed=0)
    q_rot, k_rot = module.rotate(q, k, positions)
    bias = module.attention_bias(positions[-3:], positions)
    return (module.embedding(positions), q_rot, k_rot, bias)


def _same(a: tuple[Tensor | None, ...], b: tuple[Tensor | None, ...], atol: float = 0.0) -> str | None:
    """None if the outputs agree (exactly, or within ``atol``), else a description of the first difference."""
    for i, (x, y) in enumerate(zip(a, b)):
        if (x is None) != (y is None):
            return f"output {i} is None in one run only"
        if x is None or y is None:
            continue
        if x.shape != y.shape:
            return f"output {i} has shape {tuple(x.shape)} vs {tuple(y.shape)}"
        diff = (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
        if not diff <= atol:
            return f"output {i} differs by up to {diff:.3g}"
    return None


# -- the checks ------------------------------------------------------------------------------------
# Each check takes the subject and raises AssertionError saying what is wrong. CHECKS maps a
# property's name to (check, kinds it applies to).

_ALL = frozenset(KINDS)


def _check_shapes(sub: _Subject) -> None:
    module = sub.build().eval()
    x = sub.inputs()
    with torch.no_grad():
        outs = sub.run(module, x)
    if sub.kind == "positional":
        emb, q_rot, k_rot, bias = outs
        b, s, e = x.shape
        q, k = _qk(sub.dims, b, s, 0)
        if emb is not None:
            assert tuple(emb.shape) == (s, e), f"embedding() returned {tuple(emb.shape)}, expected (seq, emb_dim) = {(s, e)}"
        assert q_rot is not None and q_rot.shape == q.shape, f"rotate() changed the query shape {tuple(q.shape)}"
        assert k_rot is not None and k_rot.shape == k.shape, (
            f"rotate() changed the key shape {tuple(k.shape)} (keys may have fewer heads than queries)")
        if bias is not None:
            target = (b, sub.dims.n_heads, 3, s)
            try:
                shape = torch.broadcast_shapes(bias.shape, target)
            except RuntimeError:
                shape = None
            assert shape == target, (
                f"attention_bias() for 3 queries over {s} keys returned {tuple(bias.shape)}, which does not "
                f"broadcast to (b, h, s_q, s_k) = {target}")
        tensors = [t for t in outs if t is not None]
    else:
        (out,) = outs
        assert isinstance(out, Tensor), f"forward returned {type(out).__name__}, expected a Tensor"
        assert out.shape == x.shape, f"forward returned shape {tuple(out.shape)} for input {tuple(x.shape)}"
        assert out.dtype == x.dtype, f"forward returned dtype {out.dtype} for input {x.dtype}"
        tensors = [out]
    for t in tensors:
        assert torch.isfinite(t).all(), "an output holds inf or nan"


def _check_causality(sub: _Subject) -> None:
    t = sub.seq // 2
    if sub.kind != "positional":
        module = sub.build().eval()
        x = sub.inputs()
        x2 = x.clone()
        x2[:, t:] = sub.inputs(seed=1)[:, t:]
        with torch.no_grad():
            (a,), (b,) = sub.run(module, x), sub.run(module, x2)
        assert a is not None and b is not None
        diff = (a[:, :t] - b[:, :t]).abs().max().item()
        assert diff <= 1e-6, (
            f"changing tokens {t}.. changed the outputs of tokens 0..{t - 1} (by up to {diff:.3g}): "
            "the component is not causal")
    model = sub.model()
    ids = sub.token_ids(length=12)
    ids2 = ids.clone()
    ids2[:, t:] = (ids2[:, t:] + 1) % sub.dims.vocab_size
    with torch.no_grad():
        torch.manual_seed(0)
        a = model(ids)
        torch.manual_seed(0)
        diff = (a[:, :t] - model(ids2)[:, :t]).abs().max().item()
    assert diff <= 1e-5, (
        f"in a model using it, changing tokens {t}.. changed the logits of tokens 0..{t - 1} "
        f"(by up to {diff:.3g}): the model is not causal")


def _check_eval_determinism(sub: _Subject) -> None:
    module = sub.build().eval()
    x = sub.inputs()
    with torch.no_grad():
        a = sub.run(module, x)
        torch.manual_seed(1)
        b = sub.run_unseeded(module, x)
    problem = _same(a, b)
    assert problem is None, f"two eval-mode runs on the same input differ ({problem}): randomness in eval mode?"


def _perturbed(module: nn.Module, seed: int) -> nn.Module:
    """``module`` with noise added to every floating tensor of its state dict (so they differ from init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in module.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.1)
    return module


def _check_state_dict_round_trip(sub: _Subject) -> None:
    source = _perturbed(sub.build(seed=0), seed=5).eval()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    try:
        state = torch.load(buffer, weights_only=True)
    except Exception as exc:
        raise AssertionError(f"its state dict does not load with torch.load(weights_only=True): {exc}") from exc
    fresh = sub.build(seed=1)
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise AssertionError(f"a fresh instance does not load its state dict strictly: {exc}") from exc
    fresh.eval()
    x = sub.inputs()
    with torch.no_grad():
        problem = _same(sub.run(source, x), sub.run(fresh, x))
    assert problem is None, (
        f"a fresh instance loaded with its state dict computes different outputs ({problem}): "
        "some state it uses is not in the state dict (a tensor attribute that is not a parameter or "
        "persistent buffer?)")


def _check_meta_device(sub: _Subject) -> None:
    real = _perturbed(sub.build(seed=0), seed=5).eval()
    try:
        with torch.device("meta"):
            meta = sub.build(seed=0)
    except Exception as exc:
        raise AssertionError(f"it cannot be built on the meta device: {type(exc).__name__}: {exc}") from exc
    off_meta = [n for n, t in [*meta.named_parameters(), *meta.named_buffers()] if not t.is_meta]
    assert not off_meta, f"built under torch.device('meta'), these tensors were allocated elsewhere: {off_meta}"
    real_sd, meta_sd = real.state_dict(), meta.state_dict()
    assert list(real_sd) == list(meta_sd), f"state-dict keys differ on meta: {list(meta_sd)} vs {list(real_sd)}"
    for key in real_sd:
        assert real_sd[key].shape == meta_sd[key].shape and real_sd[key].dtype == meta_sd[key].dtype, (
            f"'{key}' is {tuple(meta_sd[key].shape)} {meta_sd[key].dtype} on meta, "
            f"{tuple(real_sd[key].shape)} {real_sd[key].dtype} otherwise")
    meta.to_empty(device="cpu")
    with torch.no_grad():  # what load_state_dict does not fill stays NaN, never stale memory
        for t in [*meta.parameters(), *meta.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    meta.load_state_dict(real_sd)
    meta.eval()
    x = sub.inputs()
    with torch.no_grad():
        problem = _same(sub.run(real, x), sub.run(meta, x))
    assert problem is None, (
        f"built on meta, then to_empty() + load_state_dict(), it computes different outputs ({problem}): "
        "it computes a tensor at construction that is not in its state dict (a non-persistent buffer?); "
        "compute it in forward, or make it persistent")


def _cached_logits(model: nn.Module, ids: Tensor, forward: Callable[..., Tensor] | None = None) -> Tensor:
    """Logits from a KV cache: prefill 5 tokens, then a chunk of 3, then one token at a time (through
    ``forward`` when given: the model's inference step)."""
    cache = model.new_cache()  # type: ignore[operator]
    bounds = [0, 5, 8, *range(9, ids.shape[1] + 1)]
    call = forward or model
    pieces = [call(ids[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache.length == ids.shape[1], f"the cache holds {cache.length} tokens after {ids.shape[1]}"
    return torch.cat(pieces, dim=1)


def _check_kv_cache(sub: _Subject) -> None:
    models = [("", sub.model())]
    if sub.kind == "attention":
        probed = sub.model()
        probed.pos_emb = ProbePositional(sub.dims)
        models.append((" with a positional that rotates q/k and biases scores", probed))
    ids = sub.token_ids(length=14)
    for label, model in models:
        with torch.no_grad():
            full = model(ids)
            cached = _cached_logits(model, ids)
        diff = (full - cached).abs().max().item()
        assert diff <= 1e-4, (
            f"decoding with the KV cache{label} gives logits differing from full recomputation by up to "
            f"{diff:.3g}: does it pass its new keys/values through ctx.cache.update and attend over what "
            "that returns, with positions from ctx.positions?")


class ProbePositional(Positional):
    """A positional that uses both attention hooks, to check an attention applies them.

    ``rotate``: each (i, i + d/2) pair of the token at position p rotated by p·0.3·(i+1) radians;
    ``attention_bias``: −0.2·|i − j|. Not registered; the checks put it into a model directly.
    """

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        self.calls = {"rotate": 0, "attention_bias": 0}

    def rotate(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        self.calls["rotate"] += 1

        def apply(x: Tensor) -> Tensor:
            half = x.shape[-1] // 2
            angle = positions.float()[:, None] * 0.3 * torch.arange(1, half + 1, dtype=torch.float32)
            cos, sin = angle.cos(), angle.sin()
            x1, x2 = x[..., :half], x[..., half:2 * half]
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos, x[..., 2 * half:]), dim=-1)

        return apply(q), apply(k)

    def attention_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        self.calls["attention_bias"] += 1
        return -0.2 * (q_positions[:, None] - k_positions[None, :]).abs().float()


def _check_positional_hooks(sub: _Subject) -> None:
    module = sub.build().eval()
    probe = ProbePositional(sub.dims)
    x = sub.inputs()
    positions = torch.arange(x.shape[1])
    with torch.no_grad():
        plain = module(x, LayerContext(positions, NoPositional()))
        probed = module(x, LayerContext(positions, probe))
    assert probe.calls["rotate"] > 0, "it never calls ctx.positional.rotate(q, k, positions)"
    assert probe.calls["attention_bias"] > 0, "it never calls ctx.positional.attention_bias(...)"
    assert (plain - probed).abs().max().item() > 1e-4, (
        "its output does not change when the positional rotates q/k and biases the scores: "
        "it ignores what the hooks return")


def _seeded(run: Callable[..., Any], *args: Any) -> Any:
    """``run(*args)`` after ``torch.manual_seed(0)``."""
    torch.manual_seed(0)
    return run(*args)


def _check_inference_step(sub: _Subject) -> None:
    from ..runtime.optimize import optimize_for_inference
    from ..runtime.steps import step_of

    if sub.kind != "positional":
        module = _perturbed(sub.build(), seed=1).eval()  # parts that start equal (two norms) differ
        x = sub.inputs()
        step = step_of(module)
        with torch.inference_mode():
            problem = _same(sub.run(module, x), _seeded(sub.run_unseeded, module, x, step))
        assert problem is None, (
            f"alone, its inference step (modelkit.runtime.steps.step_of) differs from its forward ({problem}): "
            "a step registered for its class must compute exactly what forward computes, with the same kernels")
    ids = sub.token_ids(length=14)
    for label, optimize in (("", False), (" after optimize_for_inference", True)):
        model = _perturbed(sub.model(), seed=1)
        if optimize:
            optimize_for_inference(model)
        step = step_of(model)
        with torch.inference_mode():
            # Seeded: randomness in eval mode is eval_determinism's to report.
            problem = (_same((_seeded(model, ids),), (_seeded(step, ids),))
                       or _same((_seeded(_cached_logits, model, ids),), (_seeded(_cached_logits, model, ids, step),)))
        assert problem is None, (
            f"in a model{label}, the model's inference step gives other logits than its forward ({problem}), "
            "with or without the KV cache: its registered step (or a part's) does not compute what forward does")


CHECKS: dict[str, tuple[Callable[[_Subject], None], frozenset[str]]] = {
    "shapes": (_check_shapes, _ALL),
    "causality": (_check_causality, _ALL),
    "eval_determinism": (_check_eval_determinism, _ALL),
    "state_dict_round_trip": (_check_state_dict_round_trip, _ALL),
    "meta_device": (_check_meta_device, _ALL),
    "kv_cache": (_check_kv_cache, _ALL),
    "positional_hooks": (_check_positional_hooks, frozenset({"attention"})),
    "inference_step": (_check_inference_step, _ALL),
}


# -- running -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckResult:
    """One property: its name, whether it held, and what went wrong if not."""

    name: str
    passed: bool
    message: str = ""


@dataclass
class ConformanceReport:
    """The outcome of :func:`check_component` for one component."""

    kind: str
    component: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    @property
    def passed(self) -> list[str]:
        return [r.name for r in self.results if r.passed]

    def __str__(self) -> str:
        bad = self.failures
        head = (f"{self.kind} {self.component}: all {len(self.results)} properties hold" if not bad else
                f"{self.kind} {self.component}: {len(bad)} of {len(self.results)} properties failed")
        lines = [head] + [f"  {'ok  ' if r.passed else 'FAIL'} {r.name}" + (f": {r.message}" if r.message else "")
                          for r in self.results]
        return "\n".join(lines)

    def raise_for_failures(self) -> None:
        """Raise AssertionError listing every failed property (with why), if any failed."""
        if not self.ok:
            raise AssertionError(str(self))


def check_component(
    kind: str,
    component: str | Mapping[str, Any],
    *,
    dims: ModelDims | None = None,
    checks: Iterable[str] | None = None,
    raise_on_failure: bool = True,
) -> ConformanceReport:
    """Check that a registered component conforms to the plugin API (see the module docstring).

    ``component`` is a component reference as in a spec: a name (``"llama.rmsnorm"``) or an object
    with ``type`` and parameters. ``dims`` are the sizes to build it at (default :func:`tiny_dims`);
    ``checks`` selects properties by name (default: every one in :data:`CHECKS` that applies to
    ``kind``). Returns the report; raises ``AssertionError`` naming each failed property unless
    ``raise_on_failure`` is False. An invalid reference fails the ``construct`` property.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown component kind '{kind}' (kinds: {', '.join(KINDS)})")
    selected = list(checks) if checks is not None else [n for n, (_, kinds) in CHECKS.items() if kind in kinds]
    unknown = [n for n in selected if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown conformance checks {unknown} (known: {', '.join(CHECKS)})")
    label = repr(component) if isinstance(component, str) else repr(dict(component))
    report = ConformanceReport(kind, label)
    try:
        spec = load_spec(tiny_spec(kind, component, dims))
        ref = dict(spec.components())["feedforward.activation" if kind == "activation" else kind]
        subject = _Subject(kind, ref, spec)
        subject.build()
        subject.model()
    except Exception as exc:
        report.results.append(CheckResult("construct", False, f"{type(exc).__name__}: {exc}"))
        report.results += [CheckResult(n, False, "not run: it cannot be constructed") for n in selected]
    else:
        report.results.append(CheckResult("construct", True))
        for name in selected:
            check, kinds = CHECKS[name]
            if kind not in kinds:
                continue
            try:
                check(subject)
            except AssertionError as exc:
                report.results.append(CheckResult(name, False, str(exc)))
            except Exception as exc:
                report.results.append(CheckResult(name, False, f"raised {type(exc).__name__}: {exc}"))
            else:
                report.results.append(CheckResult(name, True))
    if raise_on_failure:
        report.raise_for_failures()
    return report
