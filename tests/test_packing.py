"""Bit packing: exact round trips for every width, sizes that match ``packed_nbytes``, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from slimsearch.compression.packing import pack_bits, pack_mask, packed_nbytes, unpack_bits, unpack_mask

COUNTS = [0, 1, 7, 8, 9, 13, 64, 1001]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", COUNTS)
def test_pack_unpack_round_trip_is_exact(bits: int, count: int) -> None:
    rng = np.random.default_rng(1000 * bits + count)
    codes = rng.integers(0, 1 << bits, size=count)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8
    assert len(packed) == packed_nbytes(count, bits) == (count * bits + 7) // 8
    restored = unpack_bits(packed, bits, count)
    assert restored.shape == (count,)
    np.testing.assert_array_equal(restored, codes)


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_codes_survive(bits: int) -> None:
    codes = np.array([0, (1 << bits) - 1] * 5 + [(1 << bits) - 1])  # 11 codes: not a multiple of 8
    np.testing.assert_array_equal(unpack_bits(pack_bits(codes, bits), bits, len(codes)), codes)


def test_packing_is_msb_first_and_dense() -> None:
    # 3-bit codes 5 (101), 3 (011), 7 (111) -> 101 011 11|1 0000000
    packed = pack_bits(np.array([5, 3, 7]), 3)
    assert packed.tolist() == [0b10101111, 0b10000000]


def test_packed_nbytes_examples() -> None:
    assert packed_nbytes(0, 4) == 0
    assert packed_nbytes(1, 1) == 1
    assert packed_nbytes(8, 1) == 1
    assert packed_nbytes(9, 1) == 2
    assert packed_nbytes(3, 3) == 2
    assert packed_nbytes(1000, 4) == 500


@pytest.mark.parametrize("bits", [1, 2, 4, 7, 8])
def test_code_out_of_range_raises(bits: int) -> None:
    with pytest.raises(ValueError):
        pack_bits(np.array([0, 1 << bits]), bits)
    with pytest.raises(ValueError):
        pack_bits(np.array([0, -1]), bits)


@pytest.mark.parametrize("bits", [0, 9, 16])
def test_bad_bit_width_raises(bits: int) -> None:
    with pytest.raises(ValueError, match="bits"):
        pack_bits(np.array([0, 1]), bits)


@pytest.mark.parametrize("count", COUNTS)
def test_mask_round_trip(count: int) -> None:
    mask = np.random.default_rng(count).random(count) < 0.3
    bitmap = pack_mask(mask)
    assert len(bitmap) == packed_nbytes(count, 1)
    restored = unpack_mask(bitmap, count)
    assert restored.dtype == bool
    np.testing.assert_array_equal(restored, mask)


def test_mask_of_any_shape_is_flattened() -> None:
    mask = np.random.default_rng(0).random((3, 5, 7)) < 0.5
    np.testing.assert_array_equal(unpack_mask(pack_mask(mask), mask.size), mask.reshape(-1))
