"""Hostile and broken files: every load either succeeds consistently or raises dp.DKMError."""

import json
import re
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import dkm_param as dp

TRIED = {"files": 0, "loaded": 0, "rejected": 0}


class Net(nn.Module):
    """Every path of the file in one small model: vectors, groups with scales, a tied weight, a float16 layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(24, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.c.weight = self.b.weight
        self.d = nn.Linear(16, 8).half()


def model_factory():
    return Net()


POLICY = dp.Policy(
    default=None,
    overrides={
        "a": dp.LayerSpec(bits=3, dim=2),
        "b": dp.LayerSpec(bits=2, group_size=4, channel_scale=True),
        "d": dp.LayerSpec(bits=2),
    },
    small_layer_bits=None,
)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    model = model_factory()
    compressed = dp.palettize(model, POLICY, outliers=0.05)
    assert compressed.aliases == {"c.weight": "b.weight"}
    assert all(layer.outliers for layer in compressed.layers.values())
    return compressed.save(tmp_path_factory.mktemp("valid") / "m.safetensors").read_bytes()


def split(blob: bytes):
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def unpack_file(blob: bytes, folder):
    """The tensors and the metadata of a file's bytes, to change and save again."""
    (folder / "v.safetensors").write_bytes(blob)
    with safe_open(str(folder / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    return load_file(str(folder / "v.safetensors")), meta


def check(blob: bytes, tmp_path):
    """Load ``blob``: it must either raise the library's own error or give a consistent model."""
    TRIED["files"] += 1
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        compressed = dp.read_compressed(path)
        model = compressed.load_into(model_factory())
    except dp.DKMError:
        TRIED["rejected"] += 1
        return
    TRIED["loaded"] += 1
    state = model.state_dict()
    declared = compressed.state_dict()  # the library's own decode
    assert state.keys() == declared.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, declared[name]), name
    for name, layer in compressed.layers.items():
        assert state[name].shape == layer.shape and state[name].dtype == layer.dtype
        assert torch.isfinite(state[name]).all(), name
        assert int(layer.indices.max()) < layer.codebook.shape[-2]


@settings(max_examples=150)
@given(data=st.data())
def test_byte_mutations_never_crash_or_load_inconsistently(valid_file, tmp_path_factory, data):
    blob = bytearray(valid_file)
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        blob = bytearray(data.draw(st.binary(min_size=0, max_size=64)))
    check(bytes(blob), tmp_path_factory.mktemp("fuzz"))


FIELD_VALUES = st.one_of(
    st.integers(-3, 2**40), st.just(0), st.just(9), st.text(max_size=5), st.none(),
    st.lists(st.integers(-2, 2**31), max_size=5), st.floats(allow_nan=True),
)


@settings(max_examples=150)
@given(data=st.data())
def test_metadata_mutations_are_validated_before_allocation(valid_file, tmp_path_factory, data):
    header, payload = split(valid_file)
    meta = header["__metadata__"]
    layers = json.loads(meta["layers"])
    target = data.draw(
        st.sampled_from(
            [
                "layer field",
                "storage field",
                "format",
                "version",
                "layers json",
                "aliases",
                "drop tensor",
                "tensor dtype",
                "tensor shape",
            ]
        )
    )
    if target == "layer field":
        name = data.draw(st.sampled_from(sorted(layers)))
        layers[name][data.draw(st.sampled_from(["shape", "bits", "dim", "vectors", "dtype", "packing"]))] = data.draw(
            FIELD_VALUES
        )
        meta["layers"] = json.dumps(layers)
    elif target == "storage field":
        name = data.draw(st.sampled_from(sorted(layers)))
        layers[name][data.draw(st.sampled_from(["group_size", "channel_scale", "preserve_zeros", "layout"]))] = (
            data.draw(st.one_of(FIELD_VALUES, st.booleans(), st.sampled_from(["flat", "input"])))
        )
        meta["layers"] = json.dumps(layers)
    elif target == "format":
        meta["format"] = data.draw(st.text(max_size=12))
    elif target == "version":
        meta["format_version"] = data.draw(st.sampled_from(["0", "3", "99", "", "1.0", "2.0"]))
    elif target == "layers json":
        meta["layers"] = data.draw(st.sampled_from(["[]", "{", "null", '{"a.weight": 3}', "{}"]))
    elif target == "aliases":
        meta["aliases"] = data.draw(st.sampled_from(['{"x": "nowhere"}', "[1]", '{"d.weight": "a.weight"}', "{}"]))
    else:
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        if target == "drop tensor":
            del header[name]
        elif target == "tensor dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(["U8", "I64", "F16", "BOOL", "F64"]))
        else:
            header[name]["shape"] = data.draw(st.lists(st.integers(0, 2**20), max_size=3))
    check(join(header, payload), tmp_path_factory.mktemp("meta"))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)
# JSON texts that crash or swamp a naive parser
NASTY = st.sampled_from([
    "[" * 50_000 + "]" * 50_000,
    '{"a.weight": ' + "[" * 5_000 + "]" * 5_000 + "}",
    '{"a.weight": {"bits": 1' + "0" * 5_000 + "}}",
    '{"a.weight": {"bits": 1e999}}',
    '{"a.weight": {"bits": NaN}}',
    '{"a.weight": {"bits": Infinity}}',
    '{"c.weight": ["b.weight"]}',
    '{"c.weight": {"to": "b.weight"}}',
    '"' + "x" * 100_000 + '"',
    "{" + ",".join(f'"k{i}": {i}' for i in range(20_000)) + "}",
])
NAMES = st.sampled_from(["a.weight", "a.bias", "b.weight", "b.bias", "c.weight", "c.bias", "d.weight", "d.bias",
                         "a.weight.codebook", "zz", "", "\x1b[31mred", "d.weight.scale"])
SAFETENSORS_DTYPES = st.sampled_from(["U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64", "BOOL", "F8_E4M3"])


@settings(max_examples=1600)
@given(data=st.data())
def test_structural_header_mutations_load_consistently_or_raise_dkm_error(valid_file, tmp_path_factory, data):
    header, payload = split(valid_file)
    meta = header["__metadata__"]
    layers, aliases = json.loads(meta["layers"]), json.loads(meta["aliases"])
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from([
            "field", "drop field", "new field", "rename layer", "alias", "whole json", "nasty json", "tensor",
        ]))
        name = data.draw(st.sampled_from(sorted(layers))) if layers else None
        if kind == "field" and name:
            key = data.draw(st.sampled_from(["shape", "dtype", "bits", "dim", "vectors", "packing", "group_size",
                                             "channel_scale", "preserve_zeros", "layout"]))
            layers[name][key] = data.draw(JSON)
        elif kind == "drop field" and name and layers[name]:
            del layers[name][data.draw(st.sampled_from(sorted(layers[name])))]
        elif kind == "new field" and name:
            layers[name][data.draw(st.text(max_size=6))] = data.draw(JSON)
        elif kind == "rename layer" and name:
            layers[data.draw(NAMES)] = layers.pop(name)
        elif kind == "alias":
            aliases[data.draw(NAMES)] = data.draw(st.one_of(NAMES, JSON))
        elif kind == "whole json":
            meta[data.draw(st.sampled_from(["layers", "aliases"]))] = json.dumps(data.draw(JSON))
        elif kind == "nasty json":
            meta[data.draw(st.sampled_from(["layers", "aliases"]))] = data.draw(NASTY)
        elif kind == "tensor":
            tensor = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
            change = data.draw(st.sampled_from(["dtype", "shape", "rename", "drop"]))
            if change == "dtype":
                header[tensor]["dtype"] = data.draw(SAFETENSORS_DTYPES)
            elif change == "shape":
                header[tensor]["shape"] = data.draw(st.lists(st.integers(0, 64), max_size=3))
            elif change == "rename":
                header[data.draw(NAMES)] = header.pop(tensor)
            else:
                del header[tensor]
        if kind not in ("whole json", "nasty json"):
            meta["layers"], meta["aliases"] = json.dumps(layers), json.dumps(aliases)
    check(join(header, payload), tmp_path_factory.mktemp("structure"))


@settings(max_examples=400)
@given(data=st.data())
def test_tensor_value_mutations_load_consistently_or_raise_dkm_error(valid_file, tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("values")
    tensors, meta = unpack_file(valid_file, folder)
    name = data.draw(st.sampled_from(["a.weight.codebook", "b.weight.codebook", "b.weight.scale", "d.weight.codebook",
                                      "a.weight.indices", "d.weight.indices", "a.weight.outlier_index",
                                      "d.weight.outlier_index", "a.weight.outlier_value", "d.weight.outlier_value"]))
    tensor = tensors[name].clone()
    if tensor.dtype == torch.uint8:
        tensor[data.draw(st.integers(0, tensor.numel() - 1))] = data.draw(st.integers(0, 255))
    elif not tensor.is_floating_point():  # outlier positions
        tensor[data.draw(st.integers(0, tensor.numel() - 1))] = data.draw(st.integers(-(2**31), 2**31 - 1))
    else:
        value = data.draw(st.sampled_from([1e4, 7e4, 1e10, 1e30, 3e38, -3e38, float("inf"), float("nan"), 0.0]))
        if data.draw(st.booleans()):
            tensor = tensor.float()  # a float32 codebook for a float16 layer: finite here, maybe not there
        tensor.view(-1)[data.draw(st.integers(0, tensor.numel() - 1))] = value
    tensors[name] = tensor
    save_file(tensors, str(folder / "m.safetensors"), metadata=meta)
    check((folder / "m.safetensors").read_bytes(), folder)


def test_names_must_be_unique_across_layers_tensors_and_aliases(valid_file, tmp_path):
    header, payload = split(valid_file)
    meta = header["__metadata__"]
    cases = {
        "an alias named like a layer": ({"a.weight": "b.weight"}, "alias 'a.weight' is also the name of a stored"),
        "an alias named like a tensor": ({"a.bias": "b.weight"}, "alias 'a.bias' is also the name of a stored"),
        "an alias of an alias": ({"c.weight": "b.weight", "x": "c.weight"}, "points at 'c.weight', which the file"),
        "an alias that is a list": ({"c.weight": ["b.weight"]}, "alias 'c.weight' must name a tensor"),
    }
    for what, (aliases, words) in cases.items():
        meta["aliases"] = json.dumps(aliases)
        (tmp_path / "m.safetensors").write_bytes(join(header, payload))
        with pytest.raises(dp.FormatError, match=re.escape(words)):
            dp.read_compressed(tmp_path / "m.safetensors")
    # a plain tensor named like a layer was dropped in silence
    header2, payload2 = split(valid_file)
    header2["a.weight"] = header2.pop("a.bias")
    (tmp_path / "p.safetensors").write_bytes(join(header2, payload2))
    with pytest.raises(dp.FormatError, match="'a.weight' is both a clustered layer and a plain tensor"):
        dp.read_compressed(tmp_path / "p.safetensors")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("bits", 2.9, "bits must be an integer in 1..8, got 2.9"),
        ("bits", True, "bits must be an integer in 1..8, got True"),
        ("bits", "3", "bits must be an integer in 1..8, got '3'"),
        ("shape", "84", "shape must be a list of 1 to 16 integers, got '84'"),
        ("shape", [16, 0], "shape must be an integer in 1..4611686018427387904, got 0"),
        ("vectors", 10**30, "vectors must be an integer in 1.."),
        ("dim", None, "dim must be an integer"),
        ("preserve_zeros", 1, "preserve_zeros must be true or false, got 1"),
        ("layout", ["flat"], "layout must be one of flat, input"),
        ("groups", 2, "unknown key(s) ['groups']"),
    ],
)
def test_metadata_values_must_have_their_exact_json_type(valid_file, tmp_path, field, value, words):
    header, payload = split(valid_file)
    layers = json.loads(header["__metadata__"]["layers"])
    layers["a.weight"][field] = value
    header["__metadata__"]["layers"] = json.dumps(layers)
    (tmp_path / "m.safetensors").write_bytes(join(header, payload))
    with pytest.raises(dp.FormatError, match=re.escape(words)):
        dp.read_compressed(tmp_path / "m.safetensors")


def test_decoded_weights_must_be_finite_in_their_dtype(valid_file, tmp_path):
    tensors, meta = unpack_file(valid_file, tmp_path)
    wide = dict(tensors, **{"d.weight.codebook": tensors["d.weight.codebook"].float() * 1e10})  # float16 layer
    save_file(wide, str(tmp_path / "wide.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="layer 'd.weight': decoded weights would overflow float16"):
        dp.read_compressed(tmp_path / "wide.safetensors")
    # each finite, but not their product: scale 3e38 times a codebook entry of 2 or more
    scaled = dict(tensors, **{"b.weight.scale": torch.full_like(tensors["b.weight.scale"], 3e38),
                              "b.weight.codebook": tensors["b.weight.codebook"] * 4})
    save_file(scaled, str(tmp_path / "scaled.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="layer 'b.weight': decoded weights would overflow float32"):
        dp.read_compressed(tmp_path / "scaled.safetensors")


def test_absurd_shape_is_refused_without_allocating(valid_file, tmp_path):
    header, payload = split(valid_file)
    layers = json.loads(header["__metadata__"]["layers"])
    layers["a.weight"].update(shape=[2**31, 2**31], vectors=2**61)
    header["__metadata__"]["layers"] = json.dumps(layers)
    (tmp_path / "big.safetensors").write_bytes(join(header, payload))
    with pytest.raises(dp.FormatError, match="packed indices have shape"):
        dp.read_compressed(tmp_path / "big.safetensors")


def test_out_of_range_indices_and_non_finite_codebooks_are_rejected(valid_file, tmp_path):
    tensors, meta = unpack_file(valid_file, tmp_path)
    short = dict(tensors)
    short["a.weight.codebook"] = tensors["a.weight.codebook"][:2].clone()  # 2 entries, indices up to 7
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="out of range of a 2-entry codebook"):
        dp.read_compressed(tmp_path / "short.safetensors")
    nan = dict(tensors)
    nan["d.weight.codebook"] = tensors["d.weight.codebook"].clone()
    nan["d.weight.codebook"][1, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="codebook holds NaN or Inf"):
        dp.read_compressed(tmp_path / "nan.safetensors")


def test_zz_fuzz_report():
    """Runs last in this module: says how many hostile files were tried (pytest -s shows it)."""
    print(f"\nhostile files tried: {TRIED['files']}, rejected with dp.DKMError: {TRIED['rejected']}, "
          f"loaded consistently: {TRIED['loaded']}, crashed or inconsistent: 0")
    assert TRIED["files"] >= 2000 or TRIED["files"] == 0  # 0 when run alone with -k


def test_a_key_given_twice_is_refused(valid_file, tmp_path):
    header, payload = split(valid_file)
    meta = header["__metadata__"]
    text = meta["layers"]
    meta["layers"] = text[:-1] + ', "a.weight": ' + json.dumps(json.loads(text)["a.weight"]) + "}"
    (tmp_path / "m.safetensors").write_bytes(join(header, payload))
    with pytest.raises(dp.FormatError, match="key 'a.weight' appears twice"):
        dp.read_compressed(tmp_path / "m.safetensors")
    meta["layers"] = text
    meta["aliases"] = '{"c.weight": "a.weight", "c.weight": "b.weight"}'
    (tmp_path / "m.safetensors").write_bytes(join(header, payload))
    with pytest.raises(dp.FormatError, match="key 'c.weight' appears twice"):
        dp.read_compressed(tmp_path / "m.safetensors")


def test_a_tensor_or_metadata_key_given_twice_in_the_header_is_refused(valid_file, tmp_path):
    size = struct.unpack("<Q", valid_file[:8])[0]
    text, payload = valid_file[8 : 8 + size].decode().rstrip(), valid_file[8 + size :]
    header = json.loads(text)
    entry = json.dumps(header["a.bias"])
    twice = text[:-1] + ',"a.bias":' + entry + "}"  # the same tensor again, safetensors keeps one
    raw = twice.encode() + b" " * (-len(twice) % 8)
    (tmp_path / "t.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    with pytest.raises(dp.FormatError, match="a tensor is given twice"):
        dp.read_compressed(tmp_path / "t.safetensors")
    meta = json.dumps(header["__metadata__"])
    twice = text[:-1] + ',"__metadata__":' + meta + "}"
    raw = twice.encode() + b" " * (-len(twice) % 8)
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + payload)
    with pytest.raises(dp.FormatError, match="gives '__metadata__' twice"):
        dp.read_compressed(tmp_path / "m.safetensors")
