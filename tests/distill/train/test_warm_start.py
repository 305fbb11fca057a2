"""The projection's warm start: the scaled orthogonal (Procrustes) and the ridge read-outs.

Why Procrustes is the default is a property of the two fits, checked here on a task where it is known: the
teacher is a rotation of the student, and the fit's texts cover only part of the student's space (one domain).
Inputs from outside that part (another domain) keep their distances under the orthogonal fit and collapse under
the least-squares one, which is the out-of-domain hybrid's 71 % against 61 % on SciFact (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest
import torch

from distill.train.warm_start import WARM_STARTS, _procrustes, _ridge


def _rotation_task(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training features spanning 8 of 32 dims (plus a little noise), targets = features @ R, and inputs from the
    other 24 dims (the unseen domain) with their true targets."""
    g = torch.Generator().manual_seed(seed)
    rot = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0]
    seen = torch.zeros(400, 32, dtype=torch.float64)
    seen[:, :8] = torch.randn(400, 8, generator=g, dtype=torch.float64)
    seen += 0.01 * torch.randn(400, 32, generator=g, dtype=torch.float64)
    unseen = torch.zeros(50, 32, dtype=torch.float64)
    unseen[:, 8:] = torch.randn(50, 24, generator=g, dtype=torch.float64)
    return seen, seen @ rot, unseen, unseen @ rot


def _pairwise(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x)[torch.triu_indices(len(x), len(x), 1).unbind()]


def test_procrustes_keeps_unseen_inputs_apart_where_ridge_collapses_them() -> None:
    seen, targets, unseen, _ = _rotation_task()
    w_p, b_p = _procrustes(seen, targets)
    w_r, b_r = _ridge(seen, targets, 1e-2)
    true = _pairwise(unseen)
    kept_p = _pairwise(unseen @ w_p + b_p) / true
    kept_r = _pairwise(unseen @ w_r + b_r) / true
    scale = float(kept_p.mean())
    assert 0.9 < scale < 1.1, scale  # targets are a rotation: the fitted scale is ~1
    assert float((kept_p / scale - 1).abs().max()) < 1e-9  # every distance kept (an isometry up to the scale)
    assert float(kept_r.mean()) < 0.2, float(kept_r.mean())  # ridge shrinks the unused directions toward 0


def test_both_fits_recover_the_map_on_the_seen_part() -> None:
    seen, targets, _, _ = _rotation_task(1)
    for fit in (_procrustes(seen, targets), _ridge(seen, targets, 1e-3)):
        mapped = seen @ fit[0] + fit[1]
        cos = torch.nn.functional.cosine_similarity(mapped, targets, dim=1)
        assert float(cos.mean()) > 0.99


@pytest.mark.parametrize("shape", [(48, 24), (24, 48)])
def test_procrustes_weight_is_a_scaled_orthogonal_map_whichever_side_is_wider(shape: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(300, shape[0], generator=g, dtype=torch.float64)
    targets = feats @ torch.randn(*shape, generator=g, dtype=torch.float64) + 3.0
    weight, bias = _procrustes(feats, targets)
    sv = torch.linalg.svdvals(weight)
    assert weight.shape == shape and len(sv) == min(shape)
    assert float(sv.max() / sv.min()) < 1 + 1e-9  # all singular values equal: orthonormal rows or columns, scaled
    assert torch.allclose((feats @ weight + bias).mean(0), targets.mean(0))  # the bias centres the output


def test_a_run_reports_the_fit_it_made_and_refuses_an_unknown_one(config) -> None:  # type: ignore[no-untyped-def]
    from distill.train.config import TrainConfig
    from distill.train.run import train
    from storage.errors import DdxError

    assert WARM_STARTS == ("procrustes", "ridge")
    assert TrainConfig.__dataclass_fields__["projection_init"].default == "procrustes"
    for method in WARM_STARTS:
        report = train(config(projection_init=method, max_steps=1, out=f"{config().out}-{method}")).report
        fit = report["warm_start"]
        assert fit["method"] == method and ("l2" in fit) == (method == "ridge"), fit
        assert fit["mean_cos_after"] > fit["mean_cos_before"], fit
    with pytest.raises(DdxError, match="projection_init must be one of procrustes, ridge, random"):
        config(projection_init="lstsq")
