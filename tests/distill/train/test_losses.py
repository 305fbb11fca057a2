"""Phase1Loss and Phase2Loss against hand-computed references, masking, gradients, and gathered InfoNCE under DDP."""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from distill.train.losses import Phase1Loss, Phase2Loss
from storage.errors import DdxError, DimensionMismatchError

# ---------------------------------------------------------------- references written independently of the code


def reference_infonce(q, p, n, mask, *, temperature: float, negatives: str) -> torch.Tensor:
    """Per-query InfoNCE losses by explicit loops over the candidate list (works in float64, with autograd)."""

    def cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum() / (a.pow(2).sum().sqrt() * b.pow(2).sum().sqrt())

    batch, k_max = mask.shape
    losses = []
    for i in range(batch):
        candidates = [p[j] for j in range(batch)]
        owners = range(batch) if negatives == "batch" else [i]
        candidates += [n[j, k] for j in owners for k in range(k_max) if mask[j, k]]
        logits = torch.stack([cos(q[i], c) for c in candidates]) / temperature
        losses.append(torch.logsumexp(logits, dim=0) - logits[i])
    return torch.stack(losses)


def reference_mse(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean squared difference over every element of every (predicted row, teacher row) pair."""
    diffs = np.concatenate([(a - b).ravel() for a, b in pairs])
    return float(np.mean(diffs**2))


def phase2_batch(batch: int, k_max: int, dim: int, teacher_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random phase-2 batch; query ``i`` has ``1 + i % k_max`` valid negatives, the rest is padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, k_max, dtype=torch.bool)
    for i in range(batch):
        mask[i, : 1 + i % k_max] = True
    return {
        "query": torch.randn(batch, dim, generator=g),
        "positive": torch.randn(batch, dim, generator=g),
        "negatives": torch.randn(batch, k_max, dim, generator=g),
        "neg_mask": mask,
        "query_projected": torch.randn(batch, teacher_dim, generator=g),
        "positive_projected": torch.randn(batch, teacher_dim, generator=g),
        "negatives_projected": torch.randn(batch, k_max, teacher_dim, generator=g),
        "teacher_query": torch.randn(batch, teacher_dim, generator=g),
        "teacher_positive": torch.randn(batch, teacher_dim, generator=g),
        "teacher_negatives": torch.randn(batch, k_max, teacher_dim, generator=g),
    }


# ---------------------------------------------------------------- Phase1Loss


def test_phase1_matches_hand_computed_2x3() -> None:
    projected = np.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])
    teacher = np.array([[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])
    mse = ((0**2 + 2**2 + 2**2) + (2**2 + 0**2 + 1**2)) / 6  # = 13 / 6
    cos0 = (1 + 0 + 3) / (math.sqrt(14) * math.sqrt(2))
    cos1 = (0 + 1 + 0) / (math.sqrt(2) * math.sqrt(5))
    cos_distance = ((1 - cos0) + (1 - cos1)) / 2
    loss, parts = Phase1Loss()(torch.tensor(projected), torch.tensor(teacher))
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-6)
    assert parts["cos_distance"].item() == pytest.approx(cos_distance, rel=1e-6)
    assert loss.item() == pytest.approx(0.4 * mse + 0.6 * cos_distance, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(loss.item())

    loss, _ = Phase1Loss(mse_weight=1.0, cos_weight=0.0)(torch.tensor(projected), torch.tensor(teacher))
    assert loss.item() == pytest.approx(mse, rel=1e-6)


def test_phase1_float16_teacher_and_gradient() -> None:
    projected = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6).half()
    loss, parts = Phase1Loss()(projected, teacher)
    assert loss.dtype == torch.float32 and not parts["mse"].requires_grad
    loss.backward()
    assert projected.grad is not None and projected.grad.abs().sum() > 0


def test_phase1_teacher_dim_mismatch() -> None:
    with pytest.raises(DimensionMismatchError, match=r"teacher has shape \(2, 5\), expected \(2, 3\)"):
        Phase1Loss()(torch.randn(2, 3), torch.randn(2, 5))
    with pytest.raises(DimensionMismatchError, match="projected must be a 2-d tensor"):
        Phase1Loss()(torch.randn(3), torch.randn(3))


def test_phase1_rejects_negative_weight() -> None:
    with pytest.raises(DdxError, match="mse_weight must be a finite number >= 0"):
        Phase1Loss(mse_weight=-1.0)


# ---------------------------------------------------------------- Phase2Loss


def test_phase2_closed_form_temperature_1() -> None:
    """Two 2-d queries; query 0 has one negative opposite to it, query 1 has none (a padded slot)."""
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    inputs = {
        "query_projected": torch.tensor([e0, e1]),
        "positive_projected": torch.tensor([e0, e1]),
        "negatives_projected": torch.tensor([[[-1.0, 0.0]], [[5.0, 5.0]]]),
        "neg_mask": torch.tensor([[True], [False]]),
    }
    teacher = {"teacher_query": inputs["query_projected"], "teacher_positive": inputs["positive_projected"]}
    teacher["teacher_negatives"] = inputs["negatives_projected"]
    loss0 = math.log(math.e + 1 + math.exp(-1)) - 1  # own positive cos 1, other positive 0, negative -1
    own1 = math.log(1 + math.e) - 1  # query 1 has no negatives of its own
    batch1 = math.log(1 + math.e + 1) - 1  # ...but sees query 0's negative (cos 0) with negatives="batch"
    for negatives, loss1 in (("own", own1), ("batch", batch1)):
        loss_fn = Phase2Loss(temperature=1.0, negatives=negatives, infonce_weight=1.0, mse_weight=0.0)
        loss, parts = loss_fn(**inputs, **teacher)
        assert parts["infonce"].item() == pytest.approx((loss0 + loss1) / 2, rel=1e-6)
        assert parts["mse"].item() == 0.0
        assert loss.item() == pytest.approx(parts["infonce"].item())


@pytest.mark.parametrize("temperature", [1.0, 0.05])
@pytest.mark.parametrize("negatives", ["own", "batch"])
@pytest.mark.parametrize("space", ["projected", "student"])
def test_phase2_matches_reference(temperature: float, negatives: str, space: str) -> None:
    inputs = phase2_batch(batch=2, k_max=2, dim=4, teacher_dim=5)  # query 0: 1 negative, query 1: 2
    loss_fn = Phase2Loss(temperature=temperature, negatives=negatives, space=space)
    loss, parts = loss_fn(**inputs)

    prefix = "" if space == "student" else "_projected"
    q, p, n = (inputs[f"{role}{prefix}"].double() for role in ("query", "positive", "negatives"))
    infonce = reference_infonce(q, p, n, inputs["neg_mask"], temperature=temperature, negatives=negatives).mean()
    mask = inputs["neg_mask"].numpy()
    mse = reference_mse(
        [(inputs["query_projected"].numpy()[i], inputs["teacher_query"].numpy()[i]) for i in range(2)]
        + [(inputs["positive_projected"].numpy()[i], inputs["teacher_positive"].numpy()[i]) for i in range(2)]
        + [
            (inputs["negatives_projected"].numpy()[i, k], inputs["teacher_negatives"].numpy()[i, k])
            for i in range(2)
            for k in range(2)
            if mask[i, k]
        ]
    )
    assert parts["infonce"].item() == pytest.approx(infonce.item(), rel=1e-5)
    assert parts["mse"].item() == pytest.approx(mse, rel=1e-5)
    assert loss.item() == pytest.approx(0.8 * infonce.item() + 0.2 * mse, rel=1e-5)


@pytest.mark.parametrize("negatives", ["own", "batch"])
def test_phase2_padded_negatives_do_not_matter(negatives: str) -> None:
    inputs = phase2_batch(batch=3, k_max=3, dim=4, teacher_dim=6)  # 1, 2 and 3 valid negatives
    loss_fn = Phase2Loss(negatives=negatives)
    base, base_parts = loss_fn(**inputs)

    scrambled = dict(inputs)
    pad = ~inputs["neg_mask"]
    for key in ("negatives", "negatives_projected", "teacher_negatives"):
        scrambled[key] = inputs[key].clone()
        scrambled[key][pad] = 1e3 * torch.randn(int(pad.sum()), inputs[key].shape[-1])
    loss, parts = loss_fn(**scrambled)
    assert loss.item() == pytest.approx(base.item(), rel=1e-6)
    assert parts["mse"].item() == pytest.approx(base_parts["mse"].item(), rel=1e-6)

    # Extra all-padding slots change nothing either.
    widened = dict(inputs)
    widened["neg_mask"] = F.pad(inputs["neg_mask"], (0, 2), value=False)
    for key in ("negatives", "negatives_projected", "teacher_negatives"):
        widened[key] = F.pad(inputs[key], (0, 0, 0, 2), value=7.0)
    assert loss_fn(**widened)[0].item() == pytest.approx(base.item(), rel=1e-6)


def test_phase2_without_negatives_is_in_batch_only() -> None:
    inputs = phase2_batch(batch=3, k_max=1, dim=4, teacher_dim=4)
    inputs["neg_mask"] = torch.zeros(3, 0, dtype=torch.bool)
    for key in ("negatives", "negatives_projected", "teacher_negatives"):
        inputs[key] = inputs[key][:, :0]
    _, parts = Phase2Loss(temperature=1.0)(**inputs)
    q, p = inputs["query_projected"].double(), inputs["positive_projected"].double()
    n = inputs["negatives_projected"]
    expected = reference_infonce(q, p, n, inputs["neg_mask"], temperature=1.0, negatives="batch")
    assert parts["infonce"].item() == pytest.approx(expected.mean().item(), rel=1e-6)


def test_phase2_gradients_skip_padding() -> None:
    inputs = {k: v.requires_grad_() if v.is_floating_point() else v for k, v in phase2_batch(2, 2, 4, 5).items()}
    loss, _ = Phase2Loss(space="student")(**inputs)
    loss.backward()
    pad = ~inputs["neg_mask"]
    for key in ("query", "positive", "negatives", "query_projected", "positive_projected", "negatives_projected"):
        grad = inputs[key].grad
        assert grad is not None and grad.abs().sum() > 0, key
    assert inputs["negatives"].grad[pad].abs().sum() == 0
    assert inputs["negatives_projected"].grad[pad].abs().sum() == 0


def test_phase2_errors() -> None:
    inputs = phase2_batch(batch=2, k_max=2, dim=4, teacher_dim=5)
    bad = {**inputs, "teacher_positive": torch.randn(2, 7)}
    with pytest.raises(DimensionMismatchError, match=r"teacher_positive has shape \(2, 7\), expected \(2, 5\)"):
        Phase2Loss()(**bad)
    bad = {**inputs, "negatives_projected": torch.randn(2, 3, 5)}
    with pytest.raises(
        DimensionMismatchError, match=r"projected negatives has shape \(2, 3, 5\), expected \(2, 2, 5\)"
    ):
        Phase2Loss()(**bad)
    no_student = {k: v for k, v in inputs.items() if k not in ("query", "positive", "negatives")}
    with pytest.raises(DdxError, match=r"space='student'.*needs the student embeddings"):
        Phase2Loss(space="student")(**no_student)
    Phase2Loss(space="projected")(**no_student)  # not needed there
    with pytest.raises(DdxError, match="negatives must be 'own' or 'batch'"):
        Phase2Loss(negatives="all")  # type: ignore[arg-type]
    with pytest.raises(DdxError, match="temperature must be > 0"):
        Phase2Loss(temperature=0.0)


def test_phase2_hybrid_space_ranks_projected_queries_against_teacher_passages() -> None:
    inputs = phase2_batch(batch=4, k_max=3, dim=4, teacher_dim=6)
    _, parts = Phase2Loss(space="hybrid")(**inputs)
    q = inputs["query_projected"].double()
    tp, tn = inputs["teacher_positive"].double(), inputs["teacher_negatives"].double()
    expected = reference_infonce(q, tp, tn, inputs["neg_mask"], temperature=0.05, negatives="batch").mean()
    assert parts["infonce"].item() == pytest.approx(expected.item(), rel=1e-6)
    # The student's own passages play no part in the hybrid InfoNCE (only in the MSE anchor).
    moved = {**inputs, "positive_projected": inputs["positive_projected"] + 1.0}
    assert Phase2Loss(space="hybrid")(**moved)[1]["infonce"].item() == pytest.approx(parts["infonce"].item())


def test_phase2_joined_spaces_average_their_infonce_terms() -> None:
    inputs = phase2_batch(batch=4, k_max=3, dim=6, teacher_dim=6)
    single = {space: Phase2Loss(space=space)(**inputs)[1] for space in ("projected", "hybrid", "student")}
    loss, parts = Phase2Loss(space="projected+hybrid")(**inputs)
    want = (single["projected"]["infonce"] + single["hybrid"]["infonce"]) / 2
    assert parts["infonce"].item() == pytest.approx(want.item(), rel=1e-6)
    assert parts["infonce_projected"].item() == pytest.approx(single["projected"]["infonce"].item(), rel=1e-6)
    assert parts["infonce_hybrid"].item() == pytest.approx(single["hybrid"]["infonce"].item(), rel=1e-6)
    assert loss.item() == pytest.approx((0.8 * parts["infonce"] + 0.2 * parts["mse"]).item(), rel=1e-6)
    three = Phase2Loss(space="student + projected + hybrid")(**inputs)[1]["infonce"]
    assert three.item() == pytest.approx(sum(v["infonce"].item() for v in single.values()) / 3, rel=1e-6)
    assert "infonce_projected" not in single["projected"], "a single space logs one InfoNCE term"


@pytest.mark.parametrize("space", ["teacher", "projected+", "hybrid+hybrid", "projected,hybrid"])
def test_phase2_bad_space_names_the_choices(space: str) -> None:
    with pytest.raises(DdxError, match=r"use one of projected, hybrid, student, or several joined with '\+'"):
        Phase2Loss(space=space)


def test_train_config_checks_the_space() -> None:
    from distill.train.config import TrainConfig

    base = dict(phase=2, store="s", data=("beir:x",), out="o", student="m")
    assert TrainConfig(**base, infonce_space="projected+hybrid").infonce_space == "projected+hybrid"
    with pytest.raises(ValueError, match="InfoNCE space 'hybird' is not valid"):
        TrainConfig(**base, infonce_space="hybird")


# ---------------------------------------------------------------- through the real model


def test_gradients_reach_student_and_projection(tiny_bert: Path) -> None:
    from distill.model.model import StudentModelWithProjection

    torch.manual_seed(0)
    model = StudentModelWithProjection.from_pretrained(str(tiny_bert), 16, device="cpu")
    texts = ["the cat", "a protein study", "zebra quartz river", "the king of the city"]
    out = model(model.tokenize(texts))
    teacher = torch.randn(4, 16)
    for space in ("projected", "student"):
        model.zero_grad()
        loss, _ = Phase2Loss(space=space)(
            query_projected=out["projected"][:2],
            positive_projected=out["projected"][2:],
            negatives_projected=out["projected"][2:, None].flip(0),
            neg_mask=torch.ones(2, 1, dtype=torch.bool),
            teacher_query=teacher[:2],
            teacher_positive=teacher[2:],
            teacher_negatives=teacher[2:, None],
            query=out["student"][:2],
            positive=out["student"][2:],
            negatives=out["student"][2:, None].flip(0),
        )
        loss.backward(retain_graph=True)
        _assert_grads(model)
    model.zero_grad()
    Phase1Loss()(out["projected"], teacher)[0].backward()
    _assert_grads(model)


def _assert_grads(model: torch.nn.Module) -> None:
    for part in (model.student, model.projection):
        grads = [p.grad for p in part.parameters() if p.grad is not None]
        assert grads and sum(g.abs().sum() for g in grads) > 0, type(part).__name__


# ---------------------------------------------------------------- DDP: gathered InfoNCE equals the global batch

# Per rank: (batch size, negative slots). Uneven sizes exercise the padding of the gather.
UNEVEN = [(3, 2), (2, 3)]
EVEN = [(2, 1), (2, 2)]


def _ddp_data(layout: list[tuple[int, int]], dim: int = 6) -> list[tuple[torch.Tensor, ...]]:
    """Per-rank (q, p, n, mask) built from one seed, so every process sees the same global batch."""
    g = torch.Generator().manual_seed(123)
    parts = []
    for batch, k_max in layout:
        mask = torch.rand(batch, k_max, generator=g) > 0.3
        mask[:, 0] = True
        parts.append(
            (
                torch.randn(batch, dim, generator=g, dtype=torch.float64),
                torch.randn(batch, dim, generator=g, dtype=torch.float64),
                torch.randn(batch, k_max, dim, generator=g, dtype=torch.float64),
                mask,
            )
        )
    return parts


def _concat(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The global batch: ranks concatenated, negatives padded to the largest slot count."""
    k_max = max(n.shape[1] for _, _, n, _ in parts)
    q = torch.cat([q for q, _, _, _ in parts])
    p = torch.cat([p for _, p, _, _ in parts])
    n = torch.cat([F.pad(n, (0, 0, 0, k_max - n.shape[1])) for _, _, n, _ in parts])
    mask = torch.cat([F.pad(m, (0, k_max - m.shape[1]), value=False) for _, _, _, m in parts])
    return q, p, n, mask


def _ddp_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        for layout in (UNEVEN, EVEN):
            for negatives in ("batch", "own"):
                _check_rank(rank, layout, negatives, check_grads=layout is EVEN)
        # No rank tears its process group down while a peer still has gloo work in flight (tearing down early
        # aborted a rank with "terminate called without an active exception" on a loaded 2-core CI machine).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_rank(rank: int, layout: list[tuple[int, int]], negatives: str, *, check_grads: bool) -> None:
    parts = _ddp_data(layout)
    q, p, n, mask = (t.clone().requires_grad_(t.is_floating_point()) for t in parts[rank])
    loss_fn = Phase2Loss(temperature=0.05, negatives=negatives)
    local = loss_fn.infonce(q, p, n, mask)

    gq, gp, gn, gmask = (t.clone().requires_grad_(t.is_floating_point()) for t in _concat(parts))
    per_query = reference_infonce(gq, gp, gn, gmask, temperature=0.05, negatives=negatives)
    start = sum(b for b, _ in layout[:rank])
    rows = slice(start, start + layout[rank][0])
    assert abs(local.item() - per_query[rows].mean().item()) < 1e-6, (rank, negatives, local, per_query)
    if not check_grads:
        return
    # DDP averages gradients over ranks, so grad/world must equal the gradient of the global mean loss.
    local.backward()
    per_query.mean().backward()
    k = n.shape[1]
    for name, got, want in (("q", q, gq.grad[rows]), ("p", p, gp.grad[rows]), ("n", n, gn.grad[rows, :k])):
        torch.testing.assert_close(got.grad / len(layout), want, rtol=0, atol=1e-6, msg=name)


def test_ddp_gathered_infonce_equals_global_batch(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)
