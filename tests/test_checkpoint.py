"""modelkit checkpoints: round trips, tied weights, book checkpoints, and every error path."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

import modelkit
from modelkit import CheckpointError, build_model
from modelkit.weights.checkpoint import (
    checkpoint_metadata,
    load_book_checkpoint,
    load_checkpoint,
    load_state_dict_into,
    read_checkpoint,
    save_checkpoint,
)
from modelkit.cli import main as cli_main
from modelkit.components.base import ModelDims, Positional
from modelkit.registry import get_registry

sys.path.insert(0, str(Path(__file__).parent))
import book_reference  # noqa: E402


def tiny(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"name": "tiny", "vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
    return cfg | overrides


def tokens(seed: int = 0, vocab: int = 97, shape: tuple[int, int] = (2, 12)) -> Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def saved(tmp_path: Path, cfg: dict[str, Any], name: str = "m.safetensors", seed: int = 0,
          **kwargs: Any) -> tuple[modelkit.GPTModel, Path]:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    path = tmp_path / name
    save_checkpoint(model, path, **kwargs)
    return model, path


def rewrite(src: Path, dst: Path, edit: Any) -> None:
    """Copy a checkpoint with its tensors edited by ``edit(dict)`` and the same metadata (a hand-made
    file, as a buggy or foreign writer would produce)."""
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
        meta = fh.metadata()
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


# -- round trips -----------------------------------------------------------------------------------

def test_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    model, path = saved(tmp_path, tiny(init="gpt2", qkv_bias=True))
    loaded = load_checkpoint(path)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert not loaded.training  # ready for inference


def test_round_trip_preserves_the_resolved_spec(tmp_path: Path) -> None:
    cfg = tiny(norm={"type": "layernorm", "eps": 1e-6}, feedforward={"type": "mlp", "activation": "gelu_exact"})
    model, path = saved(tmp_path, cfg)
    info = read_checkpoint(path)
    assert info.spec == model.spec
    stored = json.loads(info.metadata["modelkit.spec"])
    # every default is written out, not just what the config named
    assert stored["attention"] == {"type": "mha", "backend": "sdpa", "out_bias": True}
    assert stored["feedforward"]["activation"] == {"type": "gelu_exact"}
    assert stored["norm"] == {"type": "layernorm", "eps": 1e-6, "bias": True}
    assert load_checkpoint(path).spec == model.spec


def test_metadata_records_versions_and_caller_metadata(tmp_path: Path) -> None:
    _, path = saved(tmp_path, tiny(), metadata={"step": "120", "dataset": "verdict"})
    info = read_checkpoint(path)
    assert info.metadata["modelkit.version"] == modelkit.__version__
    assert info.metadata["torch.version"] == torch.__version__
    assert info.format_version == 1
    assert info.user_metadata == {"step": "120", "dataset": "verdict"}
    assert info.plugins == []  # only built-in components


def test_file_is_plain_safetensors_with_every_tensor(tmp_path: Path) -> None:
    model, path = saved(tmp_path, tiny())
    with safe_open(str(path), "pt") as fh:  # the reference reader, not ours
        names = set(fh.keys())
        assert torch.equal(fh.get_tensor("trf_blocks.1.att.W_key.weight"), model.trf_blocks[1].att.W_key.weight)
    assert names == set(model.state_dict())


def test_tied_weights_are_stored_once_and_tied_after_load(tmp_path: Path) -> None:
    model, path = saved(tmp_path, tiny(tie_embeddings=True))
    info = read_checkpoint(path)
    assert "out_head.weight" not in info.tensors
    assert info.tied == {"out_head.weight": "tok_emb.weight"}
    loaded = load_checkpoint(path)
    assert loaded.out_head.weight is loaded.tok_emb.weight
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        loaded.tok_emb.weight.add_(1.0)  # one parameter: the head moves with it
    assert torch.equal(loaded.out_head.weight, loaded.tok_emb.weight)


def test_dtype_conversion_on_load(tmp_path: Path) -> None:
    model, path = saved(tmp_path, tiny())
    loaded = load_checkpoint(path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert torch.equal(loaded.pos_emb.weight, model.pos_emb.weight.to(torch.bfloat16))


def test_a_bfloat16_checkpoint_loads_as_bfloat16(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(tiny(), dtype=torch.bfloat16).eval()
    save_checkpoint(model, tmp_path / "bf16.safetensors")
    assert read_checkpoint(tmp_path / "bf16.safetensors").dtypes == ["BF16"]
    loaded = load_checkpoint(tmp_path / "bf16.safetensors")
    assert loaded.tok_emb.weight.dtype == torch.bfloat16
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class _TableSinusoidal(Positional):
    """Sinusoidal embeddings kept in a non-persistent buffer: derived state not in the checkpoint."""

    def __init__(self, dims: ModelDims) -> None:
        super().__init__()
        pos = torch.arange(dims.context_length, dtype=torch.float32)[:, None]
        freq = torch.exp(-torch.arange(0, dims.emb_dim, 2, dtype=torch.float32) * (9.21 / dims.emb_dim))
        table = torch.zeros(dims.context_length, dims.emb_dim)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("table", table, persistent=False)

    def embedding(self, positions: Tensor) -> Tensor:
        return self.table[positions]


@pytest.fixture
def table_positional() -> Any:
    get_registry("positional").register("testkit.table_sin", _TableSinusoidal)
    yield "testkit.table_sin"
    get_registry("positional").unregister("testkit.table_sin")


def test_non_persistent_buffers_are_valid_after_load(tmp_path: Path, table_positional: str) -> None:
    model, path = saved(tmp_path, tiny(positional=table_positional))
    assert "pos_emb.table" not in read_checkpoint(path).tensors
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.pos_emb.table, model.pos_emb.table)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_runtime_component_is_recorded_and_named_when_missing(tmp_path: Path, table_positional: str) -> None:
    _, path = saved(tmp_path, tiny(positional=table_positional))
    plugins = read_checkpoint(path).plugins
    assert plugins == [{"path": "positional", "kind": "positional", "type": table_positional,
                        "distribution": None, "version": None, "module": __name__}]
    get_registry("positional").unregister(table_positional)
    with pytest.raises(CheckpointError, match=rf"positional 'testkit.table_sin' needs the module {__name__}"):
        load_checkpoint(path)
    get_registry("positional").register(table_positional, _TableSinusoidal)  # for the fixture's teardown


def test_missing_plugin_is_named_with_its_distribution(tmp_path: Path) -> None:
    _, src = saved(tmp_path, tiny())
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata()
    spec = json.loads(meta["modelkit.spec"])
    spec["feedforward"]["activation"] = {"type": "mylab.swishglu"}
    meta["modelkit.spec"] = json.dumps(spec)
    meta["modelkit.plugins"] = json.dumps([{"path": "feedforward.activation", "kind": "activation",
                                            "type": "mylab.swishglu", "distribution": "mylab-plugins",
                                            "version": "1.2.0", "module": "mylab.acts"}])
    save_file(tensors, str(tmp_path / "plugin.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "plugin.safetensors")
    assert ("feedforward.activation: activation 'mylab.swishglu' needs the plugin mylab-plugins==1.2.0 "
            "(pip install mylab-plugins)") in str(err.value)


# -- book checkpoints --------------------------------------------------------------------------------

def book_model(cfg: dict[str, Any], seed: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return book_reference.GPTModel(cfg).eval()


def test_book_state_dict_loads_with_the_matching_spec(tmp_path: Path) -> None:
    cfg = tiny(qkv_bias=True)
    book = book_model(cfg)
    torch.save(book.state_dict(), tmp_path / "book.pth")
    assert any(k.endswith("att.mask") for k in book.state_dict())  # the book's buffers are in the file
    model = load_book_checkpoint(tmp_path / "book.pth", cfg)
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(x), book(x), rtol=0, atol=1e-5)
    assert torch.equal(model.trf_blocks[1].ff.layers[2].weight, book.trf_blocks[1].ff.layers[2].weight)


def test_book_chapter5_training_dict_loads(tmp_path: Path) -> None:
    cfg = tiny()
    book = book_model(cfg)
    opt = torch.optim.AdamW(book.parameters(), lr=1e-4)
    torch.save({"model_state_dict": book.state_dict(), "optimizer_state_dict": opt.state_dict()},
               tmp_path / "model_and_optimizer.pth")
    model = load_book_checkpoint(tmp_path / "model_and_optimizer.pth", cfg)
    assert torch.equal(model.tok_emb.weight, book.tok_emb.weight)


def test_book_checkpoint_with_the_wrong_spec_lists_both_shapes(tmp_path: Path) -> None:
    torch.save(book_model(tiny()).state_dict(), tmp_path / "book.pth")
    with pytest.raises(CheckpointError) as err:
        load_book_checkpoint(tmp_path / "book.pth", tiny(n_layers=3, qkv_bias=True))
    text = str(err.value)
    assert "does not fit the spec 'tiny'" in text
    assert "missing from the checkpoint (22):" in text  # layer 2 (16 tensors) + 3 qkv biases in layers 0 and 1
    assert "trf_blocks.2.att.W_query.weight (model (32, 32))" in text
    assert "trf_blocks.0.att.W_query.bias (model (32))" in text


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="refusing to unpickle.*torch.nn.modules.linear.Linear"):
        load_book_checkpoint(tmp_path / "pickled.pth", tiny())


def test_legacy_torch_save_format_loads(tmp_path: Path) -> None:
    cfg = tiny()
    book = book_model(cfg)
    torch.save(book.state_dict(), tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    model = load_book_checkpoint(tmp_path / "legacy.pth", cfg)
    assert torch.equal(model.final_norm.scale, book.final_norm.scale)


# -- error paths -------------------------------------------------------------------------------------

def test_missing_unexpected_and_misshaped_are_listed_together(tmp_path: Path) -> None:
    _, src = saved(tmp_path, tiny())

    def edit(t: dict[str, Tensor]) -> None:
        del t["trf_blocks.1.norm2.shift"]
        t["extra.weight"] = torch.zeros(3)
        t["pos_emb.weight"] = torch.zeros(8, 32)

    rewrite(src, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad.safetensors")
    text = str(err.value)
    assert "missing from the checkpoint (1):\n    trf_blocks.1.norm2.shift (model (32))" in text
    assert "unexpected (not in the model) (1):\n    extra.weight (checkpoint (3))" in text
    assert "mis-shaped (1):\n    pos_emb.weight: checkpoint (8, 32), model (16, 32)" in text


def test_spec_that_does_not_fit_the_weights(tmp_path: Path) -> None:
    model, src = saved(tmp_path, tiny())
    # the same tensors under a spec with a smaller vocabulary
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    meta = checkpoint_metadata(build_model(tiny(vocab_size=50), device="meta"))
    save_file(tensors, str(tmp_path / "mismatch.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match=r"tok_emb.weight: checkpoint \(97, 32\), model \(50, 32\)"):
        load_checkpoint(tmp_path / "mismatch.safetensors")


def test_failed_load_leaves_the_target_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_model(tiny())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    other = build_model(tiny()).state_dict()
    other["final_norm.scale"] = torch.ones(31)
    with pytest.raises(CheckpointError, match=r"final_norm.scale: checkpoint \(31\), model \(32\)"):
        load_state_dict_into(model, other)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_state_dict_into_copies_into_a_built_model() -> None:
    torch.manual_seed(0)
    model = build_model(tiny(tie_embeddings=True))
    torch.manual_seed(1)
    source = build_model(tiny(tie_embeddings=True))
    load_state_dict_into(model, source.state_dict())
    assert torch.equal(model.tok_emb.weight, source.tok_emb.weight)
    assert model.out_head.weight is model.tok_emb.weight


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(tmp_path / "noise.safetensors")
    with pytest.raises(CheckpointError, match="is not a torch.save file"):
        load_book_checkpoint(tmp_path / "noise.safetensors", tiny())


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*No such file"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_plain_safetensors_without_a_spec_is_not_a_modelkit_checkpoint(tmp_path: Path) -> None:
    save_file({"wte.weight": torch.zeros(4, 2)}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="safetensors file but not a modelkit checkpoint.*import-hf"):
        load_checkpoint(tmp_path / "model.safetensors")


def test_torch_pickle_given_to_load_checkpoint(tmp_path: Path) -> None:
    torch.save(build_model(tiny()).state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(tmp_path / "model.pth")


def test_truncated_file_is_reported_not_loaded(tmp_path: Path) -> None:
    _, path = saved(tmp_path, tiny())
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=rf"truncated or corrupt: its header promises {size:,} bytes"):
        load_checkpoint(path)


def test_newer_format_version_is_refused(tmp_path: Path) -> None:
    _, src = saved(tmp_path, tiny())
    with safe_open(str(src), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = fh.metadata() | {"modelkit.format_version": "99"}
    save_file(tensors, str(tmp_path / "future.safetensors"), metadata=meta)
    with pytest.raises(CheckpointError, match="format version '99'.*upgrade modelkit"):
        read_checkpoint(tmp_path / "future.safetensors")


def test_reserved_or_non_text_metadata_is_refused(tmp_path: Path) -> None:
    model = build_model(tiny())
    with pytest.raises(CheckpointError, match="'modelkit.spec' is reserved"):
        save_checkpoint(model, tmp_path / "a.safetensors", metadata={"modelkit.spec": "{}"})
    with pytest.raises(CheckpointError, match="values must be strings.*int for 'step'"):
        save_checkpoint(model, tmp_path / "a.safetensors", metadata={"step": 3})  # type: ignore[dict-item]
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    model, path = saved(tmp_path, tiny())
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="meta device"):
        save_checkpoint(build_model(tiny(), device="meta"), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


def test_save_overwrites_atomically(tmp_path: Path) -> None:
    _, path = saved(tmp_path, tiny())
    model2, _ = saved(tmp_path, tiny(), seed=5)  # same path, new weights
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(tokens()), model2(tokens()))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# -- modelkit info on a checkpoint -------------------------------------------------------------------

def header_only_copy(src: Path, dst: Path) -> None:
    """The checkpoint's header without any tensor data: loading it must fail, info must not."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    dst.write_bytes(raw[: 8 + n])


def test_info_on_a_checkpoint_reads_only_the_header(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, src = saved(tmp_path, tiny(tie_embeddings=True), metadata={"step": "7"})
    header_only_copy(src, tmp_path / "header.safetensors")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(tmp_path / "header.safetensors")
    assert cli_main(["info", str(tmp_path / "header.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny(tie_embeddings=True)))
    assert cli_main(["info", str(tmp_path / "tiny.json"), "--json"]) == 0
    from_config = json.loads(capsys.readouterr().out)
    checkpoint = report.pop("checkpoint")
    assert report == from_config  # the same figures as for the spec itself
    assert checkpoint["metadata"] == {"step": "7"}
    assert checkpoint["tied"] == {"out_head.weight": "tok_emb.weight"}
    assert checkpoint["stored_elements"] == report["parameters"]


def test_info_text_report_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, path = saved(tmp_path, tiny(), metadata={"step": "7"})
    assert cli_main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"tiny  ({path})\n  checkpoint:")
    assert f"written by modelkit {modelkit.__version__}" in out
    assert "metadata:    step=7" in out


def test_info_on_a_non_checkpoint_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(256))
    assert cli_main(["info", str(tmp_path / "noise.safetensors")]) == 2
    assert "is not a safetensors file" in capsys.readouterr().err


def test_plugin_components_record_their_distribution_and_round_trip(tmp_path: Path) -> None:
    if "llama.rope" not in get_registry("positional"):
        pytest.skip("the modelkit-llama plugin is not installed")
    from importlib.metadata import version

    cfg = tiny(positional="llama.rope", norm="llama.rmsnorm", feedforward="llama.swiglu")
    model, path = saved(tmp_path, cfg)
    plugins = {p["path"]: p for p in read_checkpoint(path).plugins}
    assert set(plugins) == {"positional", "norm", "feedforward"}
    assert {(p["distribution"], p["version"]) for p in plugins.values()} == {("modelkit-llama", version("modelkit-llama"))}
    with torch.no_grad():
        assert torch.equal(load_checkpoint(path)(tokens()), model(tokens()))
