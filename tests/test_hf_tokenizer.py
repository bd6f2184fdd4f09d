"""Hugging Face tokenizers: a folder's ``tokenizer.json`` carried into the checkpoint and used by
``modelkit generate --checkpoint``, against transformers' ``generate`` + ``PreTrainedTokenizerFast.decode``.

A tiny byte-level BPE is trained with ``tokenizers`` on the sentences below (300 tokens), a perturbed
random ``LlamaForCausalLM`` of that vocabulary is saved with ``save_pretrained`` beside it, and the
folder goes through ``modelkit import-hf``. No downloads.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkit import CheckpointError, save_checkpoint
from modelkit.cli import main as cli_main
from modelkit.hf_tokenizer import HFIncrementalDecoder, HFTokenizer, TokenizerFileError
from modelkit.tokenizer import get_tokenizer, text_to_token_ids
from modelkit.weights.checkpoint import (
    KEY_TOKENIZER, KEY_TOKENIZER_JSON, checkpoint_tokenizer, read_checkpoint, stored_tokenizer_file,
)
from modelkit.weights.hf_families import import_hf

from hf_parity import check_cli_roundtrip, perturbed

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A tiny model learns to write tiny stories, one token at a time.",
    "Tokenizers split text into pieces; models predict the next piece.",
    "Héllo wörld: naïve café, 東京 and an emoji 🙂!",
]
VOCAB = 300
EOS = 1  # "</s>"
PROMPT = "The tiny fox writes 東京"


def train_bpe(vocab: int = VOCAB, metaspace: bool = False) -> Any:
    """A BPE ``tokenizers.Tokenizer`` of ``vocab`` tokens trained on :data:`SENTENCES` (byte-level, or
    SentencePiece-like Metaspace), with ``<s>`` = 0 and ``</s>`` = 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None if not metaspace else "<unk>"))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        alphabet: list[str] = []
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<s>", "</s>"] + (["<unk>"] if metaspace else [])
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return tok


def tiny_llama(vocab: int = VOCAB, eos: int | None = EOS) -> Any:
    """A perturbed random ``LlamaForCausalLM`` (2 layers, hidden 64) of ``vocab`` tokens."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      bos_token_id=0, eos_token_id=eos, pad_token_id=None)
    return perturbed(transformers.LlamaForCausalLM(config))


def hf_folder(path: Path, vocab: int = VOCAB, eos: int | None = EOS, tokenizer: bool = True) -> tuple[Path, Any]:
    """``path`` holding a tiny Llama (``save_pretrained``) and, if ``tokenizer``, its tokenizer.json."""
    hf = tiny_llama(vocab, eos)
    hf.save_pretrained(path)
    if tokenizer:
        train_bpe().save(str(path / "tokenizer.json"))
    return path, hf


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Any]:
    """(folder, checkpoint, transformers model): the tiny Llama with its tokenizer, imported by the CLI."""
    root = tmp_path_factory.mktemp("tok")
    folder, hf = hf_folder(root / "llama")
    out = root / "llama.safetensors"
    assert cli_main(["import-hf", str(folder), str(out)]) == 0
    return folder, out, hf


def generate_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``modelkit generate ARGS`` -> (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = cli_main(["generate", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def rewrite_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """A copy of the checkpoint ``src`` at ``dst`` whose metadata has ``changes`` (None removes a key)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(src), framework="pt") as fh:
        meta = dict(fh.metadata())
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


# -- the done-when: the CLI prints what transformers decodes -------------------------------------------

def test_generate_prints_what_transformers_decodes(imported: tuple[Path, Path, Any],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    folder, out, hf = imported
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ids = torch.tensor([fast(PROMPT)["input_ids"]])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                          min_new_tokens=20, pad_token_id=0)
    expected = fast.decode(ref[0])
    rc, text, err = generate_cli(capsys, "--checkpoint", str(out), "--prompt", PROMPT, "--max-new-tokens", "20")
    assert rc == 0, err
    print(f"\n[tokenizer] {text!r}")
    assert ref.shape[1] == ids.shape[1] + 20
    assert text == expected + "\n"
    assert len(expected) > len(PROMPT) + 10  # the continuation is real text


def test_checkpoint_stores_the_file_with_its_hash(imported: tuple[Path, Path, Any]) -> None:
    folder, out, _ = imported
    data = (folder / "tokenizer.json").read_bytes()
    info = read_checkpoint(out)
    assert info.tokenizer.type == "tokenizer.json"
    assert info.tokenizer.size == len(data) and info.tokenizer.eos_token_id == EOS
    assert stored_tokenizer_file(info) == data
    tok = checkpoint_tokenizer(out)
    assert isinstance(tok, HFTokenizer)
    assert (tok.n_vocab, tok.eot_token) == (VOCAB, EOS)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for sentence in SENTENCES:
        assert text_to_token_ids(sentence, tok)[0].tolist() == fast(sentence)["input_ids"]
    assert set(info.tensors) == set(load_names(out))  # the file is no tensor


def load_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return list(fh.keys())


def test_export_hf_writes_tokenizer_json_back(imported: tuple[Path, Path, Any], tmp_path: Path) -> None:
    folder, _, hf = imported
    check_cli_roundtrip(folder, hf, tmp_path, "LlamaForCausalLM", "tokenizer")
    exported = tmp_path / "exported" / "tokenizer.json"
    assert exported.read_bytes() == (folder / "tokenizer.json").read_bytes()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(exported))
    assert fast.decode(fast(PROMPT)["input_ids"]) == PROMPT


# -- streaming ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metaspace", [False, True], ids=["byte-level", "metaspace"])
def test_streamed_text_continues_the_prompt(metaspace: bool) -> None:
    """Token by token after a context, the decoder gives what decoding the whole sequence adds, for
    random ids (UTF-8 split across tokens included) and for Metaspace's leading spaces."""
    tok = HFTokenizer(train_bpe(metaspace=metaspace).to_str().encode())
    rng = random.Random(0)
    for _ in range(20):
        context = tok.encode(rng.choice(SENTENCES))
        new = tok.encode(" " + rng.choice(SENTENCES)) if metaspace else [rng.randrange(tok.n_vocab)
                                                                         for _ in range(15)]
        dec = HFIncrementalDecoder(tok, context)
        streamed = "".join(dec.feed(i) for i in new) + dec.flush()
        whole, before = tok.decode(context + new), tok.decode(context)
        assert whole.startswith(before)
        assert streamed == whole[len(before):]
    assert HFIncrementalDecoder(tok, tok.encode("The")).feed(tok.encode(" fox")[0]).startswith(" ")


# -- which tokenizer generate uses ------------------------------------------------------------------------

def test_gpt2_checkpoints_use_gpt2s_tokenizer(tmp_path: Path) -> None:
    from modelkit import build_model

    model = build_model({"name": "g", "vocab_size": 50257, "context_length": 16, "emb_dim": 8, "n_heads": 2,
                         "n_layers": 1})
    path = tmp_path / "g.safetensors"
    save_checkpoint(model, path)
    assert read_checkpoint(path).tokenizer.type == "gpt2"
    assert checkpoint_tokenizer(path) is get_tokenizer()
    old = rewrite_metadata(path, tmp_path / "old.safetensors", modelkit__tokenizer=None)  # before the record
    assert KEY_TOKENIZER not in read_checkpoint(old).metadata
    assert checkpoint_tokenizer(old) is get_tokenizer()


def test_gpt2_folder_without_tokenizer_json_records_gpt2(tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    import_hf(tmp_path / "gpt2", tmp_path / "g.safetensors")
    assert read_checkpoint(tmp_path / "g.safetensors").tokenizer.type == "gpt2"


def test_no_tokenizer_recorded_asks_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = hf_folder(tmp_path / "bare", tokenizer=False)
    out = tmp_path / "bare.safetensors"
    import_hf(folder, out)
    assert read_checkpoint(out).tokenizer.type == "none"
    rc, _, err = generate_cli(capsys, "--checkpoint", str(out), "--prompt", "The", "--max-new-tokens", "2")
    assert rc == 2 and "records no tokenizer" in err and "--tokenizer" in err
    train_bpe().save(str(tmp_path / "tok.json"))
    rc, text, err = generate_cli(capsys, "--checkpoint", str(out), "--prompt", "The", "--max-new-tokens", "2",
                                 "--tokenizer", str(tmp_path / "tok.json"))
    assert rc == 0, err
    assert text.startswith("The")


def test_explicit_tokenizer_wins_and_vocab_mismatch_is_refused(imported: tuple[Path, Path, Any],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = imported
    rc, _, err = generate_cli(capsys, "--checkpoint", str(out), "--prompt", "The", "--tokenizer", "gpt2")
    assert rc == 2
    assert "vocab_size 300, fewer than the GPT-2 tokenizer's 50257 tokens" in err


def test_eos_needs_an_end_of_text_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = hf_folder(tmp_path / "noeos", eos=None)
    out = tmp_path / "noeos.safetensors"
    import_hf(folder, out)
    assert read_checkpoint(out).tokenizer.eos_token_id is None
    rc, _, err = generate_cli(capsys, "--checkpoint", str(out), "--prompt", "The", "--eos")
    assert rc == 2 and "has no end-of-text id" in err


def test_tokenizer_larger_than_the_model_is_refused_at_import(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = hf_folder(tmp_path / "small", vocab=256)
    out = tmp_path / "small.safetensors"
    capsys.readouterr()
    assert cli_main(["import-hf", str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert "has 300 tokens, more than the model's vocab_size 256" in err
    assert not out.exists()


# -- a stored tokenizer that was altered or lost -------------------------------------------------------------

def test_altered_stored_tokenizer_is_refused(imported: tuple[Path, Path, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = imported
    text = read_checkpoint(out).metadata[KEY_TOKENIZER_JSON]
    edited = text.replace('"fox"', '"f0x"') if '"fox"' in text else text.replace("<s>", "<S>", 1)
    assert edited != text
    bad = rewrite_metadata(out, tmp_path / "edited.safetensors", modelkit__tokenizer__json=edited)
    rc, _, err = generate_cli(capsys, "--checkpoint", str(bad), "--prompt", "The")
    assert rc == 2 and "the stored tokenizer.json was altered" in err and "sha256" in err
    capsys.readouterr()
    assert cli_main(["export-hf", str(bad), str(tmp_path / "exp")]) == 2
    assert "was altered" in capsys.readouterr().err and not (tmp_path / "exp").exists()

    lost = rewrite_metadata(out, tmp_path / "lost.safetensors", modelkit__tokenizer__json=None)
    with pytest.raises(CheckpointError, match="metadata.modelkit.tokenizer.json is missing"):
        checkpoint_tokenizer(lost)

    import hashlib

    junk = "[1, 2]"  # stored with a matching record: refused as a tokenizer, not used
    record = {"type": "tokenizer.json", "sha256": hashlib.sha256(junk.encode()).hexdigest(), "size": len(junk)}
    forged = rewrite_metadata(out, tmp_path / "forged.safetensors", modelkit__tokenizer__json=junk,
                              modelkit__tokenizer=json.dumps(record))
    with pytest.raises(CheckpointError, match=r"its stored tokenizer.json\) is not a tokenizer.json"):
        checkpoint_tokenizer(forged)


@pytest.mark.parametrize("record, message", [
    ('{"type": "tokenizer.json"}', "needs its sha256 and size"),
    ('{"type": "tokenizer.json", "sha256": "xyz", "size": 3}', "metadata.modelkit.tokenizer.sha256"),
    ('{"type": "sentencepiece"}', "metadata.modelkit.tokenizer.type"),
    ('{"type": "gpt2", "path": "/etc/passwd"}', "metadata.modelkit.tokenizer.path: unknown key"),
    ('{"type": "gpt2"}', "a stored tokenizer.json, but metadata.modelkit.tokenizer records type 'gpt2'"),
    ("not json", "metadata.modelkit.tokenizer: not JSON text"),
])
def test_malformed_tokenizer_record_is_refused(imported: tuple[Path, Path, Any], tmp_path: Path, record: str,
                                               message: str) -> None:
    _, out, _ = imported
    bad = rewrite_metadata(out, tmp_path / "bad.safetensors", modelkit__tokenizer=record)
    with pytest.raises(CheckpointError, match="invalid modelkit metadata") as exc:
        read_checkpoint(bad)
    assert message in str(exc.value)


# -- hostile tokenizer files ---------------------------------------------------------------------------------

def _write(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    elif kind == "not-json":
        path.write_text("{ this is not json")
    elif kind == "list":
        path.write_text("[1, 2, 3]")
    elif kind == "deep":
        path.write_text("[" * 100_000 + "]" * 100_000)
    elif kind == "not-a-tokenizer":
        path.write_text(json.dumps({"model": {"type": "Nonsense"}}))
    elif kind == "empty-vocab":
        path.write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}))


HOSTILE = {"fifo": "not a regular file", "folder": "not a regular file", "binary": "not UTF-8",
           "not-json": "not JSON", "list": "expected a JSON object", "deep": "is not a tokenizer.json",
           "not-a-tokenizer": "the tokenizers library reads", "empty-vocab": "has no tokens"}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_tokenizer_files_are_refused(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    folder, _ = hf_folder(tmp_path / "f", tokenizer=False)
    _write(folder / "tokenizer.json", kind)
    out = tmp_path / "out.safetensors"
    capsys.readouterr()
    assert cli_main(["import-hf", str(folder), str(out)]) == 2
    err = capsys.readouterr().err
    assert HOSTILE[kind] in err and "tokenizer" in err and "Traceback" not in err
    assert not out.exists()
    if kind != "folder":
        with pytest.raises(TokenizerFileError, match=HOSTILE[kind]):
            HFTokenizer.from_file(folder / "tokenizer.json")


def test_huge_tokenizer_file_is_refused_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelkit.hf_tokenizer as hf_tokenizer

    path = tmp_path / "tokenizer.json"
    train_bpe().save(str(path))
    monkeypatch.setattr(hf_tokenizer, "MAX_TOKENIZER_BYTES", path.stat().st_size - 1)
    with pytest.raises(TokenizerFileError, match="MAX_TOKENIZER_BYTES"):
        HFTokenizer.from_file(path)
    with pytest.raises(TokenizerFileError, match="MAX_TOKENIZER_BYTES"):
        HFTokenizer(path.read_bytes())


def test_added_tokens_count_in_the_vocabulary() -> None:
    tok = train_bpe()
    tok.add_special_tokens(["<|extra|>"])
    hf = HFTokenizer(tok.to_str().encode())
    assert hf.n_vocab == VOCAB + 1
    assert hf.encode("<|extra|>") == [VOCAB] and hf.decode([VOCAB]) == "<|extra|>"


def test_info_shows_the_recorded_tokenizer(imported: tuple[Path, Path, Any],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = imported
    capsys.readouterr()
    assert cli_main(["info", str(out)]) == 0
    assert "tokenizer:   tokenizer.json stored (" in capsys.readouterr().out
    assert cli_main(["info", "--json", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)["checkpoint"]["tokenizer"]
    assert record["type"] == "tokenizer.json" and record["eos_token_id"] == EOS


def test_eos_stops_where_transformers_stops(imported: tuple[Path, Path, Any], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With config.json's eos_token_id set to a token the greedy text reaches, ``--eos`` stops there
    (the token unprinted), as transformers' ``generate`` does."""
    import shutil

    folder, _, hf = imported
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    ids = torch.tensor([fast(PROMPT)["input_ids"]])
    with torch.no_grad():
        free = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                           min_new_tokens=20, pad_token_id=0)[0, ids.shape[1]:].tolist()
    eos = free[5]
    stop = free.index(eos)  # the first time the greedy text reaches it
    copy = shutil.copytree(folder, tmp_path / "eos")
    config = json.loads((copy / "config.json").read_text())
    config["eos_token_id"] = eos
    (copy / "config.json").write_text(json.dumps(config))
    out = tmp_path / "eos.safetensors"
    import_hf(copy, out)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                          eos_token_id=eos, pad_token_id=0)
    assert ref[0, -1].item() == eos and ref.shape[1] == ids.shape[1] + stop + 1
    rc, text, err = generate_cli(capsys, "--checkpoint", str(out), "--prompt", PROMPT, "--max-new-tokens", "20",
                                 "--eos")
    assert rc == 0, err
    assert text == fast.decode(ref[0, :-1]) + "\n"
