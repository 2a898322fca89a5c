import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dkm_param.ops import packing


@given(bits=st.integers(1, 8), count=st.integers(0, 200), seed=st.integers(0, 2**16))
def test_pack_unpack_is_identity(bits, count, seed):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, 1 << bits, (count,), generator=gen)
    packed = packing.pack(indices, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packing.packed_size(count, bits) == -(-count * bits // 8)
    unpacked = packing.unpack(packed, bits, count)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked.long(), indices)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7])
def test_pack_unpack_is_identity_across_chunks(bits, monkeypatch):
    monkeypatch.setattr(packing, "_CHUNK", 24)  # chunks of 24 indices (three groups)
    gen = torch.Generator().manual_seed(bits)
    for count in (0, 1, 23, 24, 25, 100, 191):
        indices = torch.randint(0, 1 << bits, (count,), generator=gen)
        packed = packing.pack(indices, bits)
        assert torch.equal(packed, _pack_reference(indices, bits))
        assert torch.equal(packing.unpack(packed, bits, count).long(), indices)


def _pack_reference(indices, bits):
    stream = [(int(v) >> b) & 1 for v in indices for b in range(bits)]
    stream += [0] * (-len(stream) % 8)
    return torch.tensor([sum(bit << j for j, bit in enumerate(stream[i : i + 8])) for i in range(0, len(stream), 8)],
                        dtype=torch.uint8)


def test_bits_are_packed_least_significant_first():
    # 4-bit: first index in the low nibble
    assert packing.pack(torch.tensor([0x1, 0xA]), 4).tolist() == [0xA1]
    # 3-bit: 0b101, 0b011, 0b111 -> stream bits 101 110 111 (LSB first) -> 0b11_011_101, 0b1
    assert packing.pack(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b1]
    assert packing.pack(torch.tensor([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1).tolist() == [0b10001101, 0b1]


def test_out_of_range_indices_are_rejected():
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
        packing.pack(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="need 2 bytes, got 3"):
        packing.unpack(torch.zeros(3, dtype=torch.uint8), 4, 4)
