"""Batch order: seeded per epoch, optionally length-grouped, never two copies of a positive in a batch.

Length grouping sorts each window of ``group_batches × batch_size`` shuffled examples by length
before cutting batches, then shuffles the batches: similar lengths share a batch, so padding falls,
while every batch still draws from across the shuffled window. The order is a pure function of (seed, epoch), so
a resumed run replays exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["DistillBatchSampler"]


class DistillBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of example indices, a fixed number of batches per epoch.

    Batches vary in size (the short batch is shuffled in with the others; deduplication can shrink one), so the
    sampler has deliberately no ``batch_size`` attribute: accelerate's ``BatchSamplerShard`` (DDP) treats a sampler
    that has one as fixed-size and silently drops every group of batches whose last member is short — and gave the
    ranks different batch counts in half of the epochs simulated, which desynchronizes DDP's collectives. Without
    it, every batch goes to a rank in turn and each rank gets ``ceil(len / world)`` batches.

    Args:
        n: number of examples.
        batch_size: examples per batch.
        seed: base seed; the epoch is mixed in by :meth:`set_epoch`.
        lengths: token length per example; enables length grouping when given.
        positives: per example, the ids that must not repeat inside a batch (phase 2's positives).
            A conflicting example is swapped with a later one when possible, else skipped this epoch.
        group_batches: window size for length grouping, in batches.
        on_epoch: called with the epoch by :meth:`set_epoch` (the dataset's own ``set_epoch``).
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        *,
        seed: int = 42,
        lengths: np.ndarray | None = None,
        positives: Sequence[np.ndarray] | None = None,
        group_batches: int = 50,
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        self.n, self.max_batch_size, self.seed = n, batch_size, seed
        self.lengths, self.positives = lengths, positives
        self.group_batches, self.on_epoch = group_batches, on_epoch
        self.epoch = 0

    @classmethod
    def for_dataset(
        cls, dataset: Any, batch_size: int, *, seed: int = 42, length_grouping: bool = True
    ) -> DistillBatchSampler:
        """The sampler for a Phase1Dataset or Phase2Dataset: its lengths, positives and epoch hook wired in."""
        positive_sets = getattr(dataset, "positive_sets", None)
        return cls(
            len(dataset),
            batch_size,
            seed=seed,
            positives=positive_sets() if positive_sets is not None else None,
            lengths=dataset.lengths if length_grouping else None,
            on_epoch=getattr(dataset, "set_epoch", None),
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.on_epoch is not None:
            self.on_epoch(self.epoch)

    def __len__(self) -> int:
        return -(-self.n // self.max_batch_size)  # the last batch may be short

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.n)
        if self.lengths is not None:
            window = self.max_batch_size * self.group_batches
            for s in range(0, self.n, window):
                part = order[s : s + window]
                order[s : s + window] = part[np.argsort(-self.lengths[part], kind="stable")]
        size = self.max_batch_size
        batches = [order[s : s + size] for s in range(0, self.n, size)]
        rng.shuffle(batches)
        if self.positives is not None:
            batches = self._deduplicate(batches)
        for batch in batches:
            yield batch.tolist()

    def _deduplicate(self, batches: list[np.ndarray]) -> list[np.ndarray]:
        """Make every batch's positives unique: swap a conflicting example with a later one, else skip it."""
        assert self.positives is not None
        out = []
        for bi, batch in enumerate(batches):
            seen: set[int] = set()
            kept = []
            for ex in batch.tolist():
                ex = _swap_if_conflicting(ex, seen, batches, bi, self.positives)
                if ex is None:
                    continue
                seen.update(self.positives[ex].tolist())
                kept.append(ex)
            out.append(np.array(kept, dtype=np.int64))
        return out


def _swap_if_conflicting(
    ex: int, seen: set[int], batches: list[np.ndarray], bi: int, positives: Sequence[np.ndarray]
) -> int | None:
    """``ex`` when its positives are new to the batch, else a later batch's example that fits (``ex`` moves there)."""
    if seen.isdisjoint(positives[ex].tolist()):
        return ex
    for later in batches[bi + 1 : bi + 4]:
        for j, other in enumerate(later.tolist()):
            if seen.isdisjoint(positives[other].tolist()):
                later[j] = ex
                return other
    return None
