"""The whole model against the book's chapter-4 code and the book's printed numbers."""

from __future__ import annotations

import json

import pytest
import torch
from book_reference import GPT_CONFIG_124M
from book_reference import GPTModel as BookGPTModel
from conftest import REPO, tiny_cfg

from modelkit import GPTModel, build_model, count_parameters, load_spec

BOOK_BATCH = torch.tensor([[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]])  # "Every effort moves you", "Every day holds a"


def test_seeded_gpt2_small_reproduces_the_books_printed_logits_in_training_mode():
    torch.manual_seed(123)
    model = GPTModel(dict(GPT_CONFIG_124M, attention={"type": "mha", "backend": "eager"}))
    out = model(BOOK_BATCH)  # training mode, dropout active, as the book calls it
    assert out.shape == (2, 4, 50257)
    # The book prints: tensor([[[ 0.3613,  0.4222, -0.0711, ...
    assert torch.allclose(out[0, 0, :3], torch.tensor([0.3613, 0.4222, -0.0711]), atol=1e-4)
    torch.manual_seed(123)
    book = BookGPTModel(GPT_CONFIG_124M)
    assert torch.allclose(out, book(BOOK_BATCH), atol=1e-5)  # same weights, dropout placement and stream


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_eval_logits_equal_the_books_code_for_any_weights(backend):
    cfg = tiny_cfg(drop_rate=0.1, qkv_bias=True)
    torch.manual_seed(0)
    book = BookGPTModel(cfg).eval()
    with torch.no_grad():  # weights the book's init would never produce
        for p in book.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model = GPTModel(dict(cfg, attention={"type": "mha", "backend": backend})).eval()
    model.load_state_dict(book.state_dict())  # the book's att.mask buffers are accepted
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["context_length"]))
    with torch.no_grad():
        assert torch.allclose(model(idx), book(idx), atol=1e-5)


def test_parameter_names_are_the_books():
    cfg = tiny_cfg()
    ours = set(GPTModel(cfg).state_dict())
    theirs = {k for k in BookGPTModel(cfg).state_dict() if not k.endswith("att.mask")}
    assert ours == theirs
    assert {"tok_emb.weight", "pos_emb.weight", "trf_blocks.0.att.W_query.weight",
            "trf_blocks.0.ff.layers.0.weight", "trf_blocks.0.norm1.scale", "final_norm.shift",
            "out_head.weight"} <= ours


def test_eager_and_sdpa_give_the_same_logits_on_the_same_weights():
    torch.manual_seed(1)
    eager = build_model(tiny_cfg(attention={"type": "mha", "backend": "eager"})).eval()
    sdpa = build_model(tiny_cfg(attention={"type": "mha", "backend": "sdpa"})).eval()
    sdpa.load_state_dict(eager.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (eager(idx) - sdpa(idx)).abs().max() < 1e-5


# The book's and the figures: total, excluding the output head, MB at fp32.
GPT2_SIZES = {
    "gpt2-small": (163_009_536, 124_412_160, 621.83),
    "gpt2-medium": (406_212_608, 354_749_440, 1549.58),
    "gpt2-large": (838_220_800, 773_891_840, 3197.56),
    "gpt2-xl": (1_637_792_000, 1_557_380_800, 6247.68),
}


@pytest.mark.parametrize("name", GPT2_SIZES)
def test_gpt2_sizes_counted_on_the_meta_device(name):
    model = build_model(REPO / "configs" / f"{name}.json", device="meta")
    assert all(p.is_meta for p in model.parameters())
    count = count_parameters(model)
    total, without_head, mb = GPT2_SIZES[name]
    assert (count.total, count.without_head, round(count.megabytes(), 2)) == (total, without_head, mb)


def test_tied_embeddings_share_one_parameter():
    model = build_model(tiny_cfg(tie_embeddings=True))
    assert model.out_head.weight is model.tok_emb.weight
    count = count_parameters(model)
    untied = count_parameters(build_model(tiny_cfg()))
    assert count.tied and count.total == untied.total - 97 * 32


def test_block_variants_come_from_json_files_differing_in_one_line():
    small = (REPO / "configs/gpt2-small.json").read_text().splitlines()
    post = (REPO / "configs/gpt2-small-postnorm.json").read_text().splitlines()
    assert len(small) == len(post) and sum(a != b for a, b in zip(small, post)) == 1
    assert load_spec(REPO / "configs/gpt2-small-postnorm.json").block.type == "post_norm"
    model = build_model(REPO / "configs/gpt2-small-postnorm.json", device="meta")
    assert type(model.trf_blocks[0]).__name__ == "PostNormBlock"


def test_build_in_bfloat16_and_on_meta():
    model = build_model(tiny_cfg(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    assert all(p.is_meta for p in build_model(tiny_cfg(), device="meta").parameters())


def test_too_long_input_is_a_clear_error():
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="exceed context_length 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_every_config_file_validates_and_builds_on_meta():
    files = sorted((REPO / "configs").rglob("*.json"))
    assert files
    for path in files:
        spec = load_spec(path)
        model = build_model(spec, device="meta")
        assert count_parameters(model).total > 0, path
        assert json.loads(spec.to_json())["name"] == spec.name
