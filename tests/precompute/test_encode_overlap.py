"""The batch loop keeps one batch in flight: batch i+1 is tokenized and launched before batch i's vectors are
waited for (on a GPU the host then never leaves it idle), and every row still lands with its own key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from precompute.encode import encode_role
from precompute.teacher import PendingVectors, TeacherConfig, TeacherEncoder, load_teacher
from storage.keys import content_keys
from tests.tiny_models import tiny_corpus


class Collect:
    """Stands in for AsyncWriter: the rows handed over, in order."""

    def __init__(self, events: list[str] | None = None) -> None:
        self.rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.events = events

    def put(self, keys: np.ndarray, vectors: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray) -> None:
        self.rows.append((keys, vectors, roles, n_tokens))
        if self.events is not None:
            self.events.append(f"put {len(self.rows) - 1}")


class Pending(PendingVectors):
    def __init__(self, vectors: np.ndarray, i: int, events: list[str]) -> None:
        super().__init__(vectors)
        self.i, self.events = i, events

    def result(self) -> np.ndarray:
        self.events.append(f"wait {self.i}")
        return super().result()


class CountingEncoder:
    """Vectors that spell out each text's number, so a row that changed places shows; logs launches and waits."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.events: list[str] = []
        self.launches = 0
        self.fail_at = fail_at

    def launch(self, texts: list[str], role: str) -> Pending:
        if self.launches == self.fail_at:
            raise MemoryError("CUDA out of memory (simulated)")
        i, self.launches = self.launches, self.launches + 1
        self.events.append(f"launch {i}")
        return Pending(np.array([[float(t.split()[-1]), 1.0] for t in texts], np.float32), i, self.events)


def _texts(n: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    texts = [" ".join(["w"] * (1 + i % 7)) + f" {i}" for i in range(n)]
    return texts, content_keys("passage", texts), np.array([2 + i % 7 for i in range(n)], np.int32)


def test_the_next_batch_is_launched_before_the_last_is_waited_for() -> None:
    texts, keys, lengths = _texts(40)
    enc, out = CountingEncoder(), Collect()
    out.events = enc.events
    real, padded = encode_role(enc, keys, texts, "passage", lengths, out, budget=24, max_batch=4)  # type: ignore[arg-type]
    n = enc.launches
    assert n >= 10
    expected = ["launch 0"]
    for i in range(1, n):
        expected += [f"launch {i}", f"wait {i - 1}", f"put {i - 1}"]
    expected += [f"wait {n - 1}", f"put {n - 1}"]
    assert enc.events == expected
    by_key = {k.tobytes(): v for ks, vs, _, _ in out.rows for k, v in zip(ks, vs, strict=True)}
    assert len(by_key) == 40
    for i, k in enumerate(keys):  # each key got its own text's vector
        assert by_key[k.tobytes()][0] == i
    assert real == int(lengths.sum()) and padded >= real


def test_a_batch_that_fails_to_launch_still_hands_over_the_one_in_flight() -> None:
    texts, keys, lengths = _texts(20)
    enc, out = CountingEncoder(fail_at=3), Collect()
    with pytest.raises(MemoryError):
        encode_role(enc, keys, texts, "passage", lengths, out, budget=24, max_batch=4)  # type: ignore[arg-type]
    assert len(out.rows) == 3  # batches 0, 1 and 2 (in flight when 3 failed): written, not lost
    for ks, vs, _, _ in out.rows:
        for k, v in zip(ks, vs, strict=True):
            assert keys[int(v[0])].tobytes() == k.tobytes()


def test_overlapped_batches_equal_one_text_at_a_time(tiny_bert: Path) -> None:
    """The real tiny teacher: the overlapped loop's rows equal encoding each text alone (a misaligned row would be
    off by ~0.1)."""
    encoder: TeacherEncoder = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))
    texts = tiny_corpus(30, seed=11)
    keys = content_keys("passage", texts)
    lengths = encoder.token_lengths(texts, "passage")
    out: Any = Collect()
    encode_role(encoder, keys, texts, "passage", lengths, out, budget=64, max_batch=5)
    got = {k.tobytes(): v for ks, vs, _, _ in out.rows for k, v in zip(ks, vs, strict=True)}
    alone = np.stack([encoder.encode([t], "passage")[0] for t in texts])
    np.testing.assert_allclose(np.stack([got[k.tobytes()] for k in keys]), alone, atol=1e-4, rtol=0)
    assert len(out.rows) > 3
