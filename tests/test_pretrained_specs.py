"""``modelkit info configs/pretrained/<name>.json`` prints each family's published total (issue 18's
table: ``sum(p.numel())`` of the transformers model built on the meta device from the official config;
each family's test file also checks its count against transformers itself)."""

from __future__ import annotations

from pathlib import Path

import pytest

from modelkit.cli import main as cli_main

CONFIGS = Path(__file__).parent.parent / "configs" / "pretrained"
TOTALS = {
    "llama-3.2-1b.json": 1_235_814_400,
    "mistral-7b-v0.1.json": 7_241_732_096,
    "qwen2.5-0.5b.json": 494_032_768,
    "qwen3-0.6b.json": 596_049_920,
    "gemma-2b.json": 2_506_172_416,
    "gemma-2-2b.json": 2_614_341_888,
    "phi-2.json": 2_779_683_840,
    "phi-3-mini-4k.json": 3_821_079_552,
    "pythia-160m.json": 162_322_944,
    "opt-125m.json": 125_239_296,
    "bloom-560m.json": 559_214_592,
    "olmo-2-1b.json": 1_484_916_736,
    "gpt2.json": 124_439_808,
}


def test_every_pretrained_spec_has_its_total() -> None:
    assert set(TOTALS) <= {p.name for p in CONFIGS.glob("*.json")}


@pytest.mark.parametrize("name", list(TOTALS))
def test_info_prints_the_published_total(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(CONFIGS / name)]) == 0
    assert f"{TOTALS[name]:,}" in capsys.readouterr().out
