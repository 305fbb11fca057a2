"""CRC32C algebra (storage/crc.py) against google_crc32c computing the same checksums directly."""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from storage import TeacherStore, crc, verify_store
from tests.storage.rows import make_rows, write_rows


@pytest.mark.parametrize(("n", "width"), [(1, 7), (2, 5), (3, 7168), (7, 100), (300, 64), (13, 3), (4096, 32)])
def test_concat_crc_equals_the_crc_of_the_concatenation(n: int, width: int) -> None:
    data = np.random.default_rng(n).integers(0, 256, (n, width), dtype=np.uint8)
    assert crc.concat_crc(crc.piece_crcs(data), width) == google_crc32c.value(data.tobytes())


def test_shift_gives_the_crc_of_key_then_row() -> None:
    rng = np.random.default_rng(1)
    keys, rows = rng.integers(0, 256, (50, 16), dtype=np.uint8), rng.integers(0, 256, (50, 96), dtype=np.uint8)
    expected = [google_crc32c.value(k.tobytes() + r.tobytes()) for k, r in zip(keys, rows, strict=True)]
    got = crc.shift(crc.piece_crcs(keys), 96) ^ crc.piece_crcs(rows)
    assert got.tolist() == expected
    assert crc.combine(google_crc32c.value(b"abc"), google_crc32c.value(b"defg"), 4) == google_crc32c.value(b"abcdefg")
    assert crc.concat_crc(np.array([], dtype=np.uint32), 8) == 0


def test_verify_checksums_every_byte_once(new_store, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """verify used to CRC each chunk's bytes twice (the chunk's CRC, then every row's): now once."""
    store: TeacherStore = new_store(64)
    write_rows(store, make_rows(3000, 64, prefix="a"))
    store.refresh()
    chunk_bytes = sum(f.stat().st_size - 4 for f in Path(store.url).rglob("vectors/c/*/0"))
    seen = [0]
    real_value, real_extend = google_crc32c.value, google_crc32c.extend

    def value(data: object) -> int:
        seen[0] += memoryview(data).nbytes  # type: ignore[arg-type]
        return real_value(data)

    def extend(c: int, data: object) -> int:
        seen[0] += memoryview(data).nbytes  # type: ignore[arg-type]
        return real_extend(c, data)

    monkeypatch.setattr(google_crc32c, "value", value)
    monkeypatch.setattr(google_crc32c, "extend", extend)
    assert verify_store(store.url).ok
    keys = 3000 * 16
    assert chunk_bytes <= seen[0] <= 1.05 * chunk_bytes + keys, (seen[0], chunk_bytes)
