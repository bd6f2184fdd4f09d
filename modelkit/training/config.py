"""What decides a training run besides the spec and the data: :class:`TrainConfig`, and :class:`TrainError`."""

from __future__ import annotations

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

__all__ = ["TrainConfig", "TrainError"]


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
