"""modelkit.runtime.hugepages: weights moved to 2 MiB pages keep their addresses and values, the kernel
reports the huge pages, and where THP is unavailable nothing happens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import modelkit.runtime.hugepages as hp
from conftest import tiny_cfg
from modelkit import build_model, generate
from modelkit.cli import main
from modelkit.runtime.optimize import optimize_for_inference

pytestmark = pytest.mark.speed


def kernel_huge_kb(ptr: int) -> int:
    """AnonHugePages of the mapping holding address ``ptr``, as /proc/self/smaps reports it."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's header line: "start-end perms ..."
            start, end = (int(x, 16) for x in head.split("-"))
            inside = start <= ptr < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_a_large_tensor_lands_on_huge_pages_with_its_address_and_values_unchanged() -> None:
    if not hp.huge_pages_available():
        pytest.skip("no transparent huge pages here")
    t = torch.randn(3 * 1024 * 1024)  # 12 MiB: at least four whole aligned 2 MiB pages
    view = t[5:]
    before, ptr = t.clone(), t.data_ptr()
    moved = hp.advise_huge_pages_([t, view])  # one storage, advised once
    if moved == 0:
        pytest.skip("the kernel did not collapse the pages (no MADV_COLLAPSE before Linux 6.1)")
    assert moved % hp.HUGE_PAGE == 0 and 4 * hp.HUGE_PAGE <= moved <= t.numel() * 4
    assert kernel_huge_kb(ptr + t.numel() * 2) * 1024 >= moved  # the kernel's own count
    assert t.data_ptr() == ptr and torch.equal(t, before)


def test_small_tensors_and_unavailable_thp_are_left_alone(monkeypatch) -> None:
    assert hp.advise_huge_pages_([torch.randn(1000)]) == 0  # no whole 2 MiB page inside
    monkeypatch.setattr(hp, "_madvise", lambda: None)
    assert not hp.huge_pages_available()
    assert hp.advise_huge_pages_([torch.randn(3 * 1024 * 1024)]) == 0


def test_optimize_with_huge_pages_changes_no_logit_and_the_cli_prints_the_same_text(tmp_path, capsys) -> None:
    cfg = tiny_cfg(vocab_size=50257, emb_dim=64, context_length=32)
    torch.manual_seed(0)
    plain = optimize_for_inference(build_model(cfg))
    torch.manual_seed(0)
    huge = optimize_for_inference(build_model(cfg), huge_pages=True)
    ids = torch.randint(0, 50257, (2, 12))
    with torch.inference_mode():
        assert torch.equal(plain(ids), huge(ids))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    args = ["generate", "--config", str(path), "--prompt", "Hello", "--max-new-tokens", "5", "--seed", "4"]
    assert main(args) == 0
    without = capsys.readouterr().out
    assert main([*args, "--huge-pages"]) == 0
    assert capsys.readouterr().out == without
    assert torch.equal(generate(huge, ids[:1], 4), generate(plain, ids[:1], 4))
