"""Transparent huge pages for weights: decoding streams every weight once per token.

With 4 KiB pages, reading gpt2-small's 494 MB of Linear weights crosses ~120,000 pages per token,
and each crossing can cost a TLB miss and a page walk. Linux can back memory with 2 MiB pages
instead (transparent huge pages, THP). Most systems set THP to ``madvise``: only regions a process
asks for get them, and PyTorch does not ask unless ``THP_MEM_ALLOC_ENABLE=1`` is set before it
starts. :func:`advise_huge_pages_` asks for the tensors it is given, in place: ``madvise(MADV_HUGEPAGE)``,
then ``madvise(MADV_COLLAPSE)`` (Linux 6.1+), which moves the pages' contents to huge pages
immediately. Addresses, values, strides and sharing are unchanged.

It is not free: the kernel copies each page's contents to a new 2 MiB page. ``python
benchmarks/huge_pages.py`` measures both sides. On the 2-core AMD EPYC of ``benchmarks/RESULTS.md``
(gpt2-small fp32, 200 greedy tokens, 4 interleaved rounds): 11.46 -> 10.73 ms per token, the
weight-read pass 9.68 -> 9.35 ms, and moving 543 MB took 1.22 s, repaid after ~1700 tokens. So
``optimize_for_inference(huge_pages=True)`` is an opt-in for long-running decoding.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable, Iterable

from torch import Tensor, nn

__all__ = ["HUGE_PAGE", "advise_huge_pages_", "huge_pages_available", "model_tensors"]

#: The size of a transparent huge page on x86-64 and most arm64 kernels.
HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise``, or None off Linux or when THP is disabled (``never``)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            if "[never]" in f.read():
                return None
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def huge_pages_available() -> bool:
    """Whether :func:`advise_huge_pages_` can do anything here (Linux with THP not ``never``)."""
    return _madvise() is not None


def advise_huge_pages_(tensors: Iterable[Tensor]) -> int:
    """Back the CPU tensors' storages with 2 MiB pages where the kernel allows, in place; return the
    bytes now in huge pages.

    Only whole 2 MiB-aligned pages inside a storage are advised, so no other allocation's memory is
    touched, and storages under 2-4 MiB are skipped. Each storage is advised once, however many
    tensors view it. Best effort: a kernel without ``MADV_COLLAPSE`` (before 6.1), a file-backed
    storage (a memory-mapped checkpoint not yet copied) or a failed call leaves that storage as it
    was, and 0 is returned off Linux.
    """
    madvise = _madvise()
    if madvise is None:
        return 0
    seen: set[int] = set()
    collapsed = 0
    for t in tensors:
        if t.device.type != "cpu" or t.is_sparse or t.is_quantized:
            continue
        storage = t.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr in seen or not ptr:
            continue
        seen.add(ptr)
        start = (ptr + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
        end = (ptr + size) & ~(HUGE_PAGE - 1)
        if end - start < HUGE_PAGE:
            continue
        if madvise(start, end - start, _MADV_HUGEPAGE) == 0 and madvise(start, end - start, _MADV_COLLAPSE) == 0:
            collapsed += end - start
    return collapsed


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``model`` (a stacked q/k/v matrix is the storage its blocks view)."""
    return [t.detach() for t in (*model.parameters(), *model.buffers())]
