"""Warm start of a new projection: its output layer fitted to stored teacher vectors in closed form.

A projection starts from random weights while the student is pretrained, so the first phase-1
steps are spent teaching the projection a mapping that a closed form already gives: with the
student and the first projection layer fixed, the best output layer in the least-squares sense is
a ridge regression from hidden features to teacher vectors. Fitting it costs one forward pass of
the student over a sample of the phase-1 texts (no backward pass, no teacher run: the targets come
from the store), and training then starts from the best linear read-out instead of noise.

Two fits (``--projection-init``):

* ``procrustes`` (default) — the best *orthogonal* read-out, scaled: ``W = s·U Vᵀ`` from the SVD of the centred
  cross-covariance. It keeps every direction of the student's space at its length, so queries from domains the
  fit never saw keep the distinctions the student draws between them. Out of domain this is what matters: on
  SciFact, with the map fitted on HotpotQA + MS MARCO text only, the hybrid (projected queries against the
  teacher's passages) keeps 71 % of the teacher's nDCG@10 with this read-out against 61 % with ridge
  (docs/benchmarks.md, "Out of domain").
* ``ridge`` — the least-squares read-out: closest to the teacher on the fit's own texts, but it shrinks the
  directions those texts barely use, which is where an unseen domain's queries differ from each other.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distill.model.model import StudentModelWithProjection
from distill.model.projection import ProjectionLayer
from distill.train.datasets import Phase1Dataset, phase1_collate_fn
from storage.errors import DdxError

__all__ = ["WARM_STARTS", "warm_start_projection"]

WARM_STARTS = ("procrustes", "ridge")


def _features(
    model: StudentModelWithProjection, proj: ProjectionLayer, dataset: Phase1Dataset, rows: np.ndarray, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden projection features (after fc1 → GELU → LayerNorm) and teacher vectors of ``rows``."""
    collate = phase1_collate_fn(dataset.tokens)
    device = next(proj.parameters()).device
    feats, targets = [], []
    with torch.inference_mode():
        for s in range(0, len(rows), batch_size):
            batch = collate(dataset.__getitems__(rows[s : s + batch_size].tolist()))
            x = model.student(
                {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
            )["sentence_embedding"]
            feats.append(proj.norm(proj.act(proj.fc1(x.to(proj.fc1.weight.dtype)))).double().cpu())
            targets.append(batch["teacher"].double())
    return torch.cat(feats), torch.cat(targets)


def _mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.detach(), b.detach(), dim=1).mean())


def _ridge(feats: torch.Tensor, targets: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [hidden, teacher] and bias of the ridge fit; ``l2`` relative to the mean feature variance."""
    mu_f, mu_t = feats.mean(0), targets.mean(0)
    fc = feats - mu_f
    gram = fc.T @ fc
    penalty = l2 * float(gram.diagonal().mean()) * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram + penalty, fc.T @ (targets - mu_t))
    return weight, mu_t - mu_f @ weight


def _procrustes(feats: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [hidden, teacher] and bias of the scaled orthogonal fit (orthonormal rows or columns, whichever the
    shapes allow); the scale matches the spread of the mapped features to the teacher vectors'."""
    mu_f, mu_t = feats.mean(0), targets.mean(0)
    fc, tc = feats - mu_f, targets - mu_t
    u, _, vt = torch.linalg.svd(fc.T @ tc, full_matrices=False)
    weight = u @ vt
    weight = weight * (torch.linalg.norm(tc) / torch.linalg.norm(fc @ weight).clamp_min(1e-12))
    return weight, mu_t - mu_f @ weight


def _choose_l2(feats: torch.Tensor, targets: torch.Tensor, grid: tuple[float, ...], seed: int) -> float:
    """The penalty whose fit on 90 % of the texts best matches the other 10 % (mean cosine)."""
    held = torch.from_numpy(np.random.default_rng(seed).random(len(feats)) < 0.1)
    if int(held.sum()) < 10:
        return grid[len(grid) // 2]
    scores = []
    for l2 in grid:
        w, b = _ridge(feats[~held], targets[~held], l2)
        scores.append(_mean_cos(feats[held] @ w + b, targets[held]))
    return grid[int(np.argmax(scores))]


def warm_start_projection(
    model: StudentModelWithProjection,
    dataset: Phase1Dataset,
    *,
    method: str = "procrustes",
    max_texts: int = 8_192,
    l2_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0),
    batch_size: int = 64,
    seed: int = 42,
) -> dict[str, Any]:
    """Set the projection's output layer to the closed-form fit of teacher vectors on hidden features.

    Args:
        model: student + new projection (modified in place: ``projection.fc2``).
        dataset: phase-1 texts with their teacher vectors.
        method: ``procrustes`` (scaled orthogonal read-out) or ``ridge`` (least squares); module docstring.
        max_texts: fit on at most this many texts (a seeded sample, sorted by length for cheap batches).
        l2_grid: ridge penalties (relative to the mean feature variance) to choose from on a held-out 10 %:
            a few hundred texts need a strong penalty, a hundred thousand almost none.
        batch_size: texts per forward pass.
        seed: sample seed.

    Returns:
        The method, texts used and the mean cosine to the teacher on them before and after the fit.

    Raises:
        DdxError: an unknown method; the model has no projection layer (``--projection none``: nothing to fit).
    """
    if method not in WARM_STARTS:
        raise DdxError(f"Projection warm start must be one of {', '.join(WARM_STARTS)}, got {method!r}.")
    proj = model.projection
    if not isinstance(proj, ProjectionLayer):
        raise DdxError("The warm start fits a projection's output layer; a --projection none model has none.")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(dataset), min(max_texts, len(dataset)), replace=False))
    rows = rows[np.argsort(dataset.lengths[rows], kind="stable")]
    was_training = model.training
    model.eval()
    feats, targets = _features(model, proj, dataset, rows, batch_size)
    fc2 = proj.fc2
    before = _mean_cos(feats @ fc2.weight.detach().double().T.cpu() + fc2.bias.detach().double().cpu(), targets)
    l2 = _choose_l2(feats, targets, l2_grid, seed) if method == "ridge" else None
    weight, bias = _ridge(feats, targets, l2) if l2 is not None else _procrustes(feats, targets)
    with torch.no_grad():
        fc2.weight.copy_(weight.T.to(fc2.weight.dtype))
        fc2.bias.copy_(bias.to(fc2.bias.dtype))
    after = _mean_cos(feats @ weight + bias, targets)
    model.train(was_training)
    fit = {"method": method, "texts": len(rows)} | ({"l2": l2} if l2 is not None else {})
    return fit | {"mean_cos_before": round(before, 4), "mean_cos_after": round(after, 4)}
