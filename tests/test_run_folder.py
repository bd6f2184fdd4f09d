"""Resume checks the run folder: a corpus of damaged run folders, each refused with one line naming
exactly what is wrong (``modelkit train --resume``: exit 2; Python: :class:`TrainError`), and the
leftovers of an interrupted save, which resume ignores."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modelkit import build_model
from modelkit.cli import main
from modelkit.testing import synthetic_text, tiny_model_spec
from modelkit.training import TrainError, read_metrics, resume_config, train
from modelkit.weights.checkpoint import save_checkpoint

STEP1, STEP2 = "checkpoints/step_000001", "checkpoints/step_000002"


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CLI run of the tiny spec paused at step 2 of 4, with a checkpoint after each step."""
    root = tmp_path_factory.mktemp("good")
    (root / "tiny.json").write_text(json.dumps(tiny_model_spec(name="tiny")))
    (root / "text.txt").write_text(synthetic_text(60), encoding="utf-8")
    assert main(["train", "--config", str(root / "tiny.json"), "--data", str(root / "text.txt"), "--out",
                 str(root / "run"), "--batch-size", "2", "--eval-every", "100", "--steps", "4", "--pause-at", "2",
                 "--save-every", "1", "--quiet"]) == 0
    return root / "run"


@pytest.fixture
def run(good_run: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good run to damage."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def edit_state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    """A damage: ``change`` applied to step 2's parsed train_state.json."""
    def damage(run: Path) -> None:
        path = run / STEP2 / "train_state.json"
        state = json.loads(path.read_text())
        change(state)
        path.write_text(json.dumps(state))
    return damage


def truncate(name: str, keep: float | int) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        path = run / STEP2 / name
        data = path.read_bytes()
        path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    return damage


def remove(name: str) -> Callable[[Path], None]:
    return lambda run: (run / STEP2 / name).unlink()


def model_of_another_spec(run: Path) -> None:
    other = build_model(tiny_model_spec(name="tiny", emb_dim=48, n_heads=4))
    save_checkpoint(other, run / STEP2 / "model.safetensors", metadata={"step": "2", "tokens": "128"})


def model_of_another_step(run: Path) -> None:
    shutil.copy(run / STEP1 / "model.safetensors", run / STEP2 / "model.safetensors")


def state_without_rng(run: Path) -> None:
    path = run / STEP2 / "train_state.safetensors"
    tensors = {k: v for k, v in load_file(str(path)).items() if not k.startswith("rng.")}
    save_file(tensors, str(path), metadata={"format": "modelkit-train-state"})


def optimizer_state_for_another_model(run: Path) -> None:
    path = run / STEP2 / "train_state.safetensors"
    tensors = load_file(str(path))
    tensors["optimizer.extra_head.weight.exp_avg"] = torch.zeros(3)
    save_file(tensors, str(path), metadata={"format": "modelkit-train-state"})


# (damage, what the one error line says after "cannot resume from <step 2 folder>: ")
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "train_state.json missing": (remove("train_state.json"), "train_state.json is missing"),
    "train_state.json truncated": (truncate("train_state.json", 0.5), "train_state.json is not valid JSON (truncated?)"),
    "train_state.json empty": (truncate("train_state.json", 0), "train_state.json is not valid JSON (truncated?)"),
    "train_state.json a list": (lambda r: (r / STEP2 / "train_state.json").write_text("[1, 2]"),
                                "train_state.json holds list, not an object"),
    "wrong format": (edit_state(lambda s: s.update(format="something-else")),
                     "train_state.json is not a modelkit training state (format 'something-else', "
                     "expected 'modelkit-train-state')"),
    "step missing": (edit_state(lambda s: s.pop("step")), "train_state.json: 'step' is missing"),
    "tokens a string": (edit_state(lambda s: s.update(tokens="128")),
                        "train_state.json: 'tokens' must be an integer >= 0, got \"128\""),
    "step a float": (edit_state(lambda s: s.update(step=2.0)), "train_state.json: 'step' must be an integer >= 0, got 2.0"),
    "world_size a bool": (edit_state(lambda s: s.update(world_size=True)),
                          "train_state.json: 'world_size' must be an integer >= 1, got true"),
    "two fields wrong": (edit_state(lambda s: s.update(total_steps=None, global_batch_size=0)),
                         "train_state.json: 'total_steps' must be an integer >= 0, got null; "
                         "'global_batch_size' must be an integer >= 1, got 0"),
    "version unknown": (edit_state(lambda s: s.update(version=7)),
                        "train_state.json: 'version' must be an integer from 1 to 1, got 7"),
    "config a list": (edit_state(lambda s: s.update(config=[])), "train_state.json: 'config' must be an object, got []"),
    "config invalid": (edit_state(lambda s: s["config"].update(batch_size=0)),
                       "train_state.json: 'config': invalid training config: batch_size must be a positive integer, got 0"),
    "config unknown field": (edit_state(lambda s: s["config"].update(bogus=1)),
                             "train_state.json: 'config': invalid training config: unknown field 'bogus'"),
    "data fingerprint missing": (edit_state(lambda s: s["data"].pop("train_sha256")),
                                 "train_state.json: 'data.train_sha256' is missing"),
    "data path a number": (edit_state(lambda s: s["data"].update(path=5)),
                           "train_state.json: 'data.path' must be a string, got 5"),
    "train_seconds negative": (edit_state(lambda s: s.update(train_seconds=-1)),
                               "train_state.json: 'train_seconds' must be a number >= 0, got -1"),
    "step past the end": (edit_state(lambda s: s.update(step=9)),
                          "train_state.json: 'step' 9 is past 'total_steps' 4"),
    "global batch inconsistent": (edit_state(lambda s: s.update(global_batch_size=4, world_size=1)),
                                  "train_state.json: 'config.batch_size' 2 x 'world_size' 1 is not "
                                  "'global_batch_size' 4"),
    "model.safetensors missing": (remove("model.safetensors"), "model.safetensors is missing"),
    "model.safetensors truncated": (truncate("model.safetensors", 0.9), "model.safetensors is truncated or corrupt "
                                                                        "(its header promises "),
    "model.safetensors cut in its header": (truncate("model.safetensors", 4),
                                            "model.safetensors: {folder}/model.safetensors "),  # the reader's reason follows
    "model.safetensors of another step": (model_of_another_step,
                                          "model.safetensors is not this checkpoint's model (it is of step 1, "
                                          "train_state.json of step 2)"),
    "model.safetensors of another spec": (model_of_another_spec,
                                          "model.safetensors does not fit the optimizer state in "
                                          "train_state.safetensors (a model of another spec?): "),
    "optimizer state for a parameter the model lacks": (optimizer_state_for_another_model,
                                                         "model.safetensors does not fit the optimizer state in "
                                                         "train_state.safetensors (a model of another spec?): "
                                                         "extra_head.weight (not in the model)"),
    "train_state.safetensors missing": (remove("train_state.safetensors"), "train_state.safetensors is missing"),
    "train_state.safetensors truncated": (truncate("train_state.safetensors", 0.5),
                                          "train_state.safetensors is truncated or not a safetensors file"),
    "train_state.safetensors without RNG state": (state_without_rng,
                                                  "train_state.safetensors lacks the RNG state rng.torch.rank0"),
}


@pytest.mark.parametrize("damage, expected", CORPUS.values(), ids=CORPUS.keys())
def test_a_damaged_checkpoint_is_one_clear_error(run: Path, damage, expected: str, capsys) -> None:
    damage(run)
    folder = run / STEP2
    expected = f"cannot resume from {folder}: " + expected.format(folder=folder)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("modelkit train: error: " + expected), err
    with pytest.raises(TrainError, match=re.escape(expected)):
        resume_config(run)
    with pytest.raises(TrainError, match=re.escape(expected)):
        train(None, synthetic_text(60), resume=run, progress=False)
    assert not (run / "checkpoints/step_000003").exists()


def test_the_named_checkpoint_folder_is_checked_too(run: Path, capsys) -> None:
    remove("train_state.json")(run)
    assert main(["train", "--resume", str(run / STEP2), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"modelkit train: error: cannot resume from {run / STEP2}: "
                                       f"train_state.json is missing; the previous checkpoint is {run / STEP1} "
                                       "(--resume it to continue from there)\n")
    assert main(["train", "--resume", str(run / STEP1), "--quiet"]) == 0  # as the message says


def test_leftovers_of_an_interrupted_save_are_ignored(run: Path, capsys) -> None:
    # A kill while step 3 was written: older modelkits' step_N.tmp with a half-written train_state.json,
    # and this one's .step_N.tmp-<pid>; a line cut short at the end of metrics.jsonl.
    for leftover in ("step_000003.tmp", ".step_000003.tmp-4242"):
        shutil.copytree(run / STEP2, run / "checkpoints" / leftover)
        state = run / "checkpoints" / leftover / "train_state.json"
        state.write_text(state.read_text()[:40])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "epoch": 0.')
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("this session: steps 3-4, ")
    assert [m["step"] for m in read_metrics(run)] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000001", "step_000002", "step_000003", "step_000004"]  # leftovers of steps 3 cleaned up


def test_a_temporary_folder_is_not_resumed_from(run: Path, capsys) -> None:
    tmp = run / "checkpoints" / ".step_000003.tmp-4242"
    shutil.copytree(run / STEP2, tmp)
    assert main(["train", "--resume", str(tmp), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"modelkit train: error: '{tmp}' is the temporary folder of an interrupted "
                                       f"checkpoint save, not a checkpoint; resume from the run folder {run}\n")


def test_a_run_with_only_an_unfinished_checkpoint_has_none(tmp_path: Path, good_run: Path, capsys) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(good_run / STEP1, run / "checkpoints" / "step_000001.tmp")
    assert main(["train", "--resume", str(run), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"modelkit train: error: no training checkpoint in '{run}': expected "
                                       "train_state.json there or checkpoints/step_N/train_state.json below it\n")
    assert main(["train", "--resume", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert capsys.readouterr().err == (f"modelkit train: error: no training checkpoint in '{tmp_path / 'nowhere'}': "
                                       "there is no such folder\n")


def test_the_latest_checkpoint_is_by_step_number(run: Path) -> None:
    shutil.copytree(run / STEP2, run / "checkpoints" / "step_10000000")
    edit = json.loads((run / "checkpoints/step_10000000/train_state.json").read_text())
    assert edit["step"] == 2
    from modelkit.training import find_checkpoint

    assert find_checkpoint(run) == run / "checkpoints" / "step_10000000"  # not step_000002 (sorted as text)


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x08\x00")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    (tmp_path / "tiny.json").write_text(json.dumps(tiny_model_spec(name="tiny")))
    (tmp_path / "text.txt").write_text(synthetic_text(60), encoding="utf-8")
    monkeypatch.setattr("safetensors.torch.save_file", full)
    run = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "tiny.json"), "--data", str(tmp_path / "text.txt"), "--out",
                 str(run), "--batch-size", "2", "--eval-every", "100", "--steps", "2", "--save-every", "1",
                 "--quiet"]) == 2
    assert capsys.readouterr().err == (f"modelkit train: error: cannot write training checkpoint "
                                       f"{run / STEP1}: No space left on device\n")
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "metrics.jsonl"]  # no temporary folder
    assert [m["step"] for m in read_metrics(run)] == [0, 1]
