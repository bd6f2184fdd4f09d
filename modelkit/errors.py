"""The exceptions modelkit raises for bad input, each carrying what a user needs to fix it.

Every exception modelkit defines derives from :class:`ModelkitError` (and keeps a builtin base,
``ValueError``, ``LookupError`` or ``RuntimeError``, so ``except ValueError`` code keeps working).
The ``modelkit`` CLI turns any of them into one ``modelkit <command>: error: <message>`` line on
stderr and exit status 2. The classes here are the core's; the speed, training, comparison, plotting
and tokenizer modules define their own, on the same base.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest candidate, or ``""`` if none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class ModelkitError(Exception):
    """The base of every exception modelkit raises on purpose: bad input, or a feature this machine
    or installation cannot run. Its message is written for the user and says what to change."""


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: the dotted JSON path (``""`` for the whole spec) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ModelkitError, ValueError):
    """A model spec is invalid. ``issues`` lists every problem found, each with its JSON path.

    The message names the source (a file path, or "<dict>" / "<json string>") and lists all
    problems at once, one per line, so a user can fix a config in one go; a single problem is
    one line: ``invalid model spec in a.json: n_layers: must be at most 1,024 ...``.
    """

    def __init__(self, issues: list[SpecIssue], source: str | None = None) -> None:
        self.issues = list(issues)
        self.source = source
        where = f" in {source}" if source else ""
        count = len(self.issues)
        if count == 1:  # one problem: one line
            super().__init__(f"invalid model spec{where}: {self.issues[0]}")
            return
        head = f"invalid model spec{where} ({count} problem{'s' if count != 1 else ''}):"
        super().__init__("\n".join([head, *(f"  {issue}" for issue in self.issues)]))


class BuildError(ModelkitError, ValueError):
    """``build_model`` was given a device or dtype it cannot build on (an unknown device string, a dtype
    that is not floating point)."""


class RegistryError(ModelkitError, LookupError):
    """A component registry lookup or registration failed (unknown name, duplicate, bad class)."""


class UnknownComponentError(RegistryError):
    """No component of that kind has that name. The message lists the known names."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, known
        super().__init__(
            f"unknown {kind} '{name}'{did_you_mean(name, known)} (known: {', '.join(known) or 'none'})"
        )


class PluginError(RegistryError):
    """A third-party component could not be loaded from its entry point.

    The message names the distribution and its version, the entry point and the original error.
    """

    def __init__(self, kind: str, name: str | None, value: str | None, dist: str | None, version: str | None,
                 reason: str) -> None:
        self.kind, self.name, self.value, self.dist, self.version = kind, name, value, dist, version
        self.reason = reason
        who = f"{dist}=={version}" if dist else "an unknown distribution"
        if name is None:  # the distribution's entry points could not even be read
            super().__init__(f"plugin distribution {who} (entry-point group modelkit.{kind}): {reason}")
            return
        super().__init__(
            f"plugin {kind} '{name}' from {who} (entry point modelkit.{kind}: {name} = {value}) "
            f"failed to load: {reason}"
        )


class CheckpointError(ModelkitError, ValueError):
    """A checkpoint file is unreadable, is not a modelkit/GPT-2 checkpoint, or does not fit the spec."""


class GenerationError(ModelkitError, ValueError):
    """Arguments to text generation are invalid (empty prompt, bad temperature, out-of-vocab ids...)."""


class SpeedOptionError(ModelkitError, ValueError):
    """A speed option is invalid (an unknown dtype, kernel or layout; options that exclude each other),
    or cannot run on this machine: the CPU lacks the instruction set its kernel needs, or the kernel's
    build is missing. The message names the option and what is wrong."""


class DeviceError(ModelkitError, ValueError):
    """A ``--device``/``device=`` names no torch device, or one this machine does not have."""


class ModelTooLargeError(ModelkitError, MemoryError):
    """Building a model on a device would need more memory than the device has free.

    Raised before anything is allocated; ``needed`` and ``available`` are bytes (parameters and
    buffers only: running the model needs more).
    """

    def __init__(self, needed: int, available: int, device: str, parameters: int, dtype: str) -> None:
        self.needed, self.available, self.device = needed, available, device
        gib = 2**30
        super().__init__(
            f"the model needs {needed / gib:,.1f} GiB on {device} ({parameters:,} parameters in {dtype}), "
            f"but {device} has {available / gib:,.1f} GiB free; use a smaller spec, a smaller dtype, "
            "or device='meta' to inspect it without weights"
        )
