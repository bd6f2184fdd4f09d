"""Tests for modelkit.tokenizer (offline GPT-2 tokenizer).

Expected values come from outside the code under test: published GPT-2 token
ids (also used in "Build a Large Language Model (From Scratch)"), the installed
tiktoken's own pattern string, and the SHA-256 published in tiktoken's
``r50k_base`` definition.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from modelkit import tokenizer as tk

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSET = REPO_ROOT / "modelkit" / "assets" / "gpt2.tiktoken"

# Hash tiktoken itself expects for r50k_base.tiktoken (tiktoken_ext/openai_public.py).
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

MIXED_TEXT = (
    "Café naïve résumé — Ünïcödé façade\n"
    "日本語のテキスト，中文字符，한국어\n"
    "emoji: 🤖 👍🏽 👨‍👩‍👧 🇩🇪\n"
    "\ttab\t\tdouble tab\n"
    "multiple   spaces     here  \n\n\n"
    "   leading and trailing   \r\n"
    "math ∑ x² ≤ ∞, quotes «» “” ‘’, ZWJ\u200d, NBSP\u00a0end<|endoftext|>after"
)


@pytest.fixture(scope="module")
def enc():
    return tk.get_tokenizer()


# ---------------------------------------------------------------- constants


def test_asset_file_matches_published_hash_and_size():
    data = ASSET.read_bytes()
    assert len(data) == 835_554
    assert hashlib.sha256(data).hexdigest() == R50K_SHA256
    assert tk.GPT2_BPE_SHA256 == R50K_SHA256


def test_pattern_matches_installed_tiktoken():
    from tiktoken_ext.openai_public import r50k_pat_str

    assert tk.GPT2_PAT_STR == r50k_pat_str


def test_special_token_constants(enc):
    assert tk.ENDOFTEXT == "<|endoftext|>"
    assert tk.ENDOFTEXT_ID == 50256
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.max_token_value == 50256
    assert enc.name == "gpt2"


def test_get_tokenizer_is_cached(enc):
    assert tk.get_tokenizer() is enc


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello, I am", [15496, 11, 314, 716]),
        ("Every effort moves you", [6109, 3626, 6100, 345]),
        ("<|endoftext|>", [50256]),
        ("Hello world", [15496, 995]),
    ],
)
def test_known_ids(enc, text, ids):
    assert enc.encode(text, allowed_special={"<|endoftext|>"}) == ids
    t = tk.text_to_token_ids(text)
    assert t.dtype == torch.long
    assert t.shape == (1, len(ids))
    assert t.tolist() == [ids]


def test_text_to_token_ids_empty():
    t = tk.text_to_token_ids("")
    assert t.shape == (1, 0) and t.dtype == torch.long


def test_text_to_token_ids_accepts_explicit_tokenizer(enc):
    assert tk.text_to_token_ids("Hello, I am", tokenizer=enc).tolist() == [[15496, 11, 314, 716]]


def test_round_trip_mixed_unicode(enc):
    ids = tk.text_to_token_ids(MIXED_TEXT)
    assert ids.shape[0] == 1
    assert 50256 in ids[0].tolist()  # <|endoftext|> was allowed and encoded as one id
    assert tk.token_ids_to_text(ids) == MIXED_TEXT
    assert tk.token_ids_to_text(ids[0]) == MIXED_TEXT
    assert tk.token_ids_to_text(ids[0].tolist()) == MIXED_TEXT
    assert enc.decode(enc.encode(MIXED_TEXT, allowed_special="all")) == MIXED_TEXT


# ---------------------------------------------------------------- decoding errors


def test_token_ids_to_text_known():
    assert tk.token_ids_to_text(torch.tensor([[15496, 11, 314, 716]])) == "Hello, I am"
    assert tk.token_ids_to_text([6109, 3626, 6100, 345]) == "Every effort moves you"
    assert tk.token_ids_to_text([]) == ""


@pytest.mark.parametrize("bad", [50257, 100_000, -1])
def test_token_ids_to_text_out_of_range(bad):
    with pytest.raises(ValueError) as excinfo:
        tk.token_ids_to_text([15496, bad, 11])
    msg = str(excinfo.value)
    assert str(bad) in msg and "50257" in msg
    with pytest.raises(ValueError, match=str(bad)):
        tk.token_ids_to_text(torch.tensor([[15496, bad]]))


def test_token_ids_to_text_rejects_batch():
    with pytest.raises(ValueError, match="batch"):
        tk.token_ids_to_text(torch.tensor([[15496, 11], [314, 716]]))


def test_token_ids_to_text_rejects_non_integers():
    with pytest.raises(TypeError):
        tk.token_ids_to_text(torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError):
        tk.token_ids_to_text([1, "2"])


# ---------------------------------------------------------------- integrity check


def test_corrupted_asset_raises_clear_error(tmp_path):
    data = bytearray(ASSET.read_bytes())
    assert data[0:1] == b"I"  # first line is "IQ== 0"
    data[0] = ord("J")  # still valid base64, so only the hash check can catch it
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_bytes(bytes(data))
    bad_hash = hashlib.sha256(bytes(data)).hexdigest()

    with pytest.raises(tk.TokenizerAssetError) as excinfo:
        tk._load_ranks(bad)
    msg = str(excinfo.value)
    assert str(bad) in msg
    assert R50K_SHA256 in msg
    assert bad_hash in msg


def test_loader_on_intact_copy(tmp_path):
    good = tmp_path / "copy.tiktoken"
    good.write_bytes(ASSET.read_bytes())
    ranks = tk._load_ranks(good)
    assert len(ranks) == 50256
    assert sorted(ranks.values()) == list(range(50256))
    assert ranks[b"!"] == 0
    assert ranks[b"Hello"] == 15496


# ---------------------------------------------------------------- streaming


def test_incremental_decoder_emoji_split_across_tokens(enc):
    text = "Robot 🤖 says hi 👍🏽 and 日本語!"
    ids = enc.encode(text)
    # Make sure the test is meaningful: some token is not valid UTF-8 on its own.
    assert any(
        enc.decode_single_token_bytes(i).decode("utf-8", errors="replace") != enc.decode_single_token_bytes(i).decode("utf-8", errors="ignore")
        for i in ids
    )
    dec = tk.IncrementalDecoder()
    pieces = [dec.feed(i) for i in ids]
    for p in pieces:
        assert "\ufffd" not in p
    assert "" in pieces  # at least one token produced no complete character yet
    tail = dec.flush()
    assert tail == ""
    assert "".join(pieces) == text


def test_incremental_decoder_prefixes_are_text_prefixes(enc):
    ids = enc.encode(MIXED_TEXT, allowed_special="all")
    dec = tk.IncrementalDecoder(enc)
    so_far = ""
    for i in ids:
        so_far += dec.feed(i)
        assert MIXED_TEXT.startswith(so_far)
    so_far += dec.flush()
    assert so_far == MIXED_TEXT


def test_incremental_decoder_matches_decode_on_arbitrary_ids(enc):
    rng = random.Random(0)
    dec = tk.IncrementalDecoder(enc)
    for _ in range(200):
        ids = [rng.randrange(enc.n_vocab) for _ in range(rng.randrange(1, 30))]
        streamed = dec.feed_many(ids) + dec.flush()
        assert streamed == enc.decode(ids)


def test_incremental_decoder_flush_incomplete_and_errors(enc):
    dec = tk.IncrementalDecoder(enc)
    first = enc.encode("🤖")[0]  # b"\xf0\x9f": an unfinished 4-byte character
    assert dec.feed(first) == ""
    assert dec.flush() == "\ufffd"
    assert dec.feed_many(enc.encode("ok")) == "ok"  # reusable after flush
    with pytest.raises(ValueError, match="50257"):
        dec.feed(50257)


# ---------------------------------------------------------------- offline


def test_works_with_network_unreachable(tmp_path):
    cache = tmp_path / "tiktoken_cache"
    cache.mkdir()
    script = textwrap.dedent(
        """
        import os, socket, sys

        def _blocked(*args, **kwargs):
            raise OSError("network access blocked by test")

        socket.socket.connect = _blocked
        socket.socket.connect_ex = _blocked
        socket.create_connection = _blocked
        socket.getaddrinfo = _blocked

        from modelkit import tokenizer as tk

        enc = tk.get_tokenizer()
        assert enc.n_vocab == 50257, enc.n_vocab
        assert enc.encode("Hello, I am") == [15496, 11, 314, 716]
        assert tk.text_to_token_ids("Every effort moves you").tolist() == [[6109, 3626, 6100, 345]]
        assert tk.text_to_token_ids("<|endoftext|>").tolist() == [[50256]]
        assert tk.token_ids_to_text([15496, 11, 314, 716]) == "Hello, I am"

        cache = os.environ["TIKTOKEN_CACHE_DIR"]
        assert os.listdir(cache) == [], os.listdir(cache)

        # Sanity check that the blockade is real: tiktoken's own loader must fail.
        import tiktoken
        try:
            tiktoken.get_encoding("r50k_base")
        except Exception:
            pass
        else:
            sys.exit("network was not blocked: tiktoken.get_encoding succeeded")
        print("OFFLINE-OK")
        """
    )
    env = dict(os.environ)
    env["TIKTOKEN_CACHE_DIR"] = str(cache)
    env.pop("DATA_GYM_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OFFLINE-OK" in proc.stdout
    assert list(cache.iterdir()) == []
