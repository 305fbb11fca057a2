"""Key → row lookup across committed segments, and the fast batched row gather.

``KeyIndex`` holds every committed key once, sorted, as an ``S16`` array beside its global row id
(segment offset + row): 28 bytes a key, so 10 M keys cost ~280 MB and a lookup is a binary search.
A key stored twice (two writers raced on the same text) resolves to the first segment in id order;
the duplicates are counted, never an error: both rows hold the same teacher's vector.

``RowGather`` serves random rows from chunk memory maps: rows are grouped by chunk and copied with
``np.take(..., mode="clip", out=...)`` (the default ``mode="raise"`` is ~2× slower), then scattered
back into request order. DESIGN.md has the measurements behind this choice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from storage.keys import KEY_DTYPE, as_key_array

__all__ = ["KeyIndex", "RowGather"]


class KeyIndex:
    """Sorted unique keys with their global rows, roles and token counts."""

    def __init__(self, keys: np.ndarray, gids: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray,
                 duplicates: int = 0) -> None:
        self.keys, self.gids, self.roles, self.n_tokens = keys, gids, roles, n_tokens
        self.duplicates = duplicates

    @classmethod
    def build(cls, parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> KeyIndex:
        """From (keys, global rows, roles, n_tokens) per segment, in segment order (first wins)."""
        if not parts:
            return cls(np.empty(0, KEY_DTYPE), np.empty(0, np.int64), np.empty(0, np.uint8), np.empty(0, np.int32))
        keys, gids, roles, ntok = (np.concatenate([p[i] for p in parts]) for i in range(4))
        sorted_keys, first = np.unique(keys, return_index=True)
        return cls(sorted_keys, gids[first], roles[first], ntok[first], duplicates=len(keys) - len(sorted_keys))

    def __len__(self) -> int:
        return len(self.keys)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Index into the sorted arrays for each key, -1 where absent."""
        keys = as_key_array(keys)
        if len(self.keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self.keys, keys)
        pos[pos == len(self.keys)] = 0
        return np.where(self.keys[pos] == keys, pos, -1).astype(np.int64)

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Global row of each key, -1 where the store has no vector for it."""
        pos = self.positions(keys)
        if len(self.gids) == 0:
            return pos
        return np.where(pos >= 0, self.gids[np.maximum(pos, 0)], -1)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        return self.positions(keys) >= 0


class RowGather:
    """Batched random row reads over many chunks.

    Args:
        chunk_starts: global row of each chunk's first row, increasing.
        chunk_loader: returns chunk ``i`` as an array (a memory map for local stores).
        dim, dtype: row shape and storage dtype.
    """

    def __init__(self, chunk_starts: np.ndarray, chunk_loader: Callable[[int], np.ndarray], dim: int,
                 dtype: np.dtype) -> None:
        self.chunk_starts = np.asarray(chunk_starts, dtype=np.int64)
        self._load = chunk_loader
        self._chunks: list[np.ndarray | None] = [None] * len(self.chunk_starts)
        self.dim, self.dtype = dim, np.dtype(dtype)

    def _chunk(self, i: int) -> np.ndarray:
        arr = self._chunks[i]
        if arr is None:
            arr = self._chunks[i] = self._load(i)
        return arr

    def gather(self, gids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``gids`` (global ids) in request order, in the storage dtype unless ``out`` says otherwise."""
        gids = np.asarray(gids, dtype=np.int64)
        n = len(gids)
        if out is None:
            out = np.empty((n, self.dim), dtype=self.dtype)
        if n == 0:
            return out
        ci = np.searchsorted(self.chunk_starts, gids, side="right") - 1
        local = gids - self.chunk_starts[ci]
        if ci[0] == ci[-1] and (ci == ci[0]).all():
            _take(self._chunk(int(ci[0])), local, out)
            return out
        order = np.argsort(ci, kind="stable")
        ci_sorted, local_sorted = ci[order], local[order]
        cuts = np.flatnonzero(np.diff(ci_sorted)) + 1
        buf = np.empty((n, self.dim), dtype=self.dtype)
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, n], strict=True):
            np.take(self._chunk(int(ci_sorted[s])), local_sorted[s:e], axis=0, mode="clip", out=buf[s:e])
        out[order] = buf
        return out


def _take(chunk: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    if out.dtype == chunk.dtype:
        np.take(chunk, rows, axis=0, mode="clip", out=out)
    else:
        out[:] = np.take(chunk, rows, axis=0, mode="clip")
