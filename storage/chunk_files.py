"""A small, bounded set of open chunk files for random row reads with ``pread``.

A gather from a store larger than RAM must not read more than it returns. Memory maps cannot promise
that: each page fault on a map pulls a read-ahead window (~730x the bytes asked for at 7 KiB rows,
245-380 rows/s cold; ``bench/store_scale.py``). A row sits at a fixed offset of its chunk file
(``row * row_bytes``), so a gather reads each row straight into the output with one ``preadv``, from
a descriptor opened with ``POSIX_FADV_RANDOM`` (no read-ahead). Descriptors stay open in an LRU of
``max_open`` (a store of 10 M rows has ~2,400 chunk files); nothing is mapped, so nothing grows with
the store. ``pread`` takes no file position, so forked DataLoader workers can share descriptors.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["ChunkFiles"]

MAX_OPEN = 64


class ChunkFiles:
    """Open descriptors of chunk files, at most ``max_open``, least recently used closed first.

    Args:
        opener: opens chunk ``i`` and returns its descriptor (checks its size; raises on damage).
        max_open: descriptors kept open.
    """

    def __init__(self, opener: Callable[[int], int], max_open: int = MAX_OPEN) -> None:
        self._open = opener
        self._fds: OrderedDict[int, int] = OrderedDict()
        self.max_open = max_open
        self.opened = 0  # files opened so far (tests count them)

    def fd(self, i: int) -> int:
        """Descriptor of chunk ``i``, opened on first use."""
        return self.fds([i])[i]

    def fds(self, chunks: list[int]) -> dict[int, int]:
        """Descriptors of ``chunks``, opened as needed; only others are closed to keep ``max_open``.

        A batch's descriptors are all taken here, before its reads start (possibly in threads), so
        none of them is closed (and its number reused) while a read still uses it.
        """
        out = {}
        for i in chunks:
            fd = self._fds.get(i)
            if fd is None:
                fd = self._fds[i] = self._open(i)
                self.opened += 1
            else:
                self._fds.move_to_end(i)
            out[i] = fd
        while len(self._fds) > max(self.max_open, len(out)):  # the oldest are not this batch's
            os.close(self._fds.popitem(last=False)[1])
        return out

    def __len__(self) -> int:
        return len(self._fds)

    def close(self) -> None:
        """Close every descriptor."""
        while self._fds:
            os.close(self._fds.popitem()[1])

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()
