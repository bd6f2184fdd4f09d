"""``modelkit schema``: the JSON Schema of a spec, from the live registry (plugins included)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..files import write_text
from ..spec import spec_json_schema


def add_parser(sub: Any) -> None:
    p = sub.add_parser("schema", help="write the JSON Schema of model specs",
                       description="Write the JSON Schema of a model spec, built from every registered "
                                   "component (plugins included). Point a config at it with \"$schema\" "
                                   "and an editor validates and completes it.")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    schema, failures = spec_json_schema()
    text = json.dumps(schema, indent=2) + "\n"
    if args.output:
        write_text(args.output, text, what="schema")
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text, end="")
    for failure in failures:
        print(f"warning: left out a broken plugin: {failure}", file=sys.stderr)
    return 0
