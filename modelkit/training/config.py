"""What decides a training run besides the spec and the data: :class:`TrainConfig`, and :class:`TrainError`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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

from ..errors import ModelkitError, did_you_mean
from ..spec import describe_json, expected_json_type
from ..runtime.optimize import KERNELS

__all__ = ["MAX_COUNT", "MAX_LR", "MAX_SEED", "TrainConfig", "TrainError"]

#: The largest ``lr`` and ``weight_decay``: far above any useful value, and low enough that AdamW's
#: step size (``lr / (1 - beta1**t)``) and decay factor (``1 - lr * weight_decay``) stay within float32,
#: where torch's optimiser otherwise fails with an overflow error (``lr=1e300`` does).
MAX_LR = 1e6

#: The largest step, epoch, batch or window count: what a signed 64-bit integer (a torch index) holds.
MAX_COUNT = 2**63 - 1
#: The largest seed: torch seeds its generators with a 64-bit unsigned integer.
MAX_SEED = 2**64 - 1
#: The integer fields that count something (None, where allowed, means "the default").
_COUNTS = ("steps", "epochs", "batch_size", "max_length", "stride", "eval_every", "eval_batches", "save_every")


class TrainError(ModelkitError, ValueError):
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

    Ranges: counts (``steps`` ... ``save_every``) are integers in ``[1, 2**63 - 1]`` and
    ``warmup_steps`` in ``[0, 2**63 - 1]``; ``seed`` is in ``[0, 2**64 - 1]`` (torch's seed range).
    Every float must be finite (no NaN or infinity): ``0 < lr <= 1e6`` (:data:`MAX_LR`),
    ``0 <= min_lr <= lr``, ``0 <= weight_decay <= 1e6``, ``grad_clip > 0``, ``val_fraction`` and each
    of ``betas`` in ``[0, 1)``.
    A finite but too large ``lr`` is not refused here: the run stops at the first non-finite loss
    (:func:`~modelkit.training.train`).
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
        """The checks beyond types; all problems in one ``ValueError`` (see :func:`_range_problems`)."""
        problems = _range_problems(self)
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


def _range_problems(config: TrainConfig) -> list[str]:
    """Every value of ``config`` outside its range (documented on :class:`TrainConfig`), one line each."""
    problems: list[str] = []
    if config.steps is not None and config.epochs is not None:
        problems.append("give steps or epochs, not both")
    for name in _COUNTS:
        value = getattr(config, name)
        if value is not None and value < 1:
            problems.append(f"{name} must be a positive integer, got {value!r}")
        elif value is not None and value > MAX_COUNT:
            problems.append(f"{name} must be at most 2**63 - 1, got {value!r}")
    if not 0 <= config.warmup_steps <= MAX_COUNT:
        problems.append(f"warmup_steps must be in [0, 2**63 - 1], got {config.warmup_steps}")
    if not 0 <= config.seed <= MAX_SEED:
        problems.append(f"seed must be in [0, 2**64 - 1] (torch's seed range), got {config.seed}")
    floats = {"val_fraction": config.val_fraction, "lr": config.lr, "weight_decay": config.weight_decay,
              "min_lr": config.min_lr, "grad_clip": config.grad_clip,
              "betas[0]": config.betas[0], "betas[1]": config.betas[1]}
    infinite = [name for name, value in floats.items() if value is not None and not math.isfinite(value)]
    problems += [f"{name} must be a finite number, got {floats[name]}" for name in infinite]
    problems += [p for name, p in _float_range_problems(config) if name not in infinite]
    if config.linear_kernel not in KERNELS:
        problems.append(f"linear_kernel must be auto, aten or onednn, got {config.linear_kernel!r}")
    return problems


def _float_range_problems(config: TrainConfig) -> list[tuple[str, str]]:
    """``(field, problem)`` for each float outside its range (a NaN compares false, so it lands here too)."""
    problems: list[tuple[str, str]] = []
    if not 0.0 <= config.val_fraction < 1.0:
        problems.append(("val_fraction", f"val_fraction must be in [0, 1), got {config.val_fraction}"))
    if not 0 < config.lr <= MAX_LR:
        problems.append(("lr", f"lr must be positive, got {config.lr}" if not config.lr > 0
                         else f"lr must be at most {MAX_LR:g}, got {config.lr:g}"))
    if config.min_lr is not None and not 0 <= config.min_lr <= config.lr:
        problems.append(("min_lr", f"min_lr must be in [0, lr={config.lr}], got {config.min_lr}"))
    if not 0 <= config.weight_decay <= MAX_LR:
        problems.append(("weight_decay", f"weight_decay must be in [0, {MAX_LR:g}], got {config.weight_decay:g}"))
    if config.grad_clip is not None and not config.grad_clip > 0:
        problems.append(("grad_clip", f"grad_clip must be positive, got {config.grad_clip}"))
    for i, beta in enumerate(config.betas):
        if not 0.0 <= beta < 1.0:
            problems.append((f"betas[{i}]", f"betas[{i}] must be in [0, 1), got {beta}"))
    return problems
