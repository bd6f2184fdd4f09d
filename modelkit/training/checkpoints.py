"""Training checkpoints: folders that hold everything an exact resume needs, with no pickle.

A checkpoint folder (``RUN/checkpoints/step_<N>/``) holds ``model.safetensors`` (the modelkit
checkpoint format, spec included), ``train_state.safetensors`` (AdamW moment tensors by parameter
name, the torch RNG state of every rank) and ``train_state.json`` (step, tokens, config, data
fingerprints and, when the caller names it, the data file's absolute path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .config import TrainConfig, TrainError
from .distributed import DistContext

if TYPE_CHECKING:
    from ..model import GPTModel

__all__ = [
    "MODEL_FILE", "STATE_FORMAT", "STATE_JSON", "STATE_TENSORS", "STATE_VERSION", "Checkpointer",
    "check_checkpoint_folder", "find_checkpoint",
    "read_train_state", "recorded_data_path", "restore_tensors", "rng_tensors", "run_folder",
    "save_training_checkpoint",
]

STATE_FORMAT = "modelkit-train-state"
STATE_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"


# -- finding and reading ---------------------------------------------------------------------------

_STEP_FOLDER = re.compile(r"^step_(\d+)$")
_TEMP_FOLDER = re.compile(r"^\.?step_\d+\.(tmp|tmp-\d+|old-\d+)$")


def find_checkpoint(path: str | os.PathLike[str]) -> Path:
    """The checkpoint folder ``path`` names: itself, or a run folder's latest ``checkpoints/step_<N>``.

    Only folders named ``step_<N>`` count: a temporary folder an interrupted save left
    (``.step_N.tmp-<pid>``, or ``step_N.tmp`` of older modelkits) is ignored. Raises :class:`TrainError`
    if there is no checkpoint. The folder found is not checked here (see :func:`read_train_state`)."""
    path = Path(path)
    if _TEMP_FOLDER.match(path.name):
        raise TrainError(f"'{path}' is the temporary folder of an interrupted checkpoint save, not a checkpoint; "
                         f"resume from the run folder {run_folder(path)}")
    if (path / STATE_JSON).is_file():
        return path
    steps = [(int(m.group(1)), p) for p in (path / "checkpoints").glob("step_*")
             if (m := _STEP_FOLDER.match(p.name)) and p.is_dir()]
    if steps:
        return max(steps)[1]
    if _STEP_FOLDER.match(path.name) and path.is_dir():
        return path  # a checkpoint folder that lost its state: check_checkpoint_folder says so
    if not path.is_dir():
        raise TrainError(f"no training checkpoint in '{path}': there is no such folder")
    raise TrainError(f"no training checkpoint in '{path}': expected {STATE_JSON} there or "
                     f"checkpoints/step_N/{STATE_JSON} below it")


def read_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON part of a training checkpoint (step, tokens, config, data fingerprints...), plus
    ``folder``: the checkpoint folder it was read from (see :func:`find_checkpoint`).

    The whole folder is checked first (:func:`check_checkpoint_folder`): a missing, truncated or
    inconsistent file raises :class:`TrainError` naming the folder and every problem found."""
    folder = find_checkpoint(path)
    state = check_checkpoint_folder(folder)
    state["folder"] = str(folder)
    return state


def check_checkpoint_folder(folder: Path) -> dict[str, Any]:
    """``train_state.json`` of the checkpoint folder ``folder``, after checking that a resume can use it.

    Checked from the JSON and the safetensors headers (no tensor data is read): every field of
    ``train_state.json`` with its JSON type; that ``model.safetensors`` and ``train_state.safetensors``
    are there, complete and readable; that the model is the one of this step (its ``step``) and the
    optimiser state fits its tensors (names and shapes: not another model's); that every rank's RNG
    state is there. Raises :class:`TrainError`: ``cannot resume from FOLDER: <problem>; <problem>``."""
    if not folder.is_dir():
        raise TrainError(f"cannot resume from {folder}: there is no such folder")
    state, problems = _read_state_json(folder / STATE_JSON)
    if not problems and (wrong := _state_problems(state)):
        problems = [f"{STATE_JSON}: " + "; ".join(wrong)]
    if not problems:
        problems = _tensor_file_problems(folder, state)
    if problems:
        raise TrainError(f"cannot resume from {folder}: " + "; ".join(problems) + _older_hint(folder))
    return state


def _older_hint(folder: Path) -> str:
    """``; an older checkpoint is <path> (--resume it)`` when ``folder`` is a run's ``step_N`` with an
    earlier ``step_M`` beside it, else ""."""
    match = _STEP_FOLDER.match(folder.name)
    if match is None or folder.parent.name != "checkpoints":
        return ""
    older = [(int(m.group(1)), p) for p in folder.parent.glob("step_*")
             if (m := _STEP_FOLDER.match(p.name)) and p.is_dir() and int(m.group(1)) < int(match.group(1))]
    return f"; the previous checkpoint is {max(older)[1]} (--resume it to continue from there)" if older else ""


def _read_state_json(path: Path) -> tuple[dict[str, Any], list[str]]:
    """(the parsed JSON object, []) or ({}, [what is wrong with the file])."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}, [f"{STATE_JSON} is missing"]
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [f"{STATE_JSON} cannot be read ({exc.strerror if isinstance(exc, OSError) else 'not UTF-8'})"]
    try:
        state = json.loads(text)
    except ValueError as exc:
        return {}, [f"{STATE_JSON} is not valid JSON (truncated?): {exc}"]
    if not isinstance(state, dict):
        return {}, [f"{STATE_JSON} holds {type(state).__name__}, not an object"]
    if state.get("format") != STATE_FORMAT:
        return {}, [f"{STATE_JSON} is not a modelkit training state (format {state.get('format')!r}, "
                    f"expected {STATE_FORMAT!r})"]
    return state, []


# what a train_state.json field must be: (its description in errors, its test)
_COUNT = ("an integer >= 0", lambda v: type(v) is int and v >= 0)
_POSITIVE = ("an integer >= 1", lambda v: type(v) is int and v >= 1)
_TEXT = ("a string", lambda v: isinstance(v, str))
_STATE_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "version": (f"an integer from 1 to {STATE_VERSION}", lambda v: type(v) is int and 1 <= v <= STATE_VERSION),
    "step": _COUNT, "tokens": _COUNT, "total_steps": _COUNT, "world_size": _POSITIVE,
    "global_batch_size": _POSITIVE, "batches_per_epoch": _POSITIVE,
    "config": ("an object", lambda v: isinstance(v, dict)), "data": ("an object", lambda v: isinstance(v, dict)),
}
_DATA_FIELDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "train_sha256": _TEXT, "val_sha256": _TEXT, "train_tokens": _COUNT, "val_tokens": _COUNT,
}


def _field_problems(data: Mapping[str, Any], fields: Mapping[str, tuple[str, Callable[[Any], bool]]],
                    prefix: str = "") -> list[str]:
    """One line per field of ``fields`` that ``data`` lacks or holds with the wrong JSON type."""
    problems = []
    for name, (kind, ok) in fields.items():
        if name not in data:
            problems.append(f"'{prefix}{name}' is missing")
        elif not ok(data[name]):
            problems.append(f"'{prefix}{name}' must be {kind}, got {json.dumps(data[name])[:40]}")
    return problems


def _state_problems(state: Mapping[str, Any]) -> list[str]:
    """What is missing or wrong in a parsed ``train_state.json`` (its fields, types and config)."""
    problems = _field_problems(state, _STATE_FIELDS)
    if isinstance(state.get("data"), dict):
        problems += _field_problems(state["data"], _DATA_FIELDS | ({"path": _TEXT} if "path" in state["data"] else {}),
                                    "data.")
    seconds = state.get("train_seconds", 0.0)
    if type(seconds) not in (int, float) or seconds < 0:
        problems.append(f"'train_seconds' must be a number >= 0, got {json.dumps(seconds)[:40]}")
    if problems:
        return problems
    if state["step"] > state["total_steps"]:
        problems.append(f"'step' {state['step']} is past 'total_steps' {state['total_steps']}")
    try:
        config = TrainConfig.from_dict(state["config"])
    except TrainError as exc:
        return [*problems, f"'config': {exc}"]
    if config.batch_size * state["world_size"] != state["global_batch_size"]:
        problems.append(f"'config.batch_size' {config.batch_size} x 'world_size' {state['world_size']} is not "
                        f"'global_batch_size' {state['global_batch_size']}")
    return problems


def _one_line(text: str) -> str:
    """A multi-line message as one line (its lines joined with "; ")."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def _tensor_file_problems(folder: Path, state: Mapping[str, Any]) -> list[str]:
    """What is missing, truncated or inconsistent in a checkpoint folder's two safetensors files."""
    model, problems = _model_shapes(folder / MODEL_FILE, state["step"])
    saved, more = _state_shapes(folder / STATE_TENSORS, state["world_size"])
    problems += more
    if model is not None and saved is not None:
        problems += _optimizer_fit(model, saved)
    return problems


def _model_shapes(path: Path, step: int) -> tuple[dict[str, tuple[int, ...]] | None, list[str]]:
    """(tensor name -> shape, []) of the checkpoint's model, or (None, [what is wrong with the file])."""
    from ..errors import CheckpointError
    from ..weights.checkpoint import read_checkpoint

    if not path.is_file():
        return None, [f"{MODEL_FILE} is missing"]
    try:
        info = read_checkpoint(path)
    except CheckpointError as exc:
        return None, [f"{MODEL_FILE}: {_one_line(str(exc))}"]
    if info.data_offset + info.data_size != info.file_size:
        return None, [f"{MODEL_FILE} is truncated or corrupt (its header promises "
                      f"{info.data_offset + info.data_size:,} bytes, the file has {info.file_size:,})"]
    if info.user_metadata.get("step") != str(step):
        return None, [f"{MODEL_FILE} is not this checkpoint's model (it is of step "
                      f"{info.user_metadata.get('step', 'unknown')}, {STATE_JSON} of step {step})"]
    return {name: t.shape for name, t in info.tensors.items()}, []


def _state_shapes(path: Path, world_size: int) -> tuple[dict[str, tuple[int, ...]] | None, list[str]]:
    """(tensor name -> shape, []) of ``train_state.safetensors``, or (None, [what is wrong with it])."""
    from safetensors import safe_open

    if not path.is_file():
        return None, [f"{STATE_TENSORS} is missing"]
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
            shapes = {name: tuple(fh.get_slice(name).get_shape()) for name in fh.keys()}
    except Exception as exc:  # safetensors reports damage with its own error types
        return None, [f"{STATE_TENSORS} is truncated or not a safetensors file ({_one_line(str(exc))})"]
    if metadata.get("format") != STATE_FORMAT:
        return None, [f"{STATE_TENSORS} is not a modelkit training state (format {metadata.get('format')!r})"]
    missing = [f"rng.torch.rank{rank}" for rank in range(world_size) if f"rng.torch.rank{rank}" not in shapes]
    if missing:
        return None, [f"{STATE_TENSORS} lacks the RNG state {', '.join(missing)}"]
    return shapes, []


def _optimizer_fit(model: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]]) -> list[str]:
    """A line naming the optimiser moments in ``saved`` that the model's tensors do not match, if any."""
    wrong: dict[str, str] = {}
    for key, shape in saved.items():
        if not key.startswith("optimizer."):
            continue
        name, _, kind = key[len("optimizer."):].rpartition(".")
        if name not in model:
            wrong.setdefault(name, f"{name} (not in the model)")
        elif kind.startswith(("exp_avg", "max_exp_avg")) and tuple(shape) != tuple(model[name]):
            wrong.setdefault(name, f"{name} (optimizer {list(shape)}, model {list(model[name])})")
    if not wrong:
        return []
    listed = list(wrong.values())
    more = f" and {len(listed) - 3} more" if len(listed) > 3 else ""
    return [f"{MODEL_FILE} does not fit the optimizer state in {STATE_TENSORS} (a model of another spec?): "
            + ", ".join(listed[:3]) + more]


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
    """Write model, optimiser, RNG and JSON state as the checkpoint folder ``folder``.

    The files are written into ``.step_N.tmp-<pid>`` beside it, each synced, and the folder is then
    renamed to ``folder`` (replacing one already there), so ``folder`` is either absent/as before or
    complete; :func:`find_checkpoint` never picks the temporary folder. A failure to write (a full disk
    included) raises :class:`TrainError` with the path and the OS reason and leaves no temporary folder.
    """
    from safetensors.torch import save_file

    from ..files import atomic_folder, write_bytes
    from ..weights.checkpoint import checkpoint_metadata, checkpoint_tensors

    _remove_leftovers(folder)
    weights = checkpoint_tensors(model)
    metadata = checkpoint_metadata(model, {"step": str(state["step"]), "tokens": str(state["tokens"])})
    train_tensors = {**_optimizer_tensors(model, optimizer), **rng}
    with atomic_folder(folder, what="training checkpoint", error=TrainError) as tmp:
        save_file(weights, str(tmp / MODEL_FILE), metadata=metadata)
        save_file(train_tensors, str(tmp / STATE_TENSORS), metadata={"format": STATE_FORMAT})
        write_bytes(tmp / STATE_JSON, json.dumps(state, indent=2).encode("utf-8"))


def _remove_leftovers(folder: Path) -> None:
    """Remove the temporary folders an interrupted save of ``folder`` left (``step_N.tmp`` of older
    modelkits, ``.step_N.tmp-<pid>``, ``.step_N.old-<pid>``)."""
    leftovers = [folder.with_name(folder.name + ".tmp"), *folder.parent.glob(f".{folder.name}.tmp-*"),
                 *folder.parent.glob(f".{folder.name}.old-*")]
    for path in leftovers:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


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
