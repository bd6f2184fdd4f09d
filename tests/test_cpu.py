"""What modelkit detects about the CPU, the forced capability, and every speed option on any x86-64 CPU.

CI runs this file (and the other ``speed``-marked tests) twice: on the machine as it is, and under
``MODELKIT_CPU_CAPABILITY`` one level below it, so the fallback paths run on every machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, skip_without_bf16_kernel, tiny_cfg
from torch import nn

import modelkit.runtime.onednn
import modelkit.runtime.quantize
import modelkit.runtime.optimize
from modelkit import build_model
from modelkit.cli import main
from modelkit.runtime.cpu import aten_linear_works, cpu_info, hardware_flags, onednn_isa, onednn_isas
from modelkit.generation import generate
from modelkit.runtime.onednn import onednn_dtypes, onednn_linear_available
from modelkit.runtime.quantize import Int8Linear
from modelkit.runtime.optimize import kernel_report, native_build_problem, optimize_for_inference

pytestmark = pytest.mark.speed

# /proc/cpuinfo flags of three real kinds of CPU (the relevant ones).
ZEN3 = frozenset("sse4_1 avx avx2 fma f16c".split())  # AMD EPYC 7003: AVX2, no AVX-512
SKYLAKE_SP = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
SAPPHIRE_RAPIDS = SKYLAKE_SP | {"avx_vnni", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                                "amx_int8"}
CFG = tiny_cfg(vocab_size=97, emb_dim=32, context_length=32, qkv_bias=True)


@pytest.mark.parametrize(("flags", "limit", "expected"), [
    (ZEN3, None, "avx2"),
    (ZEN3, "ALL", "avx2"),
    (ZEN3, "SSE41", "sse41"),
    (SKYLAKE_SP, None, "avx512_core"),
    (SKYLAKE_SP, "AVX2_VNNI", "avx2"),  # a cap this CPU lacks: the best level below it
    (SAPPHIRE_RAPIDS, None, "avx512_core_amx"),
    (SAPPHIRE_RAPIDS, "avx2", "avx2"),
    (SAPPHIRE_RAPIDS, "AVX2_VNNI", "avx2_vnni"),
    (frozenset(), None, None),
])
def test_onednn_level_from_the_cpu_flags_and_the_cap(flags, limit, expected):
    assert onednn_isa(flags, limit) == expected


def test_cpu_info_reports_what_pytorch_chose():
    info = cpu_info()
    assert info.aten_capability == torch.backends.cpu.get_cpu_capability()
    if hardware_flags():  # Linux
        assert info.onednn_isa in onednn_isas(info.flags)
        assert set(info.shown_flags) <= info.flags


def test_the_bf16_probe_agrees_with_the_kernel():
    x, w = torch.randn(4, 32, dtype=torch.bfloat16), torch.randn(8, 32, dtype=torch.bfloat16)
    try:
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
        works = torch.allclose(out.float(), x.float() @ w.float().t(), atol=0.1, rtol=2e-2)
    except RuntimeError:  # "could not create a primitive descriptor": no bf16 kernel for this ISA
        works = False
    assert (torch.bfloat16 in onednn_dtypes()) == works
    rows = dict(kernel_report())
    assert rows["bfloat16 Linear (--dtype)"].startswith("oneDNN" if works else ("PyTorch F.linear", "none"))


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MODELKIT_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**clean, **env}, timeout=120)


def test_a_forced_capability_reaches_pytorch_and_onednn():
    code = ("import json, os, torch, modelkit; from modelkit.runtime.onednn import onednn_dtypes, onednn_linear_available; "
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), os.environ['ONEDNN_MAX_CPU_ISA'], "
            "sorted(str(d) for d in onednn_dtypes())]))")
    result = _python(code, MODELKIT_CPU_CAPABILITY="default")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["DEFAULT", "SSE41", ["torch.float32"]]  # oneDNN has no bf16 on SSE4.1
    if "avx2" in hardware_flags():  # a variable set by the user wins over the forced one
        kept = _python(code, MODELKIT_CPU_CAPABILITY="default", ATEN_CPU_CAPABILITY="avx2")
        assert json.loads(kept.stdout)[0] == "AVX2"


def test_an_unknown_forced_capability_is_one_line_and_exit_status_2(monkeypatch, capsys):
    monkeypatch.setenv("MODELKIT_CPU_CAPABILITY", "avx9")
    assert main(["info", "--device"]) == 2
    err = capsys.readouterr().err
    assert err == "modelkit info: error: MODELKIT_CPU_CAPABILITY='avx9' is not one of: default, avx2, avx512\n"
    with pytest.raises(modelkit.errors.SpeedOptionError, match="avx9"):
        optimize_for_inference(build_model(CFG))


def test_info_device_names_the_kernels_this_cpu_gets(capsys):
    assert main(["info", "--device"]) == 0
    out = capsys.readouterr().out
    assert f"PyTorch kernels:    {torch.backends.cpu.get_cpu_capability()} " in out
    for option, kernel in kernel_report():
        assert f"{option}  " in out and kernel in out
    assert main(["info", "--device", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["cpu"]["aten_capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["kernels"] == dict(kernel_report())


def _generated(capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str, str]:
    status = main(["generate", "--config", str(REPO / "configs" / "tiny.json"), "--prompt", "Hello, I am",
                   "--max-new-tokens", "6", *options])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("options", [("--dtype", "bfloat16"), ("--quantize", "int8"), ("--native",),
                                     ("--dtype", "bfloat16", "--quantize", "int8")], ids=" ".join)
def test_every_speed_option_gives_the_float32_tokens_or_one_line_naming_what_is_missing(capsys, options):
    status, reference, _ = _generated(capsys)
    assert status == 0
    status, out, err = _generated(capsys, *options)
    lines = [line for line in err.splitlines() if not line.startswith("note:")]
    if status == 2:  # allowed only with the reason, in one line
        assert out == "Hello, I am" and len(lines) == 1 and "error:" in lines[0]
        no_bf16 = not (onednn_linear_available(torch.bfloat16) or aten_linear_works(torch.bfloat16))
        assert ("--native" in options and native_build_problem() is not None) or ("bfloat16" in options and no_bf16)
    else:
        assert status == 0 and out == reference and not lines  # the tiny model's tokens have wide margins


@pytest.fixture
def without_onednn_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process behaves as on a CPU whose oneDNN has no bfloat16 kernels (an AVX2 CPU)."""
    fp32_only = onednn_dtypes() - {torch.bfloat16}
    monkeypatch.setattr(modelkit.runtime.onednn, "onednn_dtypes", lambda: fp32_only)
    monkeypatch.setattr(modelkit.runtime.onednn, "_DTYPES", fp32_only)


def test_bf16_without_any_bf16_kernel_is_one_clear_error(without_onednn_bf16, monkeypatch, capsys):
    monkeypatch.setattr(modelkit.runtime.optimize, "aten_linear_works", lambda dtype: False)
    with pytest.raises(modelkit.errors.SpeedOptionError,
                       match=r"dtype bfloat16: no Linear kernel works on this CPU: oneDNN has no bfloat16 inner product"):
        optimize_for_inference(build_model(CFG), dtype="bf16")
    status, out, err = _generated(capsys, "--dtype", "bfloat16")
    assert status == 2 and err.count("\n") - err.count("note:") == 1 and "SpeedOptionError" not in err


def test_bf16_without_onednn_bf16_runs_pytorchs_linear_and_keeps_the_answers(without_onednn_bf16):
    skip_without_bf16_kernel()
    torch.manual_seed(0)
    reference = build_model(CFG).eval()
    model = optimize_for_inference(build_model(CFG).eval(), dtype="bf16")
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in reference.state_dict().items()})
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    x = torch.randint(0, CFG["vocab_size"], (2, 12))
    with torch.no_grad():
        ref, out = reference(x), model(x)
    assert out.dtype == torch.bfloat16
    assert float((out.float() - ref).abs().max() / ref.abs().max()) < 5e-2
    prompt = x[:1, :4]
    assert torch.equal(generate(model, prompt, 8), generate(model, prompt, 8, use_cache=False))


def test_int8_without_its_kernel_computes_with_the_dequantized_weight(monkeypatch):
    monkeypatch.setattr(modelkit.runtime.quantize, "int8_kernel_available", lambda: False)
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(1, 1, 64)  # one row: the int8 kernel's case, when it works
    ref = x @ layer.dequantized_weight().T + linear.bias.detach()
    assert torch.allclose(layer(x), ref, rtol=1e-5, atol=1e-6)  # exact float path: no bf16 rounding
