"""Training data from sources and the store: which texts, which examples, their vectors and tokens.

Everything is resolved to integer positions into one ``TextIndex`` (every distinct text of the run,
sorted by content key, with its store row and its token-table handle), so phase-2 examples are a
few int64 arrays, not millions of Python objects. Source ids map to keys through per-source
``IdMap``s (64-bit id hash → position in the ``TextIndex``, 16 bytes an id); they never reach the store.

Before any training step, every text a run needs must have a teacher vector. If not, the run stops
with the count per data set and the exact ``ddx precompute-teacher`` command that fills the gap
(``allow_missing`` drops those examples instead and reports how many). Resolving needs no student
(``resolve_data``); only the token pass does (``PreparedData.add_tokens``), so ``ddx train`` finds bad
data and missing vectors in seconds, before it spends minutes loading the student's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TypeVar

import numpy as np

from distill.train.tokens import TokenTable
from precompute.pipeline import missing_vectors_command
from precompute.sources import Source, SourceOptions, parse_source
from precompute.sources.errors import BadSourceError
from storage.errors import DdxError, MissingVectorsError
from storage.keys import KEY_DTYPE, content_keys, role_code
from storage.store import TeacherStore

__all__ = [
    "IdMap",
    "Miner",
    "PreparedData",
    "Ragged",
    "TextIndex",
    "batched",
    "parse_sources",
    "prepare_data",
    "resolve_data",
]

BLOCK = 8192
T = TypeVar("T")


@dataclass(frozen=True)
class Ragged:
    """Rows of varying length as one flat int64 array plus offsets (row i = flat[offsets[i]:offsets[i+1]])."""

    flat: np.ndarray
    offsets: np.ndarray

    @classmethod
    def from_lengths(cls, flat: np.ndarray, lengths: np.ndarray) -> Ragged:
        """Consecutive rows of ``flat`` of the given ``lengths``."""
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        return cls(np.asarray(flat, dtype=np.int64), offsets)

    @classmethod
    def from_lists(cls, rows: list[list[int]] | list[np.ndarray]) -> Ragged:
        flat = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else np.empty(0, np.int64)
        return cls.from_lengths(flat, np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows)))

    @classmethod
    def from_owners(cls, owners: np.ndarray, values: np.ndarray, n: int, keep: np.ndarray) -> Ragged:
        """Rows of the ``keep`` ones of ``n`` owners; ``values`` grouped by ascending ``owners`` (only kept ones)."""
        return cls.from_lengths(values, np.bincount(owners, minlength=n)[keep])

    @classmethod
    def concat(cls, parts: list[Ragged]) -> Ragged:
        """The rows of ``parts`` one after another."""
        if not parts:
            return cls.from_lists([])
        return cls.from_lengths(np.concatenate([p.flat for p in parts]), np.concatenate([p.lengths() for p in parts]))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> np.ndarray:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def rows(self) -> list[np.ndarray]:
        """Every row, as views of ``flat``."""
        return np.split(self.flat, self.offsets[1:-1]) if len(self) else []

    def select(self, rows: np.ndarray) -> Ragged:
        return Ragged.from_lists([self.row(int(i)) for i in rows])


def id_hashes(role: str, ids: list[str]) -> np.ndarray:
    """64-bit hashes of (role, id), one vectorised polars hash per call (a role is a seed of its own).

    Only for lookups inside this process — polars' hash is not stable across its versions, so these are
    never stored. Two ids of one role sharing a hash are caught by :meth:`IdMap.build` (~1e-6 likely at
    10 M ids). Was a blake2b per id in Python: 1.2 µs an id, most of phase-2 id resolution's time.
    """
    import polars as pl

    seed = 0x9E3779B97F4A7C15 ^ role_code(role)
    return pl.Series(ids, dtype=pl.String).hash(seed=seed).to_numpy().astype(np.uint64, copy=False)


@dataclass
class IdMap:
    """(role, source id) → position of its text in the run's ``TextIndex``, for one source.

    Positions, not content keys: resolving an id is then one search of 64-bit hashes, where going
    through the key took a second search of 16-byte keys in the text index for every id (most of
    phase-2 id resolution's time, ~150 M ids for MS MARCO's hard negatives).
    """

    hashes: np.ndarray  # uint64, sorted
    pos: np.ndarray  # int64 positions into the TextIndex, aligned with hashes

    @classmethod
    def build(cls, hashes: list[np.ndarray], positions: list[np.ndarray], where: str) -> IdMap:
        h = np.concatenate(hashes) if hashes else np.empty(0, np.uint64)
        p = np.concatenate(positions).astype(np.int64, copy=False) if positions else np.empty(0, np.int64)
        order = np.argsort(h, kind="stable")
        h, p = h[order], p[order]
        clash = np.flatnonzero((h[1:] == h[:-1]) & (p[1:] != p[:-1]))
        if len(clash):
            raise BadSourceError(
                f"{where}: two different texts share one id (or a 64-bit id hash); ids must be "
                "unique per role. Deduplicate the ids in the source."
            )
        return cls(h, p)

    def lookup(self, role: str, ids: list[str]) -> np.ndarray:
        """TextIndex position of each of ``ids`` of ``role``, -1 where this source has no such id.

        The hashes are searched in sorted order (then put back): consecutive searches then walk the
        map's array forwards, ~7× faster than searching in the ids' order at millions of ids.
        """
        q = id_hashes(role, ids)
        if len(self.hashes) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        order = np.argsort(q)
        at = np.empty(len(q), dtype=np.int64)
        at[order] = np.searchsorted(self.hashes, q[order])
        at = np.minimum(at, len(self.hashes) - 1)
        return np.where(self.hashes[at] == q, self.pos[at], -1)


@dataclass
class TextIndex:
    """Every distinct text of a run (sorted by key) with its role, source, store row and token handle."""

    keys: np.ndarray
    roles: np.ndarray
    source: np.ndarray
    gids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))

    def positions(self, keys: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[pos] == keys, pos, -1)


@dataclass
class Phase2Examples:
    """Queries with their positives and hard negatives, as positions into a TextIndex."""

    query: np.ndarray
    positives: Ragged
    negatives: Ragged
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.query)


# Adds negatives to phase-2 examples (positions into the TextIndex, whose ``gids`` are filled in); returns the
# examples and a report. Passed to resolve_data by whoever wants them (distill.train.mining.hard_negative_miner).
Miner = Callable[[Phase2Examples, TextIndex, TeacherStore], tuple[Phase2Examples, dict[str, Any]]]


@dataclass
class PreparedData:
    """What training reads: the text index, phase-1 texts or phase-2 examples, and a report.

    :func:`resolve_data` fills everything but the token handles (``texts.tokens``); :meth:`add_tokens` fills those
    once the student's tokenizer is at hand, so bad data and missing vectors stop a run before the student loads.
    """

    texts: TextIndex
    phase1: np.ndarray | None = None
    phase2: Phase2Examples | None = None
    report: dict[str, Any] = field(default_factory=dict)
    to_tokenize: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))  # positions training reads

    def add_tokens(self, sources: list[Source], table: TokenTable) -> int:
        """Second pass over ``sources``: student tokens of every text training reads; returns how many were new.

        Tokenizes the texts the token table lacks, then fills ``texts.tokens`` with every text's handle. The
        blocks stream into one :meth:`TokenTable.add_blocks` call, which maps the new parts once: linear in the
        texts (a ``table.add`` per block rebuilt the table's index each time, quadratic).
        """
        texts = self.texts
        want = np.zeros(len(texts.keys), dtype=bool)
        want[self.to_tokenize] = True
        want &= table.locate(texts.keys) < 0
        added = table.add_blocks(self._untokenized(sources, want)) if want.any() else 0  # else no pass over sources
        texts.tokens = table.locate(texts.keys)
        return added

    def _untokenized(self, sources: list[Source], want: np.ndarray) -> Iterator[tuple[np.ndarray, list[str]]]:
        """(keys, texts) per block of ``sources``: the texts whose positions ``want`` marks, each once."""
        for source in sources:
            for block in batched(source.iter_texts(), BLOCK):
                k = content_keys([r.role for r in block], [r.text for r in block])
                pos = self.texts.positions(k)
                sel = [j for j in range(len(block)) if pos[j] >= 0 and want[pos[j]]]
                if sel:
                    want[pos[sel]] = False
                    yield k[sel], [block[j].text for j in sel]


def scan_sources(sources: list[Source]) -> tuple[TextIndex, list[IdMap]]:
    """Pass 1: keys of every text and one IdMap per source (streaming; 48 bytes kept per text).

    The ids' positions in the TextIndex come from sorting the keys once (``np.unique``'s inverse),
    so no id ever needs a search of keys.
    """
    all_keys, all_roles, all_src = [], [], []
    per_source: list[tuple[list[np.ndarray], list[np.ndarray]]] = []
    seen = 0
    for i, source in enumerate(sources):
        hashes, rows = [], []
        for block in batched(source.iter_texts(), BLOCK):
            k = content_keys([r.role for r in block], [r.text for r in block])
            for role in ("query", "passage"):
                sel = [j for j, r in enumerate(block) if r.role == role]
                if sel:
                    hashes.append(id_hashes(role, [block[j].id for j in sel]))
                    rows.append(seen + np.asarray(sel, dtype=np.int64))
            all_keys.append(k)
            all_roles.append(np.array([role_code(r.role) for r in block], dtype=np.uint8))
            all_src.append(np.full(len(block), i, dtype=np.int16))
            seen += len(block)
        per_source.append((hashes, rows))
    keys = np.concatenate(all_keys) if all_keys else np.empty(0, KEY_DTYPE)
    uniq, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    roles = np.concatenate(all_roles)[first] if all_keys else np.empty(0, np.uint8)
    src = np.concatenate(all_src)[first] if all_keys else np.empty(0, np.int16)
    maps = [
        IdMap.build(hashes, [inverse[r] for r in rows], source.spec)
        for source, (hashes, rows) in zip(sources, per_source, strict=True)
    ]
    return TextIndex(uniq, roles, src), maps


def parse_sources(
    data: tuple[str, ...], hard_negatives: tuple[str, ...], *, skip_bad: bool, title_join: str
) -> list[Source]:
    """The sources of ``--data`` and ``--hard-negatives`` (a bare path there is an MS MARCO examples file)."""
    options = SourceOptions(skip_bad=skip_bad, title_join=title_join)
    extra = [s if ":" in s.split("/")[0] else f"msmarco:{s}" for s in hard_negatives]
    return [parse_source(s, options) for s in (*data, *extra)]


def wanted_splits(split: str | None) -> tuple[str, ...] | None:
    """``"train,dev"`` → ("train", "dev"); None → None (every split)."""
    if split is None:
        return None
    return tuple(p.strip() for p in split.split(",") if p.strip())


def eval_query_ids(source: Source, split: str | None) -> set[str]:
    """Queries judged only in splits outside ``split``: phase 1 leaves their texts out (no test leakage)."""
    wanted = wanted_splits(split)
    if wanted is None:
        return set()
    held = {q for s in source.splits() if s not in wanted for q in source.qrels(s)}
    train = {q for s in source.splits() if s in wanted for q in source.qrels(s)}
    return held - train


def _examples(source: Source, split: str | None) -> Iterator[Any]:
    """Training examples of every wanted split the source has (a source may have none of them)."""
    wanted = wanted_splits(split)
    if wanted is None:
        yield from source.training_examples(None)
        return
    for name in source.splits():
        if name in wanted:
            yield from source.training_examples(name)


def phase1_positions(sources: list[Source], texts: TextIndex, maps: list[IdMap], split: str | None) -> np.ndarray:
    """Every text of every source except queries judged only in held-out splits."""
    exclude = []
    for source, id_map in zip(sources, maps, strict=True):
        held = sorted(eval_query_ids(source, split))
        if held:
            pos = id_map.lookup("query", held)
            exclude.append(pos[pos >= 0])
    keep = np.ones(len(texts.keys), dtype=bool)
    if exclude:
        keep[np.concatenate(exclude)] = False
    return np.flatnonzero(keep)


def resolve_examples(
    sources: list[Source], texts: TextIndex, maps: list[IdMap], split: str | None, skip_bad: bool
) -> tuple[Phase2Examples, dict[str, Any]]:
    """Phase-2 examples of every source, ids resolved (own source first, then any source).

    Examples are resolved in blocks of ``RESOLVE_BLOCK``: one hash-and-search over every id of the block,
    then array operations (was: three lookups and a ``setdiff1d`` per query, ~1 ms a query with 300
    negatives, minutes for MS MARCO's hard-negatives file).
    """
    union = _union_map(maps)
    queries: list[np.ndarray] = []
    positives: list[Ragged] = []
    negatives: list[Ragged] = []
    src: list[np.ndarray] = []
    report: dict[str, Any] = {"unknown_ids": {}, "no_positive": {}}
    for i, source in enumerate(sources):
        unknown = no_pos = 0
        for block in batched(_examples(source, split), RESOLVE_BLOCK):
            q, pos, neg, block_unknown = _resolve_block(texts, [maps[i], union], block)
            unknown += block_unknown
            no_pos += len(block) - len(q)
            queries.append(q)
            positives.append(pos)
            negatives.append(neg)
            src.append(np.full(len(q), i, dtype=np.int16))
        _check_example_problems(source, unknown, no_pos, skip_bad, report)
    examples = Phase2Examples(
        np.concatenate(queries) if queries else np.empty(0, np.int64),
        Ragged.concat(positives),
        Ragged.concat(negatives),
        np.concatenate(src) if src else np.empty(0, np.int16),
    )
    return examples, report


RESOLVE_BLOCK = 4096  # examples resolved together: ~1.2 M ids with 300 negatives each


def batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    """Lists of ``n`` consecutive items (the last one shorter): ``itertools.batched`` of Python 3.12."""
    block: list[T] = []
    for item in items:
        block.append(item)
        if len(block) == n:
            yield block
            block = []
    if block:
        yield block


def _resolve_block(texts: TextIndex, maps: list[IdMap], block: list[Any]) -> tuple[np.ndarray, Ragged, Ragged, int]:
    """(query positions, positives, negatives, unknown ids) of the block's examples that have a query and a positive.

    Positives keep their order (duplicates too); negatives are sorted, unique and never one of the same
    example's positives — as the per-example ``setdiff1d`` this replaces.
    """
    b = len(block)
    q = _resolve(maps, "query", [ex.query_id for ex in block])
    p = _resolve(maps, "passage", list(chain.from_iterable(ex.positive_ids for ex in block)))
    n = _resolve(maps, "passage", list(chain.from_iterable(ex.negative_ids for ex in block)))
    p_owner = np.repeat(np.arange(b), [len(ex.positive_ids) for ex in block])
    n_owner = np.repeat(np.arange(b), [len(ex.negative_ids) for ex in block])
    unknown = int((q < 0).sum() + (p < 0).sum() + (n < 0).sum())
    ok = q >= 0
    ok &= np.bincount(p_owner[p >= 0], minlength=b) > 0
    keep_p = (p >= 0) & ok[p_owner]
    span = np.int64(len(texts.keys) + 1)  # (example, position) pairs as one int64: example * span + position
    pos_pairs = p_owner[keep_p] * span + p[keep_p]
    keep_n = (n >= 0) & ok[n_owner]
    neg_pairs = np.sort(n_owner[keep_n] * span + n[keep_n])  # sort + neighbours: np.unique hashes first, 3x slower
    neg_pairs = neg_pairs[np.r_[True, neg_pairs[1:] != neg_pairs[:-1]]] if len(neg_pairs) else neg_pairs
    sorted_pos = np.sort(pos_pairs)
    at = np.minimum(np.searchsorted(sorted_pos, neg_pairs), max(len(sorted_pos) - 1, 0))
    if len(sorted_pos):
        neg_pairs = neg_pairs[sorted_pos[at] != neg_pairs]
    pos = Ragged.from_owners(p_owner[keep_p], p[keep_p], b, ok)
    neg = Ragged.from_owners(neg_pairs // span, neg_pairs % span, b, ok)
    return q[ok], pos, neg, unknown


def _check_example_problems(source: Source, unknown: int, no_pos: int, skip_bad: bool, report: dict[str, Any]) -> None:
    if unknown:
        report["unknown_ids"][source.spec] = unknown
    if no_pos:
        report["no_positive"][source.spec] = no_pos
    if skip_bad or not (unknown or no_pos):
        return
    what = []
    if unknown:
        what.append(f"{unknown} ids that no --data source defines")
    if no_pos:
        what.append(f"{no_pos} queries without a known positive")
    raise BadSourceError(
        f"{source.spec}: training examples reference {' and '.join(what)}. Add the collection that defines them "
        "with --data (e.g. the MS MARCO collection next to a hard-negatives file), or pass --skip-bad to drop "
        "those ids and queries (they are counted in the run report)."
    )


def _union_map(maps: list[IdMap]) -> IdMap:
    if len(maps) == 1:
        return maps[0]
    h = np.concatenate([m.hashes for m in maps])
    p = np.concatenate([m.pos for m in maps])
    order = np.argsort(h, kind="stable")
    return IdMap(h[order], p[order])


def _resolve(maps: list[IdMap], role: str, ids: list[str]) -> np.ndarray:
    """TextIndex position of each id (-1 where none of ``maps``, tried in order, has it)."""
    if not ids:
        return np.empty(0, np.int64)
    out = np.full(len(ids), -1, dtype=np.int64)
    for id_map in maps:
        todo = np.flatnonzero(out < 0)
        if not len(todo):
            break
        out[todo] = id_map.lookup(role, ids if len(todo) == len(ids) else [ids[j] for j in todo])
    return out


def check_vectors(
    store: TeacherStore, sources: list[Source], texts: TextIndex, needed: np.ndarray, allow_missing: bool
) -> np.ndarray:
    """Store rows of the needed texts; stops (or, with allow_missing, reports) when some are missing.

    Returns:
        Boolean mask over ``needed``: which texts have a vector.
    """
    texts.gids = store.locate(texts.keys)
    have = texts.gids[needed] >= 0
    if have.all() or allow_missing:
        return have
    lacking = needed[~have]
    per_source = np.bincount(texts.source[lacking], minlength=len(sources))
    lines = [f"{int(n):,} from {sources[i].spec}" for i, n in enumerate(per_source) if n]
    specs = [sources[i].spec for i, n in enumerate(per_source) if n]
    raise MissingVectorsError(
        f"{len(lacking):,} of {len(needed):,} texts this run needs have no teacher vector in {store.url!r} "
        f"({'; '.join(lines)}). The teacher never runs during training; add them with:\n  "
        f"{missing_vectors_command(store, specs)}\nor pass --allow-missing to drop those examples."
    )


def prepare_data(
    sources: list[Source],
    store: TeacherStore,
    table: TokenTable,
    *,
    phase: int,
    split: str | None = "train",
    allow_missing: bool = False,
    skip_bad: bool = False,
    mine: Miner | None = None,
) -> PreparedData:
    """Resolve sources into training data for ``phase`` (1: texts, 2: examples), tokens included.

    :func:`resolve_data` then :meth:`PreparedData.add_tokens`; see there for what raises.
    """
    data = resolve_data(
        sources, store, phase=phase, split=split, allow_missing=allow_missing, skip_bad=skip_bad, mine=mine
    )
    data.add_tokens(sources, table)
    return data


def resolve_data(
    sources: list[Source],
    store: TeacherStore,
    *,
    phase: int,
    split: str | None = "train",
    allow_missing: bool = False,
    skip_bad: bool = False,
    mine: Miner | None = None,
) -> PreparedData:
    """Resolve sources against the store for ``phase``, without tokens: no student model is needed yet.

    ``mine`` (phase 2) adds negatives to the resolved examples before their vectors are checked, e.g.
    :func:`distill.train.mining.hard_negative_miner` for ``--mine-negatives``; its report goes under ``"mined"``.

    Raises:
        MissingVectorsError: needed texts lack teacher vectors (unless ``allow_missing``).
        BadSourceError: examples reference unknown ids or queries without positives (unless ``skip_bad``).
        DdxError: nothing left to train on.
    """
    texts, maps = scan_sources(sources)
    if phase == 1:
        needed = phase1_positions(sources, texts, maps, split)
        have = check_vectors(store, sources, texts, needed, allow_missing)
        kept = needed[have]
        if len(kept) == 0:
            raise DdxError(f"No texts to train on from {[s.spec for s in sources]}.")
        report: dict[str, Any] = {"texts": len(kept), "missing_vectors": int((~have).sum())}
        report["held_out_queries"] = int(len(texts.keys) - len(needed))
        return PreparedData(texts, phase1=kept, report=report, to_tokenize=kept)
    examples, report = resolve_examples(sources, texts, maps, split, skip_bad)
    if mine is not None:
        texts.gids = store.locate(texts.keys)
        examples, report["mined"] = mine(examples, texts, store)
    needed = np.unique(np.concatenate([examples.query, examples.positives.flat, examples.negatives.flat]))
    have = check_vectors(store, sources, texts, needed, allow_missing)
    examples, report["dropped_missing"] = _drop_missing(examples, texts)
    if len(examples) == 0:
        raise DdxError(
            f"No phase-2 examples left from {[s.spec for s in sources]} (split {split!r}): check that "
            "the data has queries with judged positives for this split."
        )
    report["missing_vectors"] = int((~have).sum())
    return PreparedData(texts, phase2=examples, report=report, to_tokenize=needed[have])


def _drop_missing(examples: Phase2Examples, texts: TextIndex) -> tuple[Phase2Examples, int]:
    """Drop missing positives/negatives, and examples left without query or positive."""
    ok = texts.gids >= 0
    pos = [r[ok[r]] for r in examples.positives.rows()]
    neg = [r[ok[r]] for r in examples.negatives.rows()]
    keep = np.array([ok[q] and len(p) > 0 for q, p in zip(examples.query, pos, strict=True)], dtype=bool)
    kept = np.flatnonzero(keep)
    out = Phase2Examples(
        examples.query[kept],
        Ragged.from_lists([pos[i] for i in kept]),
        Ragged.from_lists([neg[i] for i in kept]),
        examples.source[kept],
    )
    return out, int((~keep).sum())
