"""Training checkpoints: folders that hold everything an exact resume needs, with no pickle.

A checkpoint folder (``RUN/checkpoints/step_<N>/``) holds ``model.safetensors`` (the modelkit
checkpoint format, spec included), ``train_state.safetensors`` (AdamW moment tensors by parameter
name, the torch RNG state of every rank) and ``train_state.json`` (step, tokens, config, data
fingerprints and, when the caller names it, the data file's absolute path).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import TrainError
from .distributed import DistContext

if TYPE_CHECKING:
    from ..model import GPTModel

__all__ = [
    "MODEL_FILE", "STATE_FORMAT", "STATE_JSON", "STATE_TENSORS", "STATE_VERSION", "Checkpointer", "find_checkpoint",
    "read_train_state", "recorded_data_path", "restore_tensors", "rng_tensors", "run_folder",
    "save_training_checkpoint",
]

STATE_FORMAT = "modelkit-train-state"
STATE_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


# -- finding and reading ---------------------------------------------------------------------------

def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: itself, or the latest ``checkpoints/step_*`` of a run folder."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    candidates = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / STATE_JSON).is_file())
    if candidates:
        return candidates[-1]
    raise TrainError(f"no training checkpoint in '{path}': expected {STATE_JSON} there or "
                     f"checkpoints/step_*/{STATE_JSON} below it")


def read_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON part of a training checkpoint (step, tokens, config, data fingerprints...), plus
    ``folder``: the checkpoint folder it was read from. Raises :class:`TrainError` if there is none."""
    folder = find_checkpoint(path)
    try:
        state = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainError(f"cannot read {folder / STATE_JSON}: {exc}") from None
    if state.get("format") != STATE_FORMAT:
        raise TrainError(f"{folder / STATE_JSON} is not a modelkit training state")
    state["folder"] = str(folder)
    return state


def recorded_data_path(path: str | os.PathLike[str]) -> str | None:
    """The data file a training checkpoint says it was trained on (absolute), or None if it names none.

    Only a record: :func:`~modelkit.training.loop.train` never opens it. ``modelkit train --resume``
    uses it as the default for ``--data``, and the resumed run still checks the data's token fingerprint.
    """
    recorded = read_train_state(path).get("data", {}).get("path")
    return recorded if isinstance(recorded, str) else None


def run_folder(checkpoint_folder: str | os.PathLike[str]) -> Path:
    """The run folder holding a checkpoint folder (``RUN/checkpoints/step_N`` -> ``RUN``)."""
    folder = Path(checkpoint_folder)
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent


# -- optimiser and RNG state as named tensors ------------------------------------------------------

def _param_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """AdamW's per-parameter state as ``optimizer.<param name>.<key>`` tensors."""
    names = _param_names(model)
    state = optimizer.state_dict()["state"]
    out = {}
    for index, entries in state.items():
        for key, value in entries.items():
            tensor = value if isinstance(value, Tensor) else torch.tensor(value)
            out[f"optimizer.{names[index]}.{key}"] = tensor.detach().to("cpu").contiguous()
    return out


def _load_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    """Give ``optimizer`` the state :func:`_optimizer_tensors` saved; raises :class:`TrainError` on a
    parameter this model does not have."""
    names = _param_names(model)
    index_of = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith("optimizer."):
            continue
        pname, _, skey = key[len("optimizer."):].rpartition(".")
        if pname not in index_of:
            raise TrainError(f"the checkpoint's optimizer state names parameter '{pname}', "
                             "which this model does not have")
        state.setdefault(index_of[pname], {})[skey] = tensor
    current = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def rng_tensors(ctx: DistContext, device: torch.device) -> dict[str, Tensor]:
    """Every rank's torch RNG state (CPU, and the CUDA device's when training on CUDA).

    A collective: every rank must call it."""
    out: dict[str, Tensor] = {}
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    for kind, state in states.items():
        comm_device = device if device.type == "cuda" else torch.device("cpu")
        for rank, gathered in enumerate(ctx.all_gather(state.to(comm_device))):
            out[f"rng.{kind}.rank{rank}"] = gathered.to("cpu").contiguous()
    return out


# -- saving and restoring --------------------------------------------------------------------------

def save_training_checkpoint(folder: Path, model: GPTModel, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any], rng: Mapping[str, Tensor]) -> None:
    """Write model, optimiser, RNG and JSON state to ``folder`` (via a temporary folder, then rename)."""
    from safetensors.torch import save_file

    from ..weights.checkpoint import save_checkpoint

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(model, tmp / MODEL_FILE, metadata={"step": str(state["step"]), "tokens": str(state["tokens"])})
    save_file({**_optimizer_tensors(model, optimizer), **rng}, str(tmp / STATE_TENSORS),
              metadata={"format": STATE_FORMAT})
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=2), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def restore_tensors(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, saved: Mapping[str, Any],
                    ctx: DistContext, device: torch.device) -> None:
    """Load the optimiser state and this rank's RNG state from a checkpoint folder.

    With another number of processes than the checkpoint's, rank 0 takes the saved rank 0's RNG
    state (and warns when dropout makes the draws differ from an uninterrupted run)."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATE_TENSORS))
    _load_optimizer_tensors(model, optimizer, tensors)
    same_world = saved["world_size"] == ctx.world_size
    rank = ctx.rank if same_world else 0
    if not same_world and ctx.rank == 0 and model.spec.drop_rate > 0:  # type: ignore[union-attr]
        warnings.warn(f"resuming a {saved['world_size']}-process run with {ctx.world_size} process(es): "
                      "dropout draws differ from an uninterrupted run", stacklevel=4)
    if same_world or ctx.rank == 0:
        torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
        if device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)


class Checkpointer:
    """Saves ``out/checkpoints/step_<N>/`` during a run (rank 0 writes; every rank takes part in
    gathering the RNG states); :attr:`last` is the latest folder written, or None."""

    def __init__(self, out: Path | None, model: GPTModel, optimizer: torch.optim.Optimizer, ctx: DistContext,
                 device: torch.device) -> None:
        self.out, self.model, self.optimizer, self.ctx, self.device = out, model, optimizer, ctx, device
        self.last: Path | None = None

    def save(self, state: dict[str, Any]) -> None:
        """Write a checkpoint of the model and optimiser now, with ``state`` as its JSON part."""
        rng = rng_tensors(self.ctx, self.device)  # a collective: every rank takes part
        if self.ctx.is_main and self.out is not None:
            folder = self.out / "checkpoints" / f"step_{state['step']:06d}"
            save_training_checkpoint(folder, self.model, self.optimizer, state, rng)
            self.last = folder
