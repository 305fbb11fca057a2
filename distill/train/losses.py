"""Distillation losses: phase 1 matches teacher vectors, phase 2 adds contrastive retrieval training.

Both losses take plain tensors (what :class:`distill.model.model.StudentModelWithProjection` returns plus teacher
vectors gathered from the store) and return ``(loss, components)``, where ``components`` holds detached scalars for
logging. They compute in float32 (or wider) whatever the input dtype: teacher vectors arrive as float16 from the
store and the student may run under bf16 autocast, and a 3584-d mean of squared differences loses most of its digits
in bf16.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.train.config import MseReduction, infonce_spaces
from storage.errors import DdxError, DimensionMismatchError

__all__ = ["LOSS_MSE_REDUCTION", "Phase1Loss", "Phase2Loss"]

# The loss classes' own mse_reduction default: torch's mean over elements (F.mse_loss), the plain definition their
# docstrings and tests state (Phase1Loss() is pinned to it by tests/distill/train/test_losses.py and the doctest
# below). Training does not use it: it always passes TrainConfig.mse_reduction, whose default is
# distill.train.config.MSE_REDUCTION ("vector"; docs/DESIGN.md, "Losses"). The choices are MseReduction's.
LOSS_MSE_REDUCTION: MseReduction = "element"


class Phase1Loss(nn.Module):
    """Regress projected student vectors onto teacher vectors: ``mse_weight·MSE + cos_weight·mean(1 − cos)``.

    ``MSE`` is ``F.mse_loss`` with its default reduction: the mean over all ``B·D`` elements. That makes it small
    next to the cosine term for high-dimensional unit vectors: for unit-norm ``u, v`` in ``D`` dimensions,
    ``mean((u − v)²) = (2 − 2·cos(u, v)) / D``, i.e. 1/1792 of ``2·(1 − cos)`` at ``D = 3584``. With the 0.4 / 0.6
    defaults the cosine term drives the direction and the MSE term mostly pins the norm and the per-dimension
    scale (which matters when the teacher vectors are not normalized).

    Args:
        mse_weight: Weight of the MSE term (default 0.4).
        cos_weight: Weight of the cosine-distance term (default 0.6).
        mse_reduction: ``"element"`` (default, ``F.mse_loss``) or ``"vector"`` (squared L2 distance per row,
            mean over rows: ``D`` times larger, on the cosine term's scale).

    Inputs:
        ``projected`` [B, D] student vectors after the projection; ``teacher`` [B, D] teacher vectors.

    Returns:
        ``(loss, {"mse", "cos_distance", "loss"})`` — a scalar with gradient, and detached scalars for logging.

    Raises:
        DimensionMismatchError: If the shapes differ (for instance teacher dim ≠ projected dim).

    Example:
        >>> import torch
        >>> loss_fn = Phase1Loss()
        >>> projected = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
        >>> teacher = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
        >>> loss, parts = loss_fn(projected, teacher)
        >>> round(parts["mse"].item(), 4), round(parts["cos_distance"].item(), 4)
        (0.3333, 0.5)
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        mse_weight: float = 0.4,
        cos_weight: float = 0.6,
        mse_reduction: MseReduction = LOSS_MSE_REDUCTION,
    ) -> None:
        super().__init__()
        _check_weights(mse_weight=mse_weight, cos_weight=cos_weight)
        self.mse_weight = mse_weight
        self.cos_weight = cos_weight
        self.mse_reduction = _check_reduction(mse_reduction)

    def forward(self, projected: Tensor, teacher: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss; see the class docstring for shapes."""
        _check_vectors("projected", projected, ndim=2)
        _check_teacher("teacher", teacher, like=projected)
        projected, teacher = _upcast(projected), _upcast(teacher)
        mse = _mse(projected, teacher, self.mse_reduction)
        cos_distance = (1.0 - F.cosine_similarity(projected, teacher, dim=-1)).mean()
        loss = self.mse_weight * mse + self.cos_weight * cos_distance
        return loss, {"mse": mse.detach(), "cos_distance": cos_distance.detach(), "loss": loss.detach()}

    def extra_repr(self) -> str:
        return f"mse_weight={self.mse_weight}, cos_weight={self.cos_weight}"


class Phase2Loss(nn.Module):
    """Contrastive retrieval loss with hard negatives, anchored to the teacher: ``0.8·InfoNCE + 0.2·MSE`` by default.

    **InfoNCE.** For query ``i`` the candidates are every positive in the batch (its own is the target, the others
    are in-batch negatives) plus hard negatives: all valid hard negatives in the batch (``negatives="batch"``, the
    MultipleNegativesRankingLoss choice) or only its own (``negatives="own"``). The logit of a candidate ``c`` is
    ``cos(q_i, c) / temperature``; the loss is the cross-entropy with the own positive as the target, averaged
    over the queries. ``temperature=0.05`` equals MultipleNegativesRankingLoss's ``scale=20``: cosines in
    [−1, 1] become logits in [−20, 20], sharp enough that a few hard negatives dominate the softmax.
    ``space="projected"`` runs InfoNCE on the projected vectors (teacher space, the default);
    ``space="hybrid"`` scores projected student queries against the *teacher's* positive and negative vectors
    (from the store): exactly what the hybrid system does at search time (student queries, teacher index);
    ``space="student"`` runs it on the raw student embeddings, so the student's own space learns to retrieve
    while the MSE term still trains the projection. Spaces joined with ``+`` (``"projected+hybrid"``) average
    their InfoNCE terms: one run that trains the projected passages to retrieve *and* keeps the projected queries
    aligned with the teacher's index.

    **MSE.** ``F.mse_loss`` (mean over elements) between projected and teacher vectors, over the queries, the
    positives and the valid negatives stacked into one set of rows, so each valid row counts once and padded
    negative slots count not at all.

    **Distributed.** When ``torch.distributed`` is initialised with more than one rank (and
    ``gather_across_ranks``), positives — and, for ``negatives="batch"``, valid hard negatives — are all-gathered
    with gradients (one ``all_gather`` forward, one ``all_reduce`` of the gradient backward), so every rank scores
    its queries against the global batch; target indices are offset by the number of positives on lower ranks.
    Ranks may hold different batch sizes and numbers of negatives (they are padded for the collective and unpadded
    after). Each rank's loss is the mean over its own queries; with equal per-rank batch sizes, DDP's gradient
    averaging then gives exactly the gradient of the loss over the concatenated global batch.

    **Duplicates.** If the same passage is the positive of two queries in a batch (or a hard negative of one
    query is another query's positive), it scores exactly like the target and acts as a false negative: that
    query's InfoNCE cannot fall below ``log 2`` and its gradient pushes the query away from its own positive.
    ddx's sampler keeps passages unique within a batch; nothing here deduplicates.

    Args:
        infonce_weight: Weight of the InfoNCE term (default 0.8).
        mse_weight: Weight of the MSE term (default 0.2).
        temperature: Softmax temperature applied to cosine similarities (default 0.05).
        negatives: ``"batch"`` (default) or ``"own"``: which hard negatives each query is scored against.
        space: ``"projected"`` (default), ``"hybrid"``, ``"student"``, or several joined with ``+`` (their InfoNCE
            terms averaged): the space(s) InfoNCE runs in.
        gather_across_ranks: Gather candidates across DDP ranks when distributed (default True).
        mse_reduction: ``"element"`` (default) or ``"vector"``; see :class:`Phase1Loss`.

    Inputs (keyword-only; ``B`` queries, ``K`` negative slots per query, ``d`` student dim, ``D`` teacher dim):
        ``query_projected`` [B, D], ``positive_projected`` [B, D], ``negatives_projected`` [B, K, D]: projected
        student vectors. ``neg_mask`` [B, K] bool: True where a negative slot holds a real negative.
        ``teacher_query`` [B, D], ``teacher_positive`` [B, D], ``teacher_negatives`` [B, K, D]: teacher vectors
        (padded slots may hold anything). ``query`` [B, d], ``positive`` [B, d], ``negatives`` [B, K, d]: student
        embeddings, required only when ``space="student"``. ``K`` may be 0.

    Returns:
        ``(loss, {"infonce", "mse", "loss"})`` — a scalar with gradient, and detached scalars for logging.

    Raises:
        DimensionMismatchError: If shapes disagree (for instance teacher dim ≠ projected dim).
        DdxError: If an option is invalid or student embeddings are missing for ``space="student"``.

    Example:
        >>> import torch
        >>> B, K, D = 2, 2, 3
        >>> loss_fn = Phase2Loss(temperature=1.0)
        >>> qp, pp, npj = torch.randn(B, D, requires_grad=True), torch.randn(B, D), torch.randn(B, K, D)
        >>> mask = torch.tensor([[True, True], [True, False]])  # query 1 has one negative
        >>> loss, parts = loss_fn(
        ...     query_projected=qp, positive_projected=pp, negatives_projected=npj, neg_mask=mask,
        ...     teacher_query=torch.randn(B, D), teacher_positive=torch.randn(B, D),
        ...     teacher_negatives=torch.randn(B, K, D),
        ... )
        >>> sorted(parts)
        ['infonce', 'loss', 'mse']
        >>> loss.backward()
    """

    def __init__(
        self,
        *,
        infonce_weight: float = 0.8,
        mse_weight: float = 0.2,
        temperature: float = 0.05,
        negatives: Literal["own", "batch"] = "batch",
        space: str = "projected",
        gather_across_ranks: bool = True,
        mse_reduction: MseReduction = LOSS_MSE_REDUCTION,
    ) -> None:
        super().__init__()
        _check_weights(infonce_weight=infonce_weight, mse_weight=mse_weight)
        if not temperature > 0:
            raise DdxError(f"Phase2Loss temperature must be > 0, got {temperature!r}.")
        if negatives not in ("own", "batch"):
            raise DdxError(f"Phase2Loss negatives must be 'own' or 'batch', got {negatives!r}.")
        self.spaces = infonce_spaces(space)
        self.infonce_weight = infonce_weight
        self.mse_weight = mse_weight
        self.temperature = temperature
        self.negatives = negatives
        self.space = space
        self.gather_across_ranks = gather_across_ranks
        self.mse_reduction = _check_reduction(mse_reduction)

    def forward(
        self,
        *,
        query_projected: Tensor,
        positive_projected: Tensor,
        negatives_projected: Tensor,
        neg_mask: Tensor,
        teacher_query: Tensor,
        teacher_positive: Tensor,
        teacher_negatives: Tensor,
        query: Tensor | None = None,
        positive: Tensor | None = None,
        negatives: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Compute the loss; see the class docstring for inputs and shapes."""
        _check_vectors("neg_mask", neg_mask, ndim=2)
        neg_mask = neg_mask.to(torch.bool)
        _check_triplet("projected", query_projected, positive_projected, negatives_projected, neg_mask)
        _check_teacher("teacher_query", teacher_query, like=query_projected)
        _check_teacher("teacher_positive", teacher_positive, like=positive_projected)
        _check_teacher("teacher_negatives", teacher_negatives, like=negatives_projected)
        parts: dict[str, Tensor] = {}
        for space in self.spaces:
            if space == "student":
                if query is None or positive is None or negatives is None:
                    raise DdxError(
                        "Phase2Loss(space='student') needs the student embeddings query, positive, negatives."
                    )
                _check_triplet("student", query, positive, negatives, neg_mask)
                parts[space] = self.infonce(query, positive, negatives, neg_mask)
            elif space == "hybrid":
                parts[space] = self.infonce(query_projected, teacher_positive, teacher_negatives, neg_mask)
            else:
                parts[space] = self.infonce(query_projected, positive_projected, negatives_projected, neg_mask)
        infonce = torch.stack(list(parts.values())).mean()
        predicted = torch.cat([query_projected, positive_projected, negatives_projected[neg_mask]])
        target = torch.cat([teacher_query, teacher_positive, teacher_negatives[neg_mask]])
        mse = _mse(_upcast(predicted), _upcast(target), self.mse_reduction)
        loss = self.infonce_weight * infonce + self.mse_weight * mse
        logged = {"infonce": infonce.detach(), "mse": mse.detach(), "loss": loss.detach()}
        if len(parts) > 1:
            logged.update({f"infonce_{space}": part.detach() for space, part in parts.items()})
        return loss, logged

    def infonce(self, query: Tensor, positive: Tensor, negatives: Tensor, neg_mask: Tensor) -> Tensor:
        """InfoNCE of ``query`` [B, d] against positives [B, d] and hard negatives [B, K, d] (masked by [B, K]).

        Candidates are gathered across ranks when distributed; see the class docstring.
        """
        query, positive, negatives = (F.normalize(_upcast(t), dim=-1) for t in (query, positive, negatives))
        all_positives, offset = self._gather(positive)
        scores = [query @ all_positives.T]
        if self.negatives == "batch":
            all_negatives, _ = self._gather(negatives[neg_mask])
            scores.append(query @ all_negatives.T)
        else:
            own = torch.einsum("bd,bkd->bk", query, negatives)
            scores.append(own.masked_fill(~neg_mask, float("-inf")))
        logits = torch.cat(scores, dim=1) / self.temperature
        target = torch.arange(query.shape[0], device=query.device) + offset
        return F.cross_entropy(logits, target)

    def _gather(self, rows: Tensor) -> tuple[Tensor, int]:
        """Rows from every rank (this rank's with their autograd graph), and the number of rows on lower ranks."""
        if not (self.gather_across_ranks and _world_size() > 1):
            return rows, 0
        return _all_gather_rows(rows)

    def extra_repr(self) -> str:
        return (
            f"infonce_weight={self.infonce_weight}, mse_weight={self.mse_weight}, temperature={self.temperature}, "
            f"negatives={self.negatives!r}, space={self.space!r}"
        )


def _world_size() -> int:
    """World size of the default process group, 1 when torch.distributed is unavailable or not initialised."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_gather_rows(rows: Tensor) -> tuple[Tensor, int]:
    """All-gather ``[n_r, d]`` rows of possibly different ``n_r`` per rank, with gradients.

    Rows are padded to the largest ``n_r`` for the collective (which needs equal shapes) and unpadded after.

    Returns:
        The concatenation in rank order, and ``sum(n_r for lower ranks)`` (where this rank's rows start).
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    offset = sum(counts[:rank])
    if max(counts) == 0:
        return rows, offset
    padded = F.pad(rows, (0, 0, 0, max(counts) - rows.shape[0]))
    if torch.is_grad_enabled() and not padded.requires_grad:
        # A rank whose rows carry no graph (e.g. no hard negatives in its batch) must still join the backward
        # all-reduce the other ranks run, or they wait for it forever.
        padded.requires_grad_(True)
    gathered = _GatherRows.apply(padded).chunk(world)
    return torch.cat([part[:count] for part, count in zip(gathered, counts, strict=True)]), offset


class _GatherRows(torch.autograd.Function):
    """All-gather equal-shape ``[n, d]`` blocks into ``[world·n, d]``, differentiably.

    Backward sums every rank's gradient of the gathered block (one ``all_reduce``) and keeps this rank's slice: the
    gradient of the sum of all ranks' losses with respect to this rank's rows. ``torch.distributed.nn`` does the
    same with a reduce-scatter (NCCL) or an all-to-all (other backends), but is deprecated; an all-reduce works on
    every backend and the gathered block is small (one batch of embeddings).
    """

    @staticmethod
    def forward(ctx, rows: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, rows)
        ctx.rank, ctx.n = dist.get_rank(), rows.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce works in place
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def _check_reduction(reduction: str) -> str:
    if reduction not in get_args(MseReduction):
        raise DdxError(f"mse_reduction must be 'element' or 'vector', got {reduction!r}.")
    return reduction


def _mse(predicted: Tensor, target: Tensor, reduction: str) -> Tensor:
    """Mean squared error over elements (torch's default), or squared L2 distance averaged over rows ("vector").

    "vector" is ``D`` times "element": for unit vectors it equals ``2·(1 − cos)``, on the scale of InfoNCE and of the
    cosine term, so its weight means what it says whatever the teacher's dimension.
    """
    if reduction == "element":
        return F.mse_loss(predicted, target)
    return (predicted - target).pow(2).sum(dim=-1).mean()


def _upcast(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or in its own dtype when that is wider (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _check_weights(**weights: float) -> None:
    """Loss weights must be finite and non-negative."""
    for name, value in weights.items():
        if not (isinstance(value, int | float) and 0 <= value < float("inf")):
            raise DdxError(f"Loss weight {name} must be a finite number >= 0, got {value!r}.")


def _check_vectors(name: str, tensor: Tensor, *, ndim: int) -> None:
    """``tensor`` must be a tensor of rank ``ndim``."""
    if not isinstance(tensor, Tensor) or tensor.dim() != ndim:
        shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
        raise DimensionMismatchError(f"{name} must be a {ndim}-d tensor, got {shape}.")


def _check_teacher(name: str, teacher: Tensor, *, like: Tensor) -> None:
    """Teacher vectors must have exactly the shape of the projected vectors they are compared with."""
    if not isinstance(teacher, Tensor) or teacher.shape != like.shape:
        got = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
        raise DimensionMismatchError(
            f"{name} has shape {got}, expected {tuple(like.shape)} (the projected student vectors' shape). "
            f"The last dimension is the teacher dim: build the ProjectionLayer with teacher_dim equal to the "
            "teacher store's dim."
        )


def _check_triplet(space: str, query: Tensor, positive: Tensor, negatives: Tensor, neg_mask: Tensor) -> None:
    """query [B, d], positive [B, d] and negatives [B, K, d] must agree with each other and with neg_mask [B, K]."""
    _check_vectors(f"{space} query", query, ndim=2)
    batch, dim = query.shape
    expected = {
        f"{space} positive": (positive, (batch, dim)),
        "neg_mask": (neg_mask, (batch, neg_mask.shape[1])),
        f"{space} negatives": (negatives, (batch, neg_mask.shape[1], dim)),
    }
    for name, (tensor, shape) in expected.items():
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise DimensionMismatchError(
                f"{name} has shape {got}, expected {shape} (query {tuple(query.shape)}, neg_mask "
                f"{tuple(neg_mask.shape)})."
            )
