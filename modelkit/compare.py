"""Comparing model variants: size, analytic FLOPs, measured speed, training loss and gradient norms.

:func:`compare` returns one :class:`VariantReport` per spec; ``modelkit compare`` prints them as a
table. Everything goes through the registry, so plugin components compare like built-in ones.

FLOPs per token (forward pass), analytic::

    F = 2 · N_matmul + 4 · n_layers · n_ctx · d_attn

``N_matmul`` is the number of weights in every ``nn.Linear`` of the model, the output head included
(tied or not): each weight is one multiply and one add per token. ``4 · n_layers · n_ctx · d_attn``
is attention at full context: ``q·kᵀ`` and the weighted sum of ``v``, ``2 · n_ctx · d_attn`` each per
layer, where ``d_attn = n_heads · head_dim`` (``emb_dim`` unless the spec gives ``head_dim``). This is Kaplan et al. 2020 (Table 1: ``C_forward ≈ 2N + 2 n_layer n_ctx d_attn``) with two
differences, as in Hoffmann et al. 2022 (Chinchilla, appendix F): the output head is counted (it
dominates small models) and both attention matmuls are counted. Not counted: embeddings lookups,
biases, norms, activations, softmax. No causal discount (every token is charged the full context).
A training step costs about 3 F per token (forward + backward).

Speed (forward and KV-cache decode tokens/s) is timed after :func:`~modelkit.runtime.optimize_for_inference`,
the way ``modelkit generate`` runs a model; gradient norms are taken on the model as built, before.

Overrides shrink or change every spec alike: a top-level field (``n_layers=2``) or a slot
(``block=post_norm``) applies to every spec; a component parameter (``attention.num_kv_heads=2``,
``feedforward.activation=relu``, ``positional.theta=10000``) applies to each spec whose part declares
that parameter and is reported as not applied to the others (GPT-2's ``mha`` has no ``num_kv_heads``,
Llama's ``llama.swiglu`` no ``activation``); one that no spec's part declares is an error.

Specs of different vocabularies: every figure is each model's own (the embedding and head grow with
the vocabulary), so the report adds the parameters without embeddings (token and position tables)
and without an untied head, the figure that compares architectures (Kaplan et al.'s N). Trained or
gradient-norm variants all read the same GPT-2 tokens of the same text (one stream of targets, so
the losses are nats per GPT-2 token for all); a spec whose vocabulary cannot hold those tokens is
refused before anything trains.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .builder import build_model
from .components.base import FeedForward
from .errors import ModelkitError
from .introspect import count_parameters
from .registry import get_registry
from .spec import SLOT_DEFAULTS, ComponentSpec, ModelSpec, load_spec
from .runtime.optimize import optimize_for_inference


class CompareError(ModelkitError, ValueError):
    """A comparison cannot run as asked (bad override, nothing to compare, no feed-forward found...)."""


@dataclass
class VariantReport:
    """The figures for one variant; measured ones are None when not measured."""

    name: str
    source: str
    parameters: int
    parameters_without_head: int
    parameters_without_embeddings: int
    memory_fp32_mb: float
    memory_bf16_mb: float
    flops_per_token: int
    forward_tokens_per_s: float | None = None
    decode_tokens_per_s: float | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    grad_norms: list[float] | None = None
    overrides_not_applied: list[str] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def grad_norm_ratio(self) -> float | None:
        """Gradient norm of the last layer's feed-forward output weight over the first's."""
        if not self.grad_norms:
            return None
        return self.grad_norms[-1] / self.grad_norms[0] if self.grad_norms[0] else math.inf

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("metrics")
        data["grad_norm_ratio_last_first"] = self.grad_norm_ratio
        return data


@dataclass
class CompareOptions:
    """How to measure. ``seq_len`` None: ``min(context_length, 256)``."""

    speed: bool = True
    seq_len: int | None = None
    batch_size: int = 1
    prompt_len: int = 16
    decode_tokens: int = 64
    repeats: int = 5
    warmup: int = 2
    device: str = "auto"
    seed: int = 123
    grad_norms: bool = False
    grad_batch: int = 8
    train_steps: int | None = None
    train_text: str | None = None
    train_batch_size: int = 4
    train_lr: float = 4e-4
    eval_every: int | None = None
    out_dir: str | None = None


# -- overrides ------------------------------------------------------------------------------------

def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)``; the value is JSON if it parses (``6``, ``true``), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise CompareError(f"an override is key=value (e.g. n_layers=6 or attention.backend=eager), got '{text}'")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    except RecursionError:
        raise CompareError(f"override '{key.strip()}': the value nests too deep to be a spec value") from None
    return key.strip(), value


def apply_overrides(spec: ModelSpec, overrides: Mapping[str, Any]) -> ModelSpec:
    """``spec`` with fields replaced: ``n_layers``, or a component parameter by path (``norm.eps``).

    Setting a slot (``block=post_norm``) replaces the component. The result is validated again, so a
    bad override raises :class:`~modelkit.SpecError` naming the field.
    """
    data = spec.to_dict()
    for key, value in overrides.items():
        _set(data, key, value)
    return load_spec(data)


def _set(data: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of spec data to ``value`` (a slot named by a string becomes ``{"type": ...}``)."""
    parts = key.split(".")
    target: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(target.get(part), str):
            target[part] = {"type": target[part]}
        if not isinstance(target.get(part), dict):
            raise CompareError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is not a component")
        target = target[part]
    target[parts[-1]] = value


def declares(data: Mapping[str, Any], key: str) -> bool:
    """Whether the spec ``data`` has what the override ``key`` names: always for a top-level field or a
    slot (validation refuses an unknown one); for ``slot.param`` (or ``slot.sub.param``, through a
    nested component such as the feed-forward's activation) whether that component declares it."""
    parts = key.split(".")
    if parts[0] not in SLOT_DEFAULTS:
        return True
    ref, kind = data.get(parts[0]), parts[0]
    for i, part in enumerate(parts[1:], start=1):
        name = ref if isinstance(ref, str) else ref.get("type") if isinstance(ref, Mapping) else None
        try:
            entry = get_registry(kind).get(name) if isinstance(name, str) else None
        except ModelkitError:  # an unknown part: load_spec names it
            entry = None
        if entry is None:
            return True
        if part not in entry.params_model.model_fields:
            return False
        if i == len(parts) - 1 or part not in entry.sub_components:
            return True
        kind, ref = entry.sub_components[part], ref.get(part) if isinstance(ref, Mapping) else None
    return True


def apply_overrides_where_declared(specs: Sequence[ModelSpec], overrides: Mapping[str, Any],
                                   labels: Sequence[str]) -> tuple[list[ModelSpec], list[list[str]]]:
    """Each spec with the overrides it declares (see :func:`declares`; in order, validated once at the
    end), and for each the override keys it does not. Raises :class:`CompareError` for an override
    that no spec declares."""
    changed, skipped = [], []
    for spec in specs:
        data, not_applied = spec.to_dict(), []
        for key, value in overrides.items():
            if declares(data, key):
                _set(data, key, value)
            else:
                not_applied.append(key)
        changed.append(load_spec(data))
        skipped.append(not_applied)
    for key in overrides:
        if all(key in keys for keys in skipped):
            slot = key.split(".")[0]
            parts = ", ".join(f"{label} has {slot} '{getattr(spec, slot).type}'" for label, spec in zip(labels, specs))
            raise CompareError(f"override '{key}': no spec's part declares it ({parts}); "
                               "`modelkit components` lists each part's parameters")
    return changed, skipped


# -- analytic figures -----------------------------------------------------------------------------

def parameters_without_embeddings(model: nn.Module) -> int:
    """Parameters less the token and position tables and an untied output head (Kaplan's N)."""
    tables = [getattr(model, name, None) for name in ("tok_emb", "pos_emb")]
    count = count_parameters(model)
    return count.without_head - sum(p.numel() for t in tables if t is not None for p in t.parameters())


def matmul_weights(model: nn.Module) -> int:
    """Weights of every ``nn.Linear`` (a tied head counts: its matmul still runs)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def flops_per_token(spec: ModelSpec, model: nn.Module | None = None, n_ctx: int | None = None) -> int:
    """Forward FLOPs per token at context ``n_ctx`` (default the spec's): see the module docstring."""
    model = model if model is not None else build_model(spec, device="meta")
    n_ctx = n_ctx or spec.context_length
    return 2 * matmul_weights(model) + 4 * spec.n_layers * n_ctx * spec.dims.attention_dim


# -- measurements ---------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Any, repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.inference_mode()
def measure_forward(model: nn.Module, seq_len: int, batch_size: int = 1, repeats: int = 5, warmup: int = 2,
                    seed: int = 0) -> float:
    """Forward tokens/s: ``batch_size × seq_len`` random tokens, median of ``repeats`` timed passes."""
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.spec.vocab_size, (batch_size, seq_len), generator=g).to(device)  # type: ignore[union-attr]
    model.eval()
    seconds = _median_time(lambda: model(ids), repeats, warmup, device)
    return batch_size * seq_len / seconds


@torch.inference_mode()
def measure_decode(model: nn.Module, prompt_len: int = 16, new_tokens: int = 64, repeats: int = 5,
                   warmup: int = 2, seed: int = 0) -> float:
    """KV-cache decode tokens/s, batch 1: a ``prompt_len`` prefill (not timed), then ``new_tokens``
    greedy steps of one token each through the cache (timed); median of ``repeats`` runs."""
    device = next(model.parameters()).device
    context = model.spec.context_length  # type: ignore[union-attr]
    prompt_len = max(1, min(prompt_len, context - 1))
    new_tokens = max(1, min(new_tokens, context - prompt_len))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.spec.vocab_size, (1, prompt_len), generator=g).to(device)  # type: ignore[union-attr]
    model.eval()
    times = []
    for i in range(warmup + repeats):
        cache = model.new_cache()  # type: ignore[operator]
        logits = model(prompt, cache=cache, last_only=True)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
            logits = model(next_id, cache=cache, last_only=True)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return new_tokens / statistics.median(times)


def ffn_output_weights(model: nn.Module) -> list[nn.Parameter]:
    """Each block's feed-forward output weight: the last residual projection of its FeedForward."""
    weights = []
    for i, block in enumerate(model.trf_blocks):  # type: ignore[union-attr]
        ffs = [m for m in block.modules() if isinstance(m, FeedForward)]
        projections = ffs[0].residual_projections() if ffs else []
        if not projections:
            raise CompareError(f"block {i} has no feed-forward with a residual projection "
                               "(FeedForward.residual_projections()) to measure")
        weights.append(projections[-1].weight)
    return weights


def ffn_grad_norms(model: nn.Module, inputs: Tensor, targets: Tensor) -> list[float]:
    """Frobenius norm of ∂loss/∂W for each layer's feed-forward output weight W (Xiong et al. 2020).

    One forward/backward of the cross-entropy on ``(inputs, targets)`` in eval mode (no dropout).
    """
    model.eval()
    model.zero_grad(set_to_none=True)
    logits = model(inputs)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    norms = []
    for weight in ffn_output_weights(model):
        assert weight.grad is not None
        norms.append(weight.grad.norm().item())
    model.zero_grad(set_to_none=True)
    return norms


def grad_norm_batch(spec: ModelSpec, batch: int, seq_len: int, seed: int, text: str | None) -> tuple[Tensor, Tensor]:
    """Inputs/targets for the gradient-norm measurement: the first windows of ``text``, else random ids."""
    if text is not None:
        from .training.dataset import GPTDatasetV1

        data = GPTDatasetV1(text, max_length=seq_len, stride=seq_len)
        if len(data) == 0:
            raise CompareError(f"the text is too short for one window of {seq_len} tokens")
        n = min(batch, len(data))
        return (torch.stack([data[i][0] for i in range(n)]), torch.stack([data[i][1] for i in range(n)]))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, spec.vocab_size, (batch, seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


# -- the comparison -------------------------------------------------------------------------------

def check_vocabularies_hold(text: str, specs: Sequence[ModelSpec], labels: Sequence[str]) -> None:
    """Raise :class:`CompareError` naming each spec whose vocabulary cannot hold the GPT-2 tokens of
    ``text`` (what training and text gradient norms feed every variant)."""
    from .training.dataset import tokenize

    ids = tokenize(text)
    top = int(ids.max()) if len(ids) else -1
    small = [f"{label} (vocab_size {spec.vocab_size})" for label, spec in zip(labels, specs) if spec.vocab_size <= top]
    if small:
        raise CompareError(f"the text's GPT-2 tokens go up to id {top}, outside the vocabulary of "
                           f"{', '.join(small)}: every variant trains on the same tokens, so each vocab_size "
                           f"must be at least {top + 1}")


def _labels(specs: Sequence[ModelSpec]) -> list[str]:
    labels, seen = [], {}
    for spec in specs:
        n = seen.get(spec.name, 0)
        seen[spec.name] = n + 1
        labels.append(spec.name if n == 0 else f"{spec.name}#{n + 1}")
    return labels


def compare(specs: Sequence[ModelSpec | Mapping[str, Any] | str], options: CompareOptions | None = None,
            *, overrides: Mapping[str, Any] | None = None, sources: Sequence[str] | None = None,
            progress: bool = True) -> list[VariantReport]:
    """Figures for every spec (in order); see :class:`VariantReport` and :class:`CompareOptions`.

    ``overrides`` apply as the module docstring says (a component parameter only where the part
    declares it: :attr:`VariantReport.overrides_not_applied` lists the others). Every variant is built
    after ``torch.manual_seed(options.seed)``; training uses the same seed, data and settings for all. Loss curves and the grad-norm plot go to ``options.out_dir`` if given.
    """
    from .devices import resolve_device
    from .training import TrainConfig, train

    options = options or CompareOptions()
    if not specs:
        raise CompareError("give at least one spec to compare")
    resolved = [load_spec(s) for s in specs]
    labels = _labels(resolved)
    resolved, not_applied = apply_overrides_where_declared(resolved, overrides or {}, labels)
    if options.train_text is not None and (options.train_steps or options.grad_norms):
        check_vocabularies_hold(options.train_text, resolved, labels)
    sources = list(sources) if sources is not None else [str(s) if isinstance(s, str) else "<spec>" for s in specs]
    device = resolve_device(options.device)
    reports = []
    for label, spec, source, skipped in zip(labels, resolved, sources, not_applied):
        meta = build_model(spec, device="meta")
        count = count_parameters(meta)
        report = VariantReport(
            name=label, source=source, parameters=count.total, parameters_without_head=count.without_head,
            parameters_without_embeddings=parameters_without_embeddings(meta),
            overrides_not_applied=skipped, spec=spec.to_dict(),
            memory_fp32_mb=round(count.megabytes(torch.float32), 2),
            memory_bf16_mb=round(count.megabytes(torch.bfloat16), 2),
            flops_per_token=flops_per_token(spec, meta),
        )
        seq_len = min(options.seq_len or 256, spec.context_length)
        if options.speed or options.grad_norms:
            torch.manual_seed(options.seed)
            model = build_model(spec).to(device)
            if options.grad_norms:
                inputs, targets = grad_norm_batch(spec, options.grad_batch, seq_len, options.seed, options.train_text)
                report.grad_norms = ffn_grad_norms(model, inputs.to(device), targets.to(device))
            if options.speed:
                # timed the way `modelkit generate` runs a model (oneDNN Linear layers, decode layout)
                optimize_for_inference(model)
                report.forward_tokens_per_s = measure_forward(model, seq_len, options.batch_size, options.repeats,
                                                              options.warmup, options.seed)
                report.decode_tokens_per_s = measure_decode(model, options.prompt_len, options.decode_tokens,
                                                            options.repeats, options.warmup, options.seed)
            del model
        if options.train_steps:
            if options.train_text is None:
                raise CompareError("training a variant needs data (--data FILE)")
            config = TrainConfig(steps=options.train_steps, batch_size=options.train_batch_size, lr=options.train_lr,
                                 seed=options.seed, device=options.device,
                                 eval_every=options.eval_every or max(options.train_steps // 10, 1))
            out = Path(options.out_dir) / label if options.out_dir else None
            result = train(copy.deepcopy(spec), options.train_text, config, out_dir=out, progress=progress)
            report.final_train_loss, report.final_val_loss = result.final_train_loss, result.final_val_loss
            report.metrics = result.metrics
        reports.append(report)
    return reports


def write_plots(reports: Sequence[VariantReport], out_dir: str | Path) -> list[Path]:
    """loss_curves.png (if any variant was trained) and grad_norms.png (if measured); their paths."""
    from .training.plots import plot_grad_norms, plot_loss_curves

    written = []
    if any(r.metrics for r in reports):
        written.append(plot_loss_curves({r.name: r.metrics for r in reports if r.metrics},
                                        Path(out_dir) / "loss_curves.png", title="loss by variant"))
    if any(r.grad_norms for r in reports):
        written.append(plot_grad_norms({r.name: r.grad_norms for r in reports if r.grad_norms},
                                       Path(out_dir) / "grad_norms.png"))
    return written
