"""The cached (GradCache) phase-2 step: the full-batch contrastive gradient at the memory of one mini-batch.

Phase 2 scores every query against every passage of the batch (every rank's, under DDP), so the batch cannot be cut
into gradient-accumulation steps without losing in-batch negatives. Its memory, though, is the activations of all
``B·(2 + K)`` sequences held for one backward: 288 sequences at the default batch, ~100 GB for mpnet at 512 tokens
(bench/phase2_memory.py prints the arithmetic). The cached step (Gao et al. 2021, "Scaling Deep Contrastive Learning
Batch Size under Memory Limited Setup"; sentence-transformers' ``CachedMultipleNegativesRankingLoss``) splits it:

1. embed every sequence in mini-batches of ``mini_batch_size`` without a graph, keeping only the embeddings (student
   and projected, a few MB) and the RNG state each mini-batch started from;
2. compute the full-batch loss with those embeddings as leaves and backpropagate it to them: ``∂loss/∂embedding`` for
   every sequence (the cross-rank gather and its gradient all-reduce run here, once);
3. embed each mini-batch again, with a graph, from the RNG state saved for it (the same dropout masks, so the same
   embeddings), and backpropagate its rows of ``∂loss/∂embedding`` into the student and the projection; each
   mini-batch's graph is freed before the next is built.

The parameters' gradient is the plain step's: the loss depends on the parameters only through the embeddings, and
each embedding depends only on its own sequence (no batch statistics in the student or the projection; LayerNorm is
per row). The price is one forward without a graph, about a third of a plain step's compute, partly won back by the
padding each mini-batch sheds: sequences of each kind are sorted by length and each mini-batch is cut to its longest
(right padding only; a left-padded batch keeps its width).

Under DDP only the last mini-batch runs through the wrapper, so that its backward all-reduces the gradient the earlier
mini-batches accumulated locally (the ``no_sync`` pattern of gradient accumulation); every rank runs the wrapper once a
step whatever its number of mini-batches, so ranks with different batch sizes stay in step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from storage.errors import DdxError

__all__ = ["EMBEDDING_KEYS", "SEQUENCE_GROUPS", "MiniBatch", "RngState", "cached_step", "plan_mini_batches"]

SEQUENCE_GROUPS = ("query", "pos", "neg")  # the batch's token tensors: f"{group}_input_ids", f"{group}_attention_mask"
EMBEDDING_KEYS = ("student", "projected")  # what the model returns per sequence

Embeddings = dict[str, Tensor]  # {"student": [n, d], "projected": [n, D]}
Embed = Callable[[dict[str, Tensor]], Mapping[str, Tensor]]
LossFromEmbeddings = Callable[[Embeddings, Embeddings, Embeddings | None], tuple[Tensor, dict[str, Tensor]]]


@dataclass(frozen=True)
class MiniBatch:
    """Rows ``rows`` of one sequence group, as token tensors cut to their longest sequence."""

    group: str
    rows: Tensor
    features: dict[str, Tensor]


def plan_mini_batches(batch: Mapping[str, Tensor], mini_batch_size: int) -> list[MiniBatch]:
    """Split a phase-2 batch's sequences into mini-batches of at most ``mini_batch_size``, longest first.

    Negatives are left out when ``neg_mask`` has no True slot (the collate then holds a placeholder row).

    Raises:
        DdxError: If ``mini_batch_size`` is not a positive integer.
    """
    if not (isinstance(mini_batch_size, int) and mini_batch_size > 0):
        raise DdxError(f"mini_batch_size must be a positive integer, got {mini_batch_size!r}.")
    plan = []
    for group in SEQUENCE_GROUPS:
        if group == "neg" and not bool(batch["neg_mask"].any()):
            continue
        ids, mask = batch[f"{group}_input_ids"], batch[f"{group}_attention_mask"]
        order = torch.argsort(mask.sum(dim=1), descending=True, stable=True)
        for rows in order.split(mini_batch_size):
            width = _used_width(mask[rows])
            plan.append(MiniBatch(group, rows, {"input_ids": ids[rows, :width], "attention_mask": mask[rows, :width]}))
    return plan


def _used_width(mask: Tensor) -> int:
    """Columns up to the last one any row uses: trailing padding changes nothing for a right-padded model."""
    used = mask.any(dim=0).nonzero()
    return int(used[-1]) + 1 if len(used) else mask.shape[1]


def cached_step(
    batch: Mapping[str, Tensor],
    *,
    mini_batch_size: int,
    embed: Embed,
    loss_from_embeddings: LossFromEmbeddings,
    backward: Callable[[Tensor], None],
    embed_synced: Embed | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Run one phase-2 step's loss and backward in mini-batches; gradients accumulate in the parameters' ``.grad``.

    Args:
        batch: A ``phase2_collate_fn`` batch (``query_*``, ``pos_*``, ``neg_*`` token tensors and ``neg_mask``).
        mini_batch_size: Sequences per forward; memory scales with it, not with the batch.
        embed: Token tensors of one mini-batch → ``{"student", "projected"}`` embeddings.
        loss_from_embeddings: ``(query, positive, negatives or None)`` embeddings of the whole batch → ``(loss,
            parts)``; negatives are the valid ones in ``neg_mask`` order.
        backward: Backpropagates the loss to the embeddings (``Tensor.backward``, or the trainer's, which scales it
            for gradient accumulation and fp16).
        embed_synced: ``embed`` for the last mini-batch: the DDP wrapper, so its backward syncs the gradients.

    Returns:
        The loss (detached) and its parts, as ``loss_from_embeddings`` computed them.

    Example:
        >>> loss, parts = cached_step(  # doctest: +SKIP
        ...     batch, mini_batch_size=16, embed=lambda f: module(embed=f),
        ...     loss_from_embeddings=module.phase2_loss, backward=Tensor.backward,
        ... )
    """
    plan = plan_mini_batches(batch, mini_batch_size)
    outputs, states = [], []
    with torch.no_grad():
        for mini in plan:
            states.append(RngState.capture(mini.features["input_ids"].device))
            outputs.append(embed(mini.features))
    leaves = _assemble(plan, outputs)
    loss, parts = loss_from_embeddings(leaves["query"], leaves["pos"], leaves.get("neg"))
    backward(loss)
    for i, (mini, state) in enumerate(zip(plan, states, strict=True)):
        run = embed_synced if embed_synced is not None and i == len(plan) - 1 else embed
        with state.restored():
            out = run(mini.features)
        _backpropagate(out, leaves[mini.group], mini.rows)
    return loss.detach(), parts


def _backpropagate(out: Mapping[str, Tensor], leaves: Embeddings, rows: Tensor) -> None:
    """Send the cached ``∂loss/∂embedding`` of ``rows`` back through one mini-batch's graph (``out``)."""
    tensors, grads = [], []
    for key in EMBEDDING_KEYS:
        grad = leaves[key].grad
        if grad is not None:  # the student embeddings get none unless InfoNCE runs in the student space
            tensors.append(out[key])
            grads.append(grad[rows].to(out[key].dtype))
    torch.autograd.backward(tensors, grads)


def _assemble(plan: list[MiniBatch], outputs: list[Mapping[str, Tensor]]) -> dict[str, Embeddings]:
    """Mini-batch embeddings back in batch order, per group: leaf tensors that collect ``∂loss/∂embedding``."""
    sizes: dict[str, int] = {}
    for mini in plan:
        sizes[mini.group] = sizes.get(mini.group, 0) + len(mini.rows)
    leaves: dict[str, Embeddings] = {}
    for mini, out in zip(plan, outputs, strict=True):
        group = leaves.setdefault(mini.group, {})
        for key in EMBEDDING_KEYS:
            if key not in group:
                group[key] = out[key].new_empty((sizes[mini.group], out[key].shape[-1]))
            group[key][mini.rows] = out[key]
    for group in leaves.values():
        for tensor in group.values():
            tensor.requires_grad_(True)
    return leaves


@dataclass(frozen=True)
class RngState:
    """The CPU generator's state, and the CUDA generator's of ``device`` when it is a GPU: what dropout draws from."""

    cpu: Tensor
    device: torch.device | None
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RngState:
        if device.type == "cuda":
            return cls(torch.get_rng_state(), device, torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state(), None, None)

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Run the block from this state; the generators return to where they were afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.device is not None else []):
            torch.set_rng_state(self.cpu)
            if self.device is not None and self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield
