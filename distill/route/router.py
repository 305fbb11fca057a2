"""The router: a small MLP that scores how much a query would gain from the teacher, and its saved form.

Two kinds, trained on the same targets (:mod:`distill.route.targets`) and compared on the same curve:

* ``encoder``   — input: the student's query embedding. Decides before any search, so it can live inside an
  encoder (:mod:`distill.route.routed_model`): the reference system's router.
* ``retrieval`` — input: the student's query embedding and five numbers from the hybrid search's own top 10
  scores (top-1, top-1 − top-2, top-1 − top-10, their mean, the entropy of their softmax at τ = 0.05). Decides
  after the first search whether to re-query with the teacher.

**Training.** Mean squared error on the target (standardised), AdamW, mini-batches. Regression on the gain, not
classification of "teacher helps": the expected gain given the query is exactly what a budget should be spent
on, and regression estimates it. Held-out queries pick the number of epochs: the one whose ranking recovers most
of the oracle's lift over random routing, averaged over the curve's budgets (``lift``), which is the quantity the
routing curve reports — by 5-fold cross-validation under 5,000 fit queries (a 10 % hold-out of a few hundred
queries is too few to choose by), by one held-out 10 % above.

**Saved form.** ``router.pt`` (weights, input standardisation, the fit queries' scores for calibrating a
teacher-usage threshold) and ``router.json`` (what it was fitted with: store fingerprint, teacher spec, student
identity, target, report), written into a temporary folder that is renamed into place (``router.json`` last inside
it). A router is used only with the store and the student it was fitted with (:meth:`Router.check`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.model.model import STUDENT_DIR
from distill.model.projection import PROJECTION_FILE
from distill.route.config import KINDS, MLPSettings, check_usage
from precompute.teacher import weights_identity
from storage.errors import DdxError, FingerprintMismatchError, FormatVersionError
from storage.fs import replace_dir

__all__ = [
    "KINDS",
    "ROUTER_FILE",
    "Router",
    "RouterMLP",
    "RouterNotFoundError",
    "lift_over_random",
    "score_features",
    "student_identity",
    "threshold_for_usage",
    "train_router_model",
]

ROUTER_FILE = "router.json"
WEIGHTS_FILE = "router.pt"
FORMAT_VERSION = 1
LIFT_BUDGETS = (0.05, 0.1, 0.2, 0.3, 0.5)
CV_BELOW = 5_000  # fit sets smaller than this choose the epoch count by cross-validation
CV_FOLDS = 5


class RouterNotFoundError(DdxError, FileNotFoundError):
    """No fitted router where one was expected."""


class RouterMLP(nn.Module):
    """``(x − mean) / std → Linear → GELU → Dropout → Linear → score``: higher means send to the teacher.

    Example:
        >>> mlp = RouterMLP(in_dim=4)
        >>> mlp(torch.zeros(3, 4)).shape
        torch.Size([3])
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, *, in_dim: int, hidden: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if in_dim < 1 or hidden < 1:
            raise DdxError(f"RouterMLP needs positive in_dim and hidden, got {in_dim}, {hidden}.")
        self.in_dim, self.hidden = in_dim, hidden
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std).squeeze(-1)

    def standardize_on(self, x: torch.Tensor) -> None:
        """Set the input standardisation from training features (constant features keep std 1)."""
        self.mean.copy_(x.mean(dim=0))
        std = x.std(dim=0) if len(x) > 1 else torch.ones(x.shape[1])
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    @torch.no_grad()
    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Scores of ``x`` ``[n, in_dim]`` in eval mode, as float64 numpy."""
        if x.shape[1] != self.in_dim:
            raise DdxError(f"Router expects {self.in_dim} input features, got {x.shape[1]}.")
        was = self.training
        self.eval()
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float32)) if isinstance(x, np.ndarray) else x
            return self(t.to(self.device)).double().cpu().numpy()
        finally:
            self.train(was)


def score_features(top_scores: np.ndarray, temperature: float = 0.05) -> np.ndarray:
    """The retrieval router's five numbers from a search's best-first top scores ``[n, ≥ 10]``.

    Returns:
        ``[n, 5]``: top-1, top-1 − top-2, top-1 − top-10, mean of the top 10, entropy of softmax(top 10 / τ).
        Missing places (a corpus smaller than 10) repeat the last real score.
    """
    top = np.asarray(top_scores, dtype=np.float64)[:, :10]
    if top.shape[1] == 0:
        raise DdxError("score_features needs at least one score per query.")
    top = np.where(np.isfinite(top), top, np.nan)
    top[:, 0] = np.nan_to_num(top[:, 0], nan=0.0)
    last_real = np.maximum.accumulate(np.where(np.isnan(top), 0, np.arange(top.shape[1])), axis=1)
    top = np.take_along_axis(top, last_real, axis=1)
    logits = top / temperature
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    entropy = -(p * np.log(np.maximum(p, 1e-300))).sum(axis=1)
    second = top[:, 1] if top.shape[1] > 1 else top[:, 0]
    return np.stack([top[:, 0], top[:, 0] - second, top[:, 0] - top[:, -1], top.mean(axis=1), entropy], axis=1)


def lift_over_random(scores: np.ndarray, gains: np.ndarray, budgets: tuple[float, ...] = LIFT_BUDGETS) -> float:
    """How much of the oracle's lift over random routing a ranking recovers, averaged over ``budgets``.

    At budget b the ranking sends its top ``round(b·n)`` queries to the teacher and collects their gains; random
    routing collects ``round(b·n) × mean gain``; the oracle the ``round(b·n)`` largest gains. Budgets where the
    oracle does no better than random are left out; NaN when every budget is.

    Example:
        >>> lift_over_random(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1.0, 0.0, 0.0, 0.0]), (0.25,))
        1.0
    """
    n = len(gains)
    order = np.argsort(-scores, kind="stable")
    best = np.sort(gains)[::-1]
    values = []
    for b in budgets:
        m = int(np.floor(b * n + 0.5))
        rand = m * float(gains.mean()) if n else 0.0
        oracle = float(best[:m].sum())
        if oracle - rand > 1e-12:
            values.append((float(gains[order[:m]].sum()) - rand) / (oracle - rand))
    return float(np.mean(values)) if values else float("nan")


def train_router_model(features: np.ndarray, targets: np.ndarray, settings: MLPSettings) -> tuple[RouterMLP, dict]:
    """Fit a :class:`RouterMLP` to predict ``targets`` (per-query gains) from ``features``.

    The number of epochs is chosen on held-out queries by lift over random routing. Under ``CV_BELOW`` queries a
    single held-out 10 % is a handful of queries (one of them flips the choice), so the lift curve is averaged over
    ``CV_FOLDS`` folds, smoothed over 5 epochs, and the model is then trained on every query for the best count;
    larger sets hold out ``val_fraction`` once and keep the best epoch's weights (early stop after ``patience``).

    Args:
        features: ``[n, d]`` router inputs.
        targets: ``[n]`` gains (teacher − hybrid).
        settings: architecture and optimisation.

    Returns:
        The model, and a report (how the epoch was chosen, the epoch, the held-out lift).

    Raises:
        DdxError: fewer than 2 queries, or features and targets disagree in length.
    """
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    if len(x) != len(y) or len(x) < 2:
        raise DdxError(f"A router needs at least 2 queries with targets, got {len(x)} features and {len(y)} targets.")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.seed))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small MLP gains nothing from intra-op threads; on a loaded machine they cost 2x
    try:
        if len(x) < 20 or settings.val_fraction == 0:
            model = _train(x, y, perm, settings, settings.epochs)
            report = {"selection": "none", "best_epoch": settings.epochs, "train_queries": len(x), "val_lift": None}
            return model, report
        if len(x) < CV_BELOW:
            return _cross_validated(x, y, perm, settings)
        return _held_out(x, y, perm, settings)
    finally:
        torch.set_num_threads(threads)


def _train(
    x: torch.Tensor, y: torch.Tensor, rows: torch.Tensor, settings: MLPSettings, epochs: int, watch: Any = None
) -> RouterMLP:
    """Train on ``rows`` for ``epochs`` (MSE on the standardised gain); stop when ``watch(model, epoch)`` is False."""
    g = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    xr, yr = x[rows], y[rows]
    y_std = (yr - yr.mean()) / (yr.std() if len(yr) > 1 and yr.std() > 1e-8 else 1.0)
    model = RouterMLP(in_dim=x.shape[1], hidden=settings.hidden)
    model.standardize_on(xr)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(rows), generator=g).split(settings.batch_size):
            loss = nn.functional.mse_loss(model(xr[idx]), y_std[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if watch is not None and watch(model, epoch) is False:
            break
    return model.eval()


def _cross_validated(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, settings: MLPSettings) -> tuple:
    folds = perm.tensor_split(CV_FOLDS)
    lifts = np.full((CV_FOLDS, settings.epochs), np.nan)
    for f, val in enumerate(folds):
        train_rows = torch.cat([fold for i, fold in enumerate(folds) if i != f])
        gains = y[val].double().numpy()

        def watch(model: RouterMLP, epoch: int, f: int = f, val: torch.Tensor = val, gains: np.ndarray = gains) -> None:
            lifts[f, epoch - 1] = lift_over_random(model.score(x[val]), gains)

        _train(x, y, train_rows, settings, settings.epochs, watch)
    with np.errstate(all="ignore"):
        curve = np.nanmean(lifts, axis=0) if np.isfinite(lifts).any() else np.zeros(settings.epochs)
    smooth = np.array([np.nanmean(curve[max(0, e - 2) : e + 3]) for e in range(len(curve))])
    best = int(np.nanargmax(smooth)) + 1 if np.isfinite(smooth).any() else settings.epochs
    model = _train(x, y, perm, settings, best)
    report = {"selection": f"{CV_FOLDS}-fold", "best_epoch": best, "train_queries": len(x)}
    return model, report | {"val_lift": round(float(smooth[best - 1]), 4) if np.isfinite(smooth[best - 1]) else None}


def _held_out(x: torch.Tensor, y: torch.Tensor, perm: torch.Tensor, settings: MLPSettings) -> tuple:
    n_val = int(len(x) * settings.val_fraction)
    val, rows = perm[:n_val], perm[n_val:]
    gains = y[val].double().numpy()
    best: list[Any] = [-np.inf, 0, None]

    def watch(model: RouterMLP, epoch: int) -> bool:
        lift = lift_over_random(model.score(x[val]), gains)
        if (np.isfinite(lift) and lift > best[0]) or best[2] is None:
            best[:] = [lift if np.isfinite(lift) else -np.inf, epoch, _state(model)]
        return epoch - best[1] < settings.patience

    model = _train(x, y, rows, settings, settings.epochs, watch)
    model.load_state_dict(best[2])
    report = {"selection": "held-out", "best_epoch": best[1], "train_queries": len(rows), "val_queries": n_val}
    return model.eval(), report | {"val_lift": round(best[0], 4) if np.isfinite(best[0]) else None}


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def threshold_for_usage(calibration: np.ndarray, usage: float) -> float:
    """The score threshold that sends a ``usage`` fraction of the calibration queries to the teacher.

    A query goes to the teacher when its score is **above** the threshold: usage 0 gives +inf, usage 1 gives -inf.

    Raises:
        DdxError: usage outside [0, 1].

    Example:
        >>> threshold_for_usage(np.array([0.1, 0.2, 0.3, 0.4]), 0.5)
        0.2
    """
    check_usage(usage)
    s = np.sort(np.asarray(calibration, dtype=np.float64))
    m = int(np.floor(usage * len(s) + 0.5))
    if m <= 0 or len(s) == 0:
        return float("inf")
    if m >= len(s):
        return float("-inf")
    return float(s[len(s) - m - 1])


def student_identity(run: str | os.PathLike[str]) -> str:
    """Identity of a run's student + projection: hash of ``student_base/``'s files and ``projection_layer.pt``.

    Content, not path: a router fitted on a run is refused by the same folder retrained in place, and accepted by
    a copy of the run moved elsewhere.
    """
    folder = Path(run)
    if not (folder / STUDENT_DIR).is_dir():
        raise DdxError(f"{str(run)!r} is not a finished ddx run (no {STUDENT_DIR}/). Pass a 'ddx train' --out folder.")
    _, student = weights_identity(str(folder / STUDENT_DIR))
    h = hashlib.blake2b(student.encode() + b"\x00", digest_size=16)
    try:
        h.update((folder / PROJECTION_FILE).read_bytes())
    except OSError as exc:
        raise DdxError(
            f"{str(run)!r} has no {PROJECTION_FILE}: pass the folder of a finished 'ddx train' run."
        ) from exc
    return h.hexdigest()


@dataclass
class Router:
    """A fitted router folder: one MLP per kind, what it was fitted with, and calibration scores.

    Attributes:
        models: kind → MLP (``encoder`` and/or ``retrieval``).
        meta: ``router.json``: store fingerprint, teacher spec, student identity, run, target, report.
        calibration: kind → the fit queries' scores (sets a threshold from a teacher-usage fraction).
    """

    models: dict[str, RouterMLP]
    meta: dict[str, Any]
    calibration: dict[str, np.ndarray] = field(default_factory=dict)

    def score(self, kind: str, student: np.ndarray, top_scores: np.ndarray | None = None) -> np.ndarray:
        """Router scores of queries from their student embeddings (and, for ``retrieval``, the hybrid's top scores)."""
        return self.model(kind).score(self.features(kind, student, top_scores))

    def features(self, kind: str, student: np.ndarray, top_scores: np.ndarray | None = None) -> np.ndarray:
        if kind == "encoder":
            return np.asarray(student, dtype=np.float32)
        if top_scores is None:
            raise DdxError("The retrieval router needs the hybrid search's top scores.")
        return np.concatenate([student, score_features(top_scores)], axis=1).astype(np.float32)

    def model(self, kind: str) -> RouterMLP:
        if kind not in self.models:
            raise DdxError(f"This router has no {kind!r} model (it has {sorted(self.models)}). Refit with that kind.")
        return self.models[kind]

    def check(self, *, store_fingerprint: str, student_id: str, where: str) -> None:
        """Refuse use with another store or another student than the fit's.

        Raises:
            FingerprintMismatchError: naming which of the two differs and what to do.
        """
        if self.meta.get("store_fingerprint") != store_fingerprint:
            raise FingerprintMismatchError(
                f"Router {where!r} was fitted on a store of teacher fingerprint {self.meta.get('store_fingerprint')}, "
                f"but this store holds {store_fingerprint}. Refit it: ddx router fit --store STORE --model RUN ..."
            )
        if self.meta.get("student_id") != student_id:
            raise FingerprintMismatchError(
                f"Router {where!r} was fitted with another student (identity {self.meta.get('student_id')}, "
                f"run {self.meta.get('run')!r}) than this model ({student_id}). Refit it on this run: "
                "ddx router fit --model RUN ..."
            )

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write ``router.pt`` then ``router.json`` into a temporary folder and rename it over ``folder``."""

        def write(tmp: Path) -> None:
            tmp.mkdir()
            payload = {
                "format": FORMAT_VERSION,
                "models": {
                    k: {"state_dict": _state(m), "in_dim": m.in_dim, "hidden": m.hidden} for k, m in self.models.items()
                },
                "calibration": {k: torch.as_tensor(v) for k, v in self.calibration.items()},
            }
            torch.save(payload, tmp / WEIGHTS_FILE)
            (tmp / ROUTER_FILE).write_text(json.dumps({"format": FORMAT_VERSION, **self.meta}, indent=2))

        return replace_dir(folder, write)

    @classmethod
    def load(cls, folder: str | os.PathLike[str], *, device: str | None = None) -> Router:
        """Read a folder :meth:`save` wrote.

        Raises:
            RouterNotFoundError: no ``router.json``/``router.pt`` there.
            FormatVersionError: written by a newer ddx.
            DdxError: unreadable files.
        """
        path = Path(folder)
        if not (path / ROUTER_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise RouterNotFoundError(
                f"No fitted router at {str(path)!r} ({ROUTER_FILE} or {WEIGHTS_FILE} missing). "
                "Fit one first: ddx router fit --store STORE --model RUN --data SOURCE --out RUN/router"
            )
        try:
            meta = json.loads((path / ROUTER_FILE).read_text())
            payload = torch.load(path / WEIGHTS_FILE, map_location=device or "cpu", weights_only=True)
        except Exception as exc:  # json, pickle, zip and runtime errors of damaged files
            raise DdxError(f"Router {str(path)!r} is unreadable ({type(exc).__name__}: {exc}). Refit it.") from exc
        if meta.get("format") != FORMAT_VERSION or payload.get("format") != FORMAT_VERSION:
            raise FormatVersionError(
                f"Router {str(path)!r} has format {meta.get('format')!r}; this ddx reads {FORMAT_VERSION}. Upgrade ddx."
            )
        models = {}
        for kind, m in payload["models"].items():
            mlp = RouterMLP(in_dim=m["in_dim"], hidden=m["hidden"])
            mlp.load_state_dict(m["state_dict"])
            models[kind] = mlp.to(device or "cpu").eval()
        calibration = {k: v.double().cpu().numpy() for k, v in payload.get("calibration", {}).items()}
        return cls(models, {k: v for k, v in meta.items() if k != "format"}, calibration)
