"""A corpus of malformed checkpoints and Hugging Face folders, generated from one good file of each.

Every case must give a :class:`~modelkit.ModelkitError` through the Python API and, through the CLI,
exit status 2 with one ``modelkit <cmd>: error:`` line naming the file, no traceback and no output,
each within a few seconds. The unmodified files load (the positive controls), so every error comes
from the one thing each case breaks. A checkpoint is data: no case may make modelkit read another
file, import code, or run without end.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from modelkit import ModelkitError, build_model
from modelkit.cli import main as cli_main
from modelkit.weights.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from modelkit.weights.hf import export_hf_gpt2, load_hf_gpt2

SECONDS = 5.0  # each case, through each surface
SPEC: dict[str, Any] = {"name": "corpus", "vocab_size": 50257, "context_length": 8, "emb_dim": 2, "n_heads": 1,
                        "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True, "tie_embeddings": True}
DROP = object()  # "remove this key"
DEEP = "[" * 100_000 + "]" * 100_000  # deeper than Python's JSON parser can go
HUGE_TEXT = "x" * 2_000_000
PATHS = ["/dev/zero", "configs/tiny.json", "/etc/passwd", "../m.safetensors"]


# -- the good checkpoint, as header + data --------------------------------------------------------

@dataclass(frozen=True)
class Base:
    header: dict[str, Any]
    data: bytes

    @property
    def meta(self) -> dict[str, str]:
        return self.header["__metadata__"]

    @property
    def spec(self) -> dict[str, Any]:
        return json.loads(self.meta["modelkit.spec"])


def pack(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (padded), the data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def unpack(raw: bytes) -> Base:
    n = int.from_bytes(raw[:8], "little")
    return Base(json.loads(raw[8:8 + n]), raw[8 + n:])


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Base:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "good.safetensors"
    save_checkpoint(build_model(SPEC), path)
    return unpack(path.read_bytes())


# -- cases: each a function of the good checkpoint giving the bad file's bytes ---------------------

Make = Callable[[Base], bytes]


def meta(key: str, value: Any) -> Make:
    """The good file with one metadata value replaced (any JSON value, not only text) or dropped."""
    def make(b: Base) -> bytes:
        m = dict(b.meta)
        if value is DROP:
            m.pop(key)
        else:
            m[key] = value
        return pack(b.header | {"__metadata__": m}, b.data)
    return make


def spec_text(text: str) -> Make:
    return meta("modelkit.spec", text)


def spec_field(**fields: Any) -> Make:
    """The good file whose spec has fields replaced (DROP removes one)."""
    def make(b: Base) -> bytes:
        s = b.spec | fields
        return spec_text(json.dumps({k: v for k, v in s.items() if v is not DROP}))(b)
    return make


def entry(name: str, **fields: Any) -> Make:
    """The good file with one tensor's header entry changed (DROP removes a field)."""
    def make(b: Base) -> bytes:
        e = {k: v for k, v in (b.header[name] | fields).items() if v is not DROP}
        return pack(b.header | {name: e}, b.data)
    return make


def header(fn: Callable[[dict[str, Any]], Any]) -> Make:
    return lambda b: pack(fn(json.loads(json.dumps(b.header))), b.data)


def raw(fn: Callable[[bytes], bytes]) -> Make:
    return lambda b: fn(pack(b.header, b.data))


def first_tensor(b: Base) -> str:
    return min((k for k in b.header if k != "__metadata__"), key=lambda k: b.header[k]["data_offsets"][0])


def json_types(value: str) -> dict[str, Any]:
    """A text value replaced by every other JSON type."""
    return {"number": 1, "float": 1.5, "true": True, "null": None, "list": [value], "object": {"v": value}}


def metadata_cases() -> dict[str, Make]:
    cases: dict[str, Make] = {}
    required = ["modelkit.spec", "modelkit.format_version"]
    for key in ["modelkit.spec", "modelkit.format_version", "modelkit.format", "modelkit.version",
                "modelkit.plugins", "modelkit.tied", "torch.version", "format"]:
        for kind, value in json_types("1").items():
            cases[f"meta-{key}-{kind}"] = meta(key, value)
        if key in required:
            cases[f"meta-{key}-missing"] = meta(key, DROP)
    for key in ["modelkit.spec", "modelkit.plugins", "modelkit.tied", "modelkit.format_version", "modelkit.format"]:
        for i, p in enumerate(PATHS):
            cases[f"meta-{key}-path{i}"] = meta(key, p)
        cases[f"meta-{key}-nested"] = meta(key, DEEP)
        cases[f"meta-{key}-huge"] = meta(key, HUGE_TEXT)
        cases[f"meta-{key}-not-json"] = meta(key, "{")
    cases["meta-modelkit.version-huge"] = meta("modelkit.version", HUGE_TEXT)
    cases["meta-user-key-number"] = meta("step", 7)
    cases["meta-user-key-object"] = meta("step", {"a": "b"})
    cases["meta-not-object"] = header(lambda h: h | {"__metadata__": ["modelkit.spec"]})
    cases["meta-string"] = header(lambda h: h | {"__metadata__": "/dev/zero"})
    cases["meta-missing"] = header(lambda h: {k: v for k, v in h.items() if k != "__metadata__"})
    for name, text in {"1.0": "1.0", "minus": "-1", "zero": "0", "future": "99", "spaced": " 1",
                       "unicode-digit": "\uff11", "long": "9" * 5000, "empty": ""}.items():
        cases[f"format_version-{name}"] = meta("modelkit.format_version", text)
    cases["format-other"] = meta("modelkit.format", "other-format")
    # modelkit.plugins: JSON text of the wrong shape
    for name, text in {"object": "{}", "numbers": "[1, 2]", "null": "null", "strings": '["mha"]',
                       "kind-number": '[{"path": "norm", "kind": 3, "type": "x", "distribution": null, '
                                      '"version": null, "module": null}]',
                       "kind-unknown": '[{"path": "norm", "kind": "os.system", "type": "x", "distribution": null, '
                                       '"version": null, "module": null}]',
                       "missing-keys": '[{"type": "x"}]',
                       "not-installed": '[{"path": "norm", "kind": "norm", "type": "nope", "distribution": "evil", '
                                        '"version": "1", "module": "os"}]',
                       "many": json.dumps([{"path": "p", "kind": "norm", "type": "layernorm", "distribution": None,
                                            "version": None, "module": None}] * 5000)}.items():
        cases[f"plugins-{name}"] = meta("modelkit.plugins", text)
    for name, text in {"list": "[]", "values-numbers": '{"out_head.weight": 1}', "number": "3",
                       "nested": '{"a": {"b": "c"}}'}.items():
        cases[f"tied-{name}"] = meta("modelkit.tied", text)
    return cases


def spec_cases() -> dict[str, Make]:
    cases: dict[str, Make] = {}
    for name, text in {"list": "[]", "number": "3", "null": "null", "string": '"configs/tiny.json"',
                       "empty": "", "duplicate-key": '{"n_layers": 2, "n_layers": 3}', "truncated": '{"name": '}.items():
        cases[f"spec-json-{name}"] = spec_text(text)
    for field in ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"]:
        for name, value in {"missing": DROP, "string": "2", "float": 2.5, "bool": True, "null": None,
                            "zero": 0, "negative": -4, "list": [2], "object": {"n": 2}, "huge": 10**12,
                            "enormous": 10**400}.items():
            cases[f"spec-{field}-{name}"] = spec_field(**{field: value})
    cases["spec-heads-do-not-divide"] = spec_field(n_heads=3)
    cases["spec-drop-rate-1.5"] = spec_field(drop_rate=1.5)
    cases["spec-unknown-field"] = spec_field(n_layerz=2)
    cases["spec-unknown-component"] = spec_field(norm="nope")
    cases["spec-component-object"] = spec_field(attention={"type": ["mha"]})
    cases["spec-component-param-type"] = spec_field(norm={"type": "layernorm", "eps": "1e-5"})
    cases["spec-nested-deep"] = spec_field(norm={"type": "layernorm", "eps": json.loads("[" * 500 + "]" * 500)})
    cases["spec-fewer-layers"] = spec_field(n_layers=1)
    cases["spec-other-vocab"] = spec_field(vocab_size=50000)
    cases["spec-untied"] = spec_field(tie_embeddings=False)
    return cases


def header_cases() -> dict[str, Make]:
    """Truncated and lying safetensors headers (read_checkpoint and info refuse these)."""
    cases: dict[str, Make] = {
        "file-empty": lambda b: b"",
        "file-7-bytes": lambda b: b"\x10" * 7,
        "header-length-beyond-file": raw(lambda r: (len(r) * 2).to_bytes(8, "little") + r[8:]),
        "header-length-2**63": raw(lambda r: (2**63).to_bytes(8, "little") + r[8:]),
        "header-length-zero": raw(lambda r: bytes(8) + r[8:]),
        "header-cut": raw(lambda r: r[: 8 + int.from_bytes(r[:8], "little") // 2]),
        "header-not-json": lambda b: pack(b"{not json", b.data),
        "header-not-utf8": lambda b: pack(b'{"\xff\xfe": 1}', b.data),
        "header-list": lambda b: pack(b"[]", b.data),
        "header-deep": lambda b: pack(DEEP.encode(), b.data),
        "header-duplicate-key": lambda b: pack(b'{"__metadata__": {}, "__metadata__": {}}', b.data),
    }
    for name, fields in {
        "dtype-unknown": {"dtype": "F128"}, "dtype-number": {"dtype": 4}, "dtype-missing": {"dtype": DROP},
        "shape-negative": {"shape": [-1, 8]}, "shape-strings": {"shape": ["8", "8"]}, "shape-float": {"shape": [8.0]},
        "shape-too-many-dims": {"shape": [1] * 100}, "shape-huge": {"shape": [10**12, 10**12]},
        "shape-lies": {"shape": [3]}, "shape-missing": {"shape": DROP}, "shape-null": {"shape": None},
        "offsets-three": {"data_offsets": [0, 4, 8]}, "offsets-reversed": {"data_offsets": [64, 0]},
        "offsets-beyond": {"data_offsets": [10**15, 10**15 + 64]}, "offsets-negative": {"data_offsets": [-64, 0]},
        "offsets-string": {"data_offsets": "0-64"}, "extra-key": {"pointer": "/dev/zero"},
    }.items():
        cases[f"entry-{name}"] = lambda b, f=fields: entry(first_tensor(b), **f)(b)
    cases["entry-not-object"] = lambda b: header(lambda h: h | {first_tensor(b): [1, 2]})(b)
    cases["entry-overlap"] = header(lambda h: {k: (v | {"data_offsets": [0, v["data_offsets"][1] - v["data_offsets"][0]]}
                                                   if k != "__metadata__" else v) for k, v in h.items()})
    cases["entry-removed"] = lambda b: header(lambda h: {k: v for k, v in h.items() if k != first_tensor(b)})(b)
    cases["entry-extra-tensor"] = header(lambda h: h | {"extra.weight": {"dtype": "F32", "shape": [0],
                                                                         "data_offsets": [0, 0]}})
    return cases


def data_cases() -> dict[str, Make]:
    """Files whose header is sound but whose data is not there: info reads them, loading refuses."""
    return {
        "data-truncated": lambda b: pack(b.header, b.data[:-1000]),
        "data-missing": lambda b: pack(b.header, b""),
        "data-extra-bytes": lambda b: pack(b.header, b.data + b"\0" * 64),
    }


READ_CASES = metadata_cases() | spec_cases() | header_cases()
LOAD_CASES = data_cases()


def check_cli(argv: list[str], capsys: pytest.CaptureFixture[str], where: Path) -> str:
    """Run the CLI in-process; it must exit 2 with one error line naming ``where`` and print nothing else."""
    start = time.perf_counter()
    assert cli_main(argv) == 2
    assert time.perf_counter() - start < SECONDS
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert lines[0].startswith(f"modelkit {argv[0]}: error: ")
    assert sum(line.startswith("modelkit ") for line in lines) == 1
    assert str(where) in err or where.name in err
    return err


def check_api(fn: Callable[[], Any]) -> ModelkitError:
    start = time.perf_counter()
    with pytest.raises(ModelkitError) as info:
        fn()
    assert time.perf_counter() - start < SECONDS
    return info.value


SURFACES = ["read_checkpoint", "load_checkpoint", "info", "generate", "export-hf"]


def run_surface(surface: str, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = path.parent / "hf_out"
    if surface == "read_checkpoint":
        check_api(lambda: read_checkpoint(path))
    elif surface == "load_checkpoint":
        check_api(lambda: load_checkpoint(path))
    elif surface == "info":
        check_cli(["info", str(path)], capsys, path)
    elif surface == "generate":
        check_cli(["generate", "--checkpoint", str(path), "--prompt", "Hi", "--max-new-tokens", "1"], capsys, path)
    else:
        check_cli(["export-hf", str(path), str(out)], capsys, path)
        assert not out.exists()


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("case", list(READ_CASES))
def test_malformed_checkpoint_is_refused(case: str, surface: str, base: Base, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(READ_CASES[case](base))
    run_surface(surface, path, capsys)


@pytest.mark.parametrize("surface", ["load_checkpoint", "generate", "export-hf"])
@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_checkpoint_without_its_data_is_refused_on_load(case: str, surface: str, base: Base, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(LOAD_CASES[case](base))
    assert read_checkpoint(path).spec.name == "corpus"  # the header alone is sound
    run_surface(surface, path, capsys)


def test_the_corpus_base_loads_everywhere(base: Base, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The positive control: the unmodified file (re-packed like every case) works on every surface."""
    path = tmp_path / "good.safetensors"
    path.write_bytes(pack(base.header, base.data))
    assert read_checkpoint(path).spec.n_layers == 2
    assert load_checkpoint(path).spec.vocab_size == 50257
    assert cli_main(["info", str(path)]) == 0
    assert cli_main(["generate", "--checkpoint", str(path), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0
    assert cli_main(["export-hf", str(path), str(tmp_path / "out")]) == 0
    assert "error" not in capsys.readouterr().err


def test_optional_metadata_may_be_missing(base: Base, tmp_path: Path) -> None:
    """Only the spec and the format version are required; the rest has defaults."""
    m = {k: v for k, v in base.meta.items() if k in ("modelkit.spec", "modelkit.format_version")}
    path = tmp_path / "minimal.safetensors"
    path.write_bytes(pack(base.header | {"__metadata__": m}, base.data))
    info = read_checkpoint(path)
    assert (info.plugins, info.tied, info.modelkit_version) == ([], {}, "?")
    model = load_checkpoint(path)
    assert model.out_head.weight is model.tok_emb.weight  # tied from the spec, not from modelkit.tied


def test_a_path_as_spec_is_never_read(base: Base, tmp_path: Path) -> None:
    """The spec is JSON text: a path there is an error, not a file to open (a file spec would load)."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(base.spec))
    path = tmp_path / "pathspec.safetensors"
    path.write_bytes(meta("modelkit.spec", str(spec_file))(base))
    with pytest.raises(ModelkitError, match=r"metadata\.modelkit\.spec: invalid JSON"):
        read_checkpoint(path)


def test_errors_name_the_json_path(base: Base, tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(spec_field(n_layers="2", emb_dim=True)(base))
    text = str(check_api(lambda: read_checkpoint(path)))
    assert "metadata.modelkit.spec.n_layers: expected an integer, got \"2\"" in text
    assert "metadata.modelkit.spec.emb_dim: expected an integer, got true" in text
    path.write_bytes(meta("modelkit.plugins", '[{"kind": 3}]')(base))
    assert "metadata.modelkit.plugins[0].kind" in str(check_api(lambda: read_checkpoint(path)))
    path.write_bytes(meta("modelkit.format_version", [1])(base))
    assert "metadata.modelkit.format_version: expected a string, got [1]" in str(check_api(lambda: read_checkpoint(path)))
    path.write_bytes(entry(first_tensor(base), shape=["8"])(base))
    assert f"header.{first_tensor(base)}.shape[0]: expected an integer" in str(check_api(lambda: read_checkpoint(path)))


# -- Hugging Face folders --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A good Hugging Face folder's files: config.json and model.safetensors."""
    torch.manual_seed(1)
    folder = export_hf_gpt2(build_model(SPEC), tmp_path_factory.mktemp("hf") / "good")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


HFMake = Callable[[dict[str, bytes]], dict[str, bytes]]
SHARD = "model-00001-of-00001.safetensors"


def config(**fields: Any) -> HFMake:
    def make(files: dict[str, bytes]) -> dict[str, bytes]:
        cfg = json.loads(files["config.json"]) | fields
        return files | {"config.json": json.dumps({k: v for k, v in cfg.items() if v is not DROP}).encode()}
    return make


def config_bytes(text: bytes) -> HFMake:
    return lambda files: files | {"config.json": text}


def sharded(index: Any, shard: str = SHARD) -> HFMake:
    """The folder with its weights moved to a shard and an index (``index`` None: the good index)."""
    def make(files: dict[str, bytes]) -> dict[str, bytes]:
        weights = files["model.safetensors"]
        names = [k for k in unpack(weights).header if k != "__metadata__"]
        good = {"metadata": {}, "weight_map": {n: SHARD for n in names}}
        body = good if index is None else index(good) if callable(index) else index
        text = body if isinstance(body, bytes) else json.dumps(body).encode()
        rest = {k: v for k, v in files.items() if k != "model.safetensors"}
        return rest | {"model.safetensors.index.json": text, shard: weights}
    return make


def weights(fn: Callable[[Base], bytes]) -> HFMake:
    return lambda files: files | {"model.safetensors": fn(unpack(files["model.safetensors"]))}


def hf_cases() -> dict[str, HFMake]:
    cases: dict[str, HFMake] = {
        "config-list": config_bytes(b"[]"), "config-number": config_bytes(b"12"), "config-null": config_bytes(b"null"),
        "config-string": config_bytes(b'"/dev/zero"'), "config-not-json": config_bytes(b"{"),
        "config-empty": config_bytes(b""), "config-deep": config_bytes(DEEP.encode()),
        "config-not-utf8": config_bytes(b'{"\xff": 1}'), "config-missing": lambda f: {k: v for k, v in f.items()
                                                                                      if k != "config.json"},
        "config-huge": config_bytes(b'{"a": "' + b"x" * (17 * 2**20) + b'"}'),
        "config-model-type-llama": config(model_type="llama"), "config-model-type-list": config(model_type=["gpt2"]),
    }
    for field in ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head"]:
        for name, value in {"missing": DROP, "string": "12", "float": 12.5, "bool": True, "null": None, "zero": 0,
                            "negative": -1, "list": [12], "object": {"n": 12}, "huge": 10**12,
                            "enormous": 10**400}.items():
            cases[f"config-{field}-{name}"] = config(**{field: value})
    for name, fields in {
        "n_layer-1e6": {"n_layer": 10**6}, "n_layer-1": {"n_layer": 1}, "n_embd-not-heads": {"n_head": 3},
        "n_positions-other": {"n_positions": 4}, "vocab-other": {"vocab_size": 100},
        "n_inner-string": {"n_inner": "32"}, "n_inner-huge": {"n_inner": 10**12},
        "eps-string": {"layer_norm_epsilon": "1e-5"}, "eps-negative": {"layer_norm_epsilon": -1.0},
        "tie-string": {"tie_word_embeddings": "yes"}, "activation-number": {"activation_function": 3},
        "activation-list": {"activation_function": ["gelu"]}, "activation-unknown": {"activation_function": "gelu_fast"},
        "scale-string": {"scale_attn_weights": "true"}, "scale-false": {"scale_attn_weights": False},
        "cross-attention": {"add_cross_attention": True},
    }.items():
        cases[f"config-{name}"] = config(**fields)
    for name, index in {
        "list": [SHARD], "number": 3, "not-json": b"{", "deep": DEEP.encode(),
        "weight_map-list": {"weight_map": [SHARD]}, "weight_map-number": {"weight_map": 3},
        "weight_map-missing": {"metadata": {}}, "weight_map-string": {"weight_map": SHARD},
        "value-number": lambda g: g | {"weight_map": {k: 1 for k in g["weight_map"]}},
        "value-null": lambda g: g | {"weight_map": {k: None for k in g["weight_map"]}},
        "value-list": lambda g: g | {"weight_map": {k: [SHARD] for k in g["weight_map"]}},
        "value-parent": lambda g: g | {"weight_map": {k: "../" + SHARD for k in g["weight_map"]}},
        "value-absolute": lambda g: g | {"weight_map": {k: "/dev/zero" for k in g["weight_map"]}},
        "value-subdir": lambda g: g | {"weight_map": {k: "sub/" + SHARD for k in g["weight_map"]}},
        "value-missing-file": lambda g: g | {"weight_map": {k: "model-00002.safetensors" for k in g["weight_map"]}},
    }.items():
        cases[f"index-{name}"] = sharded(index)
    cases["index-shard-truncated"] = lambda f: sharded(None)(f) | {SHARD: f["model.safetensors"][:-1000]}
    cases["index-shard-not-safetensors"] = lambda f: sharded(None)(f) | {SHARD: b"\0" * 64}
    cases["weights-truncated"] = lambda f: f | {"model.safetensors": f["model.safetensors"][:-1000]}
    cases["weights-header-lies"] = weights(lambda b: entry(first_tensor(b), shape=[3])(b))
    cases["weights-header-deep"] = weights(lambda b: pack(DEEP.encode(), b.data))
    cases["weights-offsets-beyond"] = weights(lambda b: entry(first_tensor(b), data_offsets=[10**15, 10**15])(b))
    cases["weights-scalar-c_attn"] = weights(lambda b: pack(b.header | {"transformer.h.0.attn.c_attn.bias": {
        "dtype": "F32", "shape": [], "data_offsets": b.header["transformer.h.0.attn.c_attn.bias"]["data_offsets"]}},
        b.data))
    cases["weights-none"] = lambda f: {k: v for k, v in f.items() if k != "model.safetensors"}
    return cases


HF_CASES = hf_cases()


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


@pytest.mark.parametrize("surface", ["load_hf_gpt2", "import-hf"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_malformed_hf_folder_is_refused(case: str, surface: str, hf_base: dict[str, bytes], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_folder(tmp_path / "hf", HF_CASES[case](hf_base))
    out = tmp_path / "out.safetensors"
    if surface == "load_hf_gpt2":
        check_api(lambda: load_hf_gpt2(folder))
    else:
        check_cli(["import-hf", str(folder), str(out)], capsys, folder)
        assert not out.exists()


def test_the_hf_corpus_base_loads(hf_base: dict[str, bytes], tmp_path: Path) -> None:
    """Positive controls: the good folder, and the same weights as a one-shard index, import."""
    plain = load_hf_gpt2(write_folder(tmp_path / "plain", hf_base))
    shards = load_hf_gpt2(write_folder(tmp_path / "sharded", sharded(None)(hf_base)))
    assert plain.spec.n_layers == 2
    for (name, a), (_, b) in zip(plain.state_dict().items(), shards.state_dict().items()):
        assert torch.equal(a, b), name
    assert cli_main(["import-hf", str(tmp_path / "sharded"), str(tmp_path / "m.safetensors")]) == 0


def test_an_index_never_names_a_file_outside_its_folder(hf_base: dict[str, bytes], tmp_path: Path) -> None:
    """The shard exists one level up; an index naming it by ``../`` is refused, not followed."""
    (tmp_path / SHARD).write_bytes(hf_base["model.safetensors"])
    folder = write_folder(tmp_path / "hf", sharded(lambda g: g | {"weight_map": {k: "../" + SHARD
                                                                                for k in g["weight_map"]}})(hf_base))
    with pytest.raises(ModelkitError, match=r"is not a file name in .*never paths"):
        load_hf_gpt2(folder)


def test_case_counts() -> None:
    """The corpus covers what the issue lists (a guard against cases silently going missing)."""
    assert len(READ_CASES) >= 150 and len(LOAD_CASES) == 3 and len(HF_CASES) >= 80


# -- special files: refused before anything is read (a FIFO would block, a device stream forever) --------


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_a_checkpoint_path_that_is_not_a_regular_file_is_refused_at_once(kind: str, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import os

    path = tmp_path / "model.safetensors"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path = Path("/dev/zero")
    start = time.monotonic()
    for load in (read_checkpoint, load_checkpoint):
        with pytest.raises(ModelkitError, match="not a regular file|Is a directory"):
            load(path)
    for argv in (["info", str(path)], ["generate", "--checkpoint", str(path), "--prompt", "hi"]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error:" in err, err
    assert time.monotonic() - start < 10


def test_an_hf_config_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "config.json")
    with pytest.raises(ModelkitError, match="not a regular file"):
        load_hf_gpt2(tmp_path)
