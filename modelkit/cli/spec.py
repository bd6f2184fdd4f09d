"""``modelkit spec CONFIG``: validate a spec and print it with every default filled in."""

from __future__ import annotations

import argparse
from typing import Any

from ..files import write_text
from ..spec import load_spec


def add_parser(sub: Any) -> None:
    p = sub.add_parser("spec", help="validate a spec and print it with every default filled in",
                       description="Validate a spec (reporting every problem with its JSON path) and "
                                   "print the fully resolved spec as JSON.")
    p.add_argument("config", help="a JSON spec file")
    p.add_argument("-o", "--output", help="write the resolved spec to this file instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    text = load_spec(args.config).to_json() + "\n"
    if args.output:
        write_text(args.output, text, what="spec")
    else:
        print(text, end="")
    return 0
