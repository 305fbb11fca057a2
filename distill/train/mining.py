"""Hard negatives mined from the stored teacher vectors: no teacher run, no second model.

For every training query, the teacher's own query vector is scored against the teacher vectors of
its source's passages (exact search, chunked); the top-ranked passages that are not positives
become hard negatives. The false-negative rule (NV-Retriever's "TopK-PercPos"): a candidate scoring
at or above ``margin ×`` the weakest positive's score is skipped, because a passage the teacher
rates almost as high as a judged positive is more likely an unjudged positive than a negative.
Mined negatives are appended after any negatives the data set already gives.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from distill.train.data import Miner, Phase2Examples, Ragged, TextIndex
from storage.store import TeacherStore

__all__ = ["hard_negative_miner", "mine_hard_negatives"]

STREAM_ROWS = 65_536  # passage vectors gathered per block


def _weakest_positive_scores(
    positives: Ragged, rows: np.ndarray, queries: np.ndarray, texts: TextIndex, store: TeacherStore
) -> np.ndarray:
    """Per row, the lowest cosine of its query (``queries[i]``, row ``rows[i]``) with one of its positives.

    The positives' vectors come from the store in one gather per :data:`STREAM_ROWS` of them (a gather per
    query cost a store call per training query); +inf for a row without positives.
    """
    lengths = positives.lengths()[rows]
    flat = np.concatenate([positives.row(int(r)) for r in rows]) if len(rows) else np.empty(0, np.int64)
    owner = np.repeat(np.arange(len(rows)), lengths)
    weakest = np.full(len(rows), np.inf, np.float32)
    for s in range(0, len(flat), STREAM_ROWS):
        vectors = store.get_rows(texts.gids[flat[s : s + STREAM_ROWS]], dtype="float32")
        own = owner[s : s + STREAM_ROWS]
        q = queries[own]
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        cos = np.einsum("ij,ij->i", vectors, q) / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        np.minimum.at(weakest, own, cos)
    return weakest


def _mine_source(
    examples: Phase2Examples,
    rows: np.ndarray,
    corpus: np.ndarray,
    texts: TextIndex,
    store: TeacherStore,
    k: int,
    margin: float,
) -> tuple[list[np.ndarray], int]:
    from distill.search.search import exact_search  # imports torch: loaded when mining runs
    from distill.search.search_inputs import store_blocks

    queries = store.get_rows(texts.gids[examples.query[rows]], dtype="float32")
    most_pos = int(examples.positives.lengths()[rows].max())
    depth = min(len(corpus), k + most_pos + max(k, 20))
    scores, idx = exact_search(queries, store_blocks(store, texts.gids[corpus], STREAM_ROWS), depth, normalize=True)
    weakest = _weakest_positive_scores(examples.positives, rows, queries, texts, store)
    mined, skipped = [], 0
    for r, row in enumerate(rows):
        positives = examples.positives.row(int(row))
        limit = margin * float(weakest[r])
        candidates = corpus[idx[r]]
        not_positive = ~np.isin(candidates, positives)
        ok = not_positive & (scores[r] < limit)
        skipped += int((not_positive & ~ok).sum())
        mined.append(candidates[ok][:k])
    return mined, skipped


def mine_hard_negatives(
    examples: Phase2Examples, texts: TextIndex, store: TeacherStore, k: int, *, margin: float = 0.95
) -> tuple[Phase2Examples, dict[str, Any]]:
    """Add up to ``k`` teacher-mined negatives to every example whose vectors are stored.

    Args:
        examples: phase-2 examples (positions into ``texts``).
        texts: the run's TextIndex with ``gids`` filled in.
        store: the teacher store.
        k: negatives to mine per query.
        margin: false-negative rule; candidates scoring >= margin × the weakest positive are skipped.

    Returns:
        The examples with mined negatives appended, and a report (mined count, skipped as likely positives).
    """
    negatives = examples.negatives.rows()
    report = {"per_query": k, "mined": 0, "skipped_as_likely_positive": 0, "queries": 0}
    for source in np.unique(examples.source):
        rows = np.flatnonzero((examples.source == source) & (texts.gids[examples.query] >= 0))
        rows = np.array([r for r in rows if (texts.gids[examples.positives.row(int(r))] >= 0).all()], dtype=np.int64)
        corpus = np.flatnonzero((texts.roles == 0) & (texts.source == source) & (texts.gids >= 0))
        if len(rows) == 0 or len(corpus) == 0:
            continue
        mined, skipped = _mine_source(examples, rows, corpus, texts, store, k, margin)
        for row, extra in zip(rows, mined, strict=True):
            have = negatives[row]
            negatives[row] = np.concatenate([have, extra[~np.isin(extra, have)]])
            report["mined"] += len(extra)
        report["skipped_as_likely_positive"] += skipped
        report["queries"] += len(rows)
    out = Phase2Examples(examples.query, examples.positives, Ragged.from_lists(negatives), examples.source)
    return out, report


def hard_negative_miner(k: int, margin: float = 0.95) -> Miner | None:
    """The ``mine`` step of :func:`distill.train.data.resolve_data` for ``--mine-negatives k`` (None when k is 0)."""
    return partial(mine_hard_negatives, k=k, margin=margin) if k else None
