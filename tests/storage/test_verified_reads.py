"""Readers never hand out a vector that is not the one written (issue 9 item 3).

Every gather checks each row against CRC32C(key ‖ row) recorded at write time, every scan checks its
chunks; format-1 stores (no row checksums) check each chunk once. Damage is a one-line IntegrityError
naming the segment's file, the chunk and the row, with ``ddx cache verify`` and the repair.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from storage import IntegrityError, TeacherStore
from storage.metadata import sealed
from storage.segment import IndexColumns, SegmentReader
from tests.storage.rows import Rows, make_rows, write_rows

ROWS, CHUNK = 20, 4  # five chunks


def _store(new_store: Callable[..., TeacherStore], dim: int) -> tuple[TeacherStore, Rows]:
    store = new_store(dim)
    rows = make_rows(ROWS, dim)
    write_rows(store, rows, chunk_rows=CHUNK)
    return TeacherStore.open(store.url), rows


def _flip_row(seg: SegmentReader, row: int, byte: int = 3) -> None:
    """Flip one bit of ``row`` (a row number in the segment) in its chunk file."""
    chunk, local = divmod(row, seg.chunk_rows)
    path = Path(seg.loc.join("segments", seg.seg_id, "vectors", "c", str(chunk), "0"))
    data = bytearray(path.read_bytes())
    data[local * seg.dim * seg.dtype.itemsize + byte] ^= 0x01
    path.write_bytes(bytes(data))


def _row_of(store: TeacherStore, key: np.ndarray) -> int:
    return int(store.locate(key[None])[0])


# dim 16 fp16: 32-byte rows, taken grouped by chunk; dim 512 fp16: 1 KiB rows, copied one by one.
@pytest.mark.parametrize("dim", [16, 512])
def test_a_flipped_bit_is_never_returned(new_store: Callable[..., TeacherStore], dim: int) -> None:
    store, rows = _store(new_store, dim)
    seg = store.segments[0]
    damaged = 9  # chunk 2, row 1 of it
    _flip_row(seg, damaged)
    store = TeacherStore.open(store.url)
    key_pos = int(np.flatnonzero(store.locate(rows.keys) == damaged)[0])
    message = (
        rf"^Store file .*/segments/{seg.seg_id}/vectors/c/2/0 is damaged: row 9 \(chunk 2, global row 9\) does "
        rf"not match its CRC32C: read [0-9a-f]{{8}}, written [0-9a-f]{{8}} .*Run 'ddx cache verify .*' to list all "
        rf"damage; to repair, delete .*/segments/{seg.seg_id} and rerun the precompute that wrote it"
    )
    gids = store.locate(rows.keys)
    asks: dict[str, Callable[[], object]] = {
        "get": lambda: store.get(rows.keys),
        "get float32": lambda: store.get(rows.keys[::-1], dtype="float32"),
        "get_rows": lambda: store.get_rows(gids),
        "get_rows out": lambda: store.get_rows(gids, out=np.empty((ROWS, dim), np.float32)),
        "one chunk": lambda: store.get_rows(np.array([8, damaged, 10])),
        "one row": lambda: store.get(rows.keys[key_pos : key_pos + 1]),
    }
    for name, ask in asks.items():
        with pytest.raises(IntegrityError, match=message) as info:
            ask()
        assert "\n" not in str(info.value), name
    with pytest.raises(IntegrityError, match=r"vectors/c/2/0 is damaged: row 9 \(chunk 2\) does not match"):
        list(store.iter_batches(batch_size=3))
    healthy = np.flatnonzero(gids != damaged)
    np.testing.assert_array_equal(store.get(rows.keys[healthy]), rows.vectors[healthy])  # the rest reads fine


def _rewrite_index(seg: SegmentReader, cols: IndexColumns, *, reseal: bool) -> None:
    data = cols.to_parquet_bytes()
    Path(seg.loc.join("segments", seg.seg_id, "index.parquet")).write_bytes(data)
    if reseal:  # COMMIT rewritten to match: what a writer bug (not a damaged disk) would leave
        path = Path(seg.loc.join("segments", seg.seg_id, "COMMIT"))
        commit = json.loads(path.read_text())
        commit["index_sha256"] = hashlib.sha256(data).hexdigest()
        path.write_text(json.dumps(sealed(commit)))


@pytest.mark.parametrize("moved", ["row", "key", "key+crc"])
@pytest.mark.parametrize("reseal", [False, True])
def test_two_swapped_index_lines_return_no_wrong_vector(
    new_store: Callable[..., TeacherStore], moved: str, reseal: bool
) -> None:
    """Issue 9: two rows swapped in a valid index.parquet returned 2 wrong vectors.

    Without a matching COMMIT the index fails its sha256; with one, the row checksums still fail, whichever
    columns moved: a checksum of the row alone would pass the "key+crc" swap, CRC32C(key ‖ row) does not.
    """
    store, rows = _store(new_store, 16)
    seg = store.segments[0]
    cols = seg.index()
    a, b = int(np.flatnonzero(cols.rows == 2)[0]), int(np.flatnonzero(cols.rows == 13)[0])
    swap = np.arange(len(cols.rows))
    swap[[a, b]] = [b, a]
    keys = cols.keys[swap] if "key" in moved else cols.keys
    crcs = cols.crcs[swap] if moved in ("row", "key+crc") else cols.crcs
    row_ids = cols.rows[swap] if moved == "row" else cols.rows
    assert crcs is not None
    _rewrite_index(seg, IndexColumns(keys, row_ids, cols.roles, cols.n_tokens, crcs), reseal=reseal)
    fresh = TeacherStore.open(store.url)
    expected = "does not match its CRC32C" if reseal else r"index.parquet is damaged: does not match the sha256"
    with pytest.raises(IntegrityError, match=expected):
        fresh.get(rows.keys)
    with pytest.raises(IntegrityError, match=expected):
        list(fresh.iter_batches())


def test_format_1_store_checks_chunks(tmp_path: Path) -> None:
    """Older stores have no row checksums: a gather checks each chunk it maps, once, against COMMIT."""
    from tests.storage.test_format_v1 import FIXTURE, _expected

    copy = Path(shutil.copytree(FIXTURE, tmp_path / "v1"))
    store = TeacherStore.open(copy)
    seg = next(s for s in store.segments if s.rows == 5)
    assert not seg.has_row_checksums
    keys, vectors = _expected()
    np.testing.assert_array_equal(store.get(keys), vectors)
    _flip_row(seg, 1, byte=0)
    fresh = TeacherStore.open(copy)
    with pytest.raises(IntegrityError, match=rf"{seg.seg_id}/vectors/c/0/0 is damaged: chunk 0 checksum mismatch"):
        fresh.get(keys)
    with pytest.raises(IntegrityError, match="chunk 0 checksum mismatch"):
        list(fresh.iter_batches())


def test_evaluate_teacher_mode_exits_1_on_a_damaged_store(tiny_bert: Path, tmp_path: Path) -> None:
    """Issue 9: ``ddx evaluate --modes teacher`` exited 0 with a wrong nDCG after one flipped byte."""
    from click.testing import CliRunner

    from cli.main import cli
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig
    from tests.distill.conftest import make_corpus

    corpus = make_corpus(tmp_path / "beir")
    store_path = tmp_path / "store"
    teacher = TeacherConfig(model=str(tiny_bert), device="cpu")
    precompute(PrecomputeConfig(store=str(store_path), data=(corpus.spec,), teacher=teacher, progress=False))
    args = ["evaluate", "--model", str(tiny_bert), "--store", str(store_path), "--data", corpus.spec]
    args += ["--modes", "teacher", "--device", "cpu", "--json"]
    ok = CliRunner().invoke(cli, args)
    assert ok.exit_code == 0, ok.output
    store = TeacherStore.open(store_path)
    seg = store.segments[0]
    roles = seg.index()
    passage_row = int(roles.rows[roles.roles == 0][0])  # every passage is ranked in teacher mode
    _flip_row(seg, passage_row)
    bad = CliRunner().invoke(cli, args)
    assert bad.exit_code == 1 and "Traceback" not in bad.output
    (line,) = [x for x in bad.output.splitlines() if x.startswith("Error")]  # the rest: progress bars
    assert line.startswith("Error: Store file ") and f"row {passage_row} " in line and "ddx cache verify" in line


def test_format_1_store_topped_up_by_this_ddx(tmp_path: Path) -> None:
    """A format-1 store keeps its root; new segments are format 3. Each segment is checked its own way."""
    from tests.storage.test_format_v1 import FIXTURE, _expected

    copy = Path(shutil.copytree(FIXTURE, tmp_path / "v1"))
    store = TeacherStore.open(copy)
    more = make_rows(6, 4, prefix="new")
    write_rows(store, more, chunk_rows=4)
    store = TeacherStore.open(copy)
    assert store.format_version == 1 and sorted(s.format_version for s in store.segments) == [1, 1, 3]
    keys, vectors = _expected()
    all_keys, all_vectors = np.concatenate([keys, more.keys]), np.concatenate([vectors, more.vectors])
    np.testing.assert_array_equal(store.get(all_keys), all_vectors)
    new = next(s for s in store.segments if s.has_row_checksums)
    _flip_row(new, 5)
    with pytest.raises(IntegrityError, match=rf"{new.seg_id}/vectors/c/1/0 is damaged: row 5 \(chunk 1, global row"):
        TeacherStore.open(copy).get(all_keys)
    np.testing.assert_array_equal(TeacherStore.open(copy).get(keys), vectors)  # the old segments still read
