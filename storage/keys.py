"""Content keys: the 128-bit identity of one teacher input (role + exact text, prompt excluded).

A key is ``blake2b(role || 0x00 || utf-8 text, digest_size=16)``. The same passage arriving from
MS MARCO and from a hard-negative file is one key, hence one stored vector. Keys travel as numpy
``S16`` arrays: fixed 16 bytes, sortable and searchable with ``np.searchsorted`` (every key is exactly
16 bytes, so the trailing-NUL folding of ``S`` dtypes never merges two distinct keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = [
    "KEY_BYTES",
    "ROLES",
    "KeySet",
    "content_key",
    "content_keys",
    "key_from_hex",
    "key_hex",
    "key_slice",
    "role_code",
]

KEY_BYTES = 16
ROLES: tuple[str, ...] = ("passage", "query")  # index position = role code stored in the key index
KEY_DTYPE = np.dtype("S16")


def role_code(role: str) -> int:
    """Small integer stored in the index for ``role`` ('passage' → 0, 'query' → 1)."""
    try:
        return ROLES.index(role)
    except ValueError:
        raise ValueError(f"Unknown role {role!r}; expected one of {ROLES}.") from None


def content_key(role: str, text: str) -> bytes:
    """The 16-byte key of ``text`` fed to the teacher in ``role`` (prompt not included)."""
    role_code(role)
    h = hashlib.blake2b(role.encode() + b"\x00", digest_size=KEY_BYTES)
    h.update(text.encode("utf-8"))
    return h.digest()


def content_keys(role: str | Sequence[str], texts: Sequence[str]) -> np.ndarray:
    """Keys of many texts as an ``S16`` array; ``role`` is one role or one per text."""
    roles = [role] * len(texts) if isinstance(role, str) else role
    if len(roles) != len(texts):
        raise ValueError(f"Got {len(roles)} roles for {len(texts)} texts.")
    prefixes = {r: hashlib.blake2b(r.encode() + b"\x00", digest_size=KEY_BYTES) for r in set(roles)}
    for r in prefixes:
        role_code(r)
    out = bytearray(KEY_BYTES * len(texts))
    for i, (r, t) in enumerate(zip(roles, texts, strict=True)):
        h = prefixes[r].copy()
        h.update(t.encode("utf-8"))
        out[i * KEY_BYTES : (i + 1) * KEY_BYTES] = h.digest()
    return np.frombuffer(bytes(out), dtype=KEY_DTYPE)


def key_hex(key: bytes | np.bytes_) -> str:
    """Hex form of one key (32 characters), padding the NULs that ``S16`` scalars drop."""
    return bytes(key).ljust(KEY_BYTES, b"\x00").hex()


def key_from_hex(text: str) -> bytes:
    """Inverse of :func:`key_hex`."""
    raw = bytes.fromhex(text)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"A key is {KEY_BYTES} bytes ({2 * KEY_BYTES} hex digits); got {text!r}.")
    return raw


def as_key_array(keys: Iterable[bytes] | np.ndarray) -> np.ndarray:
    """Any collection of 16-byte keys as a contiguous ``S16`` array."""
    if isinstance(keys, np.ndarray) and keys.dtype == KEY_DTYPE:
        return np.ascontiguousarray(keys)
    blob = b"".join(bytes(k).ljust(KEY_BYTES, b"\x00") for k in keys)
    return np.frombuffer(blob, dtype=KEY_DTYPE)


def key_slice(keys: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Boolean mask of the keys rank ``rank`` of ``world_size`` owns (first 8 bytes mod world size).

    The split depends on the key alone, so every rank agrees on it without talking to the others
    and a rerun with the same world size gives every rank the same slice.
    """
    if world_size == 1:
        return np.ones(len(keys), dtype=bool)
    head = np.frombuffer(as_key_array(keys).tobytes(), dtype=">u8")[::2]  # S16 even when keys end in NULs
    return (head % np.uint64(world_size)) == np.uint64(rank)


class KeySet:
    """A growing set of keys held as one sorted ``S16`` array (16 bytes a key, no Python objects).

    Adds are buffered and merged in bulk, so building a set of N keys costs O(N log N) overall and
    memory stays at the key bytes: 10 M keys are 160 MB, where a Python ``set`` of bytes is ~1 GB.
    """

    def __init__(self, keys: np.ndarray | None = None) -> None:
        self._sorted = np.unique(as_key_array(keys)) if keys is not None else np.empty(0, KEY_DTYPE)
        self._pending: list[np.ndarray] = []
        self._pending_n = 0

    def __len__(self) -> int:
        self._merge()
        return len(self._sorted)

    def add(self, keys: np.ndarray) -> None:
        """Add keys (duplicates are fine)."""
        self._pending.append(as_key_array(keys))
        self._pending_n += len(keys)
        if self._pending_n > max(65536, len(self._sorted) // 4):
            self._merge()

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Boolean mask: which of ``keys`` are in the set."""
        self._merge()
        return sorted_contains(self._sorted, as_key_array(keys))

    def array(self) -> np.ndarray:
        """All keys, sorted and unique."""
        self._merge()
        return self._sorted

    def _merge(self) -> None:
        if self._pending:
            self._sorted = np.unique(np.concatenate([self._sorted, *self._pending]))
            self._pending, self._pending_n = [], 0


def sorted_contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Membership of ``keys`` in the sorted array ``sorted_keys`` by binary search."""
    if len(sorted_keys) == 0 or len(keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos == len(sorted_keys)] = 0
    return sorted_keys[pos] == keys


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the first occurrence of each key, in input order."""
    _, first = np.unique(keys, return_index=True)
    mask = np.zeros(len(keys), dtype=bool)
    mask[first] = True
    return mask
