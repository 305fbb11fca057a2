"""The routing curve: retrieval quality against the fraction of queries the teacher encodes.

At budget b a router sends its ``round(b·n)`` highest-scoring queries to the teacher; the rest keep the hybrid's
ranking. A routed query searches with its **stored** teacher query vector against the same teacher passages, so
its ranking is exactly the teacher mode's ranking of that query, and every metric of the routed system is the mean
of per-query values taken from the teacher and hybrid runs: each point is exact, and no teacher runs.

Rows, at budgets 0, 5, 10, 20, 30, 50 and 100 %:

* each trained router (``encoder``, ``retrieval``);
* ``oracle`` — ranks by the true per-query nDCG@10 gain: the best any router can do at that budget;
* ``random`` — the expectation over uniformly random choices of ``round(b·n)`` queries (exact, no sampling):
  ``hybrid + (round(b·n)/n)·(teacher − hybrid)`` for every metric.

Every curve is the hybrid at 0 % and the teacher at 100 %. The oracle rises while it spends the budget on queries
the teacher improves, stays flat on ties and falls on queries where the hybrid beats the teacher; so it is
monotone up to the fraction of queries with a positive gain, and above the teacher in between when the hybrid wins
some queries. ``lift_over_random`` is ``(router − random) / (oracle − random)`` in nDCG@10: the share of the
oracle's lift a router recovers. ``crosses_teacher_at`` is the smallest teacher usage (over every possible
``round(b·n)``, not just the listed budgets) at which a curve reaches the teacher's nDCG@10.

:func:`evaluate_routed` is ``ddx evaluate --routed``: the evaluation of :mod:`distill.evaluate.evaluate` with these
rows added per data set, and the curve written next to the results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distill.evaluate.evaluate import EvalConfig, EvalResult, results_dir, run_evaluation
from distill.evaluate.inputs import EvalSet, SetVectors
from distill.evaluate.metrics import MetricsResult
from distill.model.run_file import check_run_store, read_run
from distill.route.router import Router, student_identity
from storage.errors import DdxError
from storage.fs import atomic_open, atomic_path
from storage.store import TeacherStore

__all__ = ["BUDGETS", "HEADLINE", "curve_values", "evaluate_routed", "routed_rows", "write_routing_curve"]

BUDGETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
HEADLINE = "nDCG@10"


def evaluate_routed(config: EvalConfig, routed: str) -> EvalResult:
    """:func:`distill.evaluate.evaluate.evaluate_retrieval` plus the routing curve of the router folder ``routed``.

    Returns:
        The evaluation table with the routing-curve rows (``encoder@20%``, ``oracle@20%``, ...) added per data set,
        and the curves (``EvalResult.curves``); ``routing-curve-<split>.json`` (and ``.png`` with matplotlib) are
        written next to the results.

    Raises:
        DdxError: ``config.modes`` lacks teacher or hybrid, or there is no store.
        FingerprintMismatchError: the run, or the router, was fitted on another store or student.
        And everything :func:`distill.evaluate.evaluate.evaluate_retrieval` raises.
    """
    if not {"teacher", "hybrid"} <= set(config.modes):
        raise DdxError(f"--routed mixes the teacher and hybrid runs: keep both in --modes (got {config.modes}).")
    store = TeacherStore.open(config.store) if config.store else None
    router = _checked_router(config, routed, store)  # before the student loads: fails fast
    result = run_evaluation(config, store, lambda es, v, searched: routed_rows(router, es, config.split, v, searched))
    out = results_dir(config, is_run=True)  # _checked_router read the run file: the model is a run folder
    if out and result.curves:
        files, notes = write_routing_curve(result.curves, Path(out), config.split)
        result.files.extend(files)
        result.notes.extend(notes)
    return result


def _checked_router(config: EvalConfig, routed: str, store: TeacherStore | None) -> Router:
    """The ``--routed`` router, refused unless it was fitted on this store and this run's student."""
    if store is None:
        raise DdxError("--routed needs --store: routed queries search with their stored teacher vectors.")
    check_run_store(read_run(config.model), config.model, store)  # a run folder, trained on this store
    router = Router.load(routed, device="cpu")
    router.check(store_fingerprint=store.fingerprint, student_id=student_identity(config.model), where=routed)
    return router


def _take(b: float, n: int) -> int:
    return int(np.floor(b * n + 0.5))


def curve_values(hybrid: np.ndarray, teacher: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Mean of the metric when the first m queries of ``order`` go to the teacher, for every m in 0..n.

    Example:
        >>> curve_values(np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0, 1])).tolist()
        [0.5, 1.0, 0.5]
    """
    n = len(order)
    gains = (teacher - hybrid)[order]
    return (hybrid.sum() + np.concatenate([[0.0], np.cumsum(gains)])) / max(n, 1)


def routed_rows(
    router: Router, es: EvalSet, split: str, v: SetVectors, searched: dict[str, tuple[np.ndarray, MetricsResult]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Routing-curve rows (every metric) for one eval set, and the curve's JSON record.

    Args:
        router: the fitted router (already checked against the store and the student).
        es: the eval set.
        split: its split (for the rows).
        v: the set's vectors (student query embeddings feed the router).
        searched: mode → (top scores ``[nq, k]`` best first, metrics) of the ``hybrid`` and ``teacher`` searches.
    """
    if not {"hybrid", "teacher"} <= set(searched):
        raise DdxError("The routing curve needs the teacher and hybrid searches: keep both in --modes.")
    (h_scores, h_metrics), t_metrics = searched["hybrid"], searched["teacher"][1]
    qids = [q for q in es.query_ids if q in h_metrics.per_query]
    where = {q: i for i, q in enumerate(es.query_ids)}
    pos = np.array([where[q] for q in qids], dtype=np.int64)
    names = list(h_metrics.mean)
    hyb = {m: np.array([h_metrics.per_query[q][m] for q in qids]) for m in names}
    tea = {m: np.array([t_metrics.per_query[q][m] for q in qids]) for m in names}
    rankers = {k: router.score(k, v.q_s[pos], h_scores[pos]) for k in router.models}
    rankers["oracle"] = tea[HEADLINE] - hyb[HEADLINE]
    orders = {name: np.argsort(-s, kind="stable") for name, s in rankers.items()}
    rows, n = [], len(qids)
    for b in BUDGETS:
        m = _take(b, n)
        oracle = curve_values(hyb[HEADLINE], tea[HEADLINE], orders["oracle"])[m]
        random = {k: hyb[k].mean() + (m / max(n, 1)) * (tea[k].mean() - hyb[k].mean()) for k in names}
        for name in [*rankers, "random"]:
            means = random if name == "random" else {k: curve_values(hyb[k], tea[k], orders[name])[m] for k in names}
            lift = _lift(means[HEADLINE], random[HEADLINE], oracle)
            rows.append(_row(es, split, name, b, m, n, means, lift))
    return rows, _record(es, split, hyb, tea, orders, rows)


def _lift(value: float, random: float, oracle: float) -> float | None:
    return round((value - random) / (oracle - random), 4) if oracle - random > 1e-12 else None


def _row(es: EvalSet, split: str, name: str, b: float, m: int, n: int, means: dict, lift: float | None) -> dict:
    return {
        "data": es.source.spec,
        "split": split,
        "mode": f"{name}@{100 * b:g}%",
        "router": name,
        "budget": b,
        "teacher_usage": round(m / max(n, 1), 4),
        **{k: float(v) for k, v in means.items()},
        "queries": n,
        "passages": len(es.doc_ids),
        "lift_over_random": lift if name != "random" or lift is None else 0.0,
        "encode_texts_per_s": None,
        "mean_cos_to_teacher": None,
    }


def _record(
    es: EvalSet, split: str, hyb: dict, tea: dict, orders: dict[str, np.ndarray], rows: list[dict]
) -> dict[str, Any]:
    """The curve's JSON record: levels, every row, the full nDCG@10 curves and where each crosses the teacher."""
    teacher = float(tea[HEADLINE].mean())
    curves: dict[str, Any] = {}
    for name, order in orders.items():
        full = curve_values(hyb[HEADLINE], tea[HEADLINE], order)
        reached = np.flatnonzero(full >= teacher - 1e-12)
        curves[name] = {
            "ndcg10_by_usage": [round(float(x), 6) for x in full],
            "crosses_teacher_at": round(int(reached[0]) / max(len(order), 1), 4) if len(reached) else None,
            "max_ndcg10": round(float(full.max()), 6),
            "usage_at_max": round(int(full.argmax()) / max(len(order), 1), 4),
        }
    return {
        "data": es.source.spec,
        "split": split,
        "queries": len(hyb[HEADLINE]),
        "teacher": {k: float(v.mean()) for k, v in tea.items()},
        "hybrid": {k: float(v.mean()) for k, v in hyb.items()},
        "budgets": list(BUDGETS),
        "curves": curves,
        "rows": rows,
    }


def write_routing_curve(records: list[dict[str, Any]], out: Path, split: str) -> tuple[list[str], list[str]]:
    """``routing-curve-<split>.json`` and, with matplotlib installed, ``routing-curve-<split>.png`` in ``out``.

    Returns:
        ``(files written, notes)``; a note says why the PNG is missing when matplotlib is not installed.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"routing-curve-{split}.json"
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"curves": records}, indent=2))
    try:
        import matplotlib
    except ImportError:
        note = "routing curve PNG not written: matplotlib is not installed (pip install 'ddx[plot]')"
        return [str(path)], [note]
    matplotlib.use("Agg", force=True)
    png = out / f"routing-curve-{split}.png"
    _plot(records, png)
    return [str(path), str(png)], []


def _plot(records: list[dict[str, Any]], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(records), figsize=(5.5 * len(records), 4.2), squeeze=False)
    styles = {"encoder": "tab:blue", "retrieval": "tab:orange", "oracle": "tab:green"}
    for ax, rec in zip(axes[0], records, strict=True):
        for name, curve in rec["curves"].items():
            ys = np.asarray(curve["ndcg10_by_usage"])
            xs = 100 * np.arange(len(ys)) / max(len(ys) - 1, 1)
            ax.plot(xs, ys, label=name, color=styles.get(name), lw=1.6 if name != "oracle" else 1.0)
        hyb, tea = rec["hybrid"][HEADLINE], rec["teacher"][HEADLINE]
        ax.plot([0, 100], [hyb, tea], color="grey", ls=":", label="random")
        ax.axhline(tea, color="black", ls="--", lw=0.8, label=f"teacher {tea:.4f}")
        ax.axhline(hyb, color="grey", ls="--", lw=0.8, label=f"hybrid {hyb:.4f}")
        for row in rec["rows"]:
            if row["router"] in ("encoder", "retrieval"):
                ax.plot(100 * row["teacher_usage"], row[HEADLINE], "o", ms=3, color=styles[row["router"]])
        name = rec["data"].split(":", 1)[-1].rstrip("/").rsplit("/", 1)[-1]
        ax.set(title=f"{name} ({rec['split']}, {rec['queries']} queries)", xlabel="teacher usage (% of queries)")
        ax.set_ylabel(HEADLINE)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
