"""Format 3: a segment's last chunk file holds only its rows, whatever the writer knew of its row count.

Before, a writer that did not know how many rows it would get (a Ray actor's unit, a run whose plan was not
counted) left its last chunk padded to ``chunk_rows``: 28 MiB for 10 rows at 3584-d fp16. Readers, ``verify``
and salvage accept the trimmed chunk; formats 1 and 2 keep their padded one (tests/storage/test_format_v2.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import google_crc32c
import numpy as np
import pytest

from storage import TeacherStore, default_chunk_rows, verify_store
from storage.segment import claim_and_salvage
from tests.storage.rows import make_rows

DIM = 16
ROW = DIM * 2


def _chunk(store: TeacherStore, seg_id: str, c: int) -> Path:
    return Path(store.url, "segments", seg_id, "vectors", "c", str(c), "0")


def test_a_writer_that_does_not_know_its_rows_pads_nothing(new_store: Callable[..., TeacherStore]) -> None:
    """3584-d fp16, default chunks of 4,096 rows: 10 rows cost 70 KiB on disk, not 28 MiB; 4,106 rows one full
    chunk and 70 KiB."""
    store = new_store(3584)
    assert default_chunk_rows(3584, "float16") == 4096
    for n in (10, 4106):
        rows = make_rows(n, 3584, prefix=f"n{n}")
        with store.writer() as w:  # chunk_rows: the default, not fitted to n
            for start in range(0, n, 1000):
                w.append(*rows[start : start + 1000].args())
            seg_id = w.seg_id
        sizes = [p.stat().st_size for p in sorted(Path(store.url, "segments", seg_id, "vectors", "c").glob("*/0"))]
        assert sizes == ([4096 * 7168 + 4] if n > 4096 else []) + [10 * 7168 + 4]
        store.refresh()
        np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    report = verify_store(store)
    assert report.ok and report.rows == 4116 and report.chunks == 3


def test_partial_flushes_rewrite_the_last_chunk_at_its_size(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    rows = make_rows(11, DIM)
    with store.writer(chunk_rows=4, flush_seconds=3600) as w:
        w.append(*rows[:5].args())  # chunk 0 full; chunk 1 holds 1 row, in memory
        w.flush()
        assert _chunk(store, w.seg_id, 1).stat().st_size == 1 * ROW + 4
        w.append(*rows[5:7].args())
        w.flush()
        assert _chunk(store, w.seg_id, 1).stat().st_size == 3 * ROW + 4  # rewritten whole, atomically
        w.append(*rows[7:].args())
        seg_id = w.seg_id
    assert [_chunk(store, seg_id, c).stat().st_size for c in range(3)] == [4 * ROW + 4, 4 * ROW + 4, 3 * ROW + 4]
    data = _chunk(store, seg_id, 2).read_bytes()
    assert int.from_bytes(data[-4:], "little") == google_crc32c.value(data[:-4])  # what zarr's crc32c codec writes
    store.refresh()
    np.testing.assert_array_equal(store.get(rows.keys), rows.vectors)
    scanned = np.concatenate([v for _, v in store.iter_batches(batch_size=3)])
    np.testing.assert_array_equal(scanned, rows.vectors)
    assert verify_store(store).ok


@pytest.mark.parametrize("leftover", ["rows past the last part", "padding of an older ddx"])
def test_salvage_trims_the_last_chunk_to_the_rows_its_index_describes(
    new_store: Callable[..., TeacherStore], leftover: str
) -> None:
    """A writer killed between a chunk write and its index part leaves more rows in the chunk than its parts
    describe; an older ddx's writer left zero padding. Salvage commits the described rows, last chunk trimmed."""
    store = new_store(DIM)
    rows = make_rows(10, DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*rows[:6].args())
    w.flush()  # parts describe rows 0..5; chunk 1 holds rows 4, 5
    w.abort()  # the lock is released: as a killed writer leaves it
    chunk = _chunk(store, w.seg_id, 1)
    block = rows.vectors[4:7] if leftover.startswith("rows") else np.vstack([rows.vectors[4:6], np.zeros((2, DIM))])
    body = np.ascontiguousarray(block, dtype="<f2").tobytes()
    chunk.write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
    result = claim_and_salvage(store.loc, w.seg_id)
    assert (result.outcome, result.rows) == ("salvaged", 6)
    assert chunk.stat().st_size == 2 * ROW + 4
    commit = json.loads(Path(store.url, "segments", w.seg_id, "COMMIT").read_text())
    assert commit["format_version"] == 3 and commit["salvaged"]
    store.refresh()
    np.testing.assert_array_equal(store.get(rows.keys[:6]), rows.vectors[:6])
    assert verify_store(store).ok
    assert claim_and_salvage(store.loc, w.seg_id).outcome == "done"  # done once
