"""``ddx evaluate``: what each retrieval mode costs in quality, with teacher vectors from the store.

Modes (queries by / passages by, in which space):

* ``teacher``   — teacher / teacher, both from the store (the teacher does not run);
* ``student``   — student / student, in the student's own space;
* ``hybrid``    — projected student / teacher from the store: a cheap query encoder against an index the
  teacher built once — the product's point;
* ``projected`` — projected student / projected student, in the teacher's space.

A ``--projection none`` run (:mod:`distill.model.teacher_dims`) has no projection: its hybrid is student queries
against the teacher's first ``D`` dims, renormalised (the vectors it was trained against); its teacher mode still
searches the full vectors; it has no ``projected`` mode (that would be its student mode again), so none is run.

Search is exact (cosine, chunked matrix products on the GPU when present, memory bounded by the
chunk size), ties ordered as trec_eval orders them, and metrics equal pytrec_eval's. A plain
SentenceTransformer folder may stand in for a run (only ``student`` and ``teacher`` then), which is
how the all-MiniLM-L6-v2 / SciFact check (nDCG@10 = 0.645) runs through this very code.

Eval sets and the vectors each mode searches come from :mod:`distill.evaluate.inputs`; this module runs the
searches, scores them and writes the table. ``ddx evaluate --routed`` runs this evaluation with a per-set hook that
also mixes the teacher and hybrid runs per query into the routing curve (:func:`distill.route.curve.evaluate_routed`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.evaluate.config import MODES, EvalConfig
from distill.evaluate.inputs import Encoders, EvalSet, SetVectors, load_eval_set, mode_inputs, set_vectors
from distill.evaluate.metrics import MetricsResult, metrics_from_topk, trec_tie_priority
from distill.evaluate.trec_run import write_trec_run
from distill.model.run_file import check_run_store
from distill.model.teacher_dims import truncate_teacher
from distill.search.search import PassageSource, exact_search, faiss_search
from distill.search.search_inputs import unit_rows
from precompute.sources import SourceOptions, parse_source
from storage.errors import DdxError
from storage.fs import atomic_open
from storage.store import TeacherStore

__all__ = ["MODES", "EvalConfig", "EvalResult", "SetHook", "evaluate_retrieval", "results_dir", "run_evaluation"]


@dataclass
class EvalResult:
    """Rows of the evaluation table (one per data set and mode) and what was excluded."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    curves: list[dict[str, Any]] = field(default_factory=list)  # routing curves (with --routed), one per data set

    def to_dict(self) -> dict[str, Any]:
        out = {"rows": self.rows, "notes": self.notes, "files": self.files}
        return out | ({"routing_curves": self.curves} if self.curves else {})


# Called once per eval set after its searches, with the set, its vectors and mode → (top scores, metrics) of every
# mode run; returns extra table rows (they get the % of teacher retained too) and an optional record for
# EvalResult.curves. ``ddx evaluate --routed`` passes one (distill.route.curve).
Searched = dict[str, tuple[np.ndarray, MetricsResult]]  # mode → (top scores [nq, k] best first, metrics)
SetHook = Callable[[EvalSet, SetVectors, Searched], tuple[list[dict[str, Any]], dict[str, Any] | None]]


def _search(
    config: EvalConfig, queries: np.ndarray, passages: PassageSource, n_docs: int, priority: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    k = min(max(config.k_values), n_docs)  # a k beyond the corpus ranks all of it (noted by the caller)
    if config.search == "exact":
        return exact_search(
            queries,
            passages,
            k,
            chunk_size=config.chunk_size,
            device=config.device,
            normalize=True,
            tie_priority=priority,
        )
    return faiss_search(
        queries,
        passages,
        k,
        index=config.search.removeprefix("faiss-"),
        normalize=True,
        chunk_size=config.chunk_size,
    )


def _available_modes(config: EvalConfig, enc: Encoders, store: TeacherStore | None) -> list[str]:
    modes = [m for m in config.modes if not (m in ("hybrid", "projected") and enc.model is None)]
    modes = [m for m in modes if not (m == "projected" and enc.teacher_dims is not None)]
    modes = [m for m in modes if not (m in ("teacher", "hybrid") and store is None)]
    if not modes:
        raise DdxError(
            f"None of the modes {config.modes} can run: hybrid/projected need a ddx run folder as "
            "--model (projected: one with a projection, not --projection none), teacher/hybrid need --store."
        )
    return modes


def _mode_notes(config: EvalConfig, enc: Encoders, store: TeacherStore | None) -> list[str]:
    """What a ``--projection none`` run's rows mean (the hybrid's cut index; no projected mode)."""
    dims = enc.teacher_dims
    if dims is None:
        return []
    full = f"all {store.dim}" if store is not None else "all"
    notes = [
        f"{config.model}: --projection none run: hybrid searches the teacher's first {dims} dims (renormalised), "
        f"teacher mode {full}"
    ]
    if "projected" in config.modes:
        notes.append(f"{config.model}: no projected mode: a --projection none run has no projection (see student)")
    return notes


def _evaluate_set(
    config: EvalConfig,
    es: EvalSet,
    enc: Encoders,
    store: TeacherStore | None,
    modes: list[str],
    on_set: SetHook | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """One table row per mode for one eval set (and its TREC run files with ``save_run``), and ``on_set``'s rows
    and record."""
    v, rate = set_vectors(es, enc, store, modes, config.teacher, config.title_join)
    priority = trec_tie_priority(es.doc_ids)
    if max(config.k_values) > len(es.doc_ids):
        es.notes.append(
            f"{es.source.spec}: k={max(config.k_values)} is larger than the corpus "
            f"({len(es.doc_ids)} passages): every passage is ranked"
        )
    out: list[dict[str, Any]] = []
    searched: Searched = {}
    for mode in modes:
        queries, passages = mode_inputs(mode, v, enc)
        scores, idx = _search(config, queries, passages, len(es.doc_ids), priority)
        metrics = metrics_from_topk(es.qrels, es.query_ids, es.doc_ids, idx, scores, k_values=config.k_values)
        searched[mode] = (scores, metrics)
        out.append(
            {
                "data": es.source.spec,
                "split": config.split,
                "mode": mode,
                **metrics.mean,
                "queries": metrics.num_evaluated,
                "passages": len(es.doc_ids),
                "encode_texts_per_s": None if mode == "teacher" else round(rate, 1),
                "mean_cos_to_teacher": _cosine(mode, v, enc),
            }
        )
        if config.save_run:
            path = Path(config.save_run) / f"{es.name}-{config.split}-{mode}.trec"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_trec_run(path, es.query_ids, es.doc_ids, idx, scores, tag=f"ddx-{mode}")
    curve = None
    if on_set is not None:
        rows, curve = on_set(es, v, searched)
        out.extend(rows)
    _add_retained(out)
    return out, curve


def _cosine(mode: str, v: SetVectors, enc: Encoders) -> float | None:
    """Mean cosine between projected student vectors and the teacher's, for the texts this mode projects."""
    if v.store is None or v.q_p is None or mode not in ("hybrid", "projected"):
        return 1.0 if mode == "teacher" else None
    store, rows_q, rows_d = v.teacher()
    q_p = v.q_p
    sims = [_mean_cos(q_p, truncate_teacher(store.get_rows(rows_q, dtype="float32"), enc.teacher_dims))]
    if mode == "projected":
        d_s = v.student_corpus()
        sample = np.arange(0, len(d_s), max(1, len(d_s) // 20_000))
        sims.append(_mean_cos(enc.project(d_s[sample]), store.get_rows(rows_d[sample], dtype="float32")))
        return round(float(np.average(sims, weights=[len(q_p), len(sample)])), 4)
    return round(sims[0], 4)


def _mean_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float((unit_rows(a) * unit_rows(b)).sum(axis=1).mean())


def _add_retained(rows: list[dict[str, Any]]) -> None:
    teacher = next((r for r in rows if r["mode"] == "teacher"), None)
    for row in rows:
        if teacher is not None and teacher["nDCG@10"]:
            row["retained_nDCG@10"] = round(100 * row["nDCG@10"] / teacher["nDCG@10"], 2)
            row["retained_MRR@10"] = round(100 * row["MRR@10"] / max(teacher["MRR@10"], 1e-12), 2)


def evaluate_retrieval(config: EvalConfig) -> EvalResult:
    """Evaluate every available mode on every data set; write the table as JSON and CSV.

    Returns:
        The table rows (data set, split, mode, metrics, % of teacher retained, cosine to teacher, encode rate).

    Raises:
        FingerprintMismatchError: the run was trained against another store.
        MissingVectorsError: the store lacks texts of the evaluation set (and no --teacher was given).
        BadSourceError: empty split, or unknown judged documents under --strict.
    """
    store = TeacherStore.open(config.store) if config.store else None
    return run_evaluation(config, store)


def run_evaluation(config: EvalConfig, store: TeacherStore | None, on_set: SetHook | None = None) -> EvalResult:
    """:func:`evaluate_retrieval` on an open store (or none), with ``on_set`` called for every eval set."""
    enc = Encoders(config.model, config.device, config.batch_size, config.progress)
    if store is not None and enc.run is not None:
        check_run_store(enc.run, config.model, store)
    modes = _available_modes(config, enc, store)
    options = SourceOptions(title_join=config.title_join)
    result = EvalResult(notes=_mode_notes(config, enc, store))
    for spec in config.data:
        es = load_eval_set(parse_source(spec, options), config.split, config.strict)
        rows, curve = _evaluate_set(config, es, enc, store, modes, on_set)
        result.rows.extend(rows)
        result.curves.extend([curve] if curve else [])
        result.notes.extend(es.notes)
    out = results_dir(config, is_run=enc.run is not None)
    if out:
        result.files = _write_tables(result, Path(out), config.split)
    return result


def results_dir(config: EvalConfig, *, is_run: bool) -> str | None:
    """Where the results go: ``config.out``, else ``<model>/eval`` when the model is a run folder, else nowhere."""
    return config.out or (str(Path(config.model) / "eval") if is_run else None)


def _write_tables(result: EvalResult, out: Path, split: str) -> list[str]:
    """The table as JSON and CSV in ``out``, each file written atomically (temp file + rename: ``atomic_open``)."""
    import csv
    import io
    import json

    out.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out / f"results-{split}.json", out / f"results-{split}.csv"
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(k for row in result.rows for k in row)))
    writer.writeheader()
    writer.writerows(result.rows)
    for path, text in ((json_path, json.dumps(result.to_dict(), indent=2)), (csv_path, table.getvalue())):
        with atomic_open(path) as f:
            f.write(text.encode("utf-8"))
    return [str(json_path), str(csv_path)]
