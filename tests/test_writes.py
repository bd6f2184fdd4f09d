"""Every write is atomic: on a failure (a full disk included) the target is what it was before, no
temporary file remains, and the error is one ModelkitError naming the path and the OS reason.

Each writer runs twice: on a real full file system (a 2 MiB tmpfs, filled up; skipped where one
cannot be mounted) and with ``ENOSPC`` injected at the write call (everywhere).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from modelkit import build_model, files
from modelkit.cli import main
from modelkit.errors import CheckpointError, ModelkitError
from modelkit.testing import tiny_model_spec
from modelkit.training import TrainError, read_metrics
from modelkit.training.checkpoints import save_training_checkpoint
from modelkit.training.metrics import MetricsWriter
from modelkit.weights.checkpoint import load_checkpoint, save_checkpoint
from modelkit.weights.hf import export_hf_gpt2

NO_SPACE = os.strerror(errno.ENOSPC)


def small_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(tiny_model_spec(vocab_size=64, context_length=16))


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


# -- the writers: each prepares its inputs in ``src`` and an old target in ``dst`` ----------------------
# and returns (target, write): ``write()`` performs the write and returns the error text it got.

Write = Callable[[], str]


def _raises(kind: type[ModelkitError], fn: Callable[..., object], *args: object) -> Write:
    def write() -> str:
        with pytest.raises(kind) as info:
            fn(*args)
        return str(info.value)
    return write


def save_checkpoint_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    target = dst / "model.safetensors"
    save_checkpoint(small_model(0), target)
    return target, _raises(CheckpointError, save_checkpoint, small_model(1), target)


def import_hf_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    export_hf_gpt2(small_model(0), src / "hf")
    target = dst / "imported.safetensors"
    save_checkpoint(small_model(1), target)
    return target, _cli(capsys, "import-hf", str(src / "hf"), str(target))


def export_hf_new_folder_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    save_checkpoint(small_model(0), src / "ckpt.safetensors")
    target = dst / "hf"
    return target, _cli(capsys, "export-hf", str(src / "ckpt.safetensors"), str(target))


def export_hf_existing_folder_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    save_checkpoint(small_model(0), src / "ckpt.safetensors")
    target = dst / "hf"
    export_hf_gpt2(small_model(1), target)
    (target / "tokenizer.json").write_text("{}")
    return target, _cli(capsys, "export-hf", str(src / "ckpt.safetensors"), str(target))


def spec_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    (src / "spec.json").write_text(json.dumps(tiny_model_spec()))
    target = dst / "resolved.json"
    target.write_text('{"the": "old resolved spec"}\n')
    return target, _cli(capsys, "spec", str(src / "spec.json"), "-o", str(target))


def schema_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    target = dst / "modelkit.schema.json"
    target.write_text('{"the": "old schema"}\n')
    return target, _cli(capsys, "schema", "-o", str(target))


def _training_parts(seed: int, step: int) -> tuple:
    model = small_model(seed)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    optimizer.step()
    state = {"format": "modelkit-train-state", "step": step, "tokens": 64 * step}
    return model, optimizer, state, {"rng.torch.rank0": torch.get_rng_state()}


def training_checkpoint_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    target = dst / "checkpoints" / "step_000002"
    save_training_checkpoint(target, *_training_parts(0, 2))
    return target, _raises(TrainError, save_training_checkpoint, target, *_training_parts(1, 2))


def new_training_checkpoint_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    (dst / "checkpoints").mkdir()
    target = dst / "checkpoints" / "step_000004"
    return target, _raises(TrainError, save_training_checkpoint, target, *_training_parts(1, 4))


def metrics_append_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    writer = MetricsWriter(dst, None, True)
    writer.write({"step": 0, "val_loss": 4.0})
    line = {"step": 1, "train_loss": 3.9, "note": "x" * 10000}  # more than the file's last page holds
    return dst / "metrics.jsonl", _raises(TrainError, writer.write, line)


def metrics_resume_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    target = dst / "metrics.jsonl"
    target.write_text("".join(json.dumps({"step": s, "train_loss": 4.0 - s}) + "\n" for s in range(4)))
    return target, _raises(TrainError, MetricsWriter, dst, 2, True)


def plot_case(src: Path, dst: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, Write]:
    pytest.importorskip("matplotlib", reason="plots need matplotlib")
    from modelkit.training.plots import PlotError, plot_training

    metrics = [{"step": s, "tokens": 32 * s, "train_loss": 4.0 - 0.1 * s, "val_loss": 4.0} for s in range(4)]
    target = dst / "loss.png"
    plot_training(metrics, target)
    return target, _raises(PlotError, plot_training, metrics[:2], target)


CASES = {
    "save_checkpoint": save_checkpoint_case,
    "import-hf": import_hf_case,
    "export-hf to a new folder": export_hf_new_folder_case,
    "export-hf into a folder with other files": export_hf_existing_folder_case,
    "spec -o": spec_case,
    "schema -o": schema_case,
    "training checkpoint over an old one": training_checkpoint_case,
    "new training checkpoint": new_training_checkpoint_case,
    "metrics.jsonl append": metrics_append_case,
    "metrics.jsonl kept lines on resume": metrics_resume_case,
}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Write:
    """Run the CLI: exit status 2 and one ``modelkit <cmd>: error:`` line on stderr, which it returns."""
    def write() -> str:
        capsys.readouterr()
        assert main(list(argv)) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"modelkit {argv[0]}: error: ") and err.count("\n") == 1, err
        return err
    return write


def check_unchanged_after_failure(case: Callable[..., tuple[Path, Write]], src: Path, dst: Path,
                                  capsys: pytest.CaptureFixture[str], before_write: Callable[[], None]) -> str:
    """Run ``case`` whose write fails; the folder ``dst`` is byte for byte as before. Returns the error."""
    target, write = case(src, dst, capsys)
    before_write()
    before = snapshot(dst)
    message = write()
    assert snapshot(dst) == before  # the target as it was, no temporary file or folder left
    assert str(target) in message and NO_SPACE in message, message
    return message


# -- the portable way: ENOSPC injected at the write call ------------------------------------------------

@pytest.fixture
def enospc(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Returns a function that makes every later write fail half-way with ENOSPC (modelkit's own byte
    writes, and safetensors' ``save_file``, which reports it as ``SafetensorError ... (os error 28)``)."""
    def write_half(fd: int, data: bytes) -> None:
        os.write(fd, bytes(data[: max(1, len(data) // 2)]))
        raise OSError(errno.ENOSPC, NO_SPACE)

    def save_file_half(tensors: dict, filename: str, metadata: dict | None = None) -> None:
        Path(filename).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error {errno.ENOSPC})")

    def start() -> None:
        monkeypatch.setattr(files, "_write_fd", write_half)
        monkeypatch.setattr("safetensors.torch.save_file", save_file_half)
    return start


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_failed_write_changes_nothing(case, enospc, capsys, tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    check_unchanged_after_failure(case, src, dst, capsys, before_write=enospc)


# -- a real full file system ------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted for the test (root on Linux only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux; test_a_failed_write_changes_nothing covers "
                    "the same writers with ENOSPC injected")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the ENOSPC-injection test covers it")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def fill(disk: Path) -> None:
    """Write to ``disk`` until it is full."""
    fd = os.open(disk / ".filler", os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


FULL_DISK_CASES = CASES | {"loss.png": plot_case}  # matplotlib writes through its own file objects


@pytest.mark.parametrize("case", FULL_DISK_CASES.values(), ids=FULL_DISK_CASES.keys())
def test_a_full_disk_changes_nothing(case, small_disk: Path, capsys, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    check_unchanged_after_failure(case, src, small_disk, capsys, before_write=lambda: fill(small_disk))


# -- what a successful write keeps -----------------------------------------------------------------

def test_save_checkpoint_replaces_the_file_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.safetensors"
    save_checkpoint(small_model(0), target)
    save_checkpoint(small_model(1), target)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert torch.equal(load_checkpoint(target).tok_emb.weight, small_model(1).tok_emb.weight)


def test_export_hf_replaces_an_earlier_export_and_keeps_other_files(tmp_path: Path) -> None:
    export_hf_gpt2(small_model(0), tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")
    export_hf_gpt2(small_model(1), tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors",
                                                                   "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_write_text_keeps_a_symlink_and_the_file_mode(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    real.write_text("old")
    real.chmod(0o600)
    link = tmp_path / "link.json"
    link.symlink_to(real)
    files.write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.json", "real.json"]


def test_spec_output_to_a_device_is_written_directly(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps(tiny_model_spec()))
    assert main(["spec", str(tmp_path / "spec.json"), "-o", os.devnull]) == 0
    assert Path(os.devnull).exists() and not Path(os.devnull).is_file()


def test_an_unwritable_folder_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spec.json").write_text(json.dumps(tiny_model_spec()))
    target = tmp_path / "no" / "such" / "folder" / "out.json"
    assert main(["spec", str(tmp_path / "spec.json"), "-o", str(target)]) == 2
    assert capsys.readouterr().err == (f"modelkit spec: error: cannot write spec {target}: "
                                       f"{os.strerror(errno.ENOENT)}\n")


# -- metrics.jsonl: a torn last line -----------------------------------------------------------------

def test_read_metrics_skips_a_torn_last_line_and_refuses_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "train_lo')  # killed mid-line
    assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]
    path.write_text('{"step": 0}\n{"step": 1, "tr\n{"step": 2}\n')
    with pytest.raises(TrainError, match=f"{path}: line 2 is not a metrics line"):
        read_metrics(path)
    with pytest.raises(TrainError, match="cannot read metrics .*missing.jsonl"):
        read_metrics(tmp_path / "missing.jsonl")


def test_metrics_writer_on_resume_drops_a_torn_line_and_appends_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "tra')
    writer = MetricsWriter(tmp_path, 2, True)
    writer.write({"step": 3, "train_loss": 1.5})
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "train_loss": 1.5}\n'


def test_the_helpers_default_error_is_a_modelkit_error_and_an_os_error(tmp_path: Path) -> None:
    target = tmp_path / "missing" / "x.txt"
    with pytest.raises(files.FileWriteError) as info:
        files.write_text(target, "text")
    assert isinstance(info.value, ModelkitError) and isinstance(info.value, OSError)
    assert str(info.value) == f"cannot write file {target}: {os.strerror(errno.ENOENT)}"
    assert sorted(tmp_path.iterdir()) == []


def test_export_hf_into_the_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    export_hf_gpt2(small_model(0), ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert Path.cwd() == tmp_path
