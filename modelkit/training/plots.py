"""PNG plots of training curves and gradient norms (needs the optional extra: ``pip install modelkit[plot]``).

matplotlib is imported when a plot is drawn, never at import time, with the non-interactive Agg
backend so plotting works on servers without a display.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ModelkitError


class PlotError(ModelkitError, RuntimeError):
    """A plot was asked for but matplotlib is not installed."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plots need matplotlib: pip install 'modelkit[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Raise :class:`PlotError` now (before a long run) if plots cannot be drawn."""
    _pyplot()


def _series(metrics: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs = [float(m["tokens"]) for m in metrics if key in m]
    ys = [float(m[key]) for m in metrics if key in m]
    return xs, ys


def _whole_number_ticks(axis: Any) -> None:
    """Major ticks of ``axis`` only at integers (layers, steps and tokens are counts)."""
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def plot_loss_curves(runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str],
                     title: str | None = None) -> Path:
    """Write a PNG of loss against tokens seen for one or more runs; returns the path.

    ``runs`` maps a label to its metric lines (as in ``metrics.jsonl``). Each run draws its
    per-step training loss (thin) and its validation loss (thick, markers) in one colour.
    """
    return _save(_pyplot(), loss_curves_figure(runs, title), path)


def loss_curves_figure(runs: Mapping[str, Sequence[Mapping[str, Any]]], title: str | None = None) -> Any:
    """The matplotlib Figure :func:`plot_loss_curves` writes (x ticks at whole token counts); the
    caller closes it (``matplotlib.pyplot.close(fig)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, metrics) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        xs, ys = _series(metrics, "train_loss")
        if xs:
            ax.plot(xs, ys, color=colour, alpha=0.35, linewidth=1, label=f"{label} train (per step)")
        xs, ys = _series(metrics, "val_loss")
        if xs:
            ax.plot(xs, ys, color=colour, linewidth=2, marker="o", markersize=3, label=f"{label} validation")
    ax.set_xlabel("tokens seen")
    _whole_number_ticks(ax.xaxis)
    ax.set_ylabel("cross-entropy loss (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def _save(plt: Any, fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay out ``fig``, write it at ``path`` (creating folders; the format from its suffix, PNG without
    one) atomically (:func:`~modelkit.files.atomic_file`: a failure raises :class:`PlotError` with the
    path and the OS reason and leaves ``path`` as it was), close it; return the path."""
    from ..files import atomic_file

    fig.tight_layout()
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out, what="plot", error=PlotError) as tmp:
            fig.savefig(tmp, dpi=120, format=out.suffix.lstrip(".").lower() or "png")
    except OSError as exc:
        raise PlotError(f"cannot write plot {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out


def plot_training(metrics: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], title: str | None = None) -> Path:
    """The loss curve of one run (see :func:`plot_loss_curves`)."""
    return plot_loss_curves({title or "run": metrics}, path, title=title)


def plot_grad_norms(norms: Mapping[str, Sequence[float]], path: str | os.PathLike[str],
                    title: str = "gradient norm of each layer's feed-forward output weight at initialisation") -> Path:
    """Write a PNG of per-layer gradient norms (log scale), one line per variant; returns the path."""
    return _save(_pyplot(), grad_norms_figure(norms, title), path)


def grad_norms_figure(norms: Mapping[str, Sequence[float]],
                      title: str = "gradient norm of each layer's feed-forward output weight at initialisation") -> Any:
    """The matplotlib Figure :func:`plot_grad_norms` writes: layers 1..n on x (ticks at whole layer
    numbers only), norms on a log y axis; the caller closes it (``matplotlib.pyplot.close(fig)``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, values in norms.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    _whole_number_ticks(ax.xaxis)
    ax.set_ylabel("‖∂L/∂W‖ (Frobenius)")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig
