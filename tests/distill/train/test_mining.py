"""mine_hard_negatives on a store whose vectors are built so that the right answer is known in advance."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
    """A store whose ``get_rows`` calls are counted."""

    def __init__(self, store: TeacherStore) -> None:
        self.store, self.calls = store, 0

    def get_rows(self, gids: np.ndarray, **kw: Any) -> np.ndarray:
        self.calls += 1
        return self.store.get_rows(gids, **kw)


@pytest.mark.parametrize("stream_rows", [mining.STREAM_ROWS, 5])
def test_against_brute_force_on_random_vectors(tmp_path: Path, monkeypatch, stream_rows: int) -> None:
    """Many queries, random vectors: the mined lists equal a direct implementation of the rule.

    The store is read in one gather for the queries and one per ``STREAM_ROWS`` passages and positives: not once a
    query (5: one query's positives straddle two gathers).

    Positives sit near their query, as a teacher's do. (Mining searches the top ``k + positives + max(k, 20)``
    candidates only, so a query whose positive ranks below that depth gets no mined negatives: everything above
    it is skipped as a likely positive. The oracle below scans everything, hence realistic positives.)
    """
    rng = np.random.default_rng(0)
    n_q, n_p, dim, k, margin = 20, 150, 16, 4, 0.9
    names = [f"q{i}" for i in range(n_q)] + [f"p{i}" for i in range(n_p)]
    roles = ["query"] * n_q + ["passage"] * n_p
    keys = content_keys(roles, names)
    vectors = rng.normal(size=(len(names), dim)).astype(np.float32)
    chosen = rng.permutation(n_p)[: 3 * n_q].reshape(n_q, 3) + n_q
    positives = [chosen[q, : rng.integers(1, 3)] for q in range(n_q)]
    for q, ps in enumerate(positives):
        vectors[ps] = vectors[q] + 0.3 * rng.normal(size=(len(ps), dim))
        if q % 2 == 0:  # an unjudged positive, closer to the query than the judged ones: must be skipped
            vectors[chosen[q, 2]] = vectors[q] + 0.1 * rng.normal(size=dim)
    store = TeacherStore.create(tmp_path / "store", make_spec(dim, normalize=False), dtype="float32")
    with store.writer(chunk_rows=16) as w:
        w.append(keys, vectors, np.array([role_code(r) for r in roles], np.uint8), np.ones(len(names), np.int32))
    store.refresh()
    order = np.argsort(keys)
    texts = TextIndex(
        keys[order], np.array([role_code(roles[i]) for i in order], np.uint8), np.zeros(len(names), np.int16)
    )
    texts.gids = store.locate(texts.keys)
    pos_of = {i: int(np.flatnonzero(order == i)[0]) for i in range(len(names))}
    examples = Phase2Examples(
        np.array([pos_of[i] for i in range(n_q)]),
        Ragged.from_lists([[pos_of[int(p)] for p in ps] for ps in positives]),
        Ragged.from_lists([[] for _ in range(n_q)]),
        np.zeros(n_q, np.int16),
    )
    monkeypatch.setattr(mining, "STREAM_ROWS", stream_rows)
    counted = CountedStore(store)
    mined, report = mine_hard_negatives(examples, texts, counted, k, margin=margin)  # type: ignore[arg-type]
    n_pos = sum(len(ps) for ps in positives)
    assert counted.calls == 1 + -(-n_p // stream_rows) + -(-n_pos // stream_rows)
    assert report["queries"] == n_q and report["mined"] == n_q * k
    assert report["skipped_as_likely_positive"] >= n_q // 2, "every planted unjudged positive is skipped"

    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    for q in range(n_q):
        scores = unit[n_q:] @ unit[q]
        limit = margin * scores[positives[q] - n_q].min()
        ranked = [int(p) for p in np.argsort(-scores, kind="stable") if p + n_q not in positives[q]]
        want = [pos_of[p + n_q] for p in ranked if scores[p] < limit][:k]
        assert mined.negatives.row(q).tolist() == want
        if q % 2 == 0:
            assert pos_of[int(chosen[q, 2])] not in want
