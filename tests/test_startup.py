"""Cheap start-up: importing modelkit and the inspecting commands leave torch.compile's machinery
(torch._dynamo, torch._inductor: seconds of imports) alone; the compile path loads it when used."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from conftest import REPO

from modelkit.builder import skip_values_on_meta

COMPILE_MODULES = "('torch._dynamo', 'torch._inductor')"
REPORT = f"import sys; print(sorted(m for m in sys.modules if m.startswith({COMPILE_MODULES})))"


def compile_modules_after(code: str) -> str:
    """What ``code``, run in a fresh interpreter, leaves imported of torch._dynamo and torch._inductor."""
    result = subprocess.run([sys.executable, "-c", f"{code}\n{REPORT}"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_import_modelkit_does_not_import_dynamo_or_inductor():
    assert compile_modules_after("import modelkit") == "[]"


def test_the_inspecting_commands_do_not_import_dynamo_or_inductor():
    code = "\n".join([
        "import contextlib, io",
        "from modelkit.cli import main",
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):",
        "    try:",
        "        main(['--help'])",
        "    except SystemExit:",
        "        pass",
        "    for argv in (['info', 'configs/gpt2-small.json'], ['info', 'configs/llama-style.json'],",
        "                 ['components'], ['schema']):",
        "        assert main(argv) == 0, argv",
    ])
    assert compile_modules_after(code) == "[]"


def test_initialising_meta_tensors_is_skipped_and_everything_else_runs():
    with skip_values_on_meta():
        meta = torch.empty(4, 4, device="meta")
        for init in (nn.init.normal_, nn.init.trunc_normal_, nn.init.kaiming_uniform_, nn.init.xavier_normal_):
            assert init(meta) is meta
        assert meta.normal_() is meta and meta.clamp_(-1, 1) is meta
        real = torch.zeros(4, 4)
        nn.init.normal_(real)  # real tensors are initialised as usual
        assert real.abs().sum() > 0 and torch.equal(torch.ones(2).add_(1), torch.full((2,), 2.0))
