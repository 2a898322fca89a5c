"""Hostile and broken files: every load either succeeds consistently or raises dp.DKMError."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dkm_param as dp

TRIED = {"files": 0, "loaded": 0, "rejected": 0}


def model_factory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    return model


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    model = model_factory()
    dp.register_dkm(model, dp.Policy(default=dp.LayerSpec(bits=3, dim=2), small_layer_bits=None))
    model.eval()
    path = dp.finalize(model).save(tmp_path_factory.mktemp("valid") / "m.safetensors")
    return path.read_bytes()


def split(blob: bytes):
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + size]), blob[8 + size :]


def join(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * ((-len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def check(blob: bytes, tmp_path):
    """Load ``blob``; it must either fit a fresh model consistently or raise the library's error."""
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
    for name, layer in compressed.layers.items():
        assert torch.isfinite(layer.codebook).all()
        assert int(layer.indices.max()) < layer.codebook.shape[0]
        assert torch.equal(state[name], layer.weight())


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
    elif target == "format":
        meta["format"] = data.draw(st.text(max_size=12))
    elif target == "version":
        meta["format_version"] = data.draw(st.sampled_from(["0", "2", "99", "", "1.0"]))
    elif target == "layers json":
        meta["layers"] = data.draw(st.sampled_from(["[]", "{", "null", '{"0.weight": 3}', "{}"]))
    elif target == "aliases":
        meta["aliases"] = data.draw(st.sampled_from(['{"x": "nowhere"}', "[1]", '{"2.weight": "0.weight"}', "{}"]))
    else:
        name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        if target == "drop tensor":
            del header[name]
        elif target == "tensor dtype":
            header[name]["dtype"] = data.draw(st.sampled_from(["U8", "I64", "F16", "BOOL", "F64"]))
        else:
            header[name]["shape"] = data.draw(st.lists(st.integers(0, 2**20), max_size=3))
    check(join(header, payload), tmp_path_factory.mktemp("meta"))


def test_absurd_shape_is_refused_without_allocating(valid_file, tmp_path):
    header, payload = split(valid_file)
    layers = json.loads(header["__metadata__"]["layers"])
    layers["0.weight"].update(shape=[2**31, 2**31], vectors=2**61)
    header["__metadata__"]["layers"] = json.dumps(layers)
    (tmp_path / "big.safetensors").write_bytes(join(header, payload))
    with pytest.raises(dp.FormatError, match="packed indices have shape"):
        dp.read_compressed(tmp_path / "big.safetensors")


def test_out_of_range_indices_and_non_finite_codebooks_are_rejected(valid_file, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    (tmp_path / "v.safetensors").write_bytes(valid_file)
    with safe_open(str(tmp_path / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "v.safetensors"))
    short = dict(tensors)
    short["0.weight.codebook"] = tensors["0.weight.codebook"][:2].clone()  # 2 entries, indices up to 7
    save_file(short, str(tmp_path / "short.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="out of range of a 2-entry codebook"):
        dp.read_compressed(tmp_path / "short.safetensors")
    nan = dict(tensors)
    nan["2.weight.codebook"] = tensors["2.weight.codebook"].clone()
    nan["2.weight.codebook"][1, 0] = float("nan")
    save_file(nan, str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(dp.FormatError, match="codebook holds NaN or Inf"):
        dp.read_compressed(tmp_path / "nan.safetensors")


def test_zz_fuzz_report():
    """Runs last in this module: says how many hostile files were tried (pytest -s shows it)."""
    print(f"\nhostile files tried: {TRIED['files']}, rejected with dp.DKMError: {TRIED['rejected']}, "
          f"loaded consistently: {TRIED['loaded']}, crashed or inconsistent: 0")
    assert TRIED["files"] >= 300 or TRIED["files"] == 0  # 0 when run alone with -k
