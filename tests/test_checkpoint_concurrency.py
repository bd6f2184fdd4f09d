"""A checkpoint replaced while it is being loaded gives the old or the new model, whole, or a clean error.

One process rewrites the checkpoint in a loop between two models (the whole file written to a
temporary file beside it, then ``os.replace``d over it: ``save_checkpoint``'s protocol); this process
loads it in a loop meanwhile. Every load must be one of the two models bit for bit, or a
:class:`CheckpointError`; never a mixture of the two.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import pytest
import torch

from modelkit import CheckpointError, build_model
from modelkit.weights import checkpoint
from modelkit.weights.checkpoint import load_checkpoint, save_checkpoint
from modelkit.weights.safetensors_file import Header

SECONDS = 2.5
SPEC = {"name": "race", "vocab_size": 4000, "context_length": 16, "emb_dim": 64, "n_heads": 4, "n_layers": 2,
        "drop_rate": 0.0, "qkv_bias": True}

# Rewrites PATH with the bytes of A, then B, then A... each time through a temporary file and os.replace,
# until told to stop (stdin closes); prints how many replaces it made.
WRITER = r"""
import os, sys
path, a, b = sys.argv[1:4]
blobs = [open(a, "rb").read(), open(b, "rb").read()]
tmp = path + ".tmp-writer"
import threading
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
print("ready", flush=True)
n = 0
while not stop.is_set():
    with open(tmp, "wb") as fh:
        fh.write(blobs[n % 2])
    os.replace(tmp, path)
    n += 1
print(n, flush=True)
"""


def saved(path: Path, seed: int, pad: int) -> dict[str, torch.Tensor]:
    """Save a model; ``pad`` characters of metadata move its data, so that reading one version's
    header with the other's data gives tensors that match neither."""
    torch.manual_seed(seed)
    model = build_model(SPEC)
    save_checkpoint(model, path, metadata={"pad": "x" * pad})
    return {k: v.clone() for k, v in model.state_dict().items()}


def which(state: dict[str, torch.Tensor], versions: dict[str, dict[str, torch.Tensor]]) -> str | None:
    """The version ``state`` equals in every tensor, bit for bit; None for a mixture."""
    for name, want in versions.items():
        if state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want):
            return name
    return None


def test_a_checkpoint_replaced_while_loading_is_one_version_whole(tmp_path: Path) -> None:
    versions = {"A": saved(tmp_path / "a.safetensors", 1, 0), "B": saved(tmp_path / "b.safetensors", 2, 1001)}
    assert not torch.equal(versions["A"]["tok_emb.weight"], versions["B"]["tok_emb.weight"])
    path = tmp_path / "live.safetensors"
    path.write_bytes((tmp_path / "a.safetensors").read_bytes())
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(tmp_path / "a.safetensors"),
                               str(tmp_path / "b.safetensors")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    seen = {"A": 0, "B": 0, "error": 0, "mixture": 0}
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            try:
                got = which(load_checkpoint(path).state_dict(), versions)
            except CheckpointError:
                got = "error"
            seen[got or "mixture"] += 1
    finally:
        out, _ = writer.communicate("", timeout=30)
    replaces = int(out.split()[-1])
    print(f"loads {sum(seen.values())}: {seen}; writer replaced the file {replaces} times")
    assert seen["mixture"] == 0
    assert seen["A"] > 0 and seen["B"] > 0  # the race really ran: both versions were loaded
    assert replaces > sum(seen.values())  # more than one replace per load on average
    assert seen["error"] <= sum(seen.values()) // 10  # errors, if any, are rare and clean


def test_a_replace_between_header_and_tensors_still_gives_the_old_model(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic form of the race: the path is replaced right after the header is read; the load
    still gets every tensor from the file whose header it read (the old version), whole."""
    old = saved(tmp_path / "live.safetensors", 1, 0)
    new = saved(tmp_path / "new.safetensors", 2, 1001)
    real = checkpoint.read_header

    def read_then_replace(fh: BinaryIO, path: Path) -> Header:
        header = real(fh, path)
        os.replace(tmp_path / "new.safetensors", tmp_path / "live.safetensors")
        return header

    monkeypatch.setattr(checkpoint, "read_header", read_then_replace)
    assert which(load_checkpoint(tmp_path / "live.safetensors").state_dict(), {"old": old, "new": new}) == "old"
    monkeypatch.undo()
    assert which(load_checkpoint(tmp_path / "live.safetensors").state_dict(), {"old": old, "new": new}) == "new"
