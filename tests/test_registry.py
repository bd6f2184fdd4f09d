"""Registry rules: one decorator line, strict names, no silent overwrite, helpful lookups."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

import pytest
import torch
from conftest import tiny_cfg
from pydantic import Field
from torch import nn

from modelkit import RegistryError, SpecError, build_model, get_registry, load_spec, register
from modelkit.components.base import Activation, ModelDims, Norm
from modelkit.errors import UnknownComponentError


@pytest.fixture
def cleanup():
    names: list[tuple[str, str]] = []
    yield names
    for kind, name in names:
        get_registry(kind).unregister(name)


def test_a_new_component_is_one_class_plus_one_registration_line(cleanup):
    @register("activation", "test.squareplus")
    class SquarePlus(Activation):
        """squareplus (Barron 2021): (x + sqrt(x² + b)) / 2."""

        def __init__(self, dims: ModelDims, *, b: Annotated[float, Field(ge=0)] = 4.0) -> None:
            super().__init__()
            self.b = b

        def forward(self, x):
            return (x + torch.sqrt(x * x + self.b)) / 2

    cleanup.append(("activation", "test.squareplus"))
    spec = load_spec(tiny_cfg(feedforward={"type": "mlp", "activation": {"type": "test.squareplus", "b": 1.0}}))
    model = build_model(spec)
    act = model.trf_blocks[0].ff.layers[1]
    assert isinstance(act, SquarePlus) and act.b == 1.0
    assert act(torch.tensor([0.0])).item() == pytest.approx(0.5)  # (0 + sqrt(1)) / 2
    entry = get_registry("activation").get("test.squareplus")
    line = next(i for i, text in enumerate(open(__file__), 1) if '@register("activation", "test.squareplus")' in text)
    assert entry.origin == __name__ and entry.source.endswith(f"test_registry.py:{line}")
    assert entry.parameters() == [("b", "float", 4.0)]


class Mode(enum.Enum):
    FAST = "fast"
    EXACT = "exact"


def test_parameters_with_a_fixed_set_of_values_are_described_by_them(cleanup):
    @register("norm", "test.choices")
    class Choosy(Norm):
        def __init__(self, dims: ModelDims, *, kind: Literal["rms", "layer"] = "rms", mode: Mode = Mode.FAST,
                     scale: Literal[1, 2] | None = None, eps: float = 1e-5) -> None:
            super().__init__()

    cleanup.append(("norm", "test.choices"))
    entry = get_registry("norm").get("test.choices")
    assert entry.choices() == {"kind": ["rms", "layer"], "mode": ["fast", "exact"], "scale": [1, 2, None]}
    assert entry.parameters() == [("kind", "'rms' | 'layer'", "rms"), ("mode", "'fast' | 'exact'", Mode.FAST),
                                  ("scale", "1 | 2 | None", None), ("eps", "float", 1e-5)]


def test_parameters_take_json_types_and_what_json_cannot_spell_as_json_spells_it(cleanup):
    @register("norm", "test.typed")
    class Typed(Norm):
        def __init__(self, dims: ModelDims, *, window: int = 4, mode: Mode = Mode.FAST,
                     sizes: tuple[int, int] = (1, 2), on: bool = False) -> None:
            super().__init__()

    cleanup.append(("norm", "test.typed"))
    spec = load_spec(tiny_cfg(norm={"type": "test.typed", "window": 8, "mode": "exact", "sizes": [3, 4]}))
    assert spec.norm.params == {"window": 8, "mode": "exact", "sizes": [3, 4], "on": False}
    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(norm={"type": "test.typed", "window": "8", "mode": "slow", "sizes": [3, True],
                                 "on": 1}))
    found = [str(issue) for issue in exc.value.issues]
    assert found[0] == 'norm.window: expected an integer, got "8"'
    assert found[1].startswith("norm.mode: Input should be 'fast' or 'exact'")
    assert found[2:] == ["norm.sizes[1]: expected an integer, got true",
                         "norm.on: expected a boolean (true or false), got 1"]


def test_duplicate_names_are_an_error_never_an_overwrite(cleanup):
    @register("norm", "test.dup")
    class First(Norm):
        def __init__(self, dims: ModelDims) -> None:
            super().__init__()

    cleanup.append(("norm", "test.dup"))
    with pytest.raises(RegistryError, match="norm 'test.dup' is already registered by .*refusing to overwrite"):
        @register("norm", "test.dup")
        class Second(Norm):
            def __init__(self, dims: ModelDims) -> None:
                super().__init__()

    assert get_registry("norm").get("test.dup").cls is First
    with pytest.raises(RegistryError, match="already registered by modelkit \\(built-in\\)"):
        get_registry("norm").register("layernorm", First)


def test_bare_names_are_reserved_for_built_ins():
    with pytest.raises(RegistryError, match="bare names are reserved.*'yourpackage.mynorm'"):
        @register("norm", "mynorm")
        class Mine(Norm):
            def __init__(self, dims: ModelDims) -> None:
                super().__init__()


@pytest.mark.parametrize("make, message", [
    (lambda: type("NotAModule", (), {}), "must be a subclass of modelkit.components.base.Norm"),
    (lambda: nn.LayerNorm, "must be a subclass of modelkit.components.base.Norm"),
])
def test_wrong_kind_of_object_is_refused(make, message):
    with pytest.raises(RegistryError, match=message):
        get_registry("norm").register("test.bad", make())


def test_signatures_that_cannot_describe_parameters_are_refused():
    class Kwargs(Norm):
        def __init__(self, dims: ModelDims, **kwargs) -> None:
            super().__init__()

    class Unannotated(Norm):
        def __init__(self, dims: ModelDims, *, eps=1e-5) -> None:
            super().__init__()

    class NoDims(Norm):
        def __init__(self, *, eps: float = 1e-5) -> None:
            super().__init__()

    with pytest.raises(RegistryError, match=r"\*args/\*\*kwargs are not allowed"):
        get_registry("norm").register("test.kwargs", Kwargs)
    with pytest.raises(RegistryError, match="parameter 'eps' needs a type annotation"):
        get_registry("norm").register("test.unannotated", Unannotated)
    with pytest.raises(RegistryError, match=r"takes \(dims\) positionally"):
        get_registry("norm").register("test.nodims", NoDims)
    assert "test.kwargs" not in get_registry("norm")


def test_invalid_names_and_kinds():
    with pytest.raises(RegistryError, match="invalid norm name 'My-Norm'"):
        get_registry("norm").register("My-Norm", Norm)
    with pytest.raises(RegistryError, match="unknown component kind 'nrom'; did you mean 'norm'?"):
        get_registry("nrom")


def test_unknown_name_lists_known_names_and_suggests_the_closest():
    with pytest.raises(UnknownComponentError) as exc:
        get_registry("block").get("prenorm")
    assert str(exc.value).startswith("unknown block 'prenorm'; did you mean 'pre_norm'? (known: parallel, post_norm, pre_norm")
    assert isinstance(exc.value, LookupError)


def test_parameter_models_forbid_unknown_keys_and_export_a_schema():
    entry = get_registry("norm").get("layernorm")
    assert entry.params_model.model_config["extra"] == "forbid"
    schema = entry.params_model.model_json_schema()
    assert schema["properties"]["eps"]["exclusiveMinimum"] == 0
    assert schema["additionalProperties"] is False
    mlp = get_registry("feedforward").get("mlp")
    assert mlp.sub_components == {"activation": "activation"}
    assert mlp.params_model.model_json_schema()["properties"]["activation"]["x-modelkit-component"] == "activation"
