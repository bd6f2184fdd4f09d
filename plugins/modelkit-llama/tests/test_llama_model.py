"""The llama-style model (configs/llama-style.json at tiny sizes): it trains, and the KV cache is exact."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from modelkit import build_model, generate, load_spec
from modelkit.tokenizer import text_to_token_ids


pytestmark = pytest.mark.usefixtures("modelkit_one_thread")

CONFIG = Path(__file__).resolve().parents[3] / "configs" / "llama-style.json"


def llama_style(**overrides: Any) -> dict[str, Any]:
    """configs/llama-style.json with its sizes shrunk (components and their settings kept)."""
    if not CONFIG.exists():
        pytest.skip(f"{CONFIG} not found (run from the modelkit repository)")
    spec = json.loads(CONFIG.read_text())
    spec.update(vocab_size=64, context_length=32, emb_dim=32, n_heads=4, n_layers=2)
    spec["attention"] = {**spec["attention"], "num_kv_heads": 2}
    spec["feedforward"] = {**spec["feedforward"], "hidden_dim": 64}
    spec.update(overrides)
    return spec


def test_the_config_is_llama_like() -> None:
    spec = load_spec(CONFIG if CONFIG.exists() else llama_style())
    assert spec.positional.type == "llama.rope" and spec.norm.type == "llama.rmsnorm"
    assert spec.attention.type == "llama.gqa" and spec.feedforward.type == "llama.swiglu"
    assert spec.tie_embeddings and not spec.qkv_bias
    assert spec.attention.params["out_bias"] is False and spec.feedforward.params["bias"] is False
    model = build_model(spec, device="meta")
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    assert not [n for n, _ in model.named_parameters() if n.startswith("pos_emb")]
    assert model.out_head.weight is model.tok_emb.weight


def short_text_ids() -> tuple[torch.Tensor, int]:
    """A generated text, GPT-2 tokenised, its ids renumbered 0..n-1 (n distinct tokens)."""
    animals = ["llama", "alpaca", "camel", "vicuna"]
    text = " ".join(f"the {animals[i % 4]} walks {i % 7} steps to the {animals[(i + 1) % 4]}." for i in range(60))
    ids = text_to_token_ids(text)[0]
    distinct, compact = torch.unique(ids, return_inverse=True)
    return compact, len(distinct)


def test_training_a_few_steps_lowers_the_loss() -> None:
    ids, vocab = short_text_ids()
    torch.manual_seed(0)
    model = build_model(llama_style(vocab_size=vocab)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        starts = torch.randint(0, len(ids) - 33, (8,), generator=g)
        batch = torch.stack([ids[s:s + 33] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), rel=0.2)  # ~uniform at start
    assert last < 0.5 * first, f"loss fell only from {first:.3f} to {last:.3f}"


@pytest.mark.parametrize("positional", ["llama.rope", "llama.alibi"])
def test_cached_logits_equal_full_recomputation(positional: str) -> None:
    torch.manual_seed(0)
    model = build_model(llama_style(positional=positional)).eval()
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:10], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 20)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positional", ["llama.rope", "llama.alibi"])
def test_cached_generation_equals_uncached(positional: str) -> None:
    torch.manual_seed(0)
    model = build_model(llama_style(positional=positional)).eval()
    prompt = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(3))
    # 40 new tokens with a 32-token window: the cache is used, then the window slides.
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "top_k": 10, "seed": 7}):
        cached = generate(model, prompt, 40, use_cache=True, **kwargs)
        uncached = generate(model, prompt, 40, use_cache=False, **kwargs)
        assert cached.shape == (2, 46)
        assert torch.equal(cached, uncached), kwargs


def test_optimized_model_reads_q_k_v_and_gate_up_in_one_matmul_each(monkeypatch: pytest.MonkeyPatch) -> None:
    from modelkit.runtime.onednn import onednn_linear_available
    from modelkit.runtime.optimize import optimize_for_inference
    from modelkit.runtime.stacking import StackedLinear, StackedLinears
    from modelkit.runtime.steps import step_of

    if not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    torch.manual_seed(0)
    ref = build_model(llama_style()).eval()
    fast = optimize_for_inference(copy.deepcopy(ref))  # stacks the groups modelkit_llama.runtime registers
    assert all(type(blk.att.W_query) is StackedLinear and type(blk.ff.gate_proj) is StackedLinear
               for blk in fast.trf_blocks)
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        assert torch.equal(a, b), name  # names and values unchanged
    matmuls: list[int] = []
    outputs = StackedLinears.outputs

    def counting(self: StackedLinears, x: torch.Tensor) -> Any:
        matmuls.append(len(self.sizes))
        return outputs(self, x)

    monkeypatch.setattr(StackedLinears, "outputs", counting)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), ref(ids), rtol=1e-4, atol=1e-5)
    assert matmuls == [3, 2] * len(fast.trf_blocks)  # q/k/v, then gate/up, in every block
    with torch.inference_mode():
        assert torch.equal(step_of(fast)(ids), fast(ids))  # the registered steps: the same logits
    assert torch.equal(generate(fast, ids[:1], 12), generate(ref, ids[:1], 12))


def test_the_components_are_plain_modules_and_the_runtime_module_is_optional() -> None:
    import ast
    from pathlib import Path

    import modelkit_llama
    from modelkit.runtime.steps import step_of

    package = Path(modelkit_llama.__file__).parent
    for path in package.glob("*.py"):
        if path.name == "runtime.py":
            continue
        imported = {node.module or "" for node in ast.walk(ast.parse(path.read_text()))
                    if isinstance(node, ast.ImportFrom)}
        assert not any(name.startswith("modelkit.runtime") for name in imported), path.name
    torch.manual_seed(0)
    norm = build_model(llama_style()).eval().final_norm
    assert step_of(norm) is not norm  # modelkit loaded modelkit_llama.runtime through its entry point
