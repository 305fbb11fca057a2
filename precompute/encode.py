"""Encoding texts into a segment, the same way in both engines: length-sorted token-budget batches, the teacher,
and a writer thread.

The local engine (:mod:`precompute.pipeline`) feeds windows of texts read from the sources; each Ray actor
(:mod:`precompute.ray_engine`) feeds one unit of planned texts. Either way :func:`encode_role` sorts the texts
by token length and cuts batches by a padded-token budget (:mod:`precompute.batching`), runs the teacher, and
hands the vectors to :class:`AsyncWriter`, whose thread appends them to the segment while the next batch runs.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from precompute.batching import padding_waste, token_budget_batches
from precompute.teacher import PendingVectors, TeacherEncoder
from storage.errors import DdxError
from storage.keys import role_code
from storage.segment import SegmentWriter

__all__ = ["AsyncWriter", "default_token_budget", "encode_role", "progress_bar"]


def default_token_budget(device: str) -> int:
    """Padded tokens per batch: 65,536 on a GPU, 8,192 on CPU."""
    return 65_536 if device.startswith("cuda") else 8_192


def encode_role(
    encoder: TeacherEncoder,
    keys: np.ndarray,
    texts: list[str],
    role: str,
    lengths: np.ndarray,
    out: AsyncWriter,
    *,
    budget: int,
    max_batch: int,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Encode ``texts`` (all of ``role``, ``lengths`` tokens each) in token-budget batches, longest first, and hand
    each batch's rows to ``out``; ``on_batch(texts, tokens)`` after each. Returns (real tokens, padded tokens).

    One batch is in flight ahead: batch i+1 is tokenized and queued on the device before batch i's vectors are
    waited for, so the GPU does not idle while the host tokenizes (each batch's indices travel with its own
    pending vectors, so rows never change places). A batch that fails to launch (out of memory, say) still
    hands the one before it to the writer.
    """
    batches = token_budget_batches(lengths, budget, max_batch)
    real, padded = padding_waste(lengths, batches)
    code = role_code(role)

    def hand_over(b: np.ndarray, pending: PendingVectors) -> None:
        out.put(keys[b], pending.result(), np.full(len(b), code, np.uint8), lengths[b])
        if on_batch is not None:
            on_batch(len(b), int(lengths[b].sum()))

    in_flight: tuple[np.ndarray, PendingVectors] | None = None
    for b in batches:
        try:
            launched = encoder.launch([texts[i] for i in b], role)
        except BaseException:
            if in_flight is not None:
                hand_over(*in_flight)
            raise
        if in_flight is not None:
            hand_over(*in_flight)
        in_flight = (b, launched)
    if in_flight is not None:
        hand_over(*in_flight)
    return real, padded


def progress_bar(total: int, enabled: bool, *, unit: str = "text") -> Any:
    """A tqdm bar on stderr (off when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit=unit,
        desc="precompute",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.05,
    )


class AsyncWriter:
    """Feeds a SegmentWriter from a background thread so encoding never waits for disk.

    The queue is bounded (8 batches), so a slow disk slows the encoder instead of filling RAM.
    On success the segment is committed; on any error it is flushed and left for salvage.
    """

    def __init__(self, writer: SegmentWriter, depth: int = 8, on_append: Callable[[], None] | None = None) -> None:
        self.writer = writer
        self._on_append = on_append  # called on the writer thread after each batch is appended (and any flush)
        self._queue: queue.Queue[tuple[np.ndarray, ...] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ddx-writer", daemon=True)

    def __enter__(self) -> AsyncWriter:
        self._thread.start()
        return self

    def put(self, keys: np.ndarray, vectors: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray) -> None:
        self._raise_if_failed()
        self._queue.put((keys, vectors, roles, n_tokens))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.append(*item)
                    if self._on_append is not None:
                        self._on_append()
                except BaseException as exc:
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is None:
            self.writer.commit()
            return
        try:
            if self._error is None:
                self.writer.flush()
        except (OSError, DdxError):
            pass  # the original error is the one to report
        finally:
            self.writer.abort()
        self._raise_if_failed()
