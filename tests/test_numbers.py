"""Numbers are checked: every numeric argument of generation and training, at every hostile value.

The corpus is generated: each numeric argument of ``generate(...)``, ``TrainConfig(...)``, ``modelkit
generate`` and ``modelkit train`` meets each value of :data:`VALUES`. Which values an argument accepts
is written down here, from the documented ranges (not from the code under test); every other value
must give a :class:`~modelkit.errors.ModelkitError` subclass through the Python API and, through the
CLI, exit status 2 with one ``modelkit <cmd>: error: ...`` line and no traceback.

Then the consequences of bad numbers that only show while running: a model whose weights hold NaN
(sampling refuses, greedy warns), a temperature that overflows the logits, a training run that
diverges (it stops, names the step, and keeps the last finite checkpoint as ``model.safetensors``),
and ``--out`` naming a file.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from modelkit import build_model
from modelkit.cli import main
from modelkit.errors import GenerationError, ModelkitError
from modelkit.generation import generate, stream_generate
from modelkit.testing import synthetic_text, tiny_model_spec
from modelkit.training import TrainConfig, TrainError, train
from modelkit.weights.checkpoint import load_checkpoint, save_checkpoint

# -- the corpus ------------------------------------------------------------------------------------------

#: Hostile values by name. "negative" is -1 for integer arguments and -1.5 for float ones.
VALUES: dict[str, Any] = {
    "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -1, "zero": 0,
    "1e-300": 1e-300, "1e300": 1e300, "2**63": 2**63, "2**64": 2**64, "2**70": 2**70, "bool": True,
    "string": "1",
}
BIG_INTS = {"2**63", "2**64", "2**70"}
#: The values an integer argument can be at all (the rest are not integers).
INTEGERS = {"negative", "zero", *BIG_INTS}


def value_of(name: str, kind: str) -> Any:
    """The value ``name`` for an argument of ``kind`` ("int" or "float")."""
    return -1.5 if name == "negative" and kind == "float" else VALUES[name]


def cli_text(name: str, kind: str) -> str:
    """How the value ``name`` is typed on a command line."""
    value = value_of(name, kind)
    return {"bool": "True", "string": "abc"}.get(name, repr(value) if isinstance(value, float) else str(value))


#: generate(...)'s numeric arguments: (kind, the values it accepts), from its docstring: max_new_tokens
#: an integer >= 0; context_size in [1, context_length]; temperature 0 or finite >= 1e-6; top_k an
#: integer >= 1; top_p in (0, 1]; eos_id in [0, vocab_size); seed in [0, 2**64 - 1].
GENERATE_ARGS: dict[str, tuple[str, set[str]]] = {
    "max_new_tokens": ("int", {"zero", *BIG_INTS}),
    "context_size": ("int", set()),  # the tiny model's context_length is 32: no hostile value fits
    "temperature": ("float", {"zero", "1e300", *BIG_INTS}),
    "top_k": ("int", set(BIG_INTS)),
    "top_p": ("float", {"1e-300"}),
    "eos_id": ("int", {"zero"}),
    "seed": ("int", {"zero", "2**63"}),
}
#: TrainConfig's numeric fields, from its docstring: counts in [1, 2**63 - 1], warmup_steps in
#: [0, 2**63 - 1], seed in [0, 2**64 - 1], finite floats: 0 < lr <= 1e6, 0 <= min_lr <= lr (4e-4 by
#: default), 0 <= weight_decay <= 1e6, grad_clip > 0, val_fraction and betas in [0, 1).
COUNTS = ("steps", "epochs", "batch_size", "max_length", "stride", "eval_every", "eval_batches", "save_every")
TRAIN_ARGS: dict[str, tuple[str, set[str]]] = {
    **{name: ("int", set()) for name in COUNTS},
    "warmup_steps": ("int", {"zero"}),
    "seed": ("int", {"zero", "2**63"}),
    "val_fraction": ("float", {"zero", "1e-300"}),
    "lr": ("float", {"1e-300"}),
    "weight_decay": ("float", {"zero", "1e-300"}),
    "min_lr": ("float", {"zero", "1e-300"}),
    "grad_clip": ("float", {"1e-300", "1e300", *BIG_INTS}),
    "betas[0]": ("float", {"zero", "1e-300"}),
    "betas[1]": ("float", {"zero", "1e-300"}),
}
#: CLI flags and the API argument each one sets.
GENERATE_FLAGS = {"--max-new-tokens": "max_new_tokens", "--temperature": "temperature", "--top-k": "top_k",
                  "--top-p": "top_p", "--seed": "seed"}
TRAIN_FLAGS = {f"--{name.replace('_', '-')}": name for name in TRAIN_ARGS if not name.startswith("betas")}


def corpus(args: dict[str, tuple[str, set[str]]]) -> list[Any]:
    """Every (argument, value name, kind, accepted) as pytest params, ids ``argument=value``."""
    return [pytest.param(arg, name, kind, name in accepted, id=f"{arg}={name}")
            for arg, (kind, accepted) in args.items() for name in VALUES]


def cli_accepts(flag_arg: str, args: dict[str, tuple[str, set[str]]], name: str) -> bool:
    """Whether the CLI takes the value: the API's verdict, for a value its flag can parse (argparse's int
    or float: no booleans or words, and an integer flag no float)."""
    kind, accepted = args[flag_arg]
    parses = name not in ("bool", "string") and (kind == "float" or name in INTEGERS)
    return parses and name in accepted


def cli(argv: list[str]) -> int:
    """``modelkit ARGV``'s exit status, in process (argparse's refusals exit through ``SystemExit``)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def assert_one_error_line(code: int, err: str, command: str) -> str:
    """Exit status 2, no traceback, and exactly one ``modelkit <command>: error:`` line, the last one
    (argparse's own refusals included). Returns the error line."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith(f"modelkit {command}: error: "), err
    before = lines[:-1]
    assert not before, err  # usage errors are one line too (OneLineErrorParser)
    return errors[0]


# -- fixtures --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    """A tiny GPT (GPT-2 vocabulary, context 32), random weights, eval mode."""
    torch.manual_seed(0)
    return build_model(tiny_model_spec()).eval()


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_model_spec(name="tiny")))
    return path


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(synthetic_text(60), encoding="utf-8")
    return path


# -- generate(...) ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("arg", "name", "kind", "accepted"), corpus(GENERATE_ARGS))
def test_generate_api_checks_every_numeric_argument(tiny: torch.nn.Module, arg: str, name: str, kind: str,
                                                    accepted: bool) -> None:
    kwargs: dict[str, Any] = {"max_new_tokens": 2, "temperature": 1.0 if arg in ("top_k", "top_p") else 0.0,
                              arg: value_of(name, kind)}
    idx = torch.tensor([[15496, 11, 314]])
    if not accepted:
        with pytest.raises(GenerationError) as info:
            stream_generate(tiny, idx, **kwargs)  # refused at the call, before any token
        assert arg in str(info.value) or "temperature" in str(info.value)
        with pytest.raises(GenerationError):
            generate(tiny, idx, **kwargs)
        return
    # Accepted: two tokens come out (a huge max_new_tokens is only started, not run to its end).
    tokens = list(itertools.islice(stream_generate(tiny, idx, **kwargs), 2))
    assert len(tokens) == (0 if arg == "max_new_tokens" and name == "zero" else 2)
    assert all(0 <= int(t) < 50257 for t in tokens)


def test_the_seed_range_is_torchs_64_bit_range(tiny: torch.nn.Module) -> None:
    idx = torch.tensor([[15496, 11]])
    top = generate(tiny, idx, 4, temperature=1.0, seed=2**64 - 1)
    assert torch.equal(top, generate(tiny, idx, 4, temperature=1.0,
                                     generator=torch.Generator().manual_seed(2**64 - 1)))
    with pytest.raises(GenerationError, match=re.escape("seed must be at most 2**64 - 1")):
        generate(tiny, idx, 4, temperature=1.0, seed=2**64)


def test_a_temperature_below_the_minimum_is_refused_and_the_minimum_samples(tiny: torch.nn.Module) -> None:
    idx = torch.tensor([[15496, 11]])
    with pytest.raises(GenerationError, match="too small to sample with: use 0 for greedy"):
        generate(tiny, idx, 3, temperature=9.9e-7)
    # 1e-6 is accepted; for these (distinct) logits it samples the argmax, as greedy decoding does
    assert torch.equal(generate(tiny, idx, 3, temperature=1e-6, seed=1), generate(tiny, idx, 3))


# -- non-finite logits -----------------------------------------------------------------------------------

def nan_model() -> torch.nn.Module:
    """The tiny GPT with one NaN in its output head: every logit of that vocabulary row is NaN."""
    torch.manual_seed(0)
    model = build_model(tiny_model_spec()).eval()
    with torch.no_grad():
        model.out_head.weight[7, 3] = float("nan")
    return model


def test_sampling_from_non_finite_logits_is_refused_naming_the_step() -> None:
    # One NaN weight in the output head's row 7: logit 7 of each of the 2 rows is NaN
    with pytest.raises(GenerationError, match=r"logits for new token 1 are not finite \(2 NaN, 0 infinite of 100514\)"):
        generate(nan_model(), torch.tensor([[15496, 11], [40, 716]]), 3, temperature=1.0, seed=0)


def test_greedy_decoding_of_non_finite_logits_warns_once_and_goes_on() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(nan_model(), torch.tensor([[15496, 11]]), 3)
    messages = [str(w.message) for w in caught if "not finite" in str(w.message)]
    assert len(messages) == 1 and "logits for new token 1 are not finite" in messages[0]
    assert out.shape == (1, 5)
    assert out[0, 2:].tolist() == [7, 7, 7]  # torch's argmax takes a NaN as the largest value


def test_a_temperature_that_overflows_finite_logits_is_refused_naming_the_step(tiny: torch.nn.Module) -> None:
    torch.manual_seed(0)
    model = build_model(tiny_model_spec()).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(1e36)  # logits near float32's limit (3.4e38), still finite
    with torch.inference_mode():
        logits = model(torch.tensor([[15496, 11]]))[0, -1]
    assert bool(torch.isfinite(logits).all()) and float(logits.abs().max()) > 1e33
    with pytest.raises(GenerationError, match="temperature 1e-06 is too small for the model's logits at new token 1"):
        generate(model, torch.tensor([[15496, 11]]), 2, temperature=1e-6, seed=0)


def test_cli_sampling_a_nan_model_exits_2_and_greedy_warns(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "nan.safetensors"
    save_checkpoint(nan_model(), checkpoint)
    base = ["generate", "--checkpoint", str(checkpoint), "--prompt", "Hello,", "--max-new-tokens", "3"]
    code = cli([*base, "--temperature", "1"])
    captured = capsys.readouterr()
    line = assert_one_error_line(code, captured.err, "generate")
    assert "logits for new token 1 are not finite" in line and "cannot sample" in line
    assert captured.out == "Hello,\n"  # the prompt, its line ended before the error
    assert main(base) == 0
    captured = capsys.readouterr()
    warning_lines = [l for l in captured.err.splitlines() if l.startswith("warning: ")]
    assert len(warning_lines) == 1 and "logits for new token 1 are not finite" in warning_lines[0]
    assert "Traceback" not in captured.err


# -- modelkit generate -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("flag", "name"), [
    pytest.param(f, n, id=f"{f}={n}") for f in GENERATE_FLAGS for n in VALUES
    # accepted, but it would generate 2**63 tokens (the API test starts such a run)
    if not (f == "--max-new-tokens" and n in BIG_INTS)])
def test_cli_generate_checks_every_numeric_flag(flag: str, name: str, config_file: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    arg = GENERATE_FLAGS[flag]
    kind = GENERATE_ARGS[arg][0]
    accepted = cli_accepts(arg, GENERATE_ARGS, name)
    argv = ["generate", "--config", str(config_file), "--prompt", "Hello,", "--max-new-tokens", "2",
            *(["--temperature", "1"] if arg in ("top_k", "top_p") else []), flag, cli_text(name, kind)]
    code = cli(argv)
    captured = capsys.readouterr()
    if accepted:
        assert code == 0, captured.err
        assert captured.out.startswith("Hello,") and "Traceback" not in captured.err
    else:
        assert_one_error_line(code, captured.err, "generate")
        assert captured.out == ""  # refused before anything was generated


# -- TrainConfig(...) and modelkit train -----------------------------------------------------------------

def train_config_kwargs(arg: str, value: Any) -> dict[str, Any]:
    """``TrainConfig`` keywords setting ``arg`` (``betas[i]`` sets one of the pair) to ``value``."""
    if arg.startswith("betas"):
        betas = [0.9, 0.999]
        betas[int(arg[6])] = value
        return {"betas": betas}
    return {arg: value}


@pytest.mark.parametrize(("arg", "name", "kind", "accepted"), corpus(TRAIN_ARGS))
def test_train_config_checks_every_numeric_field(arg: str, name: str, kind: str, accepted: bool) -> None:
    kwargs = train_config_kwargs(arg, value_of(name, kind))
    if accepted:
        config = TrainConfig(**kwargs)
        assert config.to_dict() == TrainConfig.from_dict(config.to_dict()).to_dict()
        return
    with pytest.raises(TrainError) as info:
        TrainConfig(**kwargs)
    assert str(info.value).startswith("invalid training config: ") and arg in str(info.value)


#: modelkit train's numeric flags (``--pause-at``: a step in [0, 2**63 - 1], as the API's ``pause_at``).
TRAIN_CLI_ARGS = {**TRAIN_ARGS, "pause_at": ("int", {"zero"})}
TRAIN_CLI_FLAGS = {**TRAIN_FLAGS, "--pause-at": "pause_at"}


@pytest.mark.parametrize(("flag", "name"), [
    pytest.param(f, n, id=f"{f}={n}") for f, arg in TRAIN_CLI_FLAGS.items() for n in VALUES
    if not cli_accepts(arg, TRAIN_CLI_ARGS, n)])  # the accepted values would train: TrainConfig's test has them
def test_cli_train_refuses_every_bad_numeric_flag(flag: str, name: str, config_file: Path, data_file: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kind = TRAIN_CLI_ARGS[TRAIN_CLI_FLAGS[flag]][0]
    out = tmp_path / "run"
    code = cli(["train", "--config", str(config_file), "--data", str(data_file), "--out", str(out), "--quiet",
                flag, cli_text(name, kind)])
    assert_one_error_line(code, capsys.readouterr().err, "train")
    assert not out.exists()  # nothing was written


@pytest.mark.parametrize("pause_at", [-1, 2**63, True, 1.5, "3"])
def test_train_api_refuses_a_bad_pause_at(pause_at: Any) -> None:
    with pytest.raises(TrainError, match="pause_at must be"):
        train(tiny_model_spec(), "some text", TrainConfig(steps=1), pause_at=pause_at, progress=False)


def test_a_seed_at_the_top_of_the_range_trains_epochs_past_the_first(tmp_path: Path) -> None:
    # The epoch's shuffle seed is seed + epoch, wrapped: 2**64 - 1 must work in epoch 2 too.
    result = train(tiny_model_spec(context_length=16), synthetic_text(30),
                   TrainConfig(epochs=2, batch_size=4, seed=2**64 - 1, eval_every=1000, eval_batches=1),
                   progress=False)
    assert result.step >= 2 and all(math.isfinite(loss) for loss in result.losses())


# -- --out ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["file", "under a file"])
def test_cli_train_out_naming_a_file_is_refused_and_the_file_kept(where: str, config_file: Path, data_file: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("precious")
    out = existing if where == "file" else existing / "run"
    code = cli(["train", "--config", str(config_file), "--data", str(data_file), "--out", str(out), "--steps", "1",
                 "--quiet"])
    line = assert_one_error_line(code, capsys.readouterr().err, "train")
    assert str(existing) in line and "is a file" in line
    assert existing.read_text() == "precious"


# -- divergence ------------------------------------------------------------------------------------------

def diverge(tmp_path: Path, config_file: Path, data_file: Path, capsys: pytest.CaptureFixture[str],
            *extra: str) -> tuple[Path, str]:
    """Train the tiny config at lr 1e3 (it diverges within a few steps); returns (run folder, error line)."""
    out = tmp_path / "run"
    code = cli(["train", "--config", str(config_file), "--data", str(data_file), "--out", str(out), "--steps", "8",
                 "--batch-size", "2", "--max-length", "16", "--lr", "1e3", "--eval-every", "100", "--quiet", *extra])
    return out, assert_one_error_line(code, capsys.readouterr().err, "train")


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path).state_dict()


def test_a_diverging_run_stops_at_the_first_non_finite_step_and_keeps_the_last_finite_checkpoint(
        tmp_path: Path, config_file: Path, data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, line = diverge(tmp_path, config_file, data_file, capsys, "--save-every", "1")
    bad_step = int(re.search(r"training diverged at step (\d+)", line).group(1))
    last_good = bad_step - 1
    assert last_good >= 1, line
    # metrics hold the steps taken, the last one with a finite loss; no checkpoint from the bad step on
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "train_loss" in m]
    assert [m["step"] for m in steps] == list(range(1, bad_step))
    assert all(math.isfinite(m["train_loss"]) for m in steps)
    folders = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert folders == [f"step_{s:06d}" for s in range(1, bad_step)]
    assert f"checkpoints/step_{last_good:06d}" in line and "model.safetensors holds the last finite" in line
    # model.safetensors: finite, the last good checkpoint's weights ...
    final = weights(out / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    kept = weights(out / "checkpoints" / f"step_{last_good:06d}" / "model.safetensors")
    assert final.keys() == kept.keys() and all(torch.equal(final[k], kept[k]) for k in final)
    # ... which are those of the same run stopped there on purpose
    reference = tmp_path / "reference"
    assert main(["train", "--config", str(config_file), "--data", str(data_file), "--out", str(reference),
                 "--steps", "8", "--pause-at", str(last_good), "--batch-size", "2", "--max-length", "16",
                 "--lr", "1e3", "--eval-every", "100", "--quiet"]) == 0
    capsys.readouterr()
    expected = load_file(str(reference / "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))
    assert expected.keys() == written.keys() and all(torch.equal(expected[k], written[k]) for k in expected)


def test_a_run_diverging_before_any_checkpoint_writes_no_model_and_keeps_an_existing_one(
        tmp_path: Path, config_file: Path, data_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"an earlier model")
    out, line = diverge(tmp_path, config_file, data_file, capsys)
    assert "no checkpoint had been written" in line
    assert (out / "model.safetensors").read_bytes() == b"an earlier model"
    assert not (out / "checkpoints").exists()


def test_the_api_raises_train_error_on_divergence(tmp_path: Path, data_file: Path) -> None:
    spec = tiny_model_spec(context_length=16)
    with pytest.raises(TrainError, match=r"training diverged at step \d+: the loss is .* gradient norm"):
        train(spec, data_file.read_text(), TrainConfig(steps=8, batch_size=2, lr=1e3, eval_every=100),
              out_dir=tmp_path / "run", progress=False)
