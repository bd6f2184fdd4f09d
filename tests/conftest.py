"""Shared fixtures: tiny specs that build in milliseconds, and the book's reference code on sys.path."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))  # for `import book_reference`


def tiny_cfg(**overrides: Any) -> dict[str, Any]:
    """A 2-layer, 32-wide GPT config in the book's flat format."""
    cfg: dict[str, Any] = {"vocab_size": 97, "context_length": 16, "emb_dim": 32, "n_heads": 4,
                           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": False}
    cfg.update(overrides)
    return cfg


def pytest_report_header(config: pytest.Config) -> str:
    """The CPU the suite runs on and what PyTorch and oneDNN use on it (CI logs show which paths ran)."""
    from modelkit.runtime.cpu import cpu_info

    info = cpu_info()
    forced = f"; forced: MODELKIT_CPU_CAPABILITY={info.forced}" if info.forced else ""
    return (f"modelkit CPU: {info.model}; flags: {' '.join(info.shown_flags) or 'unknown'}; PyTorch kernels "
            f"{info.aten_capability}, oneDNN up to {info.onednn_isa}{forced}")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a forced pass that did not take (a kernel ran before modelkit set the variables): it would
    test nothing new."""
    from modelkit.runtime.cpu import CAPABILITIES, cpu_info

    info = cpu_info()
    levels = list(CAPABILITIES)  # lowest first
    running = info.aten_capability.lower()
    if info.forced and running in levels and levels.index(running) > levels.index(info.forced):
        raise pytest.UsageError(f"MODELKIT_CPU_CAPABILITY={info.forced} did not take: PyTorch runs {running} kernels")


def skip_without_bf16_kernel() -> None:
    """Skip a test that runs bfloat16 Linear layers where no kernel computes them here (a capped
    ONEDNN_MAX_CPU_ISA can take PyTorch's bf16 matmul away too): ``optimize_for_inference`` then
    raises SpeedOptionError instead, which test_cpu.py tests on every machine."""
    from modelkit.runtime.cpu import aten_linear_works
    from modelkit.runtime.onednn import onednn_linear_available

    if not (onednn_linear_available(torch.bfloat16) or aten_linear_works(torch.bfloat16)):
        pytest.skip("no kernel computes a bfloat16 Linear layer on this CPU (modelkit info --device)")


@pytest.fixture
def tiny() -> dict[str, Any]:
    return tiny_cfg()


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    """Run the suite with one intra-op torch thread.

    The tests use tiny tensors, where a second thread only adds synchronisation; on a busy machine
    two threads per process made them up to 20x slower. Subprocesses (CLI, torchrun) are unaffected.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
