"""Start-up cost: ``import modelkit`` and ``modelkit info`` beside ``import torch``, each a fresh process.

    python benchmarks/startup.py [--rounds 7] [--base /path/to/other/checkout]

Runs the commands in interleaved rounds (every command once per round, so all see the same machine
state) and prints each one's median wall time and its ratio to ``python -c "import torch"``. With
``--base``, the modelkit commands run a second time against that checkout (``PYTHONPATH``), for a
before/after comparison in one run. Also reports whether ``import modelkit`` imported
``torch._dynamo`` (it must not: see ``tests/test_startup.py``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def commands(tree: Path, label: str) -> dict[str, tuple[list[str], Path]]:
    """The modelkit commands to time, run from ``tree``."""
    return {f"import modelkit ({label})": ([sys.executable, "-c", "import modelkit"], tree),
            f"modelkit info gpt2-small ({label})": ([sys.executable, "-m", "modelkit", "info",
                                                     str(tree / "configs" / "gpt2-small.json")], tree)}


def run_once(cmd: list[str], tree: Path | None) -> float:
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    start = time.perf_counter()  # run in the tree: ``python -c`` puts the working folder first on sys.path
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=tree or HERE)
    return time.perf_counter() - start


def dynamo_imported(tree: Path) -> bool:
    code = "import sys, modelkit; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tree)},
                         check=True, capture_output=True, text=True, cwd=tree).stdout
    return out.strip() == "True"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--base", type=Path, help="another checkout to compare with (before/after)")
    args = parser.parse_args()
    cmds: dict[str, tuple[list[str], Path | None]] = {"import torch": ([sys.executable, "-c", "import torch"], None)}
    cmds.update(commands(HERE, "this checkout"))
    if args.base:
        cmds.update(commands(args.base.resolve(), f"base {args.base}"))
    times: dict[str, list[float]] = {name: [] for name in cmds}
    for _ in range(args.rounds):
        for name, (cmd, tree) in cmds.items():
            times[name].append(run_once(cmd, tree))
    torch_median = statistics.median(times["import torch"])
    print(f"{'command':44s} {'median':>8s} {'vs import torch':>16s}   [min, max] over {args.rounds} rounds")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:44s} {median:7.2f}s {median / torch_median:15.2f}x   [{min(values):.2f}, {max(values):.2f}]")
    for tree, label in [(HERE, "this checkout"), *([(args.base.resolve(), "base")] if args.base else [])]:
        print(f"import modelkit imports torch._dynamo ({label}): {dynamo_imported(tree)}")


if __name__ == "__main__":
    main()
