"""Decoding from packed bytes gives CompressedLayer.weight()'s bits, for every storage spec."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dkm_param.format.layer import CompressedLayer
from dkm_param.ops import layout, packing
from dkm_param.ops.decode import byte_digits, decode_packed
from dkm_param.spec import StorageSpec
from strategies import compressed_layers


def reference(layer: CompressedLayer) -> torch.Tensor:
    """The weight as the file defines it: the lookup, then the outliers at their row-major positions."""
    weight = layout.decode(layer.codebook, layer.indices, layer.shape, layer.dtype, layer.scale, layer.spec.layout)
    weight = weight.contiguous()
    if layer.outlier_index is not None:
        weight.view(-1)[layer.outlier_index.long()] = layer.outlier_value
    return weight


def decoded(layer: CompressedLayer, bitcast: bool = False) -> torch.Tensor:
    return decode_packed(
        layer.codebook, packing.pack(layer.indices, layer.spec.bits), layer.shape, layer.dtype, layer.spec.bits,
        layer.scale, layer.spec.layout, layer.outlier_index, layer.outlier_value, bitcast=bitcast,
    )


@settings(max_examples=100)
@given(compressed_layers(), st.booleans())
def test_decoding_packed_bytes_equals_the_layers_weight(layer, bitcast):
    weight = decoded(layer, bitcast)
    assert weight.dtype == layer.dtype and tuple(weight.shape) == layer.shape and weight.is_contiguous()
    assert torch.equal(weight, reference(layer))
    if layer.spec.layout == "flat" or len(layer.shape) <= 2:
        assert torch.equal(weight, layer.weight())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("bitcast", [False, True])
def test_every_width_reads_the_bytes_the_file_holds(bits, groups, bitcast):
    # 3 groups of 7 vectors: groups that do not start on a byte take the word-by-word path
    gen = torch.Generator().manual_seed(bits)
    spec = StorageSpec(bits=bits, group_size=2 if groups > 1 else None)
    k = 1 << bits
    book = torch.randn(groups, k, 1, generator=gen) if groups > 1 else torch.randn(k, 1, generator=gen)
    layer = CompressedLayer(shape=(2 * groups, 7), dtype=torch.float32, spec=spec, codebook=book,
                            indices=torch.randint(0, k, (14 * groups,), generator=gen).to(torch.uint8))
    assert layer.problem() is None
    assert torch.equal(decoded(layer, bitcast), layer.weight())


def test_a_byte_holds_its_digits_least_significant_first():
    assert byte_digits(4)[0x5A].tolist() == [0xA, 0x5]
    assert byte_digits(2)[0b11100100].tolist() == [0, 1, 2, 3]
    assert byte_digits(8)[200].tolist() == [200]
