"""``modelkit components``: every registered component by kind, with parameters and source."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..registry import KINDS, ComponentEntry, get_registry


def add_parser(sub: Any) -> None:
    p = sub.add_parser("components", help="list registered components by kind",
                       description="List every registered component (built-ins and plugins) with its "
                                   "parameters, defaults and where it comes from. Broken plugins are "
                                   "listed with their error; the rest still work.")
    p.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _describe(entry: ComponentEntry) -> dict[str, Any]:
    """One component for the listing; ``choices`` is the list of allowed values of a parameter, or None."""
    choices = entry.choices()
    return {
        "name": entry.name, "summary": entry.summary, "origin": entry.origin, "source": entry.source,
        "parameters": [{"name": n, "type": t, "default": d, "choices": choices.get(n)}
                       for n, t, d in entry.parameters()],
    }


def run(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(KINDS)
    report: dict[str, Any] = {}
    broken = []
    for kind in kinds:
        entries, errors = get_registry(kind).load_all()
        broken.extend(errors)
        report[kind] = [_describe(e) for e in entries]
    if args.json:
        print(json.dumps({"components": report, "broken": [str(b) for b in broken]}, indent=2, default=str))
        return 0
    for kind, entries in report.items():
        print(f"{kind}:")
        for e in entries:
            print(f"  {e['name']:<16} {e['summary']}")
            print(f"  {'':<16} from {e['origin']}  [{e['source']}]")
            for p in e["parameters"]:
                default = "required" if p["default"] == "required" else f"default {p['default']!r}"
                print(f"  {'':<16}   {p['name']}: {p['type']} ({default})")
        print()
    if broken:
        print("broken plugins (their components are unavailable; everything else works):")
        for b in broken:
            print(f"  {b}")
    return 0
