"""Fixture data for storage tests: rows whose vectors encode their key, so a misaligned row is caught."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage import TeacherSpec, TeacherStore, content_keys


def make_spec(dim: int = 16, **overrides: object) -> TeacherSpec:
    fields: dict[str, object] = {
        "model": "tiny-teacher",
        "weights_id": "files:0123abcd",
        "pooling": "mean",
        "normalize": True,
        "max_seq_length": 64,
        "dim": dim,
    }
    fields.update(overrides)
    return TeacherSpec(**fields)  # type: ignore[arg-type]


def vectors_for(keys: np.ndarray, dim: int, dtype: str = "float16") -> np.ndarray:
    """Row i is a function of key i's bytes only; every value is exact in float16 (<= 255.75, 2 fraction bits)."""
    raw = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype=np.uint8).reshape(len(keys), 16)
    cols = np.arange(dim)
    return (raw[:, cols % 16].astype(np.float32) + (cols % 4) * 0.25).astype(dtype)


def roles_for(keys: np.ndarray) -> np.ndarray:
    raw = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype=np.uint8).reshape(len(keys), 16)
    return (raw[:, 1] % 2).astype(np.uint8)


def ntok_for(keys: np.ndarray) -> np.ndarray:
    raw = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype=np.uint8).reshape(len(keys), 16)
    return raw[:, 2].astype(np.int32) + 1


@dataclass
class Rows:
    """Fixture rows: keys and the vectors, roles and token counts that belong to them."""

    keys: np.ndarray
    vectors: np.ndarray
    roles: np.ndarray
    n_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, sl: slice | np.ndarray) -> Rows:
        return Rows(self.keys[sl], self.vectors[sl], self.roles[sl], self.n_tokens[sl])

    def args(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return self.keys, self.vectors, self.roles, self.n_tokens


def make_rows(n: int, dim: int = 16, *, start: int = 0, prefix: str = "text", dtype: str = "float16") -> Rows:
    keys = content_keys("passage", [f"{prefix} {i}" for i in range(start, start + n)])
    return Rows(keys, vectors_for(keys, dim, dtype), roles_for(keys), ntok_for(keys))


def write_rows(store: TeacherStore, rows: Rows, *, chunk_rows: int = 4, batches: tuple[int, ...] = ()) -> None:
    """One committed segment holding ``rows``, appended in ``batches`` (sizes; the rest in one go)."""
    with store.writer(chunk_rows=chunk_rows) as w:
        start = 0
        for size in (*batches, len(rows) - sum(batches)):
            w.append(*rows[start : start + size].args())
            start += size
