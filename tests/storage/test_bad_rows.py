"""Rows that cannot be stored exactly as given are refused, in one line naming the field, before anything of them is
buffered: never stored as NaN/inf, truncated keys, wrapped roles or token counts. The rows appended before stay."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage import TeacherStore, verify_store
from storage.errors import DdxError
from storage.keys import as_key_array
from tests.storage.rows import Rows, make_rows, make_spec

DIM = 8

Spoil = Callable[[Rows], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def _nan(r: Rows) -> tuple[np.ndarray, ...]:
    v = r.vectors.copy()
    v[1, 2] = np.nan
    return r.keys, v, r.roles, r.n_tokens


def _inf(r: Rows) -> tuple[np.ndarray, ...]:
    v = r.vectors.astype(np.float32)
    v[0, 0] = -np.inf
    return r.keys, v, r.roles, r.n_tokens


def _overflows_float16(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, r.vectors.astype(np.float64) * 1e6, r.roles, r.n_tokens  # finite, but inf once stored as float16


def _long_keys(r: Rows) -> tuple[np.ndarray, ...]:
    wide = np.array([k + k for k in r.keys], dtype="S32")  # would truncate to 16 bytes: two keys could collapse
    return wide, r.vectors, r.roles, r.n_tokens


def _role_out_of_range(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, r.vectors, np.array([0, 1, 300], np.int64), r.n_tokens  # 300 would wrap to 44 as uint8


def _negative_tokens(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, r.vectors, r.roles, np.array([5, -1, 5], np.int64)


def _huge_tokens(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, r.vectors, r.roles, np.array([5, 2**40, 5], np.int64)  # would become 0 as int32


def _short_roles(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, r.vectors, r.roles[:2], r.n_tokens  # used to fail only at flush, losing the chunk's good rows


def _fractional_tokens(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, r.vectors, r.roles, np.array([5.0, 2.5, 7.0])  # 5.0 and 7.0 would do; 2.5 is no count


def _integer_vectors(r: Rows) -> tuple[np.ndarray, ...]:
    return r.keys, (r.vectors * 100).astype(np.int32), r.roles, r.n_tokens


CASES: dict[str, tuple[Spoil, str]] = {
    "nan": (_nan, "vectors row 1 is NaN or infinite"),
    "inf": (_inf, "vectors row 0 is NaN or infinite"),
    "float16 overflow": (_overflows_float16, "vectors row 0 is NaN or infinite as float16"),
    "32-byte keys": (_long_keys, "keys must be 16-byte content keys"),
    "role 300": (_role_out_of_range, "roles must be integers in 0..1"),
    "negative n_tokens": (_negative_tokens, "n_tokens must be integers in 0..2147483647"),
    "n_tokens 2**40": (_huge_tokens, "n_tokens must be integers"),
    "roles shorter than keys": (_short_roles, "keys, roles and n_tokens must be 1-d of one length"),
    "integer vectors": (_integer_vectors, "vectors must be floating point"),
    "fractional n_tokens": (_fractional_tokens, "n_tokens must be integers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_row_is_refused_and_the_rows_before_it_stay(case: str, tmp_path: Path) -> None:
    spoil, message = CASES[case]
    store = TeacherStore.create(tmp_path / "store", make_spec(DIM))
    good, bad, after = make_rows(5, DIM), make_rows(3, DIM, start=100), make_rows(2, DIM, start=200)
    with store.writer(chunk_rows=4) as w:
        w.append(*good.args())
        with pytest.raises(DdxError, match=message) as err:
            w.append(*spoil(bad))
        assert "\n" not in str(err.value) and w.seg_id in str(err.value)
        w.append(*after.args())
    store = TeacherStore.open(store.url)
    assert len(store) == 7 and not store.contains(bad.keys).any()
    for rows in (good, after):
        np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    assert verify_store(store).ok


def test_keys_longer_than_16_bytes_are_not_truncated() -> None:
    with pytest.raises(ValueError, match="got one of 32 bytes"):
        as_key_array([b"a" * 32])
    assert as_key_array([b"abc"]).tobytes() == b"abc" + b"\x00" * 13  # a stripped S16 element, padded back
