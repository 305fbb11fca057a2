"""Content keys: the 128-bit identity of one teacher input (role + exact text, prompt excluded).

A key is ``blake2b(role || 0x00 || utf-8 text, digest_size=16)``. The same passage arriving from
MS MARCO and from a hard-negative file is one key, hence one stored vector. Keys travel as numpy
``S16`` arrays: fixed 16 bytes, sortable and searchable with ``np.searchsorted`` (every key is exactly
16 bytes, so the trailing-NUL folding of ``S`` dtypes never merges two distinct keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "KEY_BYTES",
    "ROLES",
    "KeySet",
    "content_key",
    "content_keys",
    "key_hex",
    "key_slice",
    "keys_from_arrow",
    "keys_to_arrow",
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
    if isinstance(role, str):
        return np.frombuffer(_digests(role, texts), dtype=KEY_DTYPE)
    if len(role) != len(texts):
        raise ValueError(f"Got {len(role)} roles for {len(texts)} texts.")
    out = np.empty(len(texts), KEY_DTYPE)
    for r in set(role):
        at = [i for i, x in enumerate(role) if x == r]
        out[at] = np.frombuffer(_digests(r, [texts[i] for i in at]), dtype=KEY_DTYPE)
    return out


def _digests(role: str, texts: Sequence[str]) -> bytes:
    """The keys of ``texts`` in ``role``, concatenated (one hasher state copied per text: ~1 µs a passage)."""
    role_code(role)
    copy = hashlib.blake2b(role.encode() + b"\x00", digest_size=KEY_BYTES).copy

    def digest(text: str) -> bytes:
        h = copy()
        h.update(text.encode("utf-8"))
        return h.digest()

    return b"".join(map(digest, texts))


def key_hex(key: bytes | np.bytes_) -> str:
    """Hex form of one key (32 characters), padding the NULs that ``S16`` scalars drop."""
    return bytes(key).ljust(KEY_BYTES, b"\x00").hex()


def as_key_array(keys: Iterable[bytes] | np.ndarray) -> np.ndarray:
    """Any collection of 16-byte keys as a contiguous ``S16`` array.

    Shorter ones are NUL-padded (numpy hands out an ``S16`` element with its trailing NULs stripped); a longer
    one is no key of ddx's and is refused, never truncated (two such keys could collapse into one).
    """
    if isinstance(keys, np.ndarray) and keys.dtype == KEY_DTYPE:
        return np.ascontiguousarray(keys)
    parts = [bytes(k) for k in keys]
    if any(len(k) > KEY_BYTES for k in parts):
        n = next(len(k) for k in parts if len(k) > KEY_BYTES)
        raise ValueError(f"Content keys are {KEY_BYTES} bytes; got one of {n} bytes.")
    return np.frombuffer(b"".join(k.ljust(KEY_BYTES, b"\x00") for k in parts), dtype=KEY_DTYPE)


def keys_to_arrow(keys: np.ndarray | Iterable[bytes]) -> Any:  # -> pyarrow.FixedSizeBinaryArray
    """Keys as an Arrow ``fixed_size_binary(16)`` array: the one safe way into Arrow, zero-copy from ``S16``.

    Never ``pa.array(keys)``: Arrow reads an ``S16`` array as variable-length binary cut at the first NUL
    byte (numpy's ``S`` dtype marks the end of a string with NUL), so about 1 key in 20 comes back short or
    wrong (a Ray Data prototype silently wrote 18 of 350 keys wrong that way).

    Example:
        >>> keys_to_arrow(content_keys("passage", ["a"])).type
        FixedSizeBinaryType(fixed_size_binary[16])
    """
    import pyarrow as pa

    raw = as_key_array(keys)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), len(raw), [None, pa.py_buffer(raw.tobytes())])


def keys_from_arrow(column: Any) -> np.ndarray:
    """An Arrow column of keys (``fixed_size_binary(16)``, chunked or not, sliced or not) as an ``S16`` array.

    The bytes are taken from the array's data buffer, not through Python objects, so NUL bytes anywhere in
    a key survive. ``binary``/``large_binary`` columns are accepted when every value is exactly 16 bytes.

    Raises:
        ValueError: a null, a value that is not 16 bytes (the mark of ``pa.array`` on an ``S16`` array, which
            cuts keys at a NUL byte: build key columns with :func:`keys_to_arrow`), or a column of another type.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if array.null_count:
        raise ValueError(f"Key column holds {array.null_count} nulls; every row needs its 16-byte key.")
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        lengths = np.asarray(pc.binary_length(array).to_numpy(zero_copy_only=False))
        if len(lengths) and (lengths != KEY_BYTES).any():
            raise ValueError(
                f"Key column holds values of {int(lengths.min())}..{int(lengths.max())} bytes, not {KEY_BYTES}: "
                "was it built with pa.array() from an S16 array (which cuts keys at a NUL byte)? "
                "Use storage.keys.keys_to_arrow."
            )
        array = array.cast(pa.binary(KEY_BYTES))
    if not (pa.types.is_fixed_size_binary(array.type) and array.type.byte_width == KEY_BYTES):
        raise ValueError(f"Key column has type {array.type}; expected fixed_size_binary({KEY_BYTES}).")
    data = array.buffers()[1]
    start = array.offset * KEY_BYTES
    raw = np.frombuffer(data, dtype=np.uint8)[start : start + len(array) * KEY_BYTES] if data else np.empty(0, np.uint8)
    return raw.view(KEY_DTYPE).copy()


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
    """A growing set of 128-bit keys: an open-addressing hash table probed with numpy, one batch at a time.

    A key's home slot is its second half, mixed (splitmix64, so any keys spread evenly), modulo the table
    size. Probing is linear and vectorised: each numpy step examines the home
    slot, then windows of :data:`PROBE_WINDOW` slots, for every key of the batch still looking, so a
    batch costs a few numpy calls whatever the set's size, and adding or testing N keys costs O(N)
    overall. (The sorted array this replaced merged and re-sorted every key seen for each 8,192-text
    block: 21.6 CPU-s for 800 k keys, quadratic.) The table is 17 B a slot (two uint64 halves, a used
    flag) and grows 1.5× when 3/4 full, so it holds 23–34 B a key (10 M keys: 230–340 MB); a growth
    step briefly holds the old table and the new one.

    Example:
        >>> seen = KeySet()
        >>> seen.add_new(content_keys("passage", ["a", "b", "a"]))  # first occurrences of new keys
        array([ True,  True, False])
        >>> seen.contains(content_keys("passage", ["b", "c"]))
        array([ True, False])
    """

    _halves = 2  # uint64 words a key (a KeyTable may key by one)

    def __init__(self, keys: np.ndarray | None = None, capacity: int = 0) -> None:
        self._n = 0
        self.slots_probed = 0  # slots examined so far, growth included: the set's work, linear in the keys
        self._alloc(_table_size(capacity))
        if keys is not None:
            self.add(keys)

    def __len__(self) -> int:
        return self._n

    def add(self, keys: np.ndarray | Iterable[bytes]) -> None:
        """Add keys (duplicates, within the batch or with the set, are fine)."""
        self.add_new(keys)

    def add_new(self, keys: np.ndarray | Iterable[bytes]) -> np.ndarray:
        """Add keys; returns the boolean mask of those that were new (first occurrence within ``keys`` too)."""
        lo, hi = _halves(keys)
        self._reserve(len(lo))
        return self._probe(lo, hi, insert=True)[0]

    def contains(self, keys: np.ndarray | Iterable[bytes]) -> np.ndarray:
        """Boolean mask: which of ``keys`` are in the set."""
        lo, hi = _halves(keys)
        return self._probe(lo, hi, insert=False)[0]

    def array(self) -> np.ndarray:
        """All keys as an ``S16`` array, sorted (byte order, as ``np.sort`` orders ``S16``) and unique."""
        return np.sort(np.stack([self._lo[self._used], self._hi[self._used]], axis=1).view(KEY_DTYPE).ravel())

    @property
    def nbytes(self) -> int:
        """Bytes held by the table."""
        return self._lo.nbytes + self._hi.nbytes + self._used.nbytes

    def _alloc(self, size: int) -> None:
        self._size = size
        self._lo = np.zeros(size if self._halves == 2 else 0, np.uint64)
        self._hi = np.zeros(size, np.uint64)
        self._used = np.zeros(size, bool)

    def _reserve(self, n_more: int) -> None:
        """Grow before a batch could push the load past :data:`MAX_LOAD`."""
        if self._n + n_more > self._size * MAX_LOAD:
            self._grow(self._n + n_more)

    def _grow(self, n_keys: int) -> None:
        old_lo, old_hi, old_used = self._lo, self._hi, self._used
        self._n = 0
        self._alloc(_table_size(n_keys))
        step = 1 << 14  # slice by slice: no copy of every key, and few keys contending for one slot at a time
        for s in range(0, len(old_used), step):
            at = s + np.flatnonzero(old_used[s : s + step])
            lo = old_lo[at] if self._halves == 2 else old_hi[at]
            self._moved(at, self._probe(lo, old_hi[at], insert=True)[1])

    def _moved(self, old_slots: np.ndarray, new_slots: np.ndarray) -> None:
        """Growth hook: the keys at ``old_slots`` of the previous table now sit at ``new_slots``."""

    def _probe(self, lo: np.ndarray, hi: np.ndarray, insert: bool) -> tuple[np.ndarray, np.ndarray]:
        """``(mask, slot)`` of the keys ``(lo, hi)``: the mask says found (``insert=False``) or new
        (``insert=True``); ``slot`` is where each key sits (-1: absent)."""
        out = np.zeros(len(lo), bool)
        where = np.full(len(lo), -1, np.int64)
        todo = np.arange(len(lo))
        pos = (_spread(hi) % np.uint64(self._size)).astype(np.int64)
        width = 1  # most keys stop at their home slot: look there alone first, then a window at a time
        while len(todo):
            slots = pos[:, None] + _WINDOW[:width]
            slots[slots >= self._size] -= self._size  # wrap around the table's end
            used = self._used[slots]
            self.slots_probed += slots.size
            same = used & (self._hi[slots] == hi[todo, None])
            if self._halves == 2:
                same &= self._lo[slots] == lo[todo, None]
            stop = same | ~used  # probing stops at the key or at the first empty slot
            if width == 1:
                stopped, at, found = stop[:, 0], slots[:, 0], same[:, 0]
            else:
                row, col = np.arange(len(todo)), stop.argmax(axis=1)
                stopped, at = stop[row, col], slots[row, col]
                found = stopped & same[row, col]
            where[todo[found]] = at[found]
            retry = np.zeros(len(todo), bool)
            if insert:
                retry = self._claim(todo, at, stopped & ~found, lo, hi, out, where)
            else:
                out[todo[found]] = True
            keep = ~stopped | retry
            pos = np.where(stopped, at, pos + width)[keep]
            pos[pos >= self._size] -= self._size
            todo = todo[keep]
            width = PROBE_WINDOW
        return out, where

    def _claim(
        self,
        todo: np.ndarray,
        slot: np.ndarray,
        empty: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
        new: np.ndarray,
        where: np.ndarray,
    ) -> np.ndarray:
        """Write keys into the empty slots they stopped at; the first key of the batch wins a contested slot.

        Returns the mask (over ``todo``) of the keys that lost a slot and probe again from it: a loser
        equal to the winner then finds it (a repeat within the batch), any other goes on past it.
        """
        cand = np.flatnonzero(empty)
        if not len(cand):
            return empty
        # The empty slots serve as scratch: each keeps the smallest candidate number written to it (ufunc.at
        # applies every write, repeats included), so the first key of the batch wins its slot.
        at, number = slot[cand], cand.astype(np.uint64)
        self._hi[at] = np.uint64(len(todo))
        np.minimum.at(self._hi, at, number)
        win = cand[self._hi[at] == number]
        keys = todo[win]
        self._hi[slot[win]], self._used[slot[win]] = hi[keys], True
        if self._halves == 2:
            self._lo[slot[win]] = lo[keys]
        new[keys], where[keys] = True, slot[win]
        self._n += len(win)
        retry = empty.copy()
        retry[win] = False
        return retry


class KeyTable(KeySet):
    """A :class:`KeySet` whose keys each keep a row of ``width`` int64 values: those given when the key was new.

    Keys are one or two uint64 words (``halves``), so any 64- or 128-bit identity fits (precompute's id
    ledger keys ids by a 64-bit hash and keeps a text hash and an origin per id). A slot is
    ``1 + 8 × (halves + width)`` bytes.

    Example:
        >>> table = KeyTable(width=1, halves=1)
        >>> new, kept = table.insert(np.array([5, 6, 5], np.uint64), np.array([[10], [20], [30]]))
        >>> new.tolist(), kept[:, 0].tolist()  # a repeat keeps the first value
        ([True, True, False], [10, 20, 10])
    """

    def __init__(self, width: int, halves: int = 2, capacity: int = 0) -> None:
        if halves not in (1, 2):
            raise ValueError(f"A key is 1 or 2 uint64 words, got halves={halves}.")
        self.width, self._halves = width, halves
        super().__init__(capacity=capacity)

    def insert(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add ``keys`` (uint64 ``[n]`` for one word, ``[n, 2]`` for two) with their ``values`` (``[n, width]``).

        Returns:
            ``(new, stored)``: which keys were new (first occurrence within the batch too), and the
            values each key holds now (a repeat gets its first occurrence's values).
        """
        words = np.asarray(keys, np.uint64).reshape(len(keys), self._halves)
        self._reserve(len(words))
        new, where = self._probe(words[:, 0], words[:, -1], insert=True)
        self._values[where[new]] = values[new]
        return new, self._values[where]

    @property
    def nbytes(self) -> int:
        return super().nbytes + self._values.nbytes

    def _alloc(self, size: int) -> None:
        super()._alloc(size)
        self._old_values, self._values = getattr(self, "_values", None), np.zeros((size, self.width), np.int64)

    def _moved(self, old_slots: np.ndarray, new_slots: np.ndarray) -> None:
        assert self._old_values is not None
        self._values[new_slots] = self._old_values[old_slots]

    def _grow(self, n_keys: int) -> None:
        super()._grow(n_keys)
        self._old_values = None


PROBE_WINDOW = 8  # slots examined per numpy step: a key's probe sequence is ~3 slots at load 3/4, rarely past 8
_WINDOW = np.arange(PROBE_WINDOW)
MAX_LOAD = 0.75  # grow beyond this: linear probing stays short below it
GROWN_LOAD = 0.5  # load right after growing (1.5× the size)


def _spread(words: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: home slots spread evenly even for keys that are not uniform (small ints)."""
    with np.errstate(over="ignore"):
        z = (words ^ (words >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _table_size(n_keys: int) -> int:
    return max(1024, int(n_keys / GROWN_LOAD) + 1)


def _halves(keys: np.ndarray | Iterable[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The two native-endian uint64 halves (first 8 bytes, last 8 bytes) of each key."""
    pairs = as_key_array(keys).view(np.uint64).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def first_occurrence(keys: np.ndarray) -> np.ndarray:
    """Boolean mask keeping the first occurrence of each key, in input order (a hash table: O(n))."""
    return KeySet(capacity=len(keys)).add_new(keys)


def repeated(keys: np.ndarray) -> int:
    """How many of ``keys`` repeat an earlier one (``len(keys)`` minus the distinct keys).

    Sorts the first 8 bytes of each key as ``uint64`` (numpy's radix-friendly sort: ~0.05 s at 4 M keys,
    where ``np.unique`` of ``S16`` takes ~6 s), then compares whole keys only among those whose first
    halves repeat — few for content hashes, all of them at worst, and the count is exact either way.
    """
    keys = as_key_array(keys)
    if len(keys) < 2:
        return 0
    hi, _ = _halves(keys)
    s = np.sort(hi)
    twice = np.unique(s[1:][s[1:] == s[:-1]])
    if not len(twice):
        return 0
    sub = keys[np.isin(hi, twice)]
    return len(sub) - len(np.unique(sub))
