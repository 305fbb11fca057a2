"""Once-per-id streaming: remember which ids a source has yielded, with numpy in a hash table.

A source must yield each id once, and the same id with two different texts is bad input that the
error message locates at both places. Remembering that for MS MARCO's 8.8 M passages in a Python
dict of ``id -> (text, origin)`` costs over 1 GB; the ledger keeps, per id, Python's 64-bit hash of
(role, id) as the key and two int64 (a hash of the text, the packed origin) in a
:class:`storage.keys.KeyTable`: 25 B a slot, 33–50 B an id (8.8 M ids: ~0.4 GB), looked up and filled a
block at a time by vectorised probing, so admitting N records is O(N) (the sorted arrays this
replaced took an ``np.insert`` of every id per flush).

Hashes are Python's string hashes (stable within a process, which is all a ledger lives): two distinct
ids collide with probability ~n²/2^65, about 2e-6 for all of MS MARCO (reported as a duplicate id
naming both lines).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice

import numpy as np

from storage.keys import KeyTable

from .base import LineOrigins, Origins, Source, TextBlock, TextRecord

__all__ = ["IdLedger", "unique_records"]

_ORIGIN = re.compile(r"^(.*?)(\d+)(\D*)$", re.DOTALL)  # "file:LINE", "name[split]:ROW", "file[row ROW]"
_NUMBER_BITS = 40
CHUNK = 4096  # records looked up per vectorised search
DUPLICATE_FIX = "Ids must name one text within a source; fix the ids or drop one of the rows."


class IdLedger:
    """Ids seen so far (per role), each with its text hash and first origin.

    Example:
        >>> ledger = IdLedger()
        >>> [r.id for r in ledger.admit([TextRecord("1", "a", "passage", "f:1"),
        ...                               TextRecord("1", "a", "passage", "f:5")], source)]
        ['1']
    """

    def __init__(self) -> None:
        self._table = KeyTable(width=2, halves=1)  # key: hash of (role, id); values: text hash, origin code
        self._places: list[tuple[str, str]] = []
        self._place_index: dict[tuple[str, str], int] = {}
        self._last: tuple[str, int] = ("", -1)  # (head, place index) of the last "head:NUMBER" origin

    def __len__(self) -> int:
        return len(self._table)

    def admit(self, records: list[TextRecord], source: Source) -> Iterator[TextRecord]:
        """The records of ``records`` whose id is new for their role, in order.

        A repeat with the same text is dropped; with another text it goes to ``source.reject``.

        Raises:
            BadSourceError: an id seen before with a different text (unless skip_bad).
        """
        origins = [r.origin for r in records]
        new, first = self._check([r.role for r in records], [r.id for r in records], [r.text for r in records], origins)
        for i, record in enumerate(records):
            if new[i]:
                yield record
            elif first[i] >= 0:
                self._reject(source, record.id, int(first[i]), record.origin)

    def admit_block(
        self, block: TextBlock, source: Source, bad: Sequence[tuple[int, str, str, str]] = ()
    ) -> Iterator[TextBlock]:
        """The rows of ``block`` whose id is new, as blocks; repeats with another text go to ``source.reject``.

        Args:
            block: rows of one role, in file order.
            source: receives the rejects.
            bad: ``(row, origin, reason, fix)`` of lines the reader rejected, ``row`` being the number of
                block rows before the line (:class:`.tab_lines.LineRejects`); rejected here, in file
                order with the ledger's own.

        Raises:
            BadSourceError: the first reject, once the rows before it are yielded (unless skip_bad).
        """
        new, first = self._check([block.role] * len(block), block.ids, block.texts, block.origins)
        events = sorted(
            [(row, 0, origin, reason, fix) for row, origin, reason, fix in bad]
            + [(int(row), 1, "", "", "") for row in np.flatnonzero(first >= 0)]
        )
        start = 0
        for row, kind, origin, reason, fix in events:
            if not source.options.skip_bad and row > start:
                yield from _nonempty(block.take(start + np.flatnonzero(new[start:row])))
                start = row
            if kind == 0:
                source.reject(origin, reason, fix)
            else:
                self._reject(source, block.ids[row], int(first[row]), block.origins[row])
        yield from _nonempty(block.take(start + np.flatnonzero(new[start:])))

    def _check(
        self, roles: Sequence[str], ids: Sequence[str], texts: Sequence[str], origins: Origins
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(new, first)``: which rows hold a new id, and for a repeat with another text the first origin code
        (-1 elsewhere)."""
        keys = np.array([hash((r, i)) for r, i in zip(roles, ids, strict=True)], np.int64).view(np.uint64)
        text_hash = np.array([hash(t) for t in texts], np.int64)
        new, stored = self._table.insert(keys, np.stack([text_hash, self._codes(origins)], axis=1))
        first = np.where(~new & (stored[:, 0] != text_hash), stored[:, 1], -1)
        return new, first

    def _reject(self, source: Source, rid: str, first: int, origin: str) -> None:
        where = self._decode(first)
        source.reject(origin, f"duplicate id {rid!r} with different texts at {where} and {origin}", DUPLICATE_FIX)

    def _codes(self, origins: Origins) -> np.ndarray:
        if isinstance(origins, LineOrigins):
            return (self._place((origins.path + ":", "")) << _NUMBER_BITS) | (origins.lines.astype(np.int64) + 1)
        return np.array([self._encode(o) for o in origins], np.int64)

    def _encode(self, origin: str) -> int:
        head, sep, tail = origin.rpartition(":")
        if sep and tail.isdigit() and len(tail) < 12:  # "path:LINE", "name[split]:ROW": the common, fast case
            if head != self._last[0]:
                self._last = (head, self._place((head + sep, "")))
            return (self._last[1] << _NUMBER_BITS) | (int(tail) + 1)
        m = _ORIGIN.match(origin)
        if m is None or len(m.group(2)) >= 12:
            return self._place((origin, "")) << _NUMBER_BITS
        return (self._place((m.group(1), m.group(3))) << _NUMBER_BITS) | (int(m.group(2)) + 1)

    def _place(self, place: tuple[str, str]) -> int:
        index = self._place_index.get(place)
        if index is None:
            index = self._place_index[place] = len(self._places)
            self._places.append(place)
        return index

    def _decode(self, code: int) -> str:
        prefix, suffix = self._places[code >> _NUMBER_BITS]
        number = code & ((1 << _NUMBER_BITS) - 1)
        return f"{prefix}{number - 1}{suffix}" if number else prefix


def _nonempty(block: TextBlock) -> Iterator[TextBlock]:
    if len(block):
        yield block


def unique_records(records: Iterable[TextRecord], source: Source, role: str | None = None) -> Iterator[TextRecord]:
    """``records`` of ``role`` (all when None), each id once; conflicting repeats go to ``source.reject``.

    Args:
        records: the raw stream of a source, possibly repeating ids.
        source: receives rejects (and counts them under skip_bad).
        role: keep only this role; None keeps both.

    Returns:
        A generator: nothing is read until it is iterated; records come in chunks of ``CHUNK``.
    """
    ledger = IdLedger()
    wanted = (r for r in records if role is None or r.role == role)
    while chunk := list(islice(wanted, CHUNK)):
        yield from ledger.admit(chunk, source)
