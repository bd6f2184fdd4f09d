"""Data-parallel training: 2 processes under torchrun (gloo, CPU) against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from modelkit.testing import synthetic_text, tiny_model_spec
from modelkit.training import TrainConfig, read_metrics, read_train_state, train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path):
    _run(tmp_path)


def _run(tmp_path):
    spec = tiny_model_spec(name="tiny", drop_rate=0.0)  # no dropout: ranks draw different masks
    config_file = tmp_path / "tiny.json"
    config_file.write_text(json.dumps(spec))
    text = synthetic_text(150)
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    out = tmp_path / "ddp"

    # two processes, 2 windows each: a global batch of 4
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "modelkit", "train", "--config", str(config_file), "--data", str(data), "--out", str(out),
           "--steps", "6", "--batch-size", "2", "--lr", "3e-3", "--eval-every", "3", "--save-every", "3", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "(2 processes)" in proc.stdout  # rank 0 reports once ...
    assert proc.stdout.count("trained 6 steps") == 1  # ... and only rank 0
    two = read_metrics(out)
    assert read_train_state(out / "checkpoints" / "step_000003")["world_size"] == 2

    # one process, 4 windows per batch: the same global batches
    one = train(spec, text, TrainConfig(steps=6, batch_size=4, lr=3e-3, eval_every=3), progress=False)
    two_losses = [m["train_loss"] for m in two if "train_loss" in m]
    diff = max(abs(a - b) for a, b in zip(one.losses(), two_losses))
    print(f"max |train loss difference|, 2 processes vs 1 over 6 steps: {diff:.3g}")
    assert len(two_losses) == 6 and diff < 1e-4
    one_val = [m["val_loss"] for m in one.metrics if "val_loss" in m]
    two_val = [m["val_loss"] for m in two if "val_loss" in m]
    assert one_val == pytest.approx(two_val, abs=1e-4) and len(one_val) == 3  # steps 0, 3, 6
    assert one_val[-1] < one_val[0]

    # the 2-process checkpoint at step 3 resumes in one process (batch 4 = the saved global batch)
    resumed = train(None, text, resume=out / "checkpoints" / "step_000003", progress=False)
    assert resumed.config.batch_size == 4
    diff = max(abs(a - b) for a, b in zip(resumed.losses(), two_losses[3:]))
    print(f"max |train loss difference|, steps 4-6 resumed in 1 process vs 2 processes: {diff:.3g}")
    assert len(resumed.losses()) == 3 and diff < 1e-4
