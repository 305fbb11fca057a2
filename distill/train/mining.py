"""Hard negatives mined from the stored teacher vectors: no teacher run, no second model.

For every training query, the teacher's own query vector is scored against the teacher vectors of
its source's passages (exact search, chunked); the top-ranked passages that are not positives
become hard negatives. The false-negative rule (NV-Retriever's "TopK-PercPos"): a candidate scoring
at or above ``margin ×`` the weakest positive's score is skipped, because a passage the teacher
rates almost as high as a judged positive is more likely an unjudged positive than a negative.
Mined negatives are appended after any negatives the data set already gives.

Memory is bounded by block sizes, not by the number of queries: queries are gathered (float32) and searched
:func:`_query_block_rows` at a time, within :data:`QUERY_BLOCK_BYTES` (the search adds a normalised copy of the
block), and each block reads the source's passages again, in store-row order (``store_blocks``: sorted gathers of
:data:`STREAM_ROWS`, or one scan of the store when they are a large share of it). Gathering every query at once
held them twice: peak RSS grew 2.03× their float32 size (MS MARCO's 503k train queries at 3584-d: ~13.8 GB).
A block of 4 GiB holds 297,924 queries at 3584-d (MS MARCO's 503k: 2 passes over its passages, ~8 GiB peak with
the normalised copy, against ~14 GB and 1 pass before), 1,046,760 at 1024-d; a block of 512 MiB would take 15
passes over MS MARCO's 63 GB of passages, so the budget leans to memory a GPU box has. Blocks are whole
multiples of the search's own query block, so every matmul is the one a single search over all queries makes:
the mined lists are identical.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from distill.train.data import Miner, Phase2Examples, Ragged, TextIndex
from storage.store import TeacherStore

if TYPE_CHECKING:  # imports torch; mining loads it when it runs
    from distill.search.search_inputs import PassageSource

__all__ = ["hard_negative_miner", "mine_hard_negatives"]

STREAM_ROWS = 65_536  # passage vectors gathered per block
QUERY_BLOCK_BYTES = 4 << 30  # float32 query vectors searched per pass over a source's passages
SEARCH_CHUNK = 50_000  # passages scored per search step (exact_search's default)
SEARCH_QUERY_BLOCK = (1 << 27) // SEARCH_CHUNK  # queries per search step: exact_search's default at that chunk


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


def _query_block_rows(dim: int) -> int:
    """Queries searched per pass: within :data:`QUERY_BLOCK_BYTES` as float32, a whole number (≥ 1) of the
    search's query blocks, so the search makes the matmuls a search over all queries at once would make."""
    return SEARCH_QUERY_BLOCK * max(1, QUERY_BLOCK_BYTES // (SEARCH_QUERY_BLOCK * dim * 4))


def _mine_source(
    examples: Phase2Examples,
    rows: np.ndarray,
    corpus: np.ndarray,
    texts: TextIndex,
    store: TeacherStore,
    k: int,
    margin: float,
) -> tuple[list[np.ndarray], int]:
    """Mined negatives of one source's ``rows`` and the count skipped as likely positives, a query block a pass."""
    from distill.search.search_inputs import store_blocks  # imports torch: loaded when mining runs

    passages = store_blocks(store, texts.gids[corpus], STREAM_ROWS)  # in store-row order; results in corpus order
    most_pos = int(examples.positives.lengths()[rows].max())
    depth = min(len(corpus), k + most_pos + max(k, 20))
    mined: list[np.ndarray] = []
    skipped = 0
    step = _query_block_rows(store.dim)
    for s in range(0, len(rows), step):
        block = rows[s : s + step]
        scores, idx, weakest = _search_block(examples, block, passages, texts, store, depth)
        for r, row in enumerate(block):
            candidates = corpus[idx[r]]
            not_positive = ~np.isin(candidates, examples.positives.row(int(row)))
            ok = not_positive & (scores[r] < margin * float(weakest[r]))
            skipped += int((not_positive & ~ok).sum())
            mined.append(candidates[ok][:k])
    return mined, skipped


def _search_block(
    examples: Phase2Examples,
    block: np.ndarray,
    passages: PassageSource,
    texts: TextIndex,
    store: TeacherStore,
    depth: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top ``depth`` (scores, corpus indices) of the queries of rows ``block``, and their weakest positive's cosine."""
    from distill.search.search import exact_search

    queries = store.get_rows(texts.gids[examples.query[block]], dtype="float32")
    scores, idx = exact_search(
        queries, passages, depth, chunk_size=SEARCH_CHUNK, query_block=SEARCH_QUERY_BLOCK, normalize=True
    )
    return scores, idx, _weakest_positive_scores(examples.positives, block, queries, texts, store)


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
