"""Each llama component against an independent computation: hand formulas, torch's own modules,
a complex-number RoPE, and the ALiBi paper's slopes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from modelkit import SpecError, build_model, get_registry, load_spec
from modelkit.components.base import LayerContext, ModelDims
from modelkit.components.kernels import attention_kernel_names
from modelkit_llama.attention import GroupedQueryAttention
from modelkit_llama.feedforward import SwiGLU, llama_hidden_dim
from modelkit_llama.norm import RMSNorm
from modelkit_llama.positional import ALiBi, RoPE, alibi_slopes


pytestmark = pytest.mark.usefixtures("modelkit_one_thread")

DIMS = ModelDims(vocab_size=64, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
                 qkv_bias=False)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- entry points ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("kind", "name", "cls"), [
    ("norm", "llama.rmsnorm", RMSNorm), ("feedforward", "llama.swiglu", SwiGLU),
    ("positional", "llama.rope", RoPE), ("positional", "llama.alibi", ALiBi),
    ("attention", "llama.gqa", GroupedQueryAttention),
])
def test_registered_through_its_entry_point(kind: str, name: str, cls: type) -> None:
    entry = get_registry(kind).get(name)
    assert entry.cls is cls
    assert entry.distribution == "modelkit-llama" and entry.origin.startswith("modelkit-llama==")


# -- RMSNorm ------------------------------------------------------------------------------------------

def test_rmsnorm_matches_the_formula() -> None:
    norm = RMSNorm(DIMS, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen(1)))
    x = torch.randn(2, 5, 32, generator=gen(2)) * 3 + 1
    expected = torch.empty_like(x)
    for b in range(2):
        for t in range(5):
            row = x[b, t]
            rms = math.sqrt(sum(v * v for v in row.tolist()) / 32 + 1e-5)
            expected[b, t] = row / rms * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_rmsnorm_equals_torch_rmsnorm_and_names_its_weight_weight() -> None:
    ours = RMSNorm(DIMS, eps=1e-6)
    theirs = torch.nn.RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(32, generator=gen(3)) + 0.5)
    theirs.load_state_dict(ours.state_dict())  # same key: "weight"
    x = torch.randn(3, 4, 32, generator=gen(4))
    torch.testing.assert_close(ours(x), theirs(x))


def test_rmsnorm_keeps_a_low_precision_dtype() -> None:
    x = torch.randn(2, 3, 32, generator=gen(5)).to(torch.bfloat16)
    out = RMSNorm(DIMS).to(torch.bfloat16)(x)
    assert out.dtype == torch.bfloat16
    reference = x.float() / torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)


# -- SwiGLU -------------------------------------------------------------------------------------------

def test_swiglu_matches_the_formula() -> None:
    ff = SwiGLU(DIMS, hidden_dim=48)
    x = torch.randn(2, 3, 32, generator=gen(6))
    w_gate, w_up, w_down = ff.gate_proj.weight, ff.up_proj.weight, ff.down_proj.weight
    gate = x @ w_gate.T
    swish = gate / (1 + torch.exp(-gate))  # SiLU by hand: x·σ(x)
    expected = (swish * (x @ w_up.T)) @ w_down.T
    torch.testing.assert_close(ff(x), expected)
    assert ff.gate_proj.bias is None and ff.down_proj.bias is None
    assert SwiGLU(DIMS, hidden_dim=48, bias=True).up_proj.bias is not None


@pytest.mark.parametrize(("emb_dim", "hidden"), [(4096, 11008), (5120, 13824)])  # Llama-7B and -13B
def test_swiglu_default_hidden_size_is_llamas(emb_dim: int, hidden: int) -> None:
    assert llama_hidden_dim(emb_dim, 256) == hidden
    with torch.device("meta"):
        ff = SwiGLU(ModelDims(32000, 4096, emb_dim, 32, 1, 0.0, False))
    assert tuple(ff.gate_proj.weight.shape) == (hidden, emb_dim)
    assert tuple(ff.down_proj.weight.shape) == (emb_dim, hidden)


# -- RoPE -------------------------------------------------------------------------------------------

def rope_complex(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE written with complex numbers: pair (x_i, x_{i+d/2}) as x_i + i·x_{i+d/2}, times e^{i·m·θ^(-2i/d)}."""
    d = x.shape[-1]
    half = d // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(half)], dtype=torch.float64)
    angles = positions.double()[:, None] * freqs[None, :]
    rotated = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat((rotated.real, rotated.imag), dim=-1).to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_equals_a_complex_number_implementation(theta: float) -> None:
    rope = RoPE(DIMS, theta=theta)
    q = torch.randn(2, 4, 9, 8, generator=gen(7))
    k = torch.randn(2, 2, 9, 8, generator=gen(8))
    positions = torch.arange(3, 12)
    q_rot, k_rot = rope.rotate(q, k, positions)
    torch.testing.assert_close(q_rot, rope_complex(q, positions, theta), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_rot, rope_complex(k, positions, theta), rtol=1e-5, atol=1e-5)


def test_rope_preserves_norms_and_leaves_position_zero_alone() -> None:
    rope = RoPE(DIMS)
    q = torch.randn(1, 4, 6, 8, generator=gen(9))
    q_rot, _ = rope.rotate(q, q[:, :2], torch.arange(6))
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(q_rot[:, :, 0], q[:, :, 0])
    assert not torch.allclose(q_rot[:, :, 1:], q[:, :, 1:])


def test_rope_scores_depend_only_on_relative_position() -> None:
    rope = RoPE(DIMS)
    q = torch.randn(1, 1, 1, 8, generator=gen(10))
    k = torch.randn(1, 1, 1, 8, generator=gen(11))

    def score(m: int, n: int) -> float:
        q_m, _ = rope.rotate(q, k, torch.tensor([m]))
        _, k_n = rope.rotate(q, k, torch.tensor([n]))
        return float((q_m * k_n).sum())

    for m, n in [(5, 2), (9, 9), (3, 7)]:
        for shift in (1, 10, 17):
            assert score(m, n) == pytest.approx(score(m + shift, n + shift), rel=1e-4, abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_rope_needs_an_even_head_size() -> None:
    with pytest.raises(SpecError, match="even head size"):
        load_spec({"vocab_size": 10, "context_length": 8, "emb_dim": 12, "n_heads": 4, "n_layers": 1,
                   "positional": "llama.rope"})


# -- ALiBi ------------------------------------------------------------------------------------------

def test_alibi_slopes_are_the_papers() -> None:
    assert alibi_slopes(8) == pytest.approx([2.0 ** -i for i in range(1, 9)])  # 1/2 ... 1/256
    assert alibi_slopes(4) == pytest.approx([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    # Not a power of two: the 8-head slopes, then every other one of the 16-head slopes.
    assert alibi_slopes(12) == pytest.approx([2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i + 0.5) for i in range(4)])
    assert alibi_slopes(1) == pytest.approx([2.0 ** -8])


def test_alibi_bias_is_slope_times_relative_position() -> None:
    alibi = ALiBi(ModelDims(64, 32, 64, 8, 1, 0.0, False))
    q_pos, k_pos = torch.tensor([5, 6]), torch.arange(7)  # two new queries after 5 cached tokens
    bias = alibi.attention_bias(q_pos, k_pos)
    assert bias.shape == (8, 2, 7)
    for h in range(8):
        for i, qp in enumerate(q_pos.tolist()):
            for j, kp in enumerate(k_pos.tolist()):
                assert bias[h, i, j].item() == pytest.approx(2.0 ** -(h + 1) * (kp - qp))


@pytest.mark.parametrize("backend", attention_kernel_names())
def test_attention_with_alibi_matches_a_plain_computation(backend: str) -> None:
    torch.manual_seed(0)
    att = get_registry("attention").get("mha").cls(DIMS, backend=backend).eval()
    alibi = ALiBi(DIMS)
    x = torch.randn(1, 6, 32, generator=gen(12))
    out = att(x, LayerContext(torch.arange(6), alibi))
    h, d = 4, 8
    q = (x @ att.W_query.weight.T).view(1, 6, h, d).transpose(1, 2)
    k = (x @ att.W_key.weight.T).view(1, 6, h, d).transpose(1, 2)
    v = (x @ att.W_value.weight.T).view(1, 6, h, d).transpose(1, 2)
    slopes = torch.tensor([2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8])
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    scores = q @ k.transpose(-2, -1) / math.sqrt(d) + slopes[:, None, None] * (j - i)
    scores = scores.masked_fill(j > i, float("-inf"))
    expected = (scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 6, 32) @ att.out_proj.weight.T + att.out_proj.bias
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# -- grouped-query attention ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", attention_kernel_names())
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_matches_torch_grouped_sdpa(backend: str, kv_heads: int) -> None:
    torch.manual_seed(0)
    att = GroupedQueryAttention(DIMS, num_kv_heads=kv_heads, backend=backend).eval()
    x = torch.randn(2, 7, 32, generator=gen(13))
    q = att.W_query(x).view(2, 7, 4, 8).transpose(1, 2)
    k = att.W_key(x).view(2, 7, kv_heads, 8).transpose(1, 2)
    v = att.W_value(x).view(2, 7, kv_heads, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # torch's own GQA
    expected = att.out_proj(ref.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(att(x), expected, rtol=1e-5, atol=1e-5)
    assert tuple(att.W_key.weight.shape) == (kv_heads * 8, 32)
    assert att.out_proj.bias is None


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm by hand: weight · x / √(mean(x²) + eps) over the last dimension."""
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("qk_norm", ["head", "projection"])
def test_gqa_qk_norms_match_a_hand_computation(qk_norm: str) -> None:
    """Queries and keys RMS-normalised (per head, or over the whole projection) before the heads attend."""
    torch.manual_seed(0)
    att = GroupedQueryAttention(DIMS, num_kv_heads=2, qk_norm=qk_norm, qk_norm_eps=1e-3).eval()
    with torch.no_grad():
        att.q_norm.weight.normal_(generator=gen(1))
        att.k_norm.weight.normal_(generator=gen(2))
    assert tuple(att.q_norm.weight.shape) == ((8,) if qk_norm == "head" else (32,))
    assert tuple(att.k_norm.weight.shape) == ((8,) if qk_norm == "head" else (16,))
    x = torch.randn(2, 7, 32, generator=gen(13))
    q, k, v = att.W_query(x), att.W_key(x), att.W_value(x)
    if qk_norm == "projection":
        q, k = _rms(q, att.q_norm.weight, 1e-3), _rms(k, att.k_norm.weight, 1e-3)
    q, k = q.view(2, 7, 4, 8).transpose(1, 2), k.view(2, 7, 2, 8).transpose(1, 2)
    if qk_norm == "head":
        q, k = _rms(q, att.q_norm.weight, 1e-3), _rms(k, att.k_norm.weight, 1e-3)
    v = v.view(2, 7, 2, 8).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = att.out_proj(ref.transpose(1, 2).reshape(2, 7, 32))
    with torch.no_grad():
        torch.testing.assert_close(att(x), expected, rtol=1e-5, atol=1e-5)
        plain = GroupedQueryAttention(DIMS, num_kv_heads=2).eval()
        plain.load_state_dict({n: p for n, p in att.state_dict().items() if "_norm" not in n})
        assert (plain(x) - att(x)).abs().max() > 1e-2  # the norms change the output


def test_gqa_without_qk_norm_builds_what_it_did() -> None:
    """The default adds no module and draws the same random numbers (seeded builds unchanged)."""
    torch.manual_seed(0)
    att = GroupedQueryAttention(DIMS, num_kv_heads=2)
    assert sorted(n for n, _ in att.named_parameters()) == [
        "W_key.weight", "W_query.weight", "W_value.weight", "out_proj.weight"]
    torch.manual_seed(0)
    normed = GroupedQueryAttention(DIMS, num_kv_heads=2, qk_norm="head")
    assert all(torch.equal(p, normed.state_dict()[n]) for n, p in att.state_dict().items())


def test_gqa_qk_norm_is_validated() -> None:
    base = {"vocab_size": 10, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1}
    with pytest.raises(SpecError, match="attention.qk_norm"):
        load_spec({**base, "attention": {"type": "llama.gqa", "qk_norm": "layer"}})
    with pytest.raises(SpecError, match="attention.qk_norm_eps"):
        load_spec({**base, "attention": {"type": "llama.gqa", "qk_norm": "head", "qk_norm_eps": 0}})


def test_gqa_caches_only_its_key_value_heads() -> None:
    spec = {"vocab_size": 64, "context_length": 16, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
            "attention": {"type": "llama.gqa", "num_kv_heads": 2}, "positional": "llama.rope"}
    model = build_model(spec).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.layers[0].k is not None and cache.layers[0].k.shape[1] == 2


def test_gqa_heads_must_divide() -> None:
    with pytest.raises(SpecError, match="n_heads 4 is not divisible by num_kv_heads 3"):
        load_spec({"vocab_size": 10, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                   "attention": {"type": "llama.gqa", "num_kv_heads": 3}})
    with pytest.raises(SpecError, match="backend"):
        load_spec({"vocab_size": 10, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1,
                   "attention": {"type": "llama.gqa", "backend": "flashy"}})


@pytest.mark.parametrize(("slot", "ref", "message"), [
    ("attention", {"type": "llama.gqa", "num_kv_heads": "2"}, 'attention.num_kv_heads: expected an integer, got "2"'),
    ("attention", {"type": "llama.gqa", "num_kv_heads": True}, "attention.num_kv_heads: expected an integer, got true"),
    ("attention", {"type": "llama.gqa", "out_bias": 1},
     "attention.out_bias: expected a boolean (true or false), got 1"),
    ("feedforward", {"type": "llama.swiglu", "multiple_of": True},
     "feedforward.multiple_of: expected an integer, got true"),
    ("norm", {"type": "llama.rmsnorm", "eps": "1e-5"}, 'norm.eps: expected a number, got "1e-5"'),
    ("positional", {"type": "llama.rope", "theta": "10000"}, 'positional.theta: expected a number, got "10000"'),
])
def test_parameters_of_another_json_type_are_refused_at_their_path(slot: str, ref: dict, message: str) -> None:
    with pytest.raises(SpecError) as exc:
        load_spec({"vocab_size": 10, "context_length": 8, "emb_dim": 32, "n_heads": 4, "n_layers": 1, slot: ref})
    assert [str(issue) for issue in exc.value.issues] == [message]
