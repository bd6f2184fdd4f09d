"""Training: the book's loop (chapter 5) with a schedule, clipping, evaluation, checkpoints and DDP.

``train(spec, text_or_token_ids, TrainConfig(...)) -> TrainResult`` is the whole API; ``modelkit
train`` is a thin CLI over it. What it promises:

* **The book's maths.** Loss is :func:`calc_loss_batch` (cross-entropy of ``logits.flatten(0, 1)``
  against ``targets.flatten()``), the optimiser is ``torch.optim.AdamW`` on all parameters, the data
  are :class:`~modelkit.data.GPTDatasetV1` windows, the validation text is the last
  ``val_fraction`` of the characters. With ``shuffle=False``, no warm-up and no ``min_lr`` it takes
  the same steps as the book's ``train_model_simple``.
* **Same seed, same data: same losses.** The model is built after ``torch.manual_seed(seed)``; the
  batch order depends only on ``(seed, epoch)`` (:class:`~modelkit.data.ShardedBatchSampler`).
* **Exact resume.** A checkpoint folder holds ``model.safetensors`` (the modelkit checkpoint format,
  spec included), ``train_state.safetensors`` (AdamW moment tensors by parameter name, the torch RNG
  state of every rank) and ``train_state.json`` (step, tokens, config, data fingerprints and, when
  the caller names it, the data file's absolute path): no pickle. Resuming restores model,
  optimiser, schedule (a function of the step), data position (the step) and RNG, so N steps
  straight and N/2 + resume + N/2 give identical losses. A setting changed on resume is printed
  (stderr, rank 0) and kept in :attr:`TrainResult.resume_changes`; one that would change which
  tokens a step sees (:data:`DATA_FIELDS`, the global batch, the spec, the data) is refused with a
  :class:`TrainError`.
* **Many processes.** Under ``torchrun`` (``WORLD_SIZE > 1``) it joins the process group (gloo on
  CPU, nccl on GPU), wraps the model in DistributedDataParallel and gives each rank its shard of
  every global batch (``batch_size`` per rank × world size). Logged losses are averaged over ranks;
  only rank 0 writes files and shows the progress bar.

Learning rate at step ``s`` (0-based): ``lr·(s+1)/warmup_steps`` during warm-up, then ``lr`` if
``min_lr`` is None, else cosine decay from ``lr`` to ``min_lr`` at the last step.
"""

from __future__ import annotations

import collections
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from pydantic import (
    BaseModel,
    ConfigDict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    model_validator,
)
from torch import Tensor, nn

from .data import (
    DataError,
    GPTDatasetV1,
    TokenSource,
    as_token_ids,
    fingerprint,
    make_train_loader,
    shard_indices,
    split_text,
    split_token_ids,
)
from .devices import resolve_device  # also modelkit.train.resolve_device, as before
from .errors import did_you_mean
from .spec import ModelSpec, describe_json, expected_json_type, load_spec
from .speed import KERNELS

if TYPE_CHECKING:
    from .model import GPTModel

STATE_FORMAT = "modelkit-train-state"
STATE_VERSION = 1
MODEL_FILE = "model.safetensors"
STATE_TENSORS = "train_state.safetensors"
STATE_JSON = "train_state.json"
METRICS_FILE = "metrics.jsonl"
# Config fields that decide which tokens a step sees; a resumed run must keep them.
DATA_FIELDS = ("max_length", "stride", "val_fraction", "seed", "shuffle")


class TrainError(ValueError):
    """Training cannot run as asked (bad option, incompatible resume, missing checkpoint...)."""


class TrainConfig(BaseModel):
    """Everything that decides a training run besides the model spec and the data.

    ``batch_size`` is per process; the global batch is ``batch_size × world_size``. ``steps`` and
    ``epochs`` are exclusive (neither: one epoch); an epoch is every full global batch of the
    training windows once. ``max_length`` defaults to the spec's ``context_length`` and ``stride``
    to ``max_length`` (the book's setting: windows do not overlap). ``eval_batches`` global batches
    of each split are evaluated every ``eval_every`` steps (None: the whole split).

    Values have JSON's types, as in a spec: an integer field refuses ``True`` and ``"8"``, a
    boolean refuses ``1``, a float field takes an integer. Unknown fields are refused. Any problem
    raises :class:`TrainError` naming every bad field (``invalid training config: steps must be a
    positive integer, got 0``).
    """

    model_config = ConfigDict(extra="forbid")

    steps: StrictInt | None = None
    epochs: StrictInt | None = None
    batch_size: StrictInt = 4
    max_length: StrictInt | None = None
    stride: StrictInt | None = None
    val_fraction: StrictFloat = 0.1
    lr: StrictFloat = 4e-4
    weight_decay: StrictFloat = 0.1
    betas: tuple[StrictFloat, StrictFloat] = (0.9, 0.999)  # a list is fine too (JSON has no tuple)
    warmup_steps: StrictInt = 0
    min_lr: StrictFloat | None = None
    grad_clip: StrictFloat | None = None
    eval_every: StrictInt = 50
    eval_batches: StrictInt | None = 5
    save_every: StrictInt | None = None
    seed: StrictInt = 123
    shuffle: StrictBool = True
    device: StrictStr = "auto"
    linear_kernel: StrictStr = "auto"
    plot: StrictBool = False

    if not TYPE_CHECKING:  # type checkers keep pydantic's keyword signature
        def __init__(self, **data: Any) -> None:
            try:
                super().__init__(**data)
            except ValidationError as exc:
                raise TrainError("invalid training config: " + "; ".join(_config_problems(exc))) from None

    @model_validator(mode="after")
    def _check_values(self) -> TrainConfig:
        """The checks beyond types; all problems in one ``ValueError``."""
        problems: list[str] = []
        if self.steps is not None and self.epochs is not None:
            problems.append("give steps or epochs, not both")
        for name in ("steps", "epochs", "batch_size", "max_length", "stride", "eval_every", "eval_batches",
                     "save_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            problems.append(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not self.lr > 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            problems.append(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be positive, got {self.grad_clip}")
        if self.linear_kernel not in KERNELS:
            problems.append(f"linear_kernel must be auto, aten or onednn, got {self.linear_kernel!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied, validated like a new config (``dataclasses.replace``'s role)."""
        return type(self)(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready data (``betas`` a list); ``from_dict(to_dict())`` is equal."""
        data = self.model_dump()
        data["betas"] = list(self.betas)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """A config from parsed JSON (e.g. a checkpoint's ``train_state.json``); raises :class:`TrainError`."""
        return cls(**data)


def _config_problems(error: ValidationError) -> list[str]:
    """One line per problem pydantic found in a :class:`TrainConfig`, in the config's own words."""
    names = list(TrainConfig.model_fields)
    problems = []
    for err in error.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err["loc"])
        got, expected = describe_json(err["input"]), expected_json_type(err)
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}'{did_you_mean(where, names)} (known: {', '.join(names)})")
        elif expected is not None:
            problems.append(f"{where} must be {expected}, got {got}")
        elif err["type"] == "value_error":
            problems.append(err["msg"].removeprefix("Value error, "))
        else:
            problems.append(f"{where}: {err['msg']}, got {got}")
    return problems


@dataclass
class TrainResult:
    """What a run produced. ``metrics`` are this call's JSON lines (``out_dir/metrics.jsonl`` holds the
    whole run's). ``step``/``tokens`` count the whole run; this call took steps ``start_step + 1 ..
    step`` and ``tokens - start_tokens`` tokens at ``tokens_per_s``; ``train_seconds`` is the whole
    run's time in optimizer steps (evaluation excluded). ``resume_changes`` are the printed lines
    naming each setting a resume changed."""

    model: GPTModel
    metrics: list[dict[str, Any]]
    step: int
    tokens: int
    tokens_per_s: float
    final_train_loss: float | None
    final_val_loss: float | None
    out_dir: Path | None = None
    checkpoint: Path | None = None
    config: TrainConfig = field(default_factory=TrainConfig)
    start_step: int = 0
    start_tokens: int = 0
    train_seconds: float = 0.0
    resume_changes: list[str] = field(default_factory=list)

    def losses(self) -> list[float]:
        """The training loss of every step taken in this run, in order."""
        return [m["train_loss"] for m in self.metrics if "train_loss" in m]


# -- the book's loss functions ---------------------------------------------------------------------

def calc_loss_batch(input_batch: Tensor, target_batch: Tensor, model: nn.Module,
                    device: torch.device | str | None = None) -> Tensor:
    """The book's loss: mean cross-entropy of ``model(inputs)`` ``(b, s, vocab)`` against ``(b, s)`` targets."""
    if device is not None:
        input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1), target_batch.flatten())


def calc_loss_loader(data_loader: Iterable[tuple[Tensor, Tensor]], model: nn.Module,
                     device: torch.device | str | None = None, num_batches: int | None = None) -> float:
    """The book's ``calc_loss_loader``: the mean of the first ``num_batches`` batch losses (NaN if none)."""
    total, count = 0.0, 0
    for i, (inputs, targets) in enumerate(data_loader):
        if num_batches is not None and i >= num_batches:
            break
        total += calc_loss_batch(inputs, targets, model, device).item()
        count += 1
    return total / count if count else float("nan")


def lr_at(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate for (0-based) ``step``: linear warm-up, then constant or cosine to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.min_lr is None:
        return config.lr
    decay_steps = max(total_steps - config.warmup_steps - 1, 1)
    progress = min((step - config.warmup_steps) / decay_steps, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * progress))


# -- processes and devices ------------------------------------------------------------------------

@dataclass(frozen=True)
class DistContext:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or average, ``op="mean"``) ``tensor`` over all ranks, in place; no-op for one process."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            if op == "mean":
                tensor /= self.world_size
        return tensor

    def all_gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all ranks), in rank order."""
        if self.world_size == 1:
            return [tensor]
        import torch.distributed as dist

        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group if launched by torchrun with ``WORLD_SIZE > 1`` (env:// rendezvous).

    The backend is nccl when the device is CUDA, gloo otherwise. Reuses a group that is already
    initialised. Returns the context and this process's device.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, False), device
    if world <= 1:
        return DistContext(), device
    if not dist.is_available():
        raise TrainError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, True), device


# -- checkpoints ----------------------------------------------------------------------------------

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
    """The JSON part of a training checkpoint (step, tokens, config, data fingerprints...)."""
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

    Only a record: :func:`train` never opens it. ``modelkit train --resume`` uses it as the default
    for ``--data``, and the resumed run still checks the data's token fingerprint.
    """
    recorded = read_train_state(path).get("data", {}).get("path")
    return recorded if isinstance(recorded, str) else None


def run_folder(checkpoint_folder: str | os.PathLike[str]) -> Path:
    """The run folder holding a checkpoint folder (``RUN/checkpoints/step_N`` -> ``RUN``)."""
    folder = Path(checkpoint_folder)
    return folder.parent.parent if folder.parent.name == "checkpoints" else folder.parent


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


def _rng_tensors(ctx: DistContext, device: torch.device) -> dict[str, Tensor]:
    """Every rank's torch RNG state (CPU, and the CUDA device's when training on CUDA)."""
    out: dict[str, Tensor] = {}
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    for kind, state in states.items():
        comm_device = device if device.type == "cuda" else torch.device("cpu")
        for rank, gathered in enumerate(ctx.all_gather(state.to(comm_device))):
            out[f"rng.{kind}.rank{rank}"] = gathered.to("cpu").contiguous()
    return out


def save_training_checkpoint(folder: Path, model: GPTModel, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any], rng: Mapping[str, Tensor]) -> None:
    """Write model, optimiser, RNG and JSON state to ``folder`` (via a temporary folder, then rename)."""
    from safetensors.torch import save_file

    from .checkpoint import save_checkpoint

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_checkpoint(model, tmp / MODEL_FILE, metadata={"step": str(state["step"]), "tokens": str(state["tokens"])})
    save_file({**_optimizer_tensors(model, optimizer), **rng}, str(tmp / STATE_TENSORS),
              metadata={"format": STATE_FORMAT})
    (tmp / STATE_JSON).write_text(json.dumps(state, indent=2), encoding="utf-8")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# -- evaluation -----------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, dataset: GPTDatasetV1, num_windows: int, batch_size: int, device: torch.device,
             ctx: DistContext = DistContext()) -> float | None:
    """Mean cross-entropy per token over windows ``0..num_windows-1`` of ``dataset``, in eval mode.

    Each rank evaluates its share (windows ``rank, rank + world, ...``) and the sums are added over
    ranks, so the value does not depend on the number of processes. None if there are no windows.
    """
    num_windows = min(num_windows, len(dataset))
    if num_windows == 0:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    mine = shard_indices(num_windows, ctx.rank, ctx.world_size)
    for start in range(0, len(mine), batch_size):
        idx = mine[start:start + batch_size]
        inputs = torch.stack([dataset[i][0] for i in idx]).to(device)
        targets = torch.stack([dataset[i][1] for i in idx]).to(device)
        logits = model(inputs)
        total[0] += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
        total[1] += targets.numel()
    ctx.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


# -- the run --------------------------------------------------------------------------------------

def _prepare_data(data: TokenSource, val_data: TokenSource | None, config: TrainConfig, max_length: int,
                  stride: int, vocab_size: int) -> tuple[GPTDatasetV1, GPTDatasetV1 | None, Tensor, Tensor]:
    if val_data is not None:
        train_ids, val_ids = as_token_ids(data), as_token_ids(val_data)
    elif isinstance(data, str):
        train_text, val_text = split_text(data, config.val_fraction)
        train_ids, val_ids = as_token_ids(train_text), as_token_ids(val_text)
    else:
        train_ids, val_ids = split_token_ids(as_token_ids(data), config.val_fraction)
    for label, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
            raise DataError(f"the {label} data hold token id {bad}, outside the model's vocabulary "
                            f"0..{vocab_size - 1} (vocab_size {vocab_size}; GPT-2 text needs 50257)")
    train_set = GPTDatasetV1(train_ids, max_length=max_length, stride=stride)
    if len(train_set) == 0:
        raise DataError(f"the training split has {len(train_ids)} tokens, not enough for one window of "
                        f"max_length {max_length} (it needs more than {max_length} tokens)")
    val_set = None
    if len(val_ids) > 0:
        val_set = GPTDatasetV1(val_ids, max_length=max_length, stride=stride)
        if len(val_set) == 0:
            raise DataError(f"the validation split has {len(val_ids)} tokens, not enough for one window of "
                            f"max_length {max_length}; raise val_fraction, lower max_length, or set "
                            "val_fraction to 0 to train without validation")
    return train_set, val_set, train_ids, val_ids


def _check_resume(saved: dict[str, Any], config: TrainConfig, spec: ModelSpec | None, ckpt_spec: ModelSpec,
                  train_fp: str, world_size: int) -> None:
    saved_cfg = saved["config"]
    changed = [f for f in DATA_FIELDS if saved_cfg.get(f) != getattr(config, f)]
    if changed:
        raise TrainError("cannot resume exactly with different data settings: " + ", ".join(
            f"{f} {saved_cfg.get(f)!r} -> {getattr(config, f)!r}" for f in changed))
    if config.batch_size * world_size != saved["global_batch_size"]:
        raise TrainError(f"the checkpoint was trained with a global batch of {saved['global_batch_size']}; "
                         f"batch_size {config.batch_size} x {world_size} process(es) = "
                         f"{config.batch_size * world_size} would change the batches")
    if saved["data"]["train_sha256"] != train_fp:
        recorded = saved["data"].get("path")
        raise TrainError("the training data differ from the data this checkpoint was trained on"
                         + (f" ({recorded})" if recorded else "") + " (token fingerprints do not match)")
    if spec is not None and spec.to_dict() != ckpt_spec.to_dict():
        raise TrainError("the spec differs from the checkpoint's spec; resume without a spec or with the same one")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def resume_changes(saved: Mapping[str, Any], config: TrainConfig, total_steps: int, world_size: int) -> list[str]:
    """One line per setting that differs from the checkpoint's, e.g. ``lr 0.003 -> 0.001 from step 65``.

    ``steps``/``epochs`` are reported as the run's total steps; a changed number of processes with
    the same global batch as ``processes``. If the learning rate of some step still to come differs
    from what the saved schedule would give it (past its end: its last rate), a last line says from
    which step and the two rates there.
    Steps are numbered as in ``metrics.jsonl`` (the first step after the checkpoint is ``step + 1``).
    """
    old = TrainConfig.from_dict(saved["config"])
    start, old_total = int(saved["step"]), int(saved["total_steps"])
    when = f"from step {start + 1}"
    lines = [f"steps {old_total} -> {total_steps} {when}"] if old_total != total_steps else []
    if saved["world_size"] != world_size:
        lines.append(f"processes {saved['world_size']} -> {world_size} {when} (batch_size per process "
                     f"{old.batch_size} -> {config.batch_size}, the same global batch)")
    for name in TrainConfig.model_fields:
        before, after = getattr(old, name), getattr(config, name)
        if name not in ("steps", "epochs", "batch_size") and before != after:
            lines.append(f"{name} {_fmt(before)} -> {_fmt(after)}" + ("" if name == "plot" else f" {when}"))
    schedule = old_total != total_steps or any(getattr(old, k) != getattr(config, k)
                                               for k in ("lr", "min_lr", "warmup_steps"))
    first = next((s for s in range(start, total_steps)
                  if lr_at(s, old, old_total) != lr_at(s, config, total_steps)), None) if schedule else None
    if first is not None:
        lines.append(f"the learning-rate schedule changes from step {first + 1}: lr there "
                     f"{lr_at(first, old, old_total):.3g} -> {lr_at(first, config, total_steps):.3g}")
    return lines


def resume_config(path: str | os.PathLike[str], world_size: int = 1, **overrides: Any) -> TrainConfig:
    """The config saved in a training checkpoint, with ``overrides`` applied.

    Without a ``batch_size`` override, the per-process batch is the saved global batch divided by
    ``world_size`` (so a 2-process run resumes in one process with twice the batch).
    """
    saved = read_train_state(path)
    data = dict(saved["config"])
    if "batch_size" not in overrides:
        global_batch = saved["global_batch_size"]
        if global_batch % world_size:
            raise TrainError(f"the checkpoint's global batch {global_batch} cannot be split over "
                             f"{world_size} processes")
        data["batch_size"] = global_batch // world_size
    data.update(overrides)
    return TrainConfig.from_dict(data)


def _choose_linear_kernel(model: nn.Module, kernel: str, device: torch.device) -> None:
    """``auto``: oneDNN Linear layers on a CPU where they train faster than PyTorch's
    (:func:`modelkit.speed.onednn_trains_faster`: with AVX-512), else ``F.linear``; ``onednn``,
    ``aten``: that kernel."""
    from .onednn import onednn_linear_available, use_onednn_linear_
    from .speed import onednn_trains_faster

    if kernel == "onednn" and (device.type != "cpu" or not onednn_linear_available()):
        raise TrainError("linear_kernel 'onednn' needs the CPU and a PyTorch build with oneDNN")
    if kernel == "onednn" or (kernel == "auto" and device.type == "cpu" and onednn_trains_faster()):
        use_onednn_linear_(model)


def train(spec: ModelSpec | Mapping[str, Any] | str | os.PathLike[str] | None, data: TokenSource,
          config: TrainConfig | None = None, *, val_data: TokenSource | None = None,
          out_dir: str | os.PathLike[str] | None = None, resume: str | os.PathLike[str] | None = None,
          pause_at: int | None = None, progress: bool = True,
          data_path: str | os.PathLike[str] | None = None) -> TrainResult:
    """Train a model of ``spec`` on ``data`` (text, tokenised with GPT-2's tokenizer, or token ids).

    ``val_data`` replaces the held-out split of ``data``. With ``out_dir`` (rank 0 only) it writes
    ``metrics.jsonl``, ``checkpoints/step_<N>/`` every ``save_every`` steps and at the end,
    ``model.safetensors`` (final weights) and, with ``config.plot``, ``loss.png``. ``resume`` is a
    checkpoint folder or run folder; ``spec`` may then be None and ``config`` defaults to the saved one.
    ``pause_at`` stops after that global step (saving a checkpoint) without changing the schedule.
    ``data_path`` names the file ``data`` was read from; checkpoints record it (made absolute; on
    resume without it, the checkpoint's record is kept) and nothing here reads it.
    Raises :class:`TrainError` / :class:`~modelkit.data.DataError` for unusable options or data.
    """
    from tqdm.auto import tqdm

    from .builder import build_model

    saved: dict[str, Any] | None = None
    if resume is not None:
        saved = read_train_state(resume)
    if config is None:
        config = resume_config(resume, int(os.environ.get("WORLD_SIZE", "1"))) if resume is not None else TrainConfig()
    if config.plot:
        from .plots import require_matplotlib

        require_matplotlib()
    ctx, device = init_distributed(config.device)
    try:
        if saved is not None:
            from .checkpoint import load_checkpoint

            ckpt_model = load_checkpoint(Path(saved["folder"]) / MODEL_FILE)
            ckpt_spec = ckpt_model.spec
            model_spec = ckpt_spec
        else:
            if spec is None:
                raise TrainError("give a spec (or resume from a checkpoint)")
            model_spec = load_spec(spec)
        max_length = config.max_length or model_spec.context_length
        if max_length > model_spec.context_length:
            raise TrainError(f"max_length {max_length} exceeds the model's context_length {model_spec.context_length}")
        config = config.replace(max_length=max_length, stride=config.stride or max_length)
        assert config.stride is not None
        train_set, val_set, train_ids, val_ids = _prepare_data(data, val_data, config, max_length, config.stride,
                                                                 model_spec.vocab_size)
        train_fp = fingerprint(train_ids)
        if saved is not None:
            _check_resume(saved, config, load_spec(spec) if spec is not None else None, ckpt_spec, train_fp,
                          ctx.world_size)
        if data_path is not None:
            data_path = os.path.abspath(os.fspath(data_path))
        elif saved is not None:
            data_path = saved["data"].get("path")

        global_batch = config.batch_size * ctx.world_size
        batches_per_epoch = len(train_set) // global_batch
        if batches_per_epoch == 0:
            raise DataError(f"the training split has {len(train_set)} windows, fewer than one global batch of "
                            f"{global_batch}; use more text or a smaller batch size, max_length or stride")
        total_steps = config.steps or (config.epochs or 1) * batches_per_epoch
        start_step = saved["step"] if saved is not None else 0
        stop_step = min(pause_at, total_steps) if pause_at is not None else total_steps
        if stop_step < start_step:
            raise TrainError(f"the checkpoint is at step {start_step}, past the requested stop at step {stop_step}")
        changes = resume_changes(saved, config, total_steps, ctx.world_size) if saved is not None else []
        if ctx.is_main:
            for line in changes:
                print(f"resume: {line}", file=sys.stderr)
        tokens_per_step = global_batch * max_length

        # The model: built on CPU right after seeding (the book's order), then moved.
        torch.manual_seed(config.seed)
        model = build_model(model_spec)
        if saved is not None:
            model.load_state_dict(ckpt_model.state_dict())
            del ckpt_model
        model.to(device)
        _choose_linear_kernel(model, config.linear_kernel, device)
        if ctx.world_size > 1:
            torch.manual_seed(config.seed + ctx.rank)  # each rank its own dropout stream
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                      betas=config.betas)
        tokens = 0
        if saved is not None:
            tokens = saved["tokens"]
            _restore_tensors(Path(saved["folder"]), model, optimizer, saved, ctx, device)
        train_model: nn.Module = model
        if ctx.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

        out = Path(out_dir) if out_dir is not None else None
        writer = _MetricsWriter(out, start_step if saved is not None else None, ctx.is_main,
                                history=run_folder(saved["folder"]) / METRICS_FILE if saved is not None else None)
        eval_windows = (config.eval_batches * global_batch) if config.eval_batches else max(
            len(train_set), len(val_set) if val_set else 0)

        def run_eval() -> dict[str, float]:
            result = {}
            train_loss = evaluate(model, train_set, eval_windows, config.batch_size, device, ctx)
            if train_loss is not None:
                result["train_eval_loss"] = train_loss
            if val_set is not None:
                val_loss = evaluate(model, val_set, eval_windows, config.batch_size, device, ctx)
                if val_loss is not None:
                    result["val_loss"] = val_loss
            return result

        def state_json(step: int, elapsed: float) -> dict[str, Any]:
            return {
                "format": STATE_FORMAT, "version": STATE_VERSION, "step": step, "tokens": tokens,
                "total_steps": total_steps, "world_size": ctx.world_size, "global_batch_size": global_batch,
                "batches_per_epoch": batches_per_epoch, "config": config.to_dict(),
                "data": {"train_sha256": train_fp, "val_sha256": fingerprint(val_ids),
                         "train_tokens": len(train_ids), "val_tokens": len(val_ids),
                         **({"path": data_path} if data_path is not None else {})},
                "train_seconds": elapsed,
            }

        last_checkpoint: Path | None = None

        def checkpoint(step: int, elapsed: float) -> None:
            nonlocal last_checkpoint
            rng = _rng_tensors(ctx, device)  # a collective: every rank takes part
            if ctx.is_main and out is not None:
                folder = out / "checkpoints" / f"step_{step:06d}"
                save_training_checkpoint(folder, model, optimizer, state_json(step, elapsed), rng)
                last_checkpoint = folder

        last_eval: dict[str, float] = {}
        if saved is None:
            last_eval = run_eval()
            writer.write({"step": 0, "epoch": 0.0, "tokens": 0, "lr": lr_at(0, config, total_steps), **last_eval})
        else:
            last_eval = {k: v for k, v in writer.last_eval().items()}

        train_model.train()
        loader = make_train_loader(train_set, config.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                   seed=config.seed, shuffle=config.shuffle, start=start_step, stop=stop_step)
        bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and ctx.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=20)
        train_seconds = float(saved.get("train_seconds", 0.0)) if saved is not None else 0.0
        run_seconds, run_tokens = 0.0, 0
        step = start_step
        for inputs, targets in loader:
            t0 = time.perf_counter()
            lr = lr_at(step, config, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad()
            loss = calc_loss_batch(inputs, targets, train_model, device)
            loss.backward()
            grad_norm = None
            if config.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip).item()
            optimizer.step()
            loss_value = ctx.all_reduce(loss.detach().clone(), op="mean").item()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            tokens += tokens_per_step
            run_seconds += dt
            run_tokens += tokens_per_step
            recent.append((tokens_per_step, dt))
            line: dict[str, Any] = {"step": step, "epoch": round(step / batches_per_epoch, 4), "tokens": tokens,
                                    "train_loss": loss_value, "lr": lr, "tokens_per_s": round(tokens_per_step / dt, 1)}
            if grad_norm is not None:
                line["grad_norm"] = grad_norm
            if step % config.eval_every == 0 or step == stop_step:
                last_eval = run_eval()
                line.update(last_eval)
            writer.write(line)
            smooth = sum(n for n, _ in recent) / max(sum(t for _, t in recent), 1e-9)
            postfix = {"loss": f"{loss_value:.3f}"}
            if "val_loss" in last_eval:
                postfix["val"] = f"{last_eval['val_loss']:.3f}"
            postfix["tok/s"] = f"{smooth:,.0f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            if (config.save_every and step % config.save_every == 0) or step == stop_step:
                checkpoint(step, train_seconds + run_seconds)
        bar.close()
        if step == start_step and saved is None:  # no step taken (stop_step == 0): still leave a checkpoint
            checkpoint(step, 0.0)
        if ctx.is_main and out is not None:
            from .checkpoint import save_checkpoint

            save_checkpoint(model, out / MODEL_FILE, metadata={"step": str(step), "tokens": str(tokens)})
            if config.plot:
                from .plots import plot_training

                plot_training(writer.lines_all(), out / "loss.png", title=model_spec.name)
        ctx.barrier()
        return TrainResult(
            model=model, metrics=writer.lines, step=step, tokens=tokens,
            tokens_per_s=run_tokens / run_seconds if run_seconds else 0.0,
            final_train_loss=last_eval.get("train_eval_loss"), final_val_loss=last_eval.get("val_loss"),
            out_dir=out, checkpoint=last_checkpoint, config=config, start_step=start_step,
            start_tokens=saved["tokens"] if saved is not None else 0, train_seconds=train_seconds + run_seconds,
            resume_changes=changes,
        )
    finally:
        if ctx.created_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _restore_tensors(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any],
                     ctx: DistContext, device: torch.device) -> None:
    """Load the optimiser state and this rank's RNG state from a checkpoint folder."""
    import warnings

    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATE_TENSORS))
    _load_optimizer_tensors(model, optimizer, tensors)
    same_world = saved["world_size"] == ctx.world_size
    rank = ctx.rank if same_world else 0
    if not same_world and ctx.rank == 0 and model.spec.drop_rate > 0:  # type: ignore[union-attr]
        warnings.warn(f"resuming a {saved['world_size']}-process run with {ctx.world_size} process(es): "
                      "dropout draws differ from an uninterrupted run", stacklevel=3)
    if same_world or ctx.rank == 0:
        torch.set_rng_state(tensors[f"rng.torch.rank{rank}"])
        if device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)


class _MetricsWriter:
    """Collects metric lines; rank 0 appends them to ``out/metrics.jsonl`` as they come.

    On resume (``resume_step``) it keeps the lines up to that step from ``out/metrics.jsonl``, or from
    ``history`` (the checkpoint's run's file) when ``out`` has none, so the file covers the whole run.
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
            for raw in source.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if entry.get("step", 0) <= resume_step:
                    self.previous.append(entry)
        self.path.write_text("".join(json.dumps(e) + "\n" for e in self.previous), encoding="utf-8")

    def last_eval(self) -> dict[str, float]:
        for entry in reversed(self.previous):
            if "val_loss" in entry or "train_eval_loss" in entry:
                return {k: entry[k] for k in ("train_eval_loss", "val_loss") if k in entry}
        return {}

    def lines_all(self) -> list[dict[str, Any]]:
        return self.previous + self.lines

    def write(self, entry: dict[str, Any]) -> None:
        self.lines.append(entry)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(entry) + "\n")


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The metric lines of a run (``metrics.jsonl`` or the run folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


__all__: Sequence[str] = (
    "DistContext", "TrainConfig", "TrainError", "TrainResult", "calc_loss_batch", "calc_loss_loader",
    "evaluate", "find_checkpoint", "init_distributed", "lr_at", "read_metrics", "read_train_state",
    "recorded_data_path", "resume_changes", "resume_config", "run_folder", "train",
)
