"""Interleaved A/B speed of modelkit between two source trees (two checkouts at different commits).

    python benchmarks/ab_trees.py --base /work/ab-base --new /work/main [--rounds 7]
        [--only decode,native,prefill,train,compiled] [--threads N]

Shows whether a change leaves speed "within noise": both trees are measured in one run, in
interleaved rounds, so that both see the same state of a noisy machine. The driver starts one
long-lived worker per tree (this file with ``--worker``, ``PYTHONPATH=<tree>``; each prints the
``modelkit.__file__`` it imported) and asks them for one measurement at a time over JSON lines on
stdin/stdout; which tree goes first alternates every round. Each worker builds gpt2-small from
``<tree>/configs/gpt2-small.json`` (``torch.manual_seed(123)``, random fp32 weights) and times:

- ``decode``: ``generate(model, prompt, 100, use_cache=True)``, greedy, 16 fixed prompt ids, after
  ``optimize_for_inference(model)`` (the CPU's default options); ms per generated token (call time / 100);
- ``native``: the same on a copy optimized with ``native=True`` (skipped if it cannot be built);
- ``prefill``: one forward of a (1, 1024) batch under ``torch.inference_mode`` (decode model); ms;
- ``compiled`` (only when asked for): ``decode`` on a copy optimized with ``compile=True``;
- ``train``: one AdamW step (lr 1e-4, weight decay 0.1) of the as-built model on a fixed (4, 256)
  batch: zero_grad, forward, cross-entropy, backward, step; ms.

The first round runs each call once untimed before timing it. The decode models' greedy tokens are
compared between the trees at start. Prints, per kind: both medians, new/base of the medians, the
per-round ratios' median, min and max, and in how many rounds the new tree was faster.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KINDS = ("decode", "native", "prefill", "train", "compiled")
#: Measured per generated token.
PER_TOKEN = ("decode", "native", "compiled")
DEFAULT_KINDS = ("decode", "native", "prefill", "train")
PROMPT = [15496, 11, 314, 716, 257, 3303, 2746, 326, 460, 1561, 2877, 290, 2460, 13, 383, 1110]
NEW_TOKENS = 100


# ----- worker: runs inside one tree -----

def optimizer_fn() -> Callable[..., Any]:
    """``optimize_for_inference`` from ``modelkit.runtime`` (since the runtime package), else ``modelkit.speed``."""
    try:
        import modelkit.runtime as runtime
        if hasattr(runtime, "optimize_for_inference"):
            return runtime.optimize_for_inference
    except ImportError:
        pass
    from modelkit.speed import optimize_for_inference  # type: ignore[import-not-found]  # before modelkit.runtime
    return optimize_for_inference


def prepare(tree: Path, kinds: list[str]) -> tuple[dict[str, Callable[[], Any]], dict[str, str], list[int]]:
    """Build the models; return a timed call per available kind, why others are missing, greedy tokens."""
    import torch
    import torch.nn.functional as F
    import modelkit

    torch.manual_seed(123)
    built = modelkit.build_model(tree / "configs" / "gpt2-small.json")
    optimize = optimizer_fn()
    decode = optimize(copy.deepcopy(built))
    prompt = torch.tensor([PROMPT])
    calls: dict[str, Callable[[], Any]] = {}
    missing: dict[str, str] = {}

    def generate_with(model: Any) -> Callable[[], Any]:
        return lambda: modelkit.generate(model, prompt, NEW_TOKENS, use_cache=True)

    tokens = generate_with(decode)()[0, len(PROMPT):].tolist()
    if "decode" in kinds:
        calls["decode"] = generate_with(decode)
    if "native" in kinds:
        try:
            calls["native"] = generate_with(optimize(copy.deepcopy(built), native=True))
        except Exception as exc:  # no compiler or ninja, or a model the native step does not run
            missing["native"] = f"{type(exc).__name__}: {exc}"
    if "compiled" in kinds:  # compiles on the warm-up call of the first round
        calls["compiled"] = generate_with(optimize(copy.deepcopy(built), compile=True))
    if "prefill" in kinds:
        idx = torch.randint(0, 50257, (1, 1024), generator=torch.Generator().manual_seed(1))

        def prefill() -> None:
            with torch.inference_mode():
                decode(idx)
        calls["prefill"] = prefill
    if "train" in kinds:
        model = built.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        batch = torch.randint(0, 50257, (4, 257), generator=torch.Generator().manual_seed(2))
        inputs, targets = batch[:, :-1], batch[:, 1:]

        def train_step() -> None:
            opt.zero_grad()
            logits = model(inputs)
            F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
            opt.step()
        calls["train"] = train_step
    return calls, missing, tokens


def worker(tree: Path, kinds: list[str], threads: int | None) -> None:
    """Answer one JSON line per request line: ``{"kind", "warmup"}`` -> ``{"ms"}``; EOF ends it."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (compiler output, warnings) goes to stderr, not the protocol
    import torch
    import modelkit

    if threads:
        torch.set_num_threads(threads)
    if not Path(modelkit.__file__).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"modelkit imported from {modelkit.__file__}, not from {tree}")
    calls, missing, tokens = prepare(tree, kinds)
    ready = {"file": modelkit.__file__, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "tokens": tokens, "missing": missing}
    print(json.dumps(ready), file=proto)
    for line in sys.stdin:
        request = json.loads(line)
        call = calls[request["kind"]]
        if request["warmup"]:
            call()
        start = time.perf_counter()
        call()
        ms = (time.perf_counter() - start) * 1e3
        print(json.dumps({"ms": ms / NEW_TOKENS if request["kind"] in PER_TOKEN else ms}), file=proto)


# ----- driver -----

class Worker:
    """One tree's worker process, asked for one measurement at a time."""

    def __init__(self, name: str, tree: Path, kinds: list[str], threads: int | None) -> None:
        self.name, self.tree = name, tree
        env = dict(os.environ, PYTHONPATH=str(tree))
        env.setdefault("TORCH_EXTENSIONS_DIR",  # one build cache per tree: no rebuild when trees alternate
                       str(Path.home() / ".cache" / "torch_extensions" / "ab_trees" / name))
        cmd = [sys.executable, __file__, "--worker", str(tree), "--only", ",".join(kinds)]
        if threads:
            cmd += ["--threads", str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.info: dict[str, Any] = {}

    def read(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line:
            raise SystemExit(f"{self.name} worker ({self.tree}) exited with {self.proc.wait()}: see its stderr above")
        return json.loads(line)

    def measure(self, kind: str, warmup: bool) -> float:
        self.proc.stdin.write(json.dumps({"kind": kind, "warmup": warmup}) + "\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        return self.read()["ms"]

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait()


def git_state(tree: Path) -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()
    return f"{git('rev-parse', '--short', 'HEAD') or '?'}{' (dirty)' if git('status', '--porcelain') else ''}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def report(kinds: list[str], times: dict[str, dict[str, list[float]]]) -> None:
    print("| kind | unit | base median | new median | new/base | per-round ratio median [min, max] | new faster |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for kind in kinds:
        base, new = times[kind]["base"], times[kind]["new"]
        ratios = [n / b for b, n in zip(base, new)]
        unit = "ms/token" if kind in PER_TOKEN else "ms/step" if kind == "train" else "ms/pass"
        print(f"| {kind} | {unit} | {statistics.median(base):.2f} | {statistics.median(new):.2f} "
              f"| {statistics.median(new) / statistics.median(base):.3f} | {statistics.median(ratios):.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}] | {sum(r < 1 for r in ratios)}/{len(ratios)} |")
    print()
    for kind in kinds:
        pairs = ", ".join(f"{b:.2f}/{n:.2f}" for b, n in zip(times[kind]["base"], times[kind]["new"]))
        print(f"{kind} per round (base/new): {pairs}")


def drive(args: argparse.Namespace) -> None:
    unknown = set(args.only.split(",")) - set(KINDS)
    if unknown:
        raise SystemExit(f"unknown kinds {sorted(unknown)}; choose from {','.join(KINDS)}")
    kinds = [k for k in KINDS if k in args.only.split(",")]
    trees = {"base": Path(args.base), "new": Path(args.new)}
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); --threads {args.threads or 'torch default'}")
    workers = {name: Worker(name, tree, kinds, args.threads) for name, tree in trees.items()}
    try:
        run_rounds(args.rounds, kinds, workers)
    finally:
        for w in workers.values():
            w.proc.kill()


def run_rounds(rounds: int, kinds: list[str], workers: dict[str, Worker]) -> None:
    """Read both workers' start lines, compare their tokens, time the rounds and print the report."""
    for name, w in workers.items():
        w.info = w.read()
        print(f"{name}: {w.tree} at {git_state(w.tree)}; modelkit from {w.info['file']}; "
              f"torch {w.info['torch']}, {w.info['threads']} threads")
        for kind, why in w.info["missing"].items():
            print(f"  {kind} unavailable in {name}: {why}")
    same = workers["base"].info["tokens"] == workers["new"].info["tokens"]
    print(f"greedy decode tokens ({NEW_TOKENS}) equal between trees: {same}")
    kinds = [k for k in kinds if all(k not in w.info["missing"] for w in workers.values())]
    times: dict[str, dict[str, list[float]]] = {k: {"base": [], "new": []} for k in kinds}
    for r in range(rounds):
        order = ("base", "new") if r % 2 == 0 else ("new", "base")
        for kind in kinds:
            for name in order:
                times[kind][name].append(workers[name].measure(kind, warmup=r == 0))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    for w in workers.values():
        w.close()
    print()
    report(kinds, times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the reference tree (a checkout of the repo)")
    parser.add_argument("--new", help="the tree to compare with it")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(DEFAULT_KINDS), help="comma-separated subset of " + ",".join(KINDS))
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    parser.add_argument("--worker", metavar="TREE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(Path(args.worker), args.only.split(","), args.threads)
    elif not (args.base and args.new):
        parser.error("--base and --new are required")
    else:
        drive(args)


if __name__ == "__main__":
    main()
