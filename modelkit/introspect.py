"""Counting parameters and memory, and a per-module summary (works on the meta device)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

MB = 1024**2  # the book reports memory in MB of 2**20 bytes


@dataclass(frozen=True)
class ParameterCount:
    """``total`` counts each parameter once (a tied head is not counted twice); ``output_head`` is
    the output layer's own parameters (0 when tied to the token embedding)."""

    total: int
    output_head: int
    tied: bool

    @property
    def without_head(self) -> int:
        """The book's "considering weight tying" figure: total minus the output head."""
        return self.total - self.output_head

    def megabytes(self, dtype: torch.dtype = torch.float32) -> float:
        """Size of the parameters in MB (2**20 bytes) at ``dtype``."""
        return self.total * torch.empty((), dtype=dtype, device="meta").element_size() / MB


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count a model's parameters, without the output head as well if it has ``out_head``."""
    total = sum(p.numel() for p in model.parameters())
    head = getattr(model, "out_head", None)
    tok = getattr(model, "tok_emb", None)
    tied = head is not None and tok is not None and head.weight is tok.weight
    head_params = 0 if head is None else sum(p.numel() for p in head.parameters() if not (tied and p is tok.weight))
    return ParameterCount(total, head_params, tied)


@dataclass(frozen=True)
class ModuleRow:
    name: str
    type: str
    params: int


def summarize(model: nn.Module) -> list[ModuleRow]:
    """Parameters per top-level module; a stack of identical blocks is one row plus its first block's parts."""
    rows: list[ModuleRow] = []
    for name, child in model.named_children():
        if isinstance(child, (nn.ModuleList, nn.Sequential)) and len(child) > 0:
            first = child[0]
            per_block = sum(p.numel() for p in first.parameters())
            rows.append(ModuleRow(f"{name}.0-{len(child) - 1}", f"{type(first).__name__} x{len(child)}",
                                  per_block * len(child)))
            for sub_name, sub in first.named_children():
                rows.append(ModuleRow(f"  .{sub_name}", type(sub).__name__, sum(p.numel() for p in sub.parameters())))
        else:
            own = sum(p.numel() for p in child.parameters())
            tied = name == "out_head" and getattr(model, "tok_emb", None) is not None and \
                child.weight is model.tok_emb.weight  # type: ignore[union-attr]
            rows.append(ModuleRow(name + (" (tied to tok_emb)" if tied else ""), type(child).__name__,
                                  0 if tied else own))
    return rows
