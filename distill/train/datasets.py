"""Phase-1 and phase-2 datasets: token ids and teacher vectors, streamed together, batch by batch.

Both datasets are map-style and implement ``__getitems__``: the DataLoader hands them a whole batch
of indices, and the teacher vectors of the batch come from one ``TeacherStore.get_rows`` gather
(grouped by chunk, memory-mapped) instead of one read per example. Token ids are views into the
memory-mapped token table. Nothing here runs a model: the teacher never runs during training.

Phase 2 picks, per example and epoch, one positive and up to ``num_negatives`` hard negatives
(deterministically from the seed, the epoch and the example, so an interrupted run resumes on the
same batches). Inside a batch, a negative that is another query's positive (a false in-batch
negative) or that repeats a passage already in the batch is dropped.

With ``teacher_dims`` (``ddx train --projection none``) every gathered teacher vector is cut to its first
``teacher_dims`` dimensions and renormalised (:func:`distill.model.teacher_dims.truncate_teacher`): the targets the
student's own output is trained against.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from distill.model.teacher_dims import truncate_teacher
from distill.train.data import Phase2Examples, TextIndex
from distill.train.tokens import TokenTable
from storage.store import TeacherStore

__all__ = ["Phase1Dataset", "Phase2Dataset", "phase1_collate_fn", "phase2_collate_fn"]

Collate = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


class Phase1Dataset(torch.utils.data.Dataset):
    """Texts with their teacher vectors: the phase-1 (MSE + cosine) training set.

    Args:
        positions: text positions (into ``texts``) to train on.
        texts: the run's TextIndex (store rows and token handles filled in).
        store: the teacher store.
        tokens: the student's token table.
        teacher_dims: keep the teacher vectors' first ``teacher_dims`` dims, renormalised (``None``: all of them).
    """

    def __init__(
        self,
        positions: np.ndarray,
        texts: TextIndex,
        store: TeacherStore,
        tokens: TokenTable,
        *,
        teacher_dims: int | None = None,
    ) -> None:
        self.gids = texts.gids[positions]
        self.handles = texts.tokens[positions]
        self.store, self.tokens, self.teacher_dims = store, tokens, teacher_dims

    def __len__(self) -> int:
        return len(self.gids)

    @property
    def lengths(self) -> np.ndarray:
        """Token length per example (for length-grouped batches)."""
        return self.tokens.lengths(self.handles)

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        idx = np.asarray(indices, dtype=np.int64)
        return {
            "ids": self.tokens.gather(self.handles[idx]),
            "teacher": truncate_teacher(self.store.get_rows(self.gids[idx], dtype="float32"), self.teacher_dims),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


class Phase2Dataset(torch.utils.data.Dataset):
    """(query, positive, hard negatives) examples with teacher vectors: the phase-2 training set.

    ``teacher_dims`` as for :class:`Phase1Dataset`.
    """

    def __init__(
        self,
        examples: Phase2Examples,
        texts: TextIndex,
        store: TeacherStore,
        tokens: TokenTable,
        *,
        num_negatives: int = 7,
        seed: int = 42,
        teacher_dims: int | None = None,
    ) -> None:
        self.examples, self.texts, self.store, self.tokens = examples, texts, store, tokens
        self.teacher_dims = teacher_dims
        self.num_negatives, self.seed = num_negatives, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def lengths(self) -> np.ndarray:
        """Query + first positive token length per example (for length-grouped batches)."""
        q = self.tokens.lengths(self.texts.tokens[self.examples.query])
        p = self.tokens.lengths(self.texts.tokens[self.examples.positives.flat[self.examples.positives.offsets[:-1]]])
        return q + p

    def positive_sets(self) -> list[np.ndarray]:
        """All positives of each example (the sampler keeps them unique within a batch)."""
        return self.examples.positives.rows()

    def _choose(self, i: int) -> tuple[int, np.ndarray]:
        rng = np.random.default_rng((self.seed, self.epoch, i))
        positives = self.examples.positives.row(i)
        negatives = self.examples.negatives.row(i)
        pos = int(positives[rng.integers(len(positives))])
        if len(negatives) > self.num_negatives:
            negatives = negatives[np.sort(rng.choice(len(negatives), self.num_negatives, replace=False))]
        return pos, negatives

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        chosen = [self._choose(int(i)) for i in indices]
        queries = self.examples.query[np.asarray(indices, dtype=np.int64)]
        positives = np.array([p for p, _ in chosen], dtype=np.int64)
        # Every positive of every example in the batch, not only the one picked this epoch: hard negatives are
        # scored against every query of the batch, so another query's unpicked positive would be a false negative.
        seen = {int(p) for i in indices for p in self.examples.positives.row(int(i))}
        negatives: list[np.ndarray] = []
        for _, negs in chosen:
            keep = [n for n in negs.tolist() if n not in seen]
            seen.update(keep)
            negatives.append(np.array(keep, dtype=np.int64))
        counts = np.array([len(n) for n in negatives], dtype=np.int64)
        flat = np.concatenate([queries, positives, *negatives]).astype(np.int64)
        vectors = truncate_teacher(self.store.get_rows(self.texts.gids[flat], dtype="float32"), self.teacher_dims)
        ids = self.tokens.gather(self.texts.tokens[flat])
        b = len(indices)
        return {
            "query_ids": ids[:b],
            "pos_ids": ids[b : 2 * b],
            "neg_ids": ids[2 * b :],
            "neg_counts": counts,
            "teacher_query": vectors[:b],
            "teacher_pos": vectors[b : 2 * b],
            "teacher_neg": vectors[2 * b :],
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.__getitems__([index])


def _padded(tokens: TokenTable, seqs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokens.pad(seqs)
    return torch.from_numpy(ids), torch.from_numpy(mask)


def phase1_collate_fn(tokens: TokenTable) -> Collate:
    """Collate for Phase1Dataset batches: pads token ids, converts vectors to tensors."""

    def collate(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ids, mask = _padded(tokens, batch["ids"])
        return {"input_ids": ids, "attention_mask": mask, "teacher": torch.from_numpy(batch["teacher"])}

    return collate


def phase2_collate_fn(tokens: TokenTable) -> Collate:
    """Collate for Phase2Dataset batches with a variable number of negatives per query.

    Returns tensors: ``query_input_ids``/``query_attention_mask`` [B, Lq], ``pos_*`` [B, Lp],
    ``neg_*`` [N, Ln] for the N valid negatives, ``neg_mask`` [B, K] (True where query b has a
    k-th negative; K = the most any query has), and teacher vectors ``teacher_query`` [B, D],
    ``teacher_pos`` [B, D], ``teacher_neg`` [B, K, D] (zeros where masked).
    """

    def collate(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        counts = batch["neg_counts"]
        b, k = len(counts), int(counts.max()) if len(counts) else 0
        mask = np.arange(k)[None, :] < counts[:, None]
        teacher_neg = np.zeros((b, k, batch["teacher_query"].shape[1]), dtype=np.float32)
        teacher_neg[mask] = batch["teacher_neg"]
        out = {
            "neg_mask": torch.from_numpy(mask),
            "teacher_query": torch.from_numpy(batch["teacher_query"]),
            "teacher_pos": torch.from_numpy(batch["teacher_pos"]),
            "teacher_neg": torch.from_numpy(teacher_neg),
        }
        for name in ("query", "pos", "neg"):
            seqs = batch[f"{name}_ids"]
            ids, att = _padded(tokens, seqs) if seqs else (torch.zeros(0, 1, dtype=torch.long),) * 2
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = ids, att
        return out

    return collate
