"""Length-sorted, token-budget batches: the GPU computes real tokens, not padding.

Texts of a window (65,536 by default) are sorted by token length, longest first (an out-of-memory
batch shows up at once, not hours in), and cut so that ``batch size × longest length`` stays within
the token budget. On SciFact passages this wastes under 1 % of tokens on padding, against ~35 % for
fixed batches of 32 in file order (measured by ``bench/precompute_overhead.py``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["padding_waste", "token_budget_batches"]


def token_budget_batches(lengths: np.ndarray, token_budget: int, max_batch_size: int) -> list[np.ndarray]:
    """Split texts into batches by length.

    Args:
        lengths: token length of each text.
        token_budget: most padded tokens (batch size × longest length) one batch may hold.
        max_batch_size: most texts in one batch, whatever their length.

    Returns:
        Index arrays into ``lengths``, one per batch, longest texts first.

    Example:
        >>> [b.tolist() for b in token_budget_batches(np.array([5, 100, 7, 98]), 200, 8)]
        [[1, 3], [2, 0]]
    """
    if token_budget <= 0 or max_batch_size <= 0:
        raise ValueError(f"token_budget and max_batch_size must be positive, got {token_budget}, {max_batch_size}.")
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, start = [], 0
    while start < len(order):
        longest = max(int(lengths[order[start]]), 1)
        size = max(1, min(max_batch_size, token_budget // longest, len(order) - start))
        batches.append(order[start : start + size])
        start += size
    return batches


def padding_waste(lengths: np.ndarray, batches: list[np.ndarray]) -> tuple[int, int]:
    """(real tokens, padded tokens) over ``batches``."""
    real = int(sum(int(lengths[b].sum()) for b in batches))
    padded = int(sum(len(b) * int(lengths[b].max()) for b in batches if len(b)))
    return real, padded
