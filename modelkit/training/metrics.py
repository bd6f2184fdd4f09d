"""Metrics: the run's ``metrics.jsonl`` (one JSON line per step, rank 0 writes), throughput and the progress bar."""

from __future__ import annotations

import collections
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..files import append_line, write_text
from .config import TrainError

__all__ = ["METRICS_FILE", "MetricsWriter", "ProgressBar", "Throughput", "read_metrics", "step_line"]

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Collects metric lines; rank 0 appends them to ``out/metrics.jsonl`` as they come.

    On resume (``resume_step``) it keeps the lines up to that step from ``out/metrics.jsonl``, or from
    ``history`` (the checkpoint's run's file) when ``out`` has none, so the file covers the whole run.
    The kept lines replace the file atomically; each new line is then appended in one ``write``
    (:func:`~modelkit.files.append_line`), and a failed append leaves the file as it was and raises
    :class:`TrainError` with the path and the OS reason.
    """

    def __init__(self, out: Path | None, resume_step: int | None, enabled: bool, history: Path | None = None) -> None:
        self.lines: list[dict[str, Any]] = []
        self.previous: list[dict[str, Any]] = []
        self.path = out / METRICS_FILE if out is not None and enabled else None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        source = self.path if self.path.exists() or history is None else history
        if resume_step is not None and source.exists():  # keep the history up to the checkpoint
            self.previous = [e for e in read_metrics(source) if e.get("step", 0) <= resume_step]
        write_text(self.path, "".join(json.dumps(e) + "\n" for e in self.previous), what="metrics", error=TrainError)

    def last_eval(self) -> dict[str, float]:
        """The losses of the latest evaluation among the kept lines (empty if none)."""
        for entry in reversed(self.previous):
            if "val_loss" in entry or "train_eval_loss" in entry:
                return {k: entry[k] for k in ("train_eval_loss", "val_loss") if k in entry}
        return {}

    def lines_all(self) -> list[dict[str, Any]]:
        """The whole run's lines: those kept from before the resume, then this call's."""
        return self.previous + self.lines

    def write(self, entry: dict[str, Any]) -> None:
        """Record ``entry`` (and append it to the file, on rank 0 with an output folder)."""
        self.lines.append(entry)
        if self.path is not None:
            append_line(self.path, json.dumps(entry) + "\n", what="metrics", error=TrainError)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The metric lines of a run (``metrics.jsonl`` or the run folder holding it).

    Every line is written whole with its newline in one ``write``, so text after the last newline is
    a line cut short (a run killed while writing it, a power loss) and is skipped; any other line
    that is not a JSON object raises :class:`TrainError` naming the file and the line, as does a file
    that cannot be read."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise TrainError(f"cannot read metrics {path}: {reason}") from None
    *complete, _torn = text.split("\n")  # after the last newline: "" or a line cut short, skipped
    entries = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        entry = _metrics_entry(line)
        if entry is None:
            raise TrainError(f"{path}: line {number} is not a metrics line (a JSON object): {line[:60]!r}")
        entries.append(entry)
    return entries


def _metrics_entry(line: str) -> dict[str, Any] | None:
    """``line`` parsed, or None if it is not a JSON object."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def step_line(step: int, batches_per_epoch: int, tokens: int, loss: float, lr: float, step_tokens: int,
              seconds: float, grad_norm: float | None) -> dict[str, Any]:
    """The metrics line of one optimizer step (``grad_norm`` only when gradients are clipped)."""
    line: dict[str, Any] = {"step": step, "epoch": round(step / batches_per_epoch, 4), "tokens": tokens,
                            "train_loss": loss, "lr": lr, "tokens_per_s": round(step_tokens / seconds, 1)}
    if grad_norm is not None:
        line["grad_norm"] = grad_norm
    return line


class Throughput:
    """Time spent in optimizer steps: this call's total, the whole run's, and a recent average."""

    def __init__(self, previous_seconds: float = 0.0, window: int = 20) -> None:
        self.previous_seconds = previous_seconds
        self.seconds, self.tokens = 0.0, 0
        self.recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)

    def lap(self, started: float, tokens: int, device: torch.device) -> float:
        """Seconds since ``started`` (``time.perf_counter()``; CUDA work waited for), counted with ``tokens``."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - started
        self.seconds += dt
        self.tokens += tokens
        self.recent.append((tokens, dt))
        return dt

    @property
    def run_seconds(self) -> float:
        """The whole run's time in optimizer steps, before a resume included."""
        return self.previous_seconds + self.seconds

    def tokens_per_s(self) -> float:
        """This call's mean throughput (0 if no step was taken)."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def recent_tokens_per_s(self) -> float:
        """Throughput over the last ``window`` steps."""
        return sum(n for n, _ in self.recent) / max(sum(t for _, t in self.recent), 1e-9)


class ProgressBar:
    """A tqdm bar over the run's steps showing loss, validation loss and tokens/s (shown when ``enabled``)."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step",
                        dynamic_ncols=True)

    def step(self, loss: float, last_eval: dict[str, float], tokens_per_s: float) -> None:
        """Advance by one step and show its figures."""
        postfix = {"loss": f"{loss:.3f}"}
        if "val_loss" in last_eval:
            postfix["val"] = f"{last_eval['val_loss']:.3f}"
        postfix["tok/s"] = f"{tokens_per_s:,.0f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
