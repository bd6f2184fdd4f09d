"""The torch device a command runs on: ``--device`` of ``modelkit generate``, ``train`` and ``compare``.

Kept apart from training so that generation (and anything else) can resolve a device without
importing :mod:`modelkit.training`.
"""

from __future__ import annotations

import torch

from .errors import DeviceError

_CHOICES = "auto, cpu, cuda, cuda:N or mps"
DEVICE_HELP = "auto (default: cuda if available, else cpu), cpu, cuda, cuda:N, mps"


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` names, checked to exist here.

    ``auto`` → ``cuda:<local_rank>`` if CUDA is available, else the CPU; ``cuda`` → ``cuda:<local_rank>``.
    Raises :class:`~modelkit.errors.DeviceError` (one line, saying what to use instead) for a name
    torch does not know, the meta device, or a device this machine lacks (no CUDA, no such GPU, no MPS).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device '{name}'; use {_CHOICES}") from None
    if device.type == "meta":
        raise DeviceError("device 'meta' holds no data, so nothing can run on it; use --device cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{name}' asked for, but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        count = torch.cuda.device_count()
        if device.index >= count:
            raise DeviceError(f"device '{device}' asked for, but this machine has {count} CUDA "
                              f"device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        available = getattr(backend, "is_available", None)
        if callable(available) and not available():
            raise DeviceError(f"device '{name}' asked for, but {device.type.upper()} is not available; "
                              "use --device cpu")
    return device
