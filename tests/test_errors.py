"""One error base: every exception modelkit defines is a ModelkitError, and the CLI reports any of them
in one place, as one line on stderr with exit status 2."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

from conftest import REPO

import modelkit
from modelkit import ModelkitError
from modelkit.cli import main


def defined_exceptions() -> dict[str, type[BaseException]]:
    """Every exception class defined in a module of the ``modelkit`` package, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(modelkit.__path__, prefix="modelkit."):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI when imported
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == info.name:
                found[f"{info.name}.{value.__qualname__}"] = value
    return found


def test_every_exception_modelkit_defines_derives_from_modelkit_error():
    found = defined_exceptions()
    # the walk sees the classes spread over the package, not only modelkit.errors
    names = {cls.__name__ for cls in found.values()}
    assert {"SpecError", "TrainError", "NativeBuildError", "TokenizerAssetError", "CompareError"} <= names
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, ModelkitError))
    assert outside == [], f"not under modelkit.ModelkitError: {outside}"


def test_each_error_keeps_its_builtin_base():
    from modelkit.compare import CompareError
    from modelkit.training.dataset import DataError
    from modelkit.errors import DeviceError, SpeedOptionError, UnknownComponentError
    from modelkit.runtime.native import NativeBuildError, NativeUnsupportedError
    from modelkit.training.plots import PlotError
    from modelkit.tokenizer import TokenizerAssetError
    from modelkit.training import TrainError

    for cls in (modelkit.SpecError, modelkit.CheckpointError, modelkit.GenerationError, SpeedOptionError,
                DeviceError, CompareError, DataError, TrainError, NativeUnsupportedError):
        assert issubclass(cls, ValueError), cls
    for cls in (modelkit.RegistryError, UnknownComponentError, modelkit.PluginError):
        assert issubclass(cls, LookupError), cls
    for cls in (NativeBuildError, PlotError, TokenizerAssetError):
        assert issubclass(cls, RuntimeError), cls


def test_speed_options_refuse_bad_values_with_a_modelkit_error():
    from modelkit.runtime.optimize import optimize_for_inference, parse_dtype

    model = modelkit.build_model(REPO / "configs/tiny.json", device="meta")
    with pytest.raises(ModelkitError, match="unknown dtype 'fp64'"):
        parse_dtype("fp64")
    with pytest.raises(ModelkitError, match="unknown linear_kernel 'mkl'"):
        optimize_for_inference(model, linear_kernel="mkl")  # type: ignore[arg-type]
    with pytest.raises(ModelkitError, match="exclude each other"):
        optimize_for_inference(model, native=True, compile=True)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dtype": "bfloat16"}, "dtype must be a floating point torch.dtype, got 'bfloat16'"),
    ({"dtype": torch.int64}, "dtype must be a floating point torch.dtype"),
    ({"device": "nonsense"}, "unknown device 'nonsense'"),
    ({"device": 3.5}, "unknown device 3.5"),
])
def test_build_model_refuses_a_device_or_dtype_it_cannot_build_on(kwargs, message):
    from modelkit.errors import BuildError

    with pytest.raises(BuildError, match=message.replace("(", r"\(").replace(".", r"\.")):
        modelkit.build_model(REPO / "configs/tiny.json", **kwargs)


@pytest.mark.parametrize(("argv", "message"), [
    (["generate", "--prompt", "Hello"], "give --config CONFIG (random weights) or --checkpoint FILE (trained weights)"),
    (["train", "--data", "book.txt"], "give --config (or --resume a checkpoint)"),
    (["compare", "a.json", "--train-steps", "5"], "--train-steps needs --data FILE"),
])
def test_the_cli_turns_a_modelkit_error_of_any_command_into_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"modelkit {argv[0]}: error: {message}"]


def test_the_cli_reports_the_base_class_itself_in_the_same_place(monkeypatch, capsys):
    import modelkit.cli.schema as schema

    def broken() -> None:
        raise ModelkitError("the registry is unreadable")

    monkeypatch.setattr(schema, "spec_json_schema", broken)
    assert main(["schema"]) == 2
    assert capsys.readouterr().err.splitlines() == ["modelkit schema: error: the registry is unreadable"]
