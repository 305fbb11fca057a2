"""``ddx router fit``: per-query difficulty targets from the store, then the router MLPs, saved beside the run.

Nothing here runs the teacher. The fit queries and their positives and hard negatives resolve exactly as phase-2
training resolves them (:func:`distill.train.data.resolve_data`: the same sources, splits, ``--hard-negatives`` files,
``--mine-negatives``, and the same errors — a text without a stored vector stops the fit with the precompute
command that adds it; a query without a known positive stops it unless ``--skip-bad``). The student encodes the
fit queries once; the projection maps them into the teacher's space; the teacher's query vectors and every
passage vector come from the store (:mod:`distill.route.targets`). A ``--projection none`` run's hybrid ranks with the
student's query against the passages' first ``teacher_dims`` dims, renormalised, as evaluation's hybrid searches.

Fit on queries the student did not train on when you can (a held-out split): on its own phase-2 queries the
hybrid is better than it will be on new queries, so the targets understate where the teacher helps.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.evaluate.inputs import Encoders
from distill.model.run_file import check_run_store, read_run
from distill.route.config import RouterConfig
from distill.route.router import Router, student_identity, train_router_model
from distill.route.targets import RankOutcomes, difficulty_targets, rank_outcomes
from distill.train.data import Phase2Examples, Ragged, TextIndex, batched, parse_sources, resolve_data
from distill.train.mining import hard_negative_miner
from precompute.sources import Source
from storage.errors import DdxError
from storage.keys import content_keys
from storage.store import TeacherStore

__all__ = ["FitTargets", "RouterConfig", "RouterFitResult", "fit_router", "fit_targets"]


@dataclass
class RouterFitResult:
    """Where the router went and what the fit saw."""

    out: str
    queries: int
    pool: int
    target: str
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitTargets:
    """Everything the routers are fitted on: one row per fit query."""

    query_keys: np.ndarray  # content keys of the fit queries
    student: np.ndarray  # [n, student_dim] student query embeddings (the encoder router's input)
    hybrid: RankOutcomes  # the projected student query's ranking of its candidates
    teacher: RankOutcomes  # the stored teacher query vector's ranking
    gains: np.ndarray  # teacher − hybrid on the target measure
    pool: np.ndarray  # store rows of the shared candidate pool
    positives: Ragged  # store rows per query
    negatives: Ragged


def fit_targets(config: RouterConfig, store: TeacherStore) -> FitTargets:
    """Resolve the fit queries, encode them with the student, rank their candidates both ways, take the gains.

    Raises: as :func:`fit_router`.
    """
    sources = parse_sources(config.data, config.hard_negatives, skip_bad=config.skip_bad, title_join=config.title_join)
    data = resolve_data(
        sources,
        store,
        phase=2,
        split=config.split,
        allow_missing=config.allow_missing,
        skip_bad=config.skip_bad,
        mine=hard_negative_miner(config.mine_negatives, config.mine_margin),
    )
    assert data.phase2 is not None
    examples, texts = _one_per_query(data.phase2), data.texts
    enc = Encoders(config.model, config.device, config.batch_size, config.progress)
    keys = texts.keys[examples.query]
    q_s = enc.student_vectors(query_texts(sources, keys), "query")
    pool = shared_pool(examples, texts, config.pool_size, config.seed)
    positives, negatives = _rows(examples.positives, texts), _rows(examples.negatives, texts)
    hybrid, teacher = rank_outcomes(
        [enc.project(q_s), store.get_rows(texts.gids[examples.query], dtype="float32")],
        pool,
        positives,
        negatives,
        store,
        temperature=config.temperature,
        device=config.device,
        dims=[enc.teacher_dims, None],
    )
    gains = difficulty_targets(hybrid, teacher, config.target)
    return FitTargets(keys, q_s, hybrid, teacher, gains, pool, positives, negatives)


def fit_router(config: RouterConfig) -> RouterFitResult:
    """Compute difficulty targets from the store and fit one router MLP per kind; write ``config.resolved_out``.

    Returns:
        The router folder, the number of fit queries and pool passages, and a report (hybrid and teacher
        nDCG@10 on the fit queries, the gain distribution, each kind's validation lift).

    Raises:
        StoreNotFoundError, FingerprintMismatchError: the store is missing, or the run was trained on another.
        MissingVectorsError: a fit text has no teacher vector (the message has the precompute command).
        BadSourceError: queries without a known positive, unknown ids (unless ``skip_bad``).
        DdxError: no examples in the split, or a run folder that is not a finished ``ddx train`` run.

    Example:
        >>> cfg = RouterConfig(store="stores/gte7b", model="runs/p2", data=("beir:data/scifact",))
        >>> fit_router(cfg).out  # doctest: +SKIP
        'runs/p2/router'
    """
    start = time.perf_counter()
    store = TeacherStore.open(config.store)
    check_run_store(read_run(config.model), config.model, store)
    t = fit_targets(config, store)
    router = Router({}, {})
    report: dict[str, Any] = {"hybrid_ndcg10": _mean(t.hybrid.ndcg10), "teacher_ndcg10": _mean(t.teacher.ndcg10)}
    report |= {"gain_mean": _mean(t.gains), "gain_positive": _mean(t.gains > 0), "gain_negative": _mean(t.gains < 0)}
    for kind in config.kinds:
        features = router.features(kind, t.student, t.hybrid.top_scores)
        router.models[kind], report[kind] = train_router_model(features, t.gains, config.mlp_settings())
        router.calibration[kind] = np.sort(router.models[kind].score(features))
    report["seconds"] = round(time.perf_counter() - start, 1)
    router.meta = _meta(config, store, len(t.gains), len(t.pool), t.student.shape[1]) | {"report": report}
    out = str(router.save(config.resolved_out))
    return RouterFitResult(out, len(t.gains), len(t.pool), config.target, report)


def _one_per_query(ex: Phase2Examples) -> Phase2Examples:
    """Examples merged per query (a triples file lists one query many times): positives and negatives joined."""
    groups: dict[int, list[int]] = {}
    for i, q in enumerate(ex.query.tolist()):
        groups.setdefault(q, []).append(i)
    queries = np.array(list(groups), dtype=np.int64)
    pos = [np.unique(np.concatenate([ex.positives.row(i) for i in rows])) for rows in groups.values()]
    neg = [np.unique(np.concatenate([ex.negatives.row(i) for i in rows])) for rows in groups.values()]
    neg = [np.setdiff1d(n, p) for n, p in zip(neg, pos, strict=True)]
    src = np.array([ex.source[rows[0]] for rows in groups.values()], dtype=np.int16)
    return Phase2Examples(queries, Ragged.from_lists(pos), Ragged.from_lists(neg), src)


def query_texts(sources: list[Source], keys: np.ndarray) -> list[str]:
    """The query texts of ``keys`` (content keys), found by one streaming pass over the sources' queries.

    Raises:
        DdxError: a key matches no query text (the sources changed since they were resolved).
    """
    order = np.argsort(keys)
    wanted = keys[order]
    found: list[str | None] = [None] * len(keys)
    for source in sources:
        for block in batched((rec.text for rec in source.iter_texts("query")), 8192):
            _match(block, wanted, order, found)
    missing = sum(t is None for t in found)
    if missing:
        raise DdxError(f"{missing} fit queries were not found again in the sources; did a data file change? Rerun.")
    return [t for t in found if t is not None]


def _match(block: list[str], wanted: np.ndarray, order: np.ndarray, found: list[str | None]) -> None:
    if not len(wanted):
        return
    k = content_keys("query", block)
    at = np.minimum(np.searchsorted(wanted, k), len(wanted) - 1)
    for j in np.flatnonzero(wanted[at] == k):
        found[int(order[at[j]])] = block[j]


def shared_pool(examples: Phase2Examples, texts: TextIndex, size: int, seed: int) -> np.ndarray:
    """Store rows of the shared candidate pool: every example's passages, topped up with other stored passages.

    Past ``size`` the example passages are sampled (seeded); under it, the sources' other passages with a stored
    vector fill the rest (seeded sample), so a small fit set is still ranked against a realistic haystack.
    """
    rng = np.random.default_rng(seed)
    referenced = np.unique(np.concatenate([examples.positives.flat, examples.negatives.flat]))
    if len(referenced) >= size:
        return np.sort(texts.gids[rng.choice(referenced, size, replace=False)])
    others = np.flatnonzero((texts.roles == 0) & (texts.gids >= 0))
    others = np.setdiff1d(others, referenced)
    extra = rng.choice(others, min(size - len(referenced), len(others)), replace=False)
    return np.sort(texts.gids[np.concatenate([referenced, extra])])


def _rows(positions: Ragged, texts: TextIndex) -> Ragged:
    return Ragged(texts.gids[positions.flat], positions.offsets)


def _mean(x: np.ndarray) -> float:
    return round(float(np.mean(x)), 4) if len(x) else float("nan")


def _meta(config: RouterConfig, store: TeacherStore, queries: int, pool: int, dim: int) -> dict[str, Any]:
    return {
        "store_fingerprint": store.fingerprint,
        "teacher_spec": store.spec.to_dict(),
        "student_id": student_identity(config.model),
        "run": str(Path(config.model).resolve()),
        "student_dim": dim,
        "target": config.target,
        "kinds": list(config.kinds),
        "data": list(config.data) + list(config.hard_negatives),
        "split": config.split,
        "mine_negatives": config.mine_negatives,
        "queries": queries,
        "pool": pool,
        "temperature": config.temperature,
    }
