"""Spec loading, defaults, round trips, every error path and the JSON Schema."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from book_reference import GPT_CONFIG_124M
from conftest import REPO, tiny_cfg

from modelkit import SpecError, build_model, load_spec, register
from modelkit.components.base import ModelDims, Norm
from modelkit.registry import get_registry
from modelkit.spec import spec_json_schema


def problems(excinfo) -> list[str]:
    return [str(issue) for issue in excinfo.value.issues]


def test_the_books_flat_config_is_a_valid_spec_with_the_books_parts():
    spec = load_spec(GPT_CONFIG_124M)
    assert (spec.positional.type, spec.norm.type, spec.attention.type, spec.feedforward.type, spec.block.type) == \
        ("learned", "layernorm", "mha", "mlp", "pre_norm")
    assert spec.norm.params == {"eps": 1e-5, "bias": True}
    assert spec.feedforward.params["activation"].type == "gelu"
    assert spec.tie_embeddings is False and spec.drop_rate == 0.1


def test_load_spec_takes_a_path_a_json_string_or_a_dict(tmp_path):
    path = tmp_path / "my-model.json"
    path.write_text(json.dumps(tiny_cfg()))
    from_path, from_text, from_dict = load_spec(path), load_spec(json.dumps(tiny_cfg())), load_spec(tiny_cfg())
    assert from_path.name == "my-model"  # a file without a name takes its stem
    assert from_text == from_dict == from_path.model_copy(update={"name": "gpt"})
    assert load_spec(str(path)) == from_path


def test_resolved_spec_round_trips_through_json():
    spec = load_spec(tiny_cfg(feedforward={"type": "mlp", "activation": "silu"}, block="parallel"))
    again = load_spec(json.loads(spec.to_json()))
    assert again == spec
    assert again.to_dict() == spec.to_dict()
    assert spec.to_dict()["feedforward"] == {"type": "mlp", "hidden_mult": 4, "hidden_dim": None,
                                             "activation": {"type": "silu"}, "bias": True}


def test_schema_key_is_accepted_and_dropped():
    assert load_spec(dict(tiny_cfg(), **{"$schema": "./modelkit.schema.json"})) == load_spec(tiny_cfg())


def test_unknown_activation_message_points_at_the_json_path():
    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(feedforward={"type": "mlp", "activation": "gleu"}))
    assert problems(exc) == ["feedforward.activation: unknown activation 'gleu'; did you mean 'gelu'? "
                             "(known: gelu, gelu_exact, relu, silu)"]


def test_indivisible_heads_message():
    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(emb_dim=768, n_heads=10))
    assert problems(exc) == ["n_heads: emb_dim 768 is not divisible by n_heads 10 (or give head_dim)"]


def test_every_problem_is_reported_at_once_with_the_file_name(tmp_path):
    bad = dict(tiny_cfg(), n_layer=3, drop_rate=1.0, emb_dim=-4,
               norm={"type": "layernorm", "epsilon": 1e-5},
               attention="mah", block={"kind": "pre_norm"})
    del bad["n_layers"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    found = problems(exc)
    assert str(path) in str(exc.value)
    expected_starts = [
        "n_layers: required, but missing",
        "n_layer: unknown field 'n_layer'; did you mean 'n_layers'?",
        "drop_rate: Input should be less than 1",
        "emb_dim: Input should be greater than 0",
        "norm.epsilon: unknown parameter for norm 'layernorm' 'epsilon'",
        "attention: unknown attention 'mah'; did you mean 'mha'?",
        "block: a block object needs a 'type'",
    ]
    for start in expected_starts:
        assert any(p.startswith(start) for p in found), (start, found)
    assert len(found) == len(expected_starts)
    assert isinstance(exc.value, ValueError)


def test_bad_parameter_and_bad_nested_reference_are_both_reported():
    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(feedforward={"type": "mlp", "hidden_mult": 0, "activation": {"type": "rleu"}}))
    found = problems(exc)
    assert found[0].startswith("feedforward.hidden_mult: Input should be greater than 0 (got 0)")
    assert found[1].startswith("feedforward.activation: unknown activation 'rleu'; did you mean 'relu'?")


def test_wrong_json_types_are_reported_with_what_was_given():
    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(norm=3, n_heads="four"))
    found = problems(exc)
    assert 'n_heads: expected an integer, got "four"' in found
    assert "norm: must be a norm name or an object with a 'type', got 3" in found


@pytest.mark.parametrize("field, value, message", [
    ("n_layers", True, "n_layers: expected an integer, got true"),
    ("emb_dim", "768", 'emb_dim: expected an integer, got "768"'),
    ("vocab_size", 97.0, "vocab_size: expected an integer, got 97.0"),
    ("qkv_bias", 1, "qkv_bias: expected a boolean (true or false), got 1"),
    ("tie_embeddings", "false", 'tie_embeddings: expected a boolean (true or false), got "false"'),
    ("drop_rate", "0.1", 'drop_rate: expected a number, got "0.1"'),
    ("drop_rate", False, "drop_rate: expected a number, got false"),
    ("name", 7, "name: expected a string, got 7"),
])
def test_a_field_of_another_json_type_is_refused_at_its_path(field, value, message):
    with pytest.raises(SpecError) as exc:
        load_spec(dict(tiny_cfg(), **{field: value}))
    assert problems(exc) == [message]


@pytest.mark.parametrize("slot, ref, message", [
    ("norm", {"type": "layernorm", "eps": "1e-5"}, 'norm.eps: expected a number, got "1e-5"'),
    ("norm", {"type": "layernorm", "bias": 1}, "norm.bias: expected a boolean (true or false), got 1"),
    ("feedforward", {"type": "mlp", "hidden_mult": True}, "feedforward.hidden_mult: expected an integer, got true"),
    ("feedforward", {"type": "mlp", "hidden_dim": "64"}, 'feedforward.hidden_dim: expected an integer, got "64"'),
    ("feedforward", {"type": "mlp", "activation": 3},
     "feedforward.activation: must be an activation name or an object with a 'type', got 3"),
    ("attention", {"type": "mha", "out_bias": 0}, "attention.out_bias: expected a boolean (true or false), got 0"),
    ("positional", {"type": "sinusoidal", "base": "1e4"}, 'positional.base: expected a number, got "1e4"'),
])
def test_a_component_parameter_of_another_json_type_is_refused_at_its_path(slot, ref, message):
    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(**{slot: ref}))
    assert problems(exc) == [message]


def test_an_integer_is_a_number_and_the_books_python_dict_still_validates():
    spec = load_spec(tiny_cfg(drop_rate=0, norm={"type": "layernorm", "eps": 1}))
    assert spec.drop_rate == 0.0 and isinstance(spec.drop_rate, float)
    assert spec.norm.params["eps"] == 1.0 and isinstance(spec.norm.params["eps"], float)
    book = load_spec(GPT_CONFIG_124M)  # a Python dict: qkv_bias is the bool False
    assert (book.n_layers, book.drop_rate, book.qkv_bias) == (12, 0.1, False)


def test_a_python_value_with_no_json_form_is_refused_at_its_path():
    import torch

    with pytest.raises(SpecError) as exc:
        load_spec(tiny_cfg(norm={"type": "layernorm", "eps": torch.tensor(1e-5)}))
    assert problems(exc) == ["norm.eps: expected a JSON value, got tensor(1.0000e-05)"]


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "vocab_size": 50257,\n  "emb_dim": 768\n  "n_heads": 12\n}')
    with pytest.raises(SpecError) as exc:
        load_spec(path)
    assert f"in {path}" in str(exc.value)
    assert "invalid JSON at line 4, column 3: Expecting ',' delimiter" in str(exc.value)


def test_duplicate_keys_and_missing_files_are_errors(tmp_path):
    with pytest.raises(SpecError, match="duplicate key 'n_heads'"):
        load_spec('{"n_heads": 4, "n_heads": 8}')
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(tmp_path / "nope.json")
    with pytest.raises(SpecError, match="a spec must be a JSON object, got list"):
        load_spec("[1, 2]" if False else tmp_path.joinpath("list.json").write_text("[1]") and tmp_path / "list.json")


def test_nothing_is_built_until_the_whole_spec_is_valid():
    built = []

    @register("norm", "test.counting_norm")
    class CountingNorm(Norm):
        def __init__(self, dims: ModelDims) -> None:
            super().__init__()
            built.append(torch.get_default_device().type)

    try:
        assert build_model(tiny_cfg(norm="test.counting_norm"))
        # 2 blocks x 2 norms + the final norm; sizing first built one block and the final norm on meta
        assert built.count("cpu") == 2 * 2 + 1 and built.count("meta") == 2 + 1
        built.clear()
        with pytest.raises(SpecError):
            build_model(tiny_cfg(norm="test.counting_norm", block="pre_nrom"))
        assert built == []
    finally:
        get_registry("norm").unregister("test.counting_norm")


def test_component_dimension_checks_are_reported_at_their_path():
    from modelkit.components.base import Attention

    @register("attention", "test.needs_even_heads")
    class NeedsEvenHeads(Attention):
        def __init__(self, dims: ModelDims) -> None:
            super().__init__()

        @classmethod
        def check_dims(cls, dims, **params):
            if dims.n_heads % 2:
                yield f"needs an even n_heads, got {dims.n_heads}"

    try:
        with pytest.raises(SpecError) as exc:
            load_spec(tiny_cfg(n_heads=1, attention="test.needs_even_heads"))
        assert problems(exc) == ["attention: needs an even n_heads, got 1"]
    finally:
        get_registry("attention").unregister("test.needs_even_heads")


def test_json_schema_lists_every_component_and_validates_the_shipped_configs():
    schema, failures = spec_json_schema()
    assert failures == []
    jsonschema.Draft202012Validator.check_schema(schema)
    for kind in ("activation", "norm", "attention", "feedforward", "positional", "block"):
        assert schema["$defs"][kind]["anyOf"][0]["enum"] == [e.name for e in get_registry(kind).load_all()[0]]
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((REPO / "configs").rglob("*.json")):
        data = json.loads(path.read_text())
        if all(get_registry(kind).names() for kind in ("norm",)):
            errors = list(validator.iter_errors(data))
            # plugin configs validate too when their plugin is installed (the schema includes it)
            assert errors == [], (path, [e.message for e in errors])


@pytest.mark.parametrize("bad", [
    {"n_heads": "four"},
    {"norm": {"type": "layernorm", "epsilon": 1e-5}},
    {"feedforward": {"type": "mlp", "activation": "gleu"}},
    {"attention": {"type": "mha", "backend": "spda"}},
    {"unknown_field": 1},
    {"n_layers": True},
    {"emb_dim": "768"},
    {"qkv_bias": 1},
    {"drop_rate": "0.1"},
    {"norm": {"type": "layernorm", "eps": "1e-5"}},
    {"feedforward": {"type": "mlp", "bias": 0}},
])
def test_json_schema_rejects_what_load_spec_rejects(bad):
    schema, _ = spec_json_schema()
    data = dict(tiny_cfg(), **bad)
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data))
    with pytest.raises(SpecError):
        load_spec(data)


def test_json_schema_accepts_an_integer_for_a_number_as_load_spec_does():
    schema, _ = spec_json_schema()
    data = dict(tiny_cfg(), drop_rate=0, norm={"type": "layernorm", "eps": 1})
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(data)) == []
    load_spec(data)
