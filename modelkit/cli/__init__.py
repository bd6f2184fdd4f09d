"""The ``modelkit`` command line. Each command lives in its own module with ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..runtime.cpu import forced_capability_problem
from ..errors import ModelkitError

# Command modules, in the order ``modelkit --help`` lists them.
COMMANDS: tuple[str, ...] = ("info", "spec", "schema", "components", "generate", "train", "compare", "import_hf",
                             "export_hf")


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line, like every other error of the CLI:
    ``modelkit <command>: error: <message> (see --help)`` on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    parser = OneLineErrorParser(
        prog="modelkit",
        description="Build, inspect, run and compare GPT-style models from JSON specs.",
    )
    parser.add_argument("--version", action="version", version=f"modelkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 1 runtime failure, 2 bad input).

    Any :class:`~modelkit.errors.ModelkitError` a command raises is reported here, the one place:
    ``modelkit <command>: error: <message>`` on stderr, exit status 2, no traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = forced_capability_problem()
    if problem is not None:
        print(f"modelkit {args.command}: error: {problem}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except ModelkitError as exc:
        print(f"modelkit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # python -m modelkit.cli
    sys.exit(main())
