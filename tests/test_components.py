"""Each built-in component against independent values: the book's code, hand computations, torch."""

from __future__ import annotations

import math

import pytest
import torch
from book_reference import GELU as BookGELU
from book_reference import FeedForward as BookFeedForward
from book_reference import LayerNorm as BookLayerNorm
from book_reference import MultiHeadAttention as BookMHA
from book_reference import TransformerBlock as BookBlock
from conftest import tiny_cfg

from modelkit import SpecError, build_model, load_spec
from modelkit.components.build import SpecBlockParts, build_component
from modelkit.components.kernels import attention_kernel_names, get_attention_kernel
from modelkit.spec import ComponentSpec


def make(kind, ref, **cfg_overrides):
    spec = load_spec(tiny_cfg(**cfg_overrides))
    resolved = load_spec(dict(tiny_cfg(**cfg_overrides), **{kind if kind != "activation" else "feedforward":
                         ref if kind != "activation" else {"type": "mlp", "activation": ref}}))
    if kind == "activation":
        return build_component("activation", resolved.feedforward.params["activation"], spec.dims)
    if kind == "block":
        return build_component("block", getattr(resolved, kind), resolved.dims, SpecBlockParts(resolved, resolved.dims))
    return build_component(kind, getattr(resolved, kind), resolved.dims)


# -- activations --------------------------------------------------------------------------------
XS = [-3.0, -1.0, -0.5, 0.0, 0.3, 1.0, 2.5]


@pytest.mark.parametrize("name, formula", [
    ("gelu", lambda x: 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))),
    ("gelu_exact", lambda x: 0.5 * x * (1 + math.erf(x / math.sqrt(2)))),
    ("relu", lambda x: max(x, 0.0)),
    ("silu", lambda x: x / (1 + math.exp(-x))),
])
def test_activation_matches_its_formula(name, formula):
    act = make("activation", name)
    out = act(torch.tensor(XS, dtype=torch.float64))
    assert out.tolist() == pytest.approx([formula(x) for x in XS], abs=1e-12)


def test_gelu_is_the_books_tanh_approximation():
    x = torch.linspace(-6, 6, 1001)
    assert torch.allclose(make("activation", "gelu")(x), BookGELU()(x), atol=1e-6)


# -- norm -------------------------------------------------------------------------------------------
def test_layernorm_matches_the_book_and_torch():
    norm = make("norm", "layernorm")
    with torch.no_grad():
        norm.scale.copy_(torch.randn(32))
        norm.shift.copy_(torch.randn(32))
    book = BookLayerNorm(32)
    book.load_state_dict(norm.state_dict())
    ref = torch.nn.LayerNorm(32, eps=1e-5)
    ref.load_state_dict({"weight": norm.scale, "bias": norm.shift})
    x = torch.randn(4, 5, 32) * 3 + 1
    assert torch.allclose(norm(x), book(x), atol=1e-5)
    assert torch.allclose(norm(x), ref(x), atol=1e-6)


def test_layernorm_parameters_eps_and_no_bias():
    norm = make("norm", {"type": "layernorm", "eps": 0.5, "bias": False})
    assert set(norm.state_dict()) == {"scale"}
    x = torch.tensor([[1.0, 3.0] + [2.0] * 30])
    mean, var = x.mean(), x.var(unbiased=False)
    assert torch.allclose(norm(x), (x - mean) / torch.sqrt(var + 0.5), atol=1e-6)


# -- attention -------------------------------------------------------------------------------------
def book_mha(cfg):
    return BookMHA(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"], cfg["n_heads"],
                   cfg["qkv_bias"])


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_mha_matches_the_book_in_eval(backend):
    cfg = tiny_cfg(qkv_bias=True)
    att = make("attention", {"type": "mha", "backend": backend}, qkv_bias=True).eval()
    book = book_mha(cfg).eval()
    att.load_state_dict(book.state_dict())
    x = torch.randn(3, 16, 32)
    assert torch.allclose(att(x), book(x), atol=1e-5)


def test_eager_mha_matches_the_book_in_training_mode_with_dropout():
    cfg = tiny_cfg(drop_rate=0.3)
    att = make("attention", {"type": "mha", "backend": "eager"}, drop_rate=0.3).train()
    book = book_mha(cfg).train()
    att.load_state_dict(book.state_dict())
    x = torch.randn(2, 16, 32)
    torch.manual_seed(5)
    ours = att(x)
    torch.manual_seed(5)
    assert torch.allclose(ours, book(x), atol=1e-6)


@pytest.mark.parametrize("backend", attention_kernel_names())
def test_every_attention_backend_is_causal(backend):
    torch.manual_seed(0)
    att = make("attention", {"type": "mha", "backend": backend}).eval()
    x = torch.randn(1, 16, 32)
    changed = x.clone()
    changed[:, 9:] = torch.randn(1, 7, 32)
    a, b = att(x), att(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert not torch.allclose(a[:, 9:], b[:, 9:], atol=1e-3)


@pytest.mark.parametrize("backend", attention_kernel_names())
@pytest.mark.parametrize("with_bias", [False, True])
def test_kernel_with_fewer_queries_than_keys_equals_the_last_rows_of_full_attention(backend, with_bias):
    kernel = get_attention_kernel(backend)
    q, k, v = torch.randn(3, 2, 4, 10, 8).unbind(0)
    bias = torch.randn(4, 10, 10) if with_bias else None
    full = kernel(q, k, v, bias=bias)
    tail = kernel(q[:, :, 7:], k, v, bias=None if bias is None else bias[:, 7:])
    assert torch.allclose(full[:, :, 7:], tail, atol=1e-5)
    # Hand computation of the causal softmax for the last query block.
    scores = q[:, :, 7:] @ k.transpose(-2, -1) / 8**0.5 + (0 if bias is None else bias[:, 7:])
    mask = torch.tensor([[j > 7 + i for j in range(10)] for i in range(3)])
    expected = torch.softmax(scores.masked_fill(mask, -math.inf), -1) @ v
    assert torch.allclose(tail, expected, atol=1e-5)


def _hand_attention(q, k, v, bias=None, scale=None, softcap=None, window=None):
    """softmax over the keys a query may see (j <= its position, and > its position - window), by loops."""
    s_q, s_k, d = q.shape[-2], k.shape[-2], q.shape[-1]
    out = torch.zeros_like(q)
    for i in range(s_q):
        pos = i + s_k - s_q  # the query's position among the keys
        seen = [j for j in range(s_k) if j <= pos and (window is None or j > pos - window)]
        scores = (q[..., i:i + 1, :] @ k[..., seen, :].transpose(-2, -1))[..., 0, :]
        scores = scores * scale if scale is not None else scores / math.sqrt(d)
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        if bias is not None:
            scores = scores + bias[..., i, seen]
        out[..., i, :] = (torch.softmax(scores, -1)[..., None, :] @ v[..., seen, :])[..., 0, :]
    return out


@pytest.mark.parametrize("backend", attention_kernel_names())
@pytest.mark.parametrize("s_q", [10, 4, 1])
@pytest.mark.parametrize("options", [
    dict(window=3), dict(window=1), dict(window=12), dict(scale=0.2), dict(softcap=1.5),
    dict(window=4, softcap=0.8, scale=0.7), dict(window=3, bias=True),
], ids=str)
def test_kernel_options_equal_a_hand_computed_masked_softmax(backend, s_q, options):
    """Sliding window (query i sees i - W < j <= i), softcap before the mask, and the score scale."""
    kernel = get_attention_kernel(backend)
    q, k, v = torch.randn(3, 2, 4, 10, 8, generator=torch.Generator().manual_seed(7)).unbind(0)
    q = q[:, :, 10 - s_q:]
    options = dict(options)
    bias = torch.randn(4, s_q, 10) if options.pop("bias", False) else None
    expected = _hand_attention(q, k, v, bias, **options)
    assert torch.allclose(kernel(q, k, v, bias=bias, **options), expected, atol=1e-5)


@pytest.mark.parametrize("backend", attention_kernel_names())
def test_kernel_options_change_the_result(backend):
    """Each option matters: a kernel that ignored one would fail the hand computation above."""
    kernel = get_attention_kernel(backend)
    q, k, v = torch.randn(3, 1, 2, 9, 8, generator=torch.Generator().manual_seed(3)).unbind(0)
    q = q * 4  # large scores, so the soft-cap bites
    plain = kernel(q, k, v)
    for options in (dict(window=3), dict(softcap=1.0), dict(scale=0.1)):
        assert not torch.allclose(kernel(q, k, v, **options), plain, atol=1e-3), options


def test_the_window_mask_is_transformers_sliding_window():
    """causal_mask with a window hides j <= i - W (and j > i), as transformers' sliding_window_overlay."""
    from modelkit.components.kernels import causal_mask

    mask = causal_mask(4, 7, torch.device("cpu"), window=3)  # queries at positions 3..6
    expected = torch.tensor([[not (p - 3 < j <= p) for j in range(7)] for p in range(3, 7)])
    assert torch.equal(mask, expected)


def test_unknown_backend_is_a_spec_error_with_suggestion():
    from modelkit import SpecError

    with pytest.raises(SpecError, match=r"attention.backend: unknown attention backend 'spda'; did you mean 'sdpa'\?"):
        load_spec(tiny_cfg(attention={"type": "mha", "backend": "spda"}))


# -- feedforward ----------------------------------------------------------------------------------
def test_mlp_matches_the_books_feedforward():
    cfg = tiny_cfg()
    ff = make("feedforward", "mlp")
    book = BookFeedForward(cfg)
    ff.load_state_dict(book.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.allclose(ff(x), book(x), atol=1e-6)


def test_mlp_hidden_size_parameters():
    assert make("feedforward", {"type": "mlp", "hidden_mult": 2}).layers[0].out_features == 64
    ff = make("feedforward", {"type": "mlp", "hidden_dim": 40, "activation": "relu", "bias": False})
    assert ff.layers[0].weight.shape == (40, 32) and ff.layers[0].bias is None
    assert type(ff.layers[1]).__name__ == "ReLU"


# -- positional ---------------------------------------------------------------------------------
def test_learned_positional_is_initialised_like_the_books_embedding():
    torch.manual_seed(7)
    pos = make("positional", "learned")
    torch.manual_seed(7)
    emb = torch.nn.Embedding(16, 32)
    assert torch.equal(pos.weight, emb.weight)
    positions = torch.tensor([3, 0, 15])
    assert torch.equal(pos.embedding(positions), emb(positions))


def test_learned_positional_offset_zero_is_the_default_and_the_books_table():
    torch.manual_seed(123)
    default = make("positional", "learned")
    torch.manual_seed(123)
    zero = make("positional", {"type": "learned", "offset": 0})
    assert load_spec(dict(tiny_cfg(), positional="learned")).positional.params == {"offset": 0}
    assert zero.weight.shape == (16, 32) and torch.equal(zero.weight, default.weight)
    positions = torch.arange(16)
    assert torch.equal(zero.embedding(positions), default.weight[positions])


def test_learned_positional_offset_reads_rows_after_the_reserved_ones():
    pos = make("positional", {"type": "learned", "offset": 2})  # OPT's table
    assert pos.weight.shape == (16 + 2, 32)
    positions = torch.tensor([0, 5, 15])
    assert torch.equal(pos.embedding(positions), pos.weight[positions + 2])
    model = build_model(dict(tiny_cfg(), positional={"type": "learned", "offset": 2}))
    assert model.pos_emb.weight.shape == (18, 32)


@pytest.mark.parametrize("offset", [-1, 1025, 1.5, True])
def test_learned_positional_offset_is_validated(offset):
    with pytest.raises(SpecError, match="offset"):
        load_spec(dict(tiny_cfg(), positional={"type": "learned", "offset": offset}))


def test_sinusoidal_positional_matches_vaswani_by_hand():
    pos = make("positional", "sinusoidal")
    table = pos.embedding(torch.arange(16))
    for p in (0, 1, 7, 15):
        for i in range(16):
            angle = p / 10000 ** (2 * i / 32)
            assert table[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-5)
            assert table[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-5)
    assert list(pos.parameters()) == []


def test_none_positional_adds_nothing():
    pos = make("positional", "none")
    assert pos.embedding(torch.arange(4)) is None and list(pos.parameters()) == []


# -- blocks -------------------------------------------------------------------------------------------
def test_pre_norm_block_is_the_books_transformer_block_including_dropout():
    cfg = tiny_cfg(drop_rate=0.2)
    block = make("block", "pre_norm", drop_rate=0.2).train()
    book = BookBlock(cfg).train()
    block.load_state_dict(book.state_dict(), strict=True)
    x = torch.randn(2, 16, 32)
    torch.manual_seed(3)
    ours = block(x)
    torch.manual_seed(3)
    assert torch.allclose(ours, book(x), atol=1e-5)


def test_post_norm_and_parallel_blocks_follow_their_formulas():
    x = torch.randn(2, 16, 32)
    post = make("block", "post_norm").eval()
    h = post.norm1(x + post.att(x))
    assert torch.allclose(post(x), post.norm2(h + post.ff(h)), atol=1e-6)
    par = make("block", "parallel").eval()
    n = par.norm1(x)
    assert torch.allclose(par(x), x + par.att(n) + par.ff(n), atol=1e-6)
    assert not hasattr(par, "norm2")


def test_component_spec_serialises_to_the_json_form():
    ref = ComponentSpec(type="mlp", params={"hidden_mult": 4, "activation": ComponentSpec(type="gelu")})
    assert ref.model_dump() == {"type": "mlp", "hidden_mult": 4, "activation": {"type": "gelu"}}


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_dropout_is_torchs_dropout_in_every_mode_and_draws_the_same_random_numbers(p):
    from torch import nn

    from modelkit.components.base import Dropout

    x = torch.randn(4, 50)
    ours, torchs = Dropout(p), nn.Dropout(p)
    assert isinstance(ours, nn.Dropout) and repr(ours) == repr(torchs) and ours.state_dict() == {}
    torch.manual_seed(7)
    a = ours(x)
    after_ours = torch.rand(1)
    torch.manual_seed(7)
    b = torchs(x)
    after_torchs = torch.rand(1)
    assert torch.equal(a, b) and torch.equal(after_ours, after_torchs)  # same mask, same RNG use
    if p > 0:
        assert (a == 0).any() and torch.allclose(a[a != 0], x[a != 0] / (1 - p))
    ours.eval()
    assert ours(x) is x  # eval: the input itself, as nn.Dropout returns it
