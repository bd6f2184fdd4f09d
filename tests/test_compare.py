"""Comparing variants: analytic FLOPs against torch's FLOP counter, sizes by hand, gradient norms
against autograd, overrides, plugin components, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from modelkit import PluginError, RegistryError, SpecError, build_model, get_registry, load_spec
from modelkit.cli import main
from modelkit.compare import (
    CompareError,
    CompareOptions,
    apply_overrides,
    apply_overrides_where_declared,
    compare,
    declares,
    ffn_grad_norms,
    flops_per_token,
    parse_override,
)
from modelkit.components.base import FeedForward, ModelDims
from modelkit.testing import synthetic_text, tiny_model_spec, with_component

EAGER = {"type": "mha", "backend": "eager"}  # torch's FLOP counter sees eager attention's matmuls



class GatedFeedForward(FeedForward):
    """A third-party feed-forward (registered at runtime in these tests): down(a · sigmoid(b))."""

    def __init__(self, dims: ModelDims, *, hidden_mult: int = 2) -> None:
        super().__init__()
        hidden = hidden_mult * dims.emb_dim
        self.up = nn.Linear(dims.emb_dim, 2 * hidden)
        self.down = nn.Linear(hidden, dims.emb_dim)

    def residual_projections(self) -> list[nn.Linear]:
        return [self.down]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(a * torch.sigmoid(b))


@pytest.fixture
def gated_plugin():
    registry = get_registry("feedforward")
    registry.register("testkit.gated", GatedFeedForward)
    yield "testkit.gated"
    registry.unregister("testkit.gated")


def counted_flops_per_token(spec, seq: int) -> float:
    model = build_model(spec).eval()
    ids = torch.randint(0, spec.vocab_size, (2, seq))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids)
    return counter.get_total_flops() / (2 * seq)


@pytest.mark.parametrize("overrides", [
    {}, {"tie_embeddings": True}, {"n_layers": 3, "context_length": 24},
    {"feedforward": {"type": "mlp", "hidden_mult": 2}},
])
def test_flops_per_token_equal_torch_flop_counter(overrides):
    spec = load_spec(tiny_model_spec(vocab_size=97, attention=EAGER, **overrides))
    assert flops_per_token(spec) == counted_flops_per_token(spec, spec.context_length)


def test_flops_per_token_of_a_plugin_component(gated_plugin):
    spec = load_spec(tiny_model_spec(vocab_size=97, attention=EAGER, feedforward=gated_plugin))
    assert flops_per_token(spec) == counted_flops_per_token(spec, spec.context_length)


def test_flops_formula_for_every_config_at_tiny_size(modelkit_config):
    """Each shipped config's components, shrunk: the analytic count equals torch's counter."""
    shrink = {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 16, "vocab_size": 101,
              "attention.backend": "eager"}
    try:
        full = load_spec(modelkit_config)
        if full.attention.params.get("num_kv_heads"):  # grouped-query attention: keep 2 query heads per group
            shrink["attention.num_kv_heads"] = 2
        spec = apply_overrides(full, shrink)
    except (PluginError, RegistryError, SpecError) as exc:
        pytest.skip(f"{modelkit_config.name} needs what is not installed here: {exc}")
    assert flops_per_token(spec) == counted_flops_per_token(spec, 16)


def test_gpt2_small_flops_by_hand():
    spec = load_spec("configs/gpt2-small.json")
    matmul = 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 50257  # q, k, v, out; ff in/out; head
    assert flops_per_token(spec) == 2 * matmul + 4 * 12 * 1024 * 768 == 284_812_800


def test_sizes_by_hand(modelkit_make_tiny_spec):
    (report,) = compare([modelkit_make_tiny_spec(vocab_size=97)], CompareOptions(speed=False))
    e, v, c, h = 32, 97, 32, 128
    per_layer = 3 * e * e + (e * e + e) + (e * h + h) + (h * e + e) + 2 * 2 * e
    total = v * e + c * e + 2 * per_layer + 2 * e + e * v
    assert report.parameters == total
    assert report.parameters_without_head == total - e * v
    assert report.memory_fp32_mb == round(total * 4 / 2**20, 2)
    assert report.memory_bf16_mb == round(total * 2 / 2**20, 2)
    assert report.forward_tokens_per_s is None  # not measured


@pytest.mark.parametrize("block", ["pre_norm", "post_norm"])
def test_grad_norms_equal_autograd(block):
    spec = load_spec(tiny_model_spec(vocab_size=97, block=block, n_layers=3, drop_rate=0.1))
    torch.manual_seed(0)
    model = build_model(spec)
    ids = torch.randint(0, 97, (4, 17))
    norms = ffn_grad_norms(model, ids[:, :-1], ids[:, 1:])
    model.eval()
    weights = [b.ff.layers[2].weight for b in model.trf_blocks]
    loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    expected = [g.norm().item() for g in torch.autograd.grad(loss, weights)]
    assert norms == pytest.approx(expected, rel=1e-5)


def test_grad_norms_for_every_block(modelkit_block_name):
    (report,) = compare([tiny_model_spec(vocab_size=97, block=modelkit_block_name, n_layers=3)],
                        CompareOptions(speed=False, grad_norms=True, grad_batch=2, seq_len=16))
    assert report.grad_norms is not None and len(report.grad_norms) == 3
    assert all(n > 0 for n in report.grad_norms)
    assert report.grad_norm_ratio == report.grad_norms[-1] / report.grad_norms[0]


def test_overrides():
    spec = load_spec(tiny_model_spec())
    changed = apply_overrides(spec, dict([parse_override("n_layers=3"), parse_override("attention.backend=eager"),
                                          parse_override("block=post_norm")]))
    assert (changed.n_layers, changed.attention.params["backend"], changed.block.type) == (3, "eager", "post_norm")
    with pytest.raises(SpecError, match="n_layrs"):
        apply_overrides(spec, {"n_layrs": 3})
    with pytest.raises(CompareError, match="key=value"):
        parse_override("n_layers")


def test_same_spec_twice_trains_to_the_same_losses(gated_plugin):
    text = synthetic_text(60)
    plugin_spec = with_component(tiny_model_spec(name="gated"), "feedforward", gated_plugin)
    reports = compare([tiny_model_spec(name="a"), tiny_model_spec(name="a"), plugin_spec],
                      CompareOptions(speed=False, train_steps=3, train_text=text, train_batch_size=2),
                      progress=False)
    assert [r.name for r in reports] == ["a", "a#2", "gated"]
    assert reports[0].final_val_loss == reports[1].final_val_loss is not None
    assert reports[0].final_val_loss != reports[2].final_val_loss
    assert reports[2].final_train_loss is not None


def test_cli_json_markdown_and_plots(tmp_path, capsys):
    a, b = tmp_path / "pre.json", tmp_path / "post.json"
    unnamed = {k: v for k, v in tiny_model_spec(vocab_size=97).items() if k != "name"}  # named by file stem
    a.write_text(json.dumps(unnamed))
    b.write_text(json.dumps({**unnamed, "block": "post_norm"}))
    common = ["compare", str(a), str(b), "--repeats", "1", "--seq-len", "16", "--decode-tokens", "4",
              "--grad-norms", "--grad-batch", "2", "--override", "n_layers=3", "--out", str(tmp_path / "cmp")]
    assert main([*common, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    pre, post = data["variants"]
    assert (pre["name"], post["name"]) == ("pre", "post")
    assert pre["flops_per_token"] == flops_per_token(load_spec({**tiny_model_spec(vocab_size=97), "n_layers": 3}))
    assert pre["forward_tokens_per_s"] > 0 and pre["decode_tokens_per_s"] > 0
    assert len(post["grad_norms"]) == 3
    assert (tmp_path / "cmp" / "grad_norms.png").stat().st_size > 1000
    assert main([*common, "--markdown", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "| variant | params |" in out and "| last/first |" in out


def test_cli_needs_data_to_train(tmp_path, capsys):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(tiny_model_spec()))
    assert main(["compare", str(a), "--train-steps", "2"]) == 2
    assert "--train-steps needs --data" in capsys.readouterr().err


# -- specs of different families, shrunk with --override (issue 18) --------------------------------

SHRINK = ["n_layers=2", "emb_dim=64", "n_heads=4", "head_dim=16", "vocab_size=300", "context_length=64",
          "attention.num_kv_heads=2", "feedforward.hidden_dim=128"]
FAMILY_SPECS = [  # one line a family: (spec file, the SHRINK overrides its parts do not declare)
    ("configs/gpt2-small.json", ["attention.num_kv_heads"]),
    ("configs/pretrained/llama-3.2-1b.json", []),
    ("configs/pretrained/gemma-2b.json", []),
    ("configs/pretrained/olmo-2-1b.json", []),
    ("configs/pretrained/qwen3-0.6b.json", []),
]


def test_compare_runs_across_families_shrunk_with_overrides(capsys):
    pytest.importorskip("modelkit_llama")
    pytest.importorskip("modelkit_olmo")
    files = [f for f, _ in FAMILY_SPECS]
    assert main(["compare", *files, "--override", *SHRINK, "--repeats", "1", "--seq-len", "16",
                 "--decode-tokens", "4", "--grad-norms", "--grad-batch", "2", "--no-plot", "--json"]) == 0
    variants = json.loads(capsys.readouterr().out)["variants"]
    assert [v["source"] for v in variants] == files
    for v, (_, skipped) in zip(variants, FAMILY_SPECS):
        spec = load_spec(v["spec"])
        assert (spec.n_layers, spec.emb_dim, spec.n_heads, spec.vocab_size, spec.context_length) == (2, 64, 4, 300, 64)
        assert v["overrides_not_applied"] == skipped
        assert v["parameters"] == sum(p.numel() for p in build_model(spec, device="meta").parameters())
        assert v["forward_tokens_per_s"] > 0 and v["decode_tokens_per_s"] > 0 and len(v["grad_norms"]) == 2


def test_shrunk_gpt2_and_llama_counted_by_hand():
    pytest.importorskip("modelkit_llama")
    gpt2, llama = compare([f for f, _ in FAMILY_SPECS[:2]], CompareOptions(speed=False),
                          overrides=dict(parse_override(o) for o in SHRINK))
    e, v, c, h, kv = 64, 300, 64, 128, 32  # kv: 2 KV heads of 16
    gpt2_layer = 3 * e * e + (e * e + e) + (e * h + h) + (h * e + e) + 2 * 2 * e  # q k v, out, mlp, 2 LayerNorms
    llama_layer = 2 * e * e + 2 * e * kv + 3 * e * h + 2 * e  # q o, k v, SwiGLU, 2 RMSNorms
    assert gpt2.parameters == v * e + c * e + 2 * gpt2_layer + 2 * e + e * v  # untied head
    assert llama.parameters == v * e + 2 * llama_layer + e  # RoPE: no table; tied head
    assert gpt2.parameters_without_embeddings == 2 * gpt2_layer + 2 * e
    assert llama.parameters_without_embeddings == 2 * llama_layer + e
    assert llama.spec["attention"]["num_kv_heads"] == 2 and llama.spec["feedforward"]["hidden_dim"] == h
    assert gpt2.spec["feedforward"]["hidden_dim"] == h and gpt2.overrides_not_applied == ["attention.num_kv_heads"]


def test_a_part_parameter_applies_where_the_part_declares_it():
    pytest.importorskip("modelkit_llama")
    gpt2, llama = load_spec("configs/gpt2-small.json"), load_spec("configs/pretrained/llama-3.2-1b.json")
    for key, by_gpt2, by_llama in [("attention.num_kv_heads", False, True), ("feedforward.activation", True, False),
                                   ("positional.theta", False, True), ("norm.eps", True, True),
                                   ("n_layers", True, True), ("block", True, True)]:
        assert (declares(gpt2.to_dict(), key), declares(llama.to_dict(), key)) == (by_gpt2, by_llama), key
    assert declares({**gpt2.to_dict(), "attention": "llama.gqa"}, "attention.num_kv_heads")  # after a slot override
    (changed,), (skipped,) = apply_overrides_where_declared([gpt2], {"attention": "llama.gqa",
                                                                      "attention.num_kv_heads": 4}, ["gpt2"])
    assert changed.attention.type == "llama.gqa" and changed.attention.params["num_kv_heads"] == 4 and not skipped


def test_an_override_no_spec_declares_is_refused():
    with pytest.raises(CompareError, match=r"override 'attention.num_kv_head': no spec's part declares it "
                                           r"\(a has attention 'mha'\)"):
        compare([tiny_model_spec(name="a")], CompareOptions(speed=False), overrides={"attention.num_kv_head": 2})
    with pytest.raises(SpecError, match="n_layrs"):  # top-level fields are every spec's: validated
        compare([tiny_model_spec(name="a")], CompareOptions(speed=False), overrides={"n_layrs": 2})


def test_different_vocabularies_train_on_the_same_tokens_or_are_refused(tmp_path, capsys):
    small, big = tmp_path / "small.json", tmp_path / "big.json"
    small.write_text(json.dumps(tiny_model_spec(name="small", vocab_size=300)))
    big.write_text(json.dumps(tiny_model_spec(name="big", vocab_size=50304)))
    data = tmp_path / "text.txt"
    data.write_text(synthetic_text(40))
    assert main(["compare", str(big), str(small), "--train-steps", "1", "--data", str(data), "--no-speed"]) == 2
    assert "outside the vocabulary of small (vocab_size 300)" in capsys.readouterr().err
    assert main(["compare", str(big), str(small), "--no-speed"]) == 0
    out = capsys.readouterr().out
    assert "vocabularies differ (big 50,304, small 300)" in out
    reports = compare([tiny_model_spec(name="big", vocab_size=50304), tiny_model_spec(name="gpt2", vocab_size=50257)],
                      CompareOptions(speed=False))
    assert reports[0].parameters != reports[1].parameters
    assert reports[0].parameters_without_embeddings == reports[1].parameters_without_embeddings
