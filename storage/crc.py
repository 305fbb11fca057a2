"""CRC32C algebra: combine checksums of pieces into the checksum of their concatenation, vectorised.

CRC32C (finalised, as ``google_crc32c.value`` returns it) is linear under concatenation:
``crc(A ‖ B) = shift(crc(A), len(B)) ^ crc(B)``, where ``shift(c, n)`` multiplies ``c`` by x^(8n) modulo the
polynomial — a linear map on 32-bit values (zlib's ``crc32_combine`` is the same algebra for CRC-32).
The map for one ``n`` is a 32×32 matrix over GF(2), applied here through four 256-entry byte tables, so a
whole array of checksums is shifted with four numpy lookups.

``ddx cache verify`` uses this to check a chunk with **one** pass over its bytes: it takes the CRC32C of
each row once, and derives from those both every row's CRC32C(key ‖ row) (``shift(crc(key), row bytes)
^ crc(row)``) and the chunk's CRC32C (a balanced tree of combines). Checking both the old way read every
byte twice through the CRC.
"""

from __future__ import annotations

import functools

import google_crc32c
import numpy as np

POLY = 0x82F63B78  # CRC32C (Castagnoli), reflected


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _byte_table()


def _apply(cols: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The linear map whose images of the 32 unit vectors are ``cols``, applied to each value of ``v``."""
    out = np.zeros(v.shape, dtype=np.uint32)
    for j in range(32):
        out ^= np.where((v >> np.uint32(j)) & np.uint32(1), cols[j], np.uint32(0)).astype(np.uint32)
    return out


def _compose(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Columns of a ∘ b."""
    return _apply(a, b)


@functools.lru_cache(maxsize=64)
def _shift_columns(n: int) -> np.ndarray:
    """Columns of the map c ↦ shift(c, n) (``n`` zero bytes appended to the CRC register)."""
    units = np.uint32(1) << np.arange(32, dtype=np.uint32)
    one = (units >> np.uint32(8)) ^ _TABLE[units & np.uint32(0xFF)]  # one zero byte
    result = units.copy()  # identity
    power = one
    while n:
        if n & 1:
            result = _compose(power, result)
        n >>= 1
        if n:
            power = _compose(power, power)
    return result


@functools.lru_cache(maxsize=64)
def shift_tables(n: int) -> np.ndarray:
    """Four 256-entry tables; ``shift(c, n)`` = T0[c & 255] ^ T1[(c >> 8) & 255] ^ T2[(c >> 16) & 255] ^ T3[c >> 24]."""
    cols = _shift_columns(n)
    b = np.arange(256, dtype=np.uint32)
    return np.stack([_apply(cols, b << np.uint32(8 * k)) for k in range(4)])


def shift(crcs: np.ndarray, n: int) -> np.ndarray:
    """``shift(c, n)`` of every value of ``crcs`` (uint32): the CRC of ``A`` carried past ``n`` more bytes."""
    t = shift_tables(n)
    c = np.asarray(crcs, dtype=np.uint32)
    return t[0][c & 0xFF] ^ t[1][(c >> 8) & 0xFF] ^ t[2][(c >> 16) & 0xFF] ^ t[3][c >> 24]


def combine(a: int, b: int, len_b: int) -> int:
    """CRC32C of ``A ‖ B`` from ``crc(A)``, ``crc(B)`` and ``len(B)``."""
    return int(shift(np.array([a], dtype=np.uint32), len_b)[0]) ^ b


def piece_crcs(pieces: np.ndarray) -> np.ndarray:
    """CRC32C of each row of a 2-D uint8 array (one C call a row)."""
    return np.fromiter(map(google_crc32c.value, pieces), dtype=np.uint32, count=len(pieces))


def concat_crc(crcs: np.ndarray, piece_bytes: int) -> int:
    """CRC32C of the concatenation of ``len(crcs)`` pieces of ``piece_bytes`` bytes each, given theirs.

    A balanced tree: level k combines neighbours of 2^k pieces with one vectorised shift; a leftover odd
    piece waits for the next level, where its (shorter) length is handled by one scalar combine.
    """
    if len(crcs) == 0:
        return 0
    c = np.asarray(crcs, dtype=np.uint32)
    width = piece_bytes
    tail: tuple[int, int] | None = None  # (crc, bytes) of the pieces after the tree's part, in order
    while len(c) > 1:
        if len(c) % 2:
            last = int(c[-1])
            tail = (last, width) if tail is None else (combine(last, tail[0], tail[1]), width + tail[1])
            c = c[:-1]
        c = shift(c[0::2], width) ^ c[1::2]
        width *= 2
    out = int(c[0])
    return out if tail is None else combine(out, tail[0], tail[1])
