"""Bit packing: b-bit unsigned codes and 1-bit masks into bytes, and back, exactly."""

from __future__ import annotations

import numpy as np


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits occupy once packed."""
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers in ``[0, 2**bits)`` into a uint8 array, most significant bit first."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits = {bits}: expected 1 to 8")
    codes = np.asarray(codes).reshape(-1)
    if codes.size and (codes.min() < 0 or codes.max() >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}); got {codes.min()}..{codes.max()}")
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint8)
    planes = (codes.astype(np.uint8)[:, None] >> shifts) & 1
    return np.packbits(planes.reshape(-1))


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` codes as int64."""
    planes = np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count * bits)
    weights = (1 << np.arange(bits - 1, -1, -1)).astype(np.int64)
    return planes.reshape(count, bits).astype(np.int64) @ weights


def pack_mask(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as a bitmap, one bit per element."""
    return np.packbits(np.asarray(mask, dtype=bool).reshape(-1))


def unpack_mask(bitmap: np.ndarray, count: int) -> np.ndarray:
    """Inverse of ``pack_mask``."""
    return np.unpackbits(np.asarray(bitmap, dtype=np.uint8), count=count).astype(bool)
