"""``modelkit spec CONFIG``: validate a spec and print it with every default filled in."""

from __future__ import annotations

import argparse
from typing import Any

from ..files import write_text
from ..sizing import check_parameter_limit, estimate_size
from ..spec import load_spec


def add_parser(sub: Any) -> None:
    p = sub.add_parser("spec", help="validate a spec and print it with every default filled in",
                       description="Validate a spec (reporting every problem with its JSON path, and "
                                   "a model over modelkit.limits.MAX_PARAMETERS parameters) and print the "
                                   "fully resolved spec as JSON.")
    p.add_argument("config", help="a JSON spec file")
    p.add_argument("-o", "--output", help="write the resolved spec to this file instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = load_spec(args.config)
    check_parameter_limit(spec, estimate_size(spec), args.config)  # a spec that validates can be built (meta sizing: ms)
    text = spec.to_json() + "\n"
    if args.output:
        write_text(args.output, text, what="spec")
    else:
        print(text, end="")
    return 0
