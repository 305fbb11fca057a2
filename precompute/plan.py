"""Which texts a precompute encodes: the plan both engines follow (local/torchrun, and Ray Data).

Two streaming passes over the sources keep memory at the keys whatever the corpus size:

1. :func:`scan_keys` reads every text, computes its content key, drops keys seen before (within and across
   sources) and keys the store already holds, and keeps one rank's slice: the sorted keys to encode, 16 bytes a
   text. Bad input stops the run here, before any teacher time is spent.
2. :func:`iter_todo` reads again and yields the records of those keys, each once, in reading order.

:func:`plan_texts` runs both and returns the texts as an Arrow table, for an engine that ships the work to other
processes (:mod:`precompute.ray_engine` hands it to ``ray.data.from_arrow``). Keys enter Arrow as
``fixed_size_binary(16)`` through :func:`storage.keys.keys_to_arrow`: ``pa.array`` of an ``S16`` array cuts a key
at its first NUL byte (about 1 key in 20), which silently wrote wrong keys in a prototype.

Example:
    >>> store = TeacherStore.open_or_create(config.store, spec_from_files(config.teacher))  # doctest: +SKIP
    >>> plan = plan_texts(config, store)                                                     # doctest: +SKIP
    >>> plan.table.schema                                                                    # doctest: +SKIP
    key: fixed_size_binary[16]
    role: string
    text: large_string
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from precompute.config import PrecomputeConfig
from precompute.sources import Source, SourceOptions, TextRecord, parse_source
from precompute.sources.errors import BadSourceError
from storage.keys import KEY_BYTES, KEY_DTYPE, KeySet, content_keys, first_occurrence, key_slice, keys_to_arrow
from storage.store import TeacherStore

__all__ = [
    "PLAN_SCHEMA",
    "KeyPlan",
    "ScanCounts",
    "TextPlan",
    "iter_todo",
    "open_sources",
    "plan_texts",
    "scan_keys",
]

SCAN_BLOCK = 8192  # records hashed per numpy call
PLAN_SCHEMA = pa.schema([("key", pa.binary(KEY_BYTES)), ("role", pa.string()), ("text", pa.large_string())])


@dataclass
class ScanCounts:
    """What pass 1 saw: per source, and in all (the run summary's counts)."""

    sources: list[dict[str, Any]] = field(default_factory=list)  # spec, queries, passages, skipped_bad
    texts_read: int = 0
    unique_texts: int = 0
    already_stored: int = 0
    other_ranks: int = 0
    skipped_bad: int = 0


@dataclass
class KeyPlan:
    """Pass 1's result: the sorted ``S16`` keys this rank encodes, and the counts."""

    keys: np.ndarray
    counts: ScanCounts


@dataclass
class TextPlan:
    """The texts to encode as an Arrow table (:data:`PLAN_SCHEMA`: one row per key, in reading order)."""

    table: pa.Table
    counts: ScanCounts

    def __len__(self) -> int:
        return self.table.num_rows


def open_sources(config: PrecomputeConfig) -> list[Source]:
    """The sources of ``config.data``, with its reading options.

    Raises:
        BadSourceError: a source spec is unknown, or its files are missing.
    """
    options = SourceOptions(skip_bad=config.skip_bad, title_join=config.title_join)
    return [parse_source(s, options) for s in config.data]


def scan_keys(
    sources: list[Source],
    store: TeacherStore,
    *,
    roles: tuple[str, ...],
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> KeyPlan:
    """Pass 1: the sorted keys of ``sources`` (texts of ``roles``) that the store lacks, this rank's slice.

    A key is kept once, however many sources hold its text; ``limit`` keeps the first that many (a dry run).

    Raises:
        BadSourceError: a record is malformed or a text is empty (nothing is encoded or written).
    """
    seen, counts = KeySet(), ScanCounts()
    todo_parts: list[np.ndarray] = []
    counts.sources = [{"spec": s.spec, "queries": 0, "passages": 0} for s in sources]
    for i, role, keys in _key_blocks(sources, roles):
        counts.sources[i]["queries" if role == "query" else "passages"] += len(keys)
        counts.texts_read += len(keys)
        keys = keys[seen.add_new(keys)]  # first occurrences of keys not seen before: O(block), whatever was seen
        counts.unique_texts += len(keys)
        stored = store.contains(keys)
        counts.already_stored += int(stored.sum())
        keys = keys[~stored]
        mine = key_slice(keys, rank, world_size)
        counts.other_ranks += int((~mine).sum())
        todo_parts.append(keys[mine])
    for i, s in enumerate(sources):
        counts.sources[i]["skipped_bad"] = len(s.bad)
        counts.skipped_bad += len(s.bad)
    todo = np.concatenate(todo_parts) if todo_parts else np.empty(0, KEY_DTYPE)
    if limit is not None:
        todo = todo[:limit]
    return KeyPlan(np.sort(todo), counts)


def iter_todo(
    sources: list[Source], todo: np.ndarray, roles: tuple[str, ...]
) -> Iterator[tuple[np.ndarray, list[TextRecord]]]:
    """Pass 2: (keys, records) per block of the sources, keeping the records whose key is in ``todo`` (sorted), each
    key once, in reading order. Warns at the end when texts of ``todo`` were not found again (a file changed)."""
    done = np.zeros(len(todo), dtype=bool)
    if not len(todo):
        return
    for _, block in _iter_blocks(sources, roles):
        keys = content_keys([r.role for r in block], [r.text for r in block])
        pos = np.minimum(np.searchsorted(todo, keys), len(todo) - 1)
        hit = (todo[pos] == keys) & ~done[pos] & first_occurrence(keys)
        done[pos[hit]] = True
        at = np.flatnonzero(hit)
        if len(at):
            yield keys[at], [block[j] for j in at]
    if not done.all():
        warnings.warn(
            f"{int((~done).sum())} texts found in the first pass were gone in the second "
            "(did a source file change during the run?); rerun to encode them.",
            stacklevel=2,
        )


def plan_texts(
    config: PrecomputeConfig,
    store: TeacherStore,
    *,
    sources: list[Source] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> TextPlan:
    """Both passes: the texts of ``config.data`` the store lacks, as an Arrow table of :data:`PLAN_SCHEMA`.

    Args:
        config: the data, roles, limit and reading options (``config.rank``/``world_size`` are not read: pass
            ``rank``/``world_size`` to plan a slice).
        store: the store whose keys are skipped.
        sources: already opened sources; opened from ``config.data`` when None.

    Returns:
        The plan: ``table`` (key ``fixed_size_binary(16)``, role, text; every key once) and the pass-1 counts.
        Read its keys back with :func:`storage.keys.keys_from_arrow`.

    Raises:
        BadSourceError: malformed input.
    """
    sources = open_sources(config) if sources is None else sources
    keys = scan_keys(sources, store, roles=config.roles, limit=config.limit, rank=rank, world_size=world_size)
    key_parts, roles, texts = [], [], []
    for block_keys, records in iter_todo(sources, keys.keys, config.roles):
        key_parts.append(block_keys)
        roles += [r.role for r in records]
        texts += [r.text for r in records]
    all_keys = np.concatenate(key_parts) if key_parts else np.empty(0, KEY_DTYPE)
    columns = [keys_to_arrow(all_keys), pa.array(roles, pa.string()), pa.array(texts, pa.large_string())]
    return TextPlan(pa.table(columns, schema=PLAN_SCHEMA), keys.counts)


def _iter_blocks(sources: list[Source], roles: tuple[str, ...]) -> Iterator[tuple[int, list[TextRecord]]]:
    for i, source in enumerate(sources):
        block: list[TextRecord] = []
        for rec in source.iter_texts():
            if rec.role not in roles:
                continue
            if not rec.text.strip():
                raise BadSourceError(f"{rec.origin or source.spec}: empty text for id {rec.id!r} ({rec.role}).")
            block.append(rec)
            if len(block) == SCAN_BLOCK:
                yield i, block
                block = []
        if block:
            yield i, block


def _key_blocks(sources: list[Source], roles: tuple[str, ...]) -> Iterator[tuple[int, str, np.ndarray]]:
    """Pass 1's reading: ``(source index, role, content keys)`` per block, the texts read as columns."""
    for i, source in enumerate(sources):
        for block in source.iter_text_blocks():  # every role: bad input of any role stops the run here
            if block.role not in roles:
                continue
            if (row := block.first_blank()) is not None:
                origin, rid = block.origins[row] or source.spec, block.ids[row]
                raise BadSourceError(f"{origin}: empty text for id {rid!r} ({block.role}).")
            yield i, block.role, block.keys()
