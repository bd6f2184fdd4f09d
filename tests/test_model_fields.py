"""The spec's model-level fields beyond the book's model: ``head_dim``, ``embedding_scale``,
``embedding_norm``, ``head_bias`` and ``final_logit_softcap``.

Each is checked against a computation written here with torch's own functions, with the field's
default leaving the book's model unchanged (``tests/test_numbers.py`` holds the book's numbers).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_cfg
from modelkit import CheckpointError, SpecError, build_model, load_spec
from modelkit.introspect import count_parameters
from modelkit.sizing import estimate_size
from modelkit.spec import model_level_features, spec_json_schema
from modelkit.weights.checkpoint import load_checkpoint, save_checkpoint
from modelkit.weights.hf_families import export_hf

ALL_FIELDS: dict[str, Any] = dict(head_dim=12, embedding_scale=math.sqrt(32), head_bias=True,
                                  final_logit_softcap=3.0, embedding_norm={"type": "layernorm", "eps": 1e-6})


def ids(seed: int = 0, length: int = 10) -> torch.Tensor:
    return torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(seed))


def perturb(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_defaults_are_the_books_model() -> None:
    spec = load_spec(tiny_cfg())
    assert (spec.head_dim, spec.embedding_scale, spec.embedding_norm, spec.head_bias, spec.final_logit_softcap) == (
        None, 1.0, None, False, None)
    assert model_level_features(spec) == []
    model = build_model(tiny_cfg())
    assert not hasattr(model, "emb_norm") and model.out_head.bias is None


@pytest.mark.parametrize("attention", ["mha", {"type": "llama.gqa", "num_kv_heads": 2}])
def test_head_dim_sets_the_attention_width(attention: Any) -> None:
    """emb_dim 30 is not divisible by 4 heads; head_dim 12 makes q 48 wide. The attention equals
    softmax(q·kᵀ/√12)·v computed here with torch's sdpa on the module's own projections."""
    with pytest.raises(SpecError, match="not divisible by n_heads 4 \\(or give head_dim\\)"):
        load_spec(tiny_cfg(emb_dim=30))
    model = perturb(build_model(tiny_cfg(emb_dim=30, head_dim=12, attention=attention)))
    att = model.trf_blocks[0].att
    kv_heads = 2 if isinstance(attention, dict) else 4
    assert att.W_query.weight.shape == (48, 30) and att.out_proj.weight.shape == (30, 48)
    assert att.W_key.weight.shape == (12 * kv_heads, 30)
    x = torch.randn(2, 5, 30)
    q = att.W_query(x).view(2, 5, 4, 12).transpose(1, 2)
    k = att.W_key(x).view(2, 5, kv_heads, 12).transpose(1, 2).repeat_interleave(4 // kv_heads, dim=1)
    v = att.W_value(x).view(2, 5, kv_heads, 12).transpose(1, 2).repeat_interleave(4 // kv_heads, dim=1)
    ref = att.out_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 5, 48))
    with torch.no_grad():
        torch.testing.assert_close(att(x), ref)


def test_head_dim_limits_and_rope_size() -> None:
    with pytest.raises(SpecError, match="head_dim: n_heads \\* head_dim"):
        load_spec(tiny_cfg(n_heads=2**10, head_dim=2**11))
    with pytest.raises(SpecError, match="RoPE needs an even head size; head_dim = 7"):
        load_spec(tiny_cfg(head_dim=7, positional="llama.rope"))


def test_embedding_scale_multiplies_the_token_embeddings() -> None:
    """Scaling the embeddings equals scaling the embedding table (same float product per element)."""
    scale = math.sqrt(32)
    scaled = perturb(build_model(tiny_cfg(embedding_scale=scale)))
    plain = build_model(tiny_cfg()).eval()
    state = {k: v.clone() for k, v in scaled.state_dict().items()}
    plain.load_state_dict(state)
    with torch.no_grad():
        plain.tok_emb.weight.mul_(scale)
        torch.testing.assert_close(scaled(ids()), plain(ids()), rtol=0, atol=0)


def test_embedding_norm_normalises_the_summed_embeddings() -> None:
    model = perturb(build_model(tiny_cfg(embedding_norm={"type": "layernorm", "eps": 1e-6})))
    x = ids()
    with torch.no_grad():
        h = model.tok_emb(x) + model.pos_emb.embedding(torch.arange(10))
        h = F.layer_norm(h, (32,), model.emb_norm.scale, model.emb_norm.shift, 1e-6)
        for block in model.trf_blocks:
            h = block(h)
        ref = model.out_head(model.final_norm(h))
        torch.testing.assert_close(model(x), ref)


def test_head_bias_is_added_to_the_logits() -> None:
    model = perturb(build_model(tiny_cfg(head_bias=True, tie_embeddings=True)))
    assert model.out_head.bias.shape == (97,) and model.out_head.bias.abs().min() > 0
    seen: list[torch.Tensor] = []
    model.final_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        logits = model(ids())
    torch.testing.assert_close(logits, seen[0] @ model.tok_emb.weight.T + model.out_head.bias)
    assert count_parameters(model).total == count_parameters(build_model(tiny_cfg(tie_embeddings=True))).total + 97


def test_final_logit_softcap_bounds_the_logits() -> None:
    capped = perturb(build_model(tiny_cfg(final_logit_softcap=2.0)))
    plain = build_model(tiny_cfg()).eval()
    plain.load_state_dict(capped.state_dict())
    with torch.no_grad():
        raw, out = plain(ids()), capped(ids())
    assert raw.abs().max() > 2.0 and out.abs().max() < 2.0
    torch.testing.assert_close(out, 2.0 * torch.tanh(raw / 2.0))


def test_every_field_together_sizes_caches_and_round_trips(tmp_path: Path) -> None:
    cfg = tiny_cfg(emb_dim=32, **ALL_FIELDS)
    model = perturb(build_model(cfg))
    assert estimate_size(model.spec).parameters == count_parameters(model).total
    x = ids(length=12)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    save_checkpoint(model, tmp_path / "m.safetensors")
    back = load_checkpoint(tmp_path / "m.safetensors")
    assert back.spec == model.spec
    with torch.no_grad():
        torch.testing.assert_close(back(x), full, rtol=0, atol=0)
    assert load_spec(json.loads(model.spec.to_json())) == model.spec


def test_the_fields_are_validated_at_their_paths() -> None:
    with pytest.raises(SpecError) as info:
        load_spec(tiny_cfg(head_dim=0, embedding_scale=-1.0, head_bias=1, final_logit_softcap=0,
                           embedding_norm="rmsnrom"))
    text = str(info.value)
    for where in ("head_dim:", "embedding_scale:", "head_bias: expected a boolean", "final_logit_softcap:",
                  "embedding_norm: unknown norm 'rmsnrom'"):
        assert where in text, where
    props = spec_json_schema()[0]["properties"]
    assert {"head_dim", "embedding_scale", "head_bias", "final_logit_softcap", "embedding_norm"} <= set(props)


def test_formats_that_cannot_state_a_field_refuse_it(tmp_path: Path) -> None:
    model = build_model(tiny_cfg(head_bias=True))
    with pytest.raises(CheckpointError, match="head_bias true \\(a GPT-2 config cannot state it\\)"):
        export_hf(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_native_step_refuses_the_fields() -> None:
    from modelkit.runtime.native import native_unsupported_reason

    model = copy.deepcopy(build_model(tiny_cfg(final_logit_softcap=30.0))).eval()
    assert "final_logit_softcap 30.0" in (native_unsupported_reason(model) or "")
