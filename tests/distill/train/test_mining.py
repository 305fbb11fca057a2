"""mine_hard_negatives on a store whose vectors are built so that the right answer is known in advance."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from distill.search import search_inputs
from distill.train import mining
from distill.train.data import Phase2Examples, Ragged, TextIndex
from distill.train.mining import mine_hard_negatives
from storage.keys import content_keys, role_code
from storage.store import TeacherStore
from tests.storage.rows import make_spec

# name: (role, source, vector). Cosines with qa = e0 are the first component (all rows are unit vectors).
ROWS: dict[str, tuple[str, int, list[float]]] = {
    "qa": ("query", 0, [1.0, 0.0, 0.0, 0.0]),
    "pa": ("passage", 0, [1.0, 0.0, 0.0, 0.0]),  # qa's positive: cos 1.0, so the margin limit is 0.95
    "near": ("passage", 0, [0.97, 0.2431, 0.0, 0.0]),  # cos 0.97 >= 0.95: likely an unjudged positive, skipped
    "mid": ("passage", 0, [0.9, 0.0, 0.4359, 0.0]),  # cos 0.90: the best real hard negative
    "low": ("passage", 0, [0.8, 0.0, 0.0, 0.6]),  # cos 0.80: second
    "far": ("passage", 0, [0.1, 0.0, 0.995, 0.0]),  # cos 0.10: already a given negative of qa
    "other": ("passage", 1, [0.93, 0.3676, 0.0, 0.0]),  # cos 0.93, but another data set's passage
    "qz": ("query", 0, [0.0, 0.0, 0.0, 1.0]),  # a query whose positive has no vector: not mined for
}


@pytest.fixture
def world(tmp_path: Path) -> tuple[TextIndex, TeacherStore, dict[str, int]]:
    names = [*ROWS, "pz"]  # pz: qz's positive, a text the store lacks
    roles = [ROWS[n][0] if n in ROWS else "passage" for n in names]
    keys = content_keys(roles, [f"text of {n}" for n in names])
    store = TeacherStore.create(tmp_path / "store", make_spec(4, normalize=False), dtype="float32")
    stored = [i for i, n in enumerate(names) if n in ROWS]
    with store.writer(chunk_rows=2) as w:
        w.append(
            keys[stored],
            np.array([ROWS[names[i]][2] for i in stored], np.float32),
            np.array([role_code(roles[i]) for i in stored], np.uint8),
            np.ones(len(stored), np.int32),
        )
    store.refresh()
    order = np.argsort(keys)
    texts = TextIndex(
        keys[order],
        np.array([role_code(roles[i]) for i in order], np.uint8),
        np.array([ROWS[names[i]][1] if names[i] in ROWS else 0 for i in order], np.int16),
    )
    texts.gids = store.locate(texts.keys)
    position = {names[i]: int(np.flatnonzero(order == i)[0]) for i in range(len(names))}
    return texts, store, position


def _examples(position: dict[str, int], rows: list[tuple[str, list[str], list[str]]]) -> Phase2Examples:
    return Phase2Examples(
        np.array([position[q] for q, _, _ in rows], np.int64),
        Ragged.from_lists([[position[p] for p in pos] for _, pos, _ in rows]),
        Ragged.from_lists([[position[n] for n in neg] for _, _, neg in rows]),
        np.zeros(len(rows), np.int16),
    )


def _names(position: dict[str, int], row: np.ndarray) -> list[str]:
    by_position = {v: k for k, v in position.items()}
    return [by_position[int(p)] for p in row]


def test_margin_rule_skips_near_positives_and_mines_the_next_best(world) -> None:
    texts, store, position = world
    examples = _examples(position, [("qa", ["pa"], ["far"]), ("qz", ["pz"], [])])
    mined, report = mine_hard_negatives(examples, texts, store, 2, margin=0.95)
    # Given negatives first, then the two best candidates below 0.95 × 1.0 from qa's own data set.
    assert _names(position, mined.negatives.row(0)) == ["far", "mid", "low"]
    assert _names(position, mined.negatives.row(1)) == [], "qz's positive has no vector: it is left alone"
    assert report["queries"] == 1 and report["mined"] == 2 and report["per_query"] == 2
    assert report["skipped_as_likely_positive"] == 1, "near (0.97) was skipped"
    assert (mined.query == examples.query).all() and mined.positives is examples.positives


def test_a_looser_margin_admits_the_near_positive(world) -> None:
    texts, store, position = world
    mined, report = mine_hard_negatives(_examples(position, [("qa", ["pa"], [])]), texts, store, 2, margin=0.99)
    assert _names(position, mined.negatives.row(0)) == ["near", "mid"]
    assert report["skipped_as_likely_positive"] == 0


def test_the_weakest_positive_sets_the_limit(world) -> None:
    """With positives at 1.0 and 0.8, the limit is 0.95 × 0.8 = 0.76: near, mid and low are all too close."""
    texts, store, position = world
    mined, report = mine_hard_negatives(_examples(position, [("qa", ["pa", "low"], [])]), texts, store, 3)
    assert _names(position, mined.negatives.row(0)) == ["far"]
    assert report["skipped_as_likely_positive"] == 2


def test_mined_negatives_never_repeat_given_ones_or_cross_data_sets(world) -> None:
    texts, store, position = world
    mined, _ = mine_hard_negatives(_examples(position, [("qa", ["pa"], ["mid"])]), texts, store, 10, margin=0.95)
    names = _names(position, mined.negatives.row(0))
    assert names == ["mid", "low", "far"]
    assert "other" not in names and "pa" not in names and "near" not in names


class CountedStore:
    """A store whose ``get_rows`` calls (and their rows) and scans are counted."""

    def __init__(self, store: TeacherStore) -> None:
        self.store, self.calls, self.scans, self.dim, self.rows = store, 0, 0, store.dim, store.rows
        self.requests: list[np.ndarray] = []

    def get_rows(self, gids: np.ndarray, **kw: Any) -> np.ndarray:
        self.calls += 1
        self.requests.append(np.asarray(gids))
        return self.store.get_rows(gids, **kw)

    def iter_batches(self, *args: Any, **kw: Any) -> Any:
        self.scans += 1
        return self.store.iter_batches(*args, **kw)


def read_passages_by(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Make mining gather its passages (``get_rows``) or scan the store for them, whatever their share of it."""
    monkeypatch.setattr(search_inputs, "SCAN_DENSITY", {"gather": 2.0, "scan": 0.0}[how])


@dataclass
class RandomWorld:
    """Random query and passage vectors in a store, positives near their query (as a teacher's are)."""

    examples: Phase2Examples
    texts: TextIndex
    store: TeacherStore
    vectors: np.ndarray  # rows: n_q queries, then the passages
    positives: list[np.ndarray]  # per query, its positives' rows in ``vectors``
    planted: np.ndarray  # per query, an unjudged positive (planted for even queries only)
    pos_of: dict[int, int]  # row in ``vectors`` → position in ``texts``


def random_world(tmp_path: Path, n_q: int, n_p: int, dim: int, chunk_rows: int = 16) -> RandomWorld:
    """Queries and passages stored in name order, so the key-sorted TextIndex lists them in a random row order."""
    rng = np.random.default_rng(0)
    names = [f"q{i}" for i in range(n_q)] + [f"p{i}" for i in range(n_p)]
    roles = ["query"] * n_q + ["passage"] * n_p
    keys = content_keys(roles, names)
    vectors = rng.normal(size=(len(names), dim)).astype(np.float32)
    # Three passages a query, disjoint while there are enough (a shared one would sit near one query only).
    chosen = rng.permutation(n_p)[: 3 * n_q] if 3 * n_q <= n_p else rng.integers(0, n_p, 3 * n_q)
    chosen = chosen.reshape(n_q, 3) + n_q
    positives = [chosen[q, : rng.integers(1, 3)] for q in range(n_q)]
    for q, ps in enumerate(positives):
        vectors[ps] = vectors[q] + 0.3 * rng.normal(size=(len(ps), dim))
        if q % 2 == 0:  # an unjudged positive, closer to the query than the judged ones: must be skipped
            vectors[chosen[q, 2]] = vectors[q] + 0.1 * rng.normal(size=dim)
    store = TeacherStore.create(tmp_path / "store", make_spec(dim, normalize=False), dtype="float32")
    with store.writer(chunk_rows=chunk_rows) as w:
        w.append(keys, vectors, np.array([role_code(r) for r in roles], np.uint8), np.ones(len(names), np.int32))
    store.refresh()
    order = np.argsort(keys)
    texts = TextIndex(
        keys[order], np.array([role_code(roles[i]) for i in order], np.uint8), np.zeros(len(names), np.int16)
    )
    texts.gids = store.locate(texts.keys)
    pos_of = {int(i): p for p, i in enumerate(order)}
    examples = Phase2Examples(
        np.array([pos_of[i] for i in range(n_q)]),
        Ragged.from_lists([[pos_of[int(p)] for p in ps] for ps in positives]),
        Ragged.from_lists([[] for _ in range(n_q)]),
        np.zeros(n_q, np.int16),
    )
    return RandomWorld(examples, texts, store, vectors, positives, chosen[:, 2], pos_of)


@pytest.mark.parametrize(("stream_rows", "read"), [(mining.STREAM_ROWS, "gather"), (5, "gather"), (5, "scan")])
def test_against_brute_force_on_random_vectors(tmp_path: Path, monkeypatch, stream_rows: int, read: str) -> None:
    """Many queries, random vectors: the mined lists equal a direct implementation of the rule.

    The store is read in one gather for the queries and one per ``STREAM_ROWS`` positives, and the passages in one
    gather per ``STREAM_ROWS`` of them or one scan: not once a query (5: one query's positives straddle two
    gathers).

    Positives sit near their query, as a teacher's do. (Mining searches the top ``k + positives + max(k, 20)``
    candidates only, so a query whose positive ranks below that depth gets no mined negatives: everything above
    it is skipped as a likely positive. The oracle below scans everything, hence realistic positives.)
    """
    n_q, n_p, k, margin = 20, 150, 4, 0.9
    w = random_world(tmp_path, n_q, n_p, 16)
    monkeypatch.setattr(mining, "STREAM_ROWS", stream_rows)
    read_passages_by(monkeypatch, read)
    counted = CountedStore(w.store)
    mined, report = mine_hard_negatives(w.examples, w.texts, counted, k, margin=margin)  # type: ignore[arg-type]
    n_pos = sum(len(ps) for ps in w.positives)
    passage_gathers = -(-n_p // stream_rows) if read == "gather" else 0
    assert counted.calls == 1 + passage_gathers + -(-n_pos // stream_rows)
    assert counted.scans == (read == "scan")
    assert report["queries"] == n_q and report["mined"] == n_q * k
    assert report["skipped_as_likely_positive"] >= n_q // 2, "every planted unjudged positive is skipped"

    unit = w.vectors / np.linalg.norm(w.vectors, axis=1, keepdims=True)
    for q in range(n_q):
        scores = unit[n_q:] @ unit[q]
        limit = margin * scores[w.positives[q] - n_q].min()
        ranked = [int(p) for p in np.argsort(-scores, kind="stable") if p + n_q not in w.positives[q]]
        want = [w.pos_of[p + n_q] for p in ranked if scores[p] < limit][:k]
        assert mined.negatives.row(q).tolist() == want
        if q % 2 == 0:
            assert w.pos_of[int(w.planted[q])] not in want


def _small_query_blocks(monkeypatch: pytest.MonkeyPatch, dim: int, search_block: int, per_pass: int) -> None:
    """Mine ``per_pass`` queries a pass (a multiple of ``search_block``, the search's query block)."""
    monkeypatch.setattr(mining, "SEARCH_QUERY_BLOCK", search_block)
    monkeypatch.setattr(mining, "QUERY_BLOCK_BYTES", per_pass * dim * 4)


def test_query_blocks_mine_exactly_what_one_pass_mines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 6 queries (searched 3 at a time) give the lists and report of one pass over all 40 queries; every
    query gather stays within a block, and each block streams the passages again."""
    n_q, n_p, dim = 40, 150, 16
    w = random_world(tmp_path, n_q, n_p, dim)
    whole, whole_report = mine_hard_negatives(w.examples, w.texts, w.store, 5, margin=0.9)
    _small_query_blocks(monkeypatch, dim, search_block=3, per_pass=6)
    assert mining._query_block_rows(dim) == 6
    counted = CountedStore(w.store)
    blocked, report = mine_hard_negatives(w.examples, w.texts, counted, 5, margin=0.9)  # type: ignore[arg-type]
    assert report == whole_report and report["mined"] > 0
    for row in range(n_q):
        np.testing.assert_array_equal(blocked.negatives.row(row), whole.negatives.row(row))
    query_gathers = [r for r in counted.requests if np.isin(r, w.texts.gids[w.examples.query]).all()]
    assert [len(r) for r in query_gathers] == [6] * 6 + [4]
    assert counted.calls == 7 * 2, "per block: its queries and its positives"
    assert counted.scans == 7, "per block: one scan for the passages (150 of the store's 190 rows)"


def test_passages_are_read_in_store_row_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gathered, the key-sorted corpus is read sorted by store row (a row-by-row read in key order jumps all over
    the store); the mined lists still name corpus positions (the brute-force test checks them)."""
    w = random_world(tmp_path, 10, 120, 8)
    monkeypatch.setattr(mining, "STREAM_ROWS", 32)
    read_passages_by(monkeypatch, "gather")
    counted = CountedStore(w.store)
    mine_hard_negatives(w.examples, w.texts, counted, 3)  # type: ignore[arg-type]
    passage_rows = w.texts.gids[w.texts.roles == role_code("passage")]
    assert not (np.diff(passage_rows) > 0).all(), "the fixture lists passages out of row order"
    gathers = [r for r in counted.requests if len(r) == 32 or len(r) == 120 % 32][:4]
    assert np.concatenate(gathers).tolist() == sorted(passage_rows.tolist())


def test_peak_memory_does_not_grow_with_the_number_of_queries(tmp_path: Path, monkeypatch) -> None:
    """Doubling the queries (400 → 800, 1024-d) leaves the traced peak within a quarter of the 400 extra queries'
    float32 size; gathering all queries at once grew it by more than their whole size (1.6 MB)."""
    dim, n_p = 1024, 64
    w = random_world(tmp_path, 800, n_p, dim, chunk_rows=64)
    _small_query_blocks(monkeypatch, dim, search_block=32, per_pass=64)

    def peak(n_q: int) -> int:
        ex = w.examples
        first = [Ragged.from_lists(r.rows()[:n_q]) for r in (ex.positives, ex.negatives)]
        sub = Phase2Examples(ex.query[:n_q], first[0], first[1], ex.source[:n_q])
        mine_hard_negatives(sub, w.texts, w.store, 2)  # warm: first-call allocations (indexes, file handles)
        tracemalloc.start()
        try:
            mine_hard_negatives(sub, w.texts, w.store, 2)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(400), peak(800)
    assert large - small < 0.25 * 400 * dim * 4, (small, large)
