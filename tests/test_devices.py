"""modelkit.devices.resolve_device: what --device of generate, train and compare accepts and refuses."""

from __future__ import annotations

import pytest
import torch

from modelkit.devices import resolve_device
from modelkit.errors import DeviceError


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend CUDA is available with two devices (torch.device('cuda', i) needs no GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_auto_and_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"^device 'cuda' asked for, but CUDA is not available; use --device cpu$"):
        resolve_device("cuda")


@pytest.mark.usefixtures("two_gpus")
def test_cuda_takes_the_local_rank_and_must_exist() -> None:
    assert resolve_device("auto", local_rank=1) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1", local_rank=0) == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match=r"'cuda:2' asked for, but this machine has 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_unknown_meta_and_unavailable_devices_are_one_line_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cases = {"tpu": "unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps",
             "cuda:x": "unknown device 'cuda:x'",
             "meta": "device 'meta' holds no data",
             "mps": "device 'mps' asked for, but MPS is not available; use --device cpu"}
    for name, message in cases.items():
        with pytest.raises(DeviceError) as info:
            resolve_device(name)
        assert message in str(info.value) and "\n" not in str(info.value)


def test_training_resolves_devices_with_the_same_helper() -> None:
    from modelkit.training import distributed

    assert distributed.resolve_device is resolve_device
