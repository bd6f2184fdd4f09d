"""Speed options (bf16, int8 weight-only, torch.compile) keep the model's answers: the fp32 model is the reference.

Accuracy properties only; speed is measured by ``benchmarks/peers.py``, never here.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import skip_without_bf16_kernel, tiny_cfg
from torch import nn

import modelkit.runtime.optimize
from modelkit import build_model
from modelkit.cli import main
from modelkit.runtime.cpu import hardware_flags
from modelkit.errors import SpeedOptionError
from modelkit.generation import generate
from modelkit.runtime.onednn import onednn_linear_available
from modelkit.runtime.quantize import SMALL_BATCH, Int8Linear, quantize_int8_, quantize_weight_int8
from modelkit.runtime.optimize import optimize_for_inference, parse_dtype, set_weight_layout_

pytestmark = pytest.mark.speed

# emb_dim 32 (a multiple of 16) takes the int8 kernel when decoding; 97 in-features take the fallback.
CFG = tiny_cfg(vocab_size=97, emb_dim=32, context_length=32, qkv_bias=True)


def fp32_model(**overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(dict(CFG, **overrides)).eval()


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref).abs().max() / ref.abs().max())


def test_int8_weights_are_within_half_a_step_of_the_float_weights():
    w = torch.randn(40, 64) * torch.linspace(0.01, 3, 40)[:, None]
    w[3] = 0.0
    q, scale = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (40,)
    assert int(q.abs().max()) <= 127
    assert torch.all((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7)
    assert scale[3] == 1.0 and torch.all(q[3] == 0)


@pytest.mark.parametrize("in_features", [64, 97], ids=["int8-kernel", "fallback"])
@pytest.mark.parametrize("rows", [1, SMALL_BATCH + 1], ids=["decode", "prefill"])
def test_int8_linear_computes_with_its_dequantized_weight(in_features, rows):
    torch.manual_seed(1)
    linear = nn.Linear(in_features, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(1, rows, in_features)
    ref = x @ layer.dequantized_weight().T + linear.bias.detach()
    out = layer(x)
    assert out.shape == (1, rows, 48) and out.dtype == torch.float32
    # the int8 kernel rounds activations to bf16 (relative 2^-9); the float path is exact
    assert relative_error(out, ref) < (1e-2 if rows == 1 and in_features % 16 == 0 else 1e-5)


def test_int8_linear_follows_the_activation_dtype():
    layer = Int8Linear.from_linear(nn.Linear(32, 8, bias=False))
    assert layer.bias is None
    assert layer(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_quantize_replaces_every_linear_and_keeps_module_names():
    model = fp32_model()
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    quantize_int8_(model)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert {n for n, m in model.named_modules() if isinstance(m, Int8Linear)} == names
    assert "trf_blocks.0.att.W_query.weight_int8" in model.state_dict()


def test_quantized_tied_head_leaves_the_embedding_in_float():
    model = fp32_model(tie_embeddings=True)
    emb = model.tok_emb.weight.detach().clone()
    quantize_int8_(model)
    assert model.tok_emb.weight.dtype == torch.float32 and torch.equal(model.tok_emb.weight, emb)


@pytest.mark.parametrize("variant", ["bf16", "int8", "bf16+int8"])
def test_fast_variants_stay_close_to_the_fp32_logits(variant):
    if "bf16" in variant:
        skip_without_bf16_kernel()
    ref_model = fp32_model()
    model = optimize_for_inference(fp32_model(), dtype="bf16" if "bf16" in variant else None,
                                   quantize="int8" if "int8" in variant else None)
    idx = torch.randint(0, CFG["vocab_size"], (3, CFG["context_length"]), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ref, out = ref_model(idx), model(idx)
        # decoding (one row per call) takes the int8 kernel path
        step_ref = ref_model(idx[:1, :5], last_only=True)
        step = model(idx[:1, :5], last_only=True)
    assert out.dtype == (torch.bfloat16 if "bf16" in variant else torch.float32)
    assert relative_error(out, ref) < 0.05
    assert relative_error(step, step_ref) < 0.05
    # most next-token predictions are unchanged
    assert float((out.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.8


@pytest.mark.parametrize("variant", ["bf16", "int8"])
def test_fast_variants_generate_with_the_kv_cache(variant):
    if variant == "bf16":
        skip_without_bf16_kernel()
    model = optimize_for_inference(fp32_model(), dtype="bf16" if variant == "bf16" else None,
                                   quantize="int8" if variant == "int8" else None)
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, 10)
    assert out.shape == (1, 13) and out.dtype == torch.long and torch.equal(out[:, :3], prompt)


def test_compiled_model_captures_one_graph_and_generates_the_same_tokens():
    model = fp32_model()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: no graph breaks
    idx = torch.randint(0, CFG["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        assert torch.allclose(compiled(idx), model(idx), atol=1e-5)
    prompt = idx[:1, :4]
    assert torch.equal(generate(compiled, prompt, 12), generate(model, prompt, 12))
    torch._dynamo.reset()


def test_optimize_for_inference_sets_eval_and_checks_its_arguments():
    model = fp32_model().train()
    assert optimize_for_inference(model) is model and not model.training
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("int4")
    with pytest.raises(ValueError, match="unknown quantize"):
        optimize_for_inference(model, quantize="int4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        optimize_for_inference(model, threads=0)
    with pytest.raises(ValueError, match="unknown weight_layout"):
        optimize_for_inference(model, weight_layout="diagonal")  # type: ignore[arg-type]


def test_cli_generate_with_bf16_and_int8_prints_what_the_api_generates(tmp_path, capsys):
    from modelkit.tokenizer import text_to_token_ids, token_ids_to_text

    skip_without_bf16_kernel()
    cfg = tiny_cfg(vocab_size=50257, emb_dim=32, context_length=32)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    assert main(["generate", "--config", str(path), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "4",
                 "--dtype", "bfloat16", "--quantize", "int8"]) == 0
    torch.manual_seed(4)
    model = optimize_for_inference(build_model(cfg), dtype=torch.bfloat16, quantize="int8")
    expected = generate(model, text_to_token_ids("Hello"), 5)
    assert capsys.readouterr().out == token_ids_to_text(expected) + "\n"


def test_single_query_sdpa_attends_to_every_cached_key():
    from modelkit.components.kernels import sdpa_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, n, 16, generator=gen) for n in (1, 9, 9))
    ref = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1) @ v  # the last query: no key is masked
    assert torch.allclose(sdpa_attention(q, k, v), ref, atol=1e-6)


def test_column_major_weights_keep_values_names_and_outputs():
    model = fp32_model()
    ref_model = fp32_model()
    params = dict(model.named_parameters())
    set_weight_layout_(model, "columns")
    w = model.trf_blocks[0].att.W_query.weight
    assert w is params["trf_blocks.0.att.W_query.weight"] and w.t().is_contiguous() and not w.is_contiguous()
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), ref_model.state_dict().values()))
    idx = torch.randint(0, CFG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        assert torch.allclose(model(idx), ref_model(idx), atol=1e-5)
    set_weight_layout_(model, "rows")
    assert w.is_contiguous()


def test_column_major_model_trains_and_saves_like_the_row_major_one(tmp_path):
    from modelkit.weights.checkpoint import load_checkpoint, save_checkpoint

    models = [fp32_model().train(), set_weight_layout_(fp32_model().train(), "columns")]
    idx = torch.randint(0, CFG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(7))
    grads = []
    for model in models:
        torch.manual_seed(1)  # same dropout masks
        model(idx).sum().backward()
        grads.append(model.trf_blocks[1].ff.layers[0].weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    save_checkpoint(models[1], tmp_path / "m.safetensors")
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), models[1].state_dict().values()))


def test_tied_head_keeps_the_embeddings_layout():
    model = set_weight_layout_(fp32_model(tie_embeddings=True), "columns")
    assert model.out_head.weight is model.tok_emb.weight and model.tok_emb.weight.is_contiguous()


@pytest.mark.parametrize("avx512", [True, False], ids=["avx512", "avx2"])
@pytest.mark.parametrize(("dtype", "kernel", "layout"),
                         [(None, "aten", "columns"), (None, "onednn", "columns"), ("bf16", "aten", "rows"), ("bf16", "onednn", "rows")])
def test_optimize_for_inference_picks_the_layout_measured_fastest_on_the_cpu(monkeypatch, dtype, kernel, layout, avx512):
    # benchmarks/cpu_defaults.py: fp32 column-major decodes faster with AVX-512, and only prefills slower with AVX2
    monkeypatch.setattr(modelkit.runtime.optimize, "_columns_pay_off", lambda: avx512)
    layout = layout if avx512 else "rows"
    if kernel == "onednn" and not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    if kernel == "onednn" and dtype == "bf16" and not onednn_linear_available(torch.bfloat16):
        with pytest.raises(SpeedOptionError, match=r"no bfloat16 inner product for this CPU's instruction set, \w+"):
            optimize_for_inference(fp32_model(), dtype=dtype, linear_kernel=kernel)
        return
    model = optimize_for_inference(set_weight_layout_(fp32_model(), "columns"), dtype=dtype, linear_kernel=kernel)
    w = model.out_head.weight
    assert (w.t().is_contiguous() and not w.is_contiguous()) if layout == "columns" else w.is_contiguous()


def test_columns_are_the_auto_layout_exactly_where_onednn_may_use_avx512():
    flags = hardware_flags()
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL").upper() in ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2")
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags and not capped
    model = optimize_for_inference(fp32_model())
    assert model.out_head.weight.is_contiguous() == (not avx512)
