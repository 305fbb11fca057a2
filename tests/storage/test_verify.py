"""verify_store: a clean store passes; each kind of damage is reported naming the file, in one checksum format."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import IntegrityError, TeacherStore, verify_store
from storage.metadata import sealed
from storage.segment import IndexColumns
from storage.verify import LOST_COMMIT
from tests.storage.rows import make_rows, write_rows

DIM = 16
CHUNK_BYTES = 4 * DIM * 2 + 4  # 4 rows of float16 and the crc32c trailer
HEX8 = "[0-9a-f]{8}"


@pytest.fixture
def store(new_store: Callable[..., TeacherStore]) -> TeacherStore:
    store = new_store(DIM)
    write_rows(store, make_rows(10, DIM, prefix="a"))
    write_rows(store, make_rows(6, DIM, prefix="b"))
    store.refresh()
    return store


def _seg_id(store: TeacherStore, rows: int) -> str:
    """Id of the segment with ``rows`` rows (ids sort by time and a random suffix, not by write order)."""
    return next(s.seg_id for s in store.segments if s.rows == rows)


def _seg_dir(store: TeacherStore, rows: int) -> Path:
    return Path(store.url, "segments", _seg_id(store, rows))


def _chunk_path(store: TeacherStore, rows: int, chunk: int) -> Path:
    return _seg_dir(store, rows) / "vectors" / "c" / str(chunk) / "0"


def _flip(path: Path, offset: int, bit: int = 0x40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bit
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change: Callable[[dict], None], *, reseal: bool = False) -> None:
    doc = json.loads(path.read_text())
    target = doc["attributes"]["ddx"] if "attributes" in doc else doc
    change(target)
    if reseal:  # what a careful hand edit (or a writer bug) would leave: a valid seal over wrong content
        target.update(sealed(target))
    path.write_text(json.dumps(doc))


def test_clean_store_verifies(store: TeacherStore) -> None:
    report = verify_store(store)
    assert report.ok and report.problems == [] and report.notes == []
    assert (report.segments, report.rows, report.chunks) == (2, 16, 5)
    assert report.to_dict()["ok"] is True
    assert verify_store(store.url).to_dict() == report.to_dict()  # by path: no open store needed


def test_flipped_byte_in_a_chunk(store: TeacherStore) -> None:
    _flip(_chunk_path(store, 6, 1), 5)
    seg_id = _seg_id(store, 6)
    report = verify_store(store)
    assert len(report.problems) == 1
    assert re.fullmatch(
        rf"segments/{seg_id}/vectors/c/1/0: chunk 1 checksum mismatch: CRC32C of its data {HEX8}, "
        rf"file trailer {HEX8}, COMMIT {HEX8}",
        report.problems[0],
    )
    with pytest.raises(IntegrityError, match=rf"{seg_id}/vectors/c/1/0 is damaged: row 4 \(chunk 1\) does not match"):
        list(TeacherStore.open(store.url).iter_batches())  # sequential scans check too


def test_flipped_trailer_only(store: TeacherStore) -> None:
    """The data is intact (readers return it), but the file no longer matches its own CRC: damage for zarr readers."""
    path = _chunk_path(store, 10, 0)
    _flip(path, CHUNK_BYTES - 1)
    assert verify_store(store).problems[0].startswith(f"segments/{_seg_id(store, 10)}/vectors/c/0/0: chunk 0 checksum")
    rows = make_rows(10, DIM, prefix="a")
    np.testing.assert_array_equal(TeacherStore.open(store.url).get(rows.keys), rows.vectors)


@pytest.mark.parametrize(("chunk", "rows"), [(1, 4), (2, 2)])  # a full chunk; the segment's last chunk (trimmed)
def test_truncated_chunk(store: TeacherStore, chunk: int, rows: int) -> None:
    path = _chunk_path(store, 10, chunk)
    path.write_bytes(path.read_bytes()[:50])
    seg_id = _seg_id(store, 10)
    expected = rows * DIM * 2 + 4
    report = verify_store(store)
    assert report.problems == [
        f"segments/{seg_id}/vectors/c/{chunk}/0: has 50 bytes, expected {expected} ({rows} x 16 float16 + CRC)"
    ]
    fresh = TeacherStore.open(store.url)
    gid = fresh.locate(make_rows(10, DIM, prefix="a").keys[4 * chunk : 4 * chunk + 1])  # a row of that chunk
    with pytest.raises(IntegrityError, match=rf"c/{chunk}/0 is damaged: has 50 bytes, expected {expected} .*verify"):
        fresh.get_rows(gid)


def test_missing_chunk(store: TeacherStore) -> None:
    _chunk_path(store, 10, 0).unlink()
    assert verify_store(store).problems == [f"segments/{_seg_id(store, 10)}/vectors/c/0/0: is missing"]


def test_swapped_index_rows_fail_the_sha256(store: TeacherStore) -> None:
    """A valid Parquet file with other content (two rows' keys swapped) fails the COMMIT sha256."""
    seg = store.segments[0]
    path = Path(store.url, "segments", seg.seg_id, "index.parquet")
    cols = seg.index()
    keys = cols.keys.copy()
    keys[[0, 1]] = keys[[1, 0]]
    path.write_bytes(IndexColumns(keys, cols.rows, cols.roles, cols.n_tokens, cols.crcs).to_parquet_bytes())
    problems = verify_store(store).problems
    assert problems == [f"segments/{seg.seg_id}/index.parquet: does not match the sha256 recorded in COMMIT"]


def test_swapped_index_rows_with_a_matching_commit_fail_the_row_checksums(store: TeacherStore) -> None:
    """Were COMMIT rewritten to match (a writer bug), the key-bound row CRCs still catch the swap."""
    seg_dir = _seg_dir(store, 10)
    cols = store.segments[[s.rows for s in store.segments].index(10)].index()
    keys = cols.keys.copy()
    first, second = int(np.flatnonzero(cols.rows == 0)[0]), int(np.flatnonzero(cols.rows == 5)[0])
    keys[[first, second]] = keys[[second, first]]
    data = IndexColumns(keys, cols.rows, cols.roles, cols.n_tokens, cols.crcs).to_parquet_bytes()
    (seg_dir / "index.parquet").write_bytes(data)
    _edit_json(seg_dir / "COMMIT", lambda c: c.update(index_sha256=hashlib.sha256(data).hexdigest()), reseal=True)
    assert verify_store(store).problems == [
        f"segments/{seg_dir.name}/vectors/c/0/0: 1 row(s) do not match their CRC32C(key ‖ row) from index.parquet "
        "(rows 0)",
        f"segments/{seg_dir.name}/vectors/c/1/0: 1 row(s) do not match their CRC32C(key ‖ row) from index.parquet "
        "(rows 5)",
    ]


def test_unreadable_index_is_reported_not_raised(store: TeacherStore) -> None:
    seg_id = store.segments[0].seg_id
    path = Path(store.url, "segments", seg_id, "index.parquet")
    path.write_bytes(path.read_bytes()[:-9])  # torn footer
    assert verify_store(store).problems == [
        f"segments/{seg_id}/index.parquet: does not match the sha256 recorded in COMMIT"
    ]
    path.unlink()
    assert verify_store(store).problems == [f"segments/{seg_id}/index.parquet: is missing"]


def test_edited_root_spec_and_dim(store: TeacherStore) -> None:
    """Issue 9: normalize true→false and dim 16→17 in the root zarr.json used to pass verify."""
    root = Path(store.url, "zarr.json")
    original = root.read_text()
    _edit_json(root, lambda a: a["teacher_spec"].update(normalize=False))
    assert verify_store(store).problems == [
        "zarr.json: its content does not match its checksum (a changed byte)",
        f"zarr.json: fingerprint {store.fingerprint!r} != '{_fingerprint(store, normalize=False)}' computed from "
        "teacher_spec",
    ]
    root.write_text(original)
    _edit_json(root, lambda a: a.update(dim=17), reseal=True)
    assert verify_store(store).problems == ["zarr.json: dim 17 != teacher_spec.dim 16"]
    with pytest.raises(IntegrityError, match=r"zarr.json is damaged: dim 17 != teacher_spec.dim 16\. Run 'ddx cache"):
        TeacherStore.open(store.url)
    root.write_text(original)
    _edit_json(root, lambda a: a["teacher_spec"].update(dim=17), reseal=True)  # spec and root agree, segments do not
    problems = verify_store(store).problems
    assert problems[0].startswith("zarr.json: fingerprint")
    _edit_json(root, lambda a: a.update(fingerprint=_fingerprint(store, dim=17), dim=17), reseal=True)
    problems = verify_store(store).problems
    assert len(problems) == 2 and all(
        p.endswith("COMMIT: records 16-d vectors, the store (root zarr.json) 17-d") for p in problems
    )


def _fingerprint(store: TeacherStore, **changes: object) -> str:
    from dataclasses import replace

    return replace(store.spec, **changes).fingerprint  # type: ignore[arg-type]


def test_misspelt_spec_field_is_damage_not_a_newer_ddx(store: TeacherStore) -> None:
    root = Path(store.url, "zarr.json")
    root.write_text(root.read_text().replace('"max_seq_length"', '"max_seq_lengti"'))
    problems = verify_store(store).problems
    assert "zarr.json: teacher_spec: unknown field 'max_seq_lengti'" in problems
    with pytest.raises(IntegrityError, match=r"zarr.json is damaged: .*\. Run 'ddx cache verify"):
        TeacherStore.open(store.url)


def test_root_that_is_not_json_or_gone(store: TeacherStore) -> None:
    root = Path(store.url, "zarr.json")
    root.write_text(root.read_text()[:40])
    assert re.fullmatch(r"zarr.json: not valid JSON \(JSONDecodeError at byte \d+\)", *verify_store(store.url).problems)
    with pytest.raises(IntegrityError, match=r"zarr.json is damaged: not valid JSON"):
        TeacherStore.open(store.url)
    root.unlink()
    report = verify_store(store.url)
    assert report.problems[0].startswith("zarr.json: is missing") and report.segments == 2


def test_empty_foreign_and_stray_entries_under_segments(store: TeacherStore) -> None:
    segments = Path(store.url, "segments")
    (segments / "empty").mkdir()
    (segments / "photos").mkdir()
    (segments / "photos" / "cat.jpg").write_bytes(b"x")
    (segments / "notes.txt").write_text("x")
    assert sorted(verify_store(store).problems) == [
        "segments/empty: is an empty directory (foreign); 'ddx cache gc' removes it",
        "segments/notes.txt: is a file that belongs to no segment (foreign); remove it",
        "segments/photos: is a directory that is not a segment (foreign); 'ddx cache gc' removes it",
    ]


def test_commit_checksum_edit_names_commit_in_hex(store: TeacherStore) -> None:
    """Issue 9: an edited chunk checksum in COMMIT was a "chunk mismatch" with hex and decimal mixed."""
    commit = _seg_dir(store, 6) / "COMMIT"
    _edit_json(commit, lambda c: c["chunk_crc32c"].__setitem__(0, c["chunk_crc32c"][0] ^ 1))
    assert verify_store(store).problems == [
        f"segments/{_seg_id(store, 6)}/COMMIT: its content does not match its checksum (a changed byte)"
    ]
    _edit_json(commit, lambda c: None, reseal=True)  # a matching seal: the chunk check names both values in hex
    (problem,) = verify_store(store).problems
    assert re.fullmatch(
        rf".*/vectors/c/0/0: chunk 0 checksum mismatch: CRC32C of its data ({HEX8}), "
        rf"file trailer \1, COMMIT {HEX8}",
        problem,
    )


def test_truncated_commit_and_vectors_meta(store: TeacherStore) -> None:
    seg_dir = _seg_dir(store, 6)
    meta = seg_dir / "vectors" / "zarr.json"
    original = meta.read_bytes()
    meta.write_bytes(original[:30])
    assert verify_store(store).problems == [
        f"segments/{seg_dir.name}/vectors/zarr.json: does not match the sha256 recorded in COMMIT",
        f"segments/{seg_dir.name}/vectors/zarr.json: not valid JSON (JSONDecodeError at byte 30)",
    ]
    meta.unlink()
    assert verify_store(store).problems == [f"segments/{seg_dir.name}/vectors/zarr.json: is missing"]
    with pytest.raises(IntegrityError, match=r"vectors/zarr.json is damaged: is missing\. Run 'ddx cache verify"):
        TeacherStore.open(store.url)
    meta.write_bytes(original)
    commit = seg_dir / "COMMIT"
    commit.write_bytes(commit.read_bytes()[:-20])
    assert verify_store(store).problems[0].startswith(f"segments/{seg_dir.name}/COMMIT: not valid JSON")


def test_missing_commit_hides_the_segment(store: TeacherStore) -> None:
    a = make_rows(10, DIM, prefix="a")
    seg_id, other = (s.seg_id for s in sorted(store.segments, key=lambda s: s.rows != 10))  # a's segment first
    Path(store.url, "segments", seg_id, "COMMIT").unlink()
    store.refresh()
    assert [s.seg_id for s in store.segments] == [other]
    assert len(store) == 6 and not store.contains(a.keys).any()
    assert store.uncommitted_segments() == [(seg_id, "abandoned")]
    report = verify_store(store)
    assert report.segments == 1 and report.notes == []
    assert report.problems == [f"segments/{seg_id}/COMMIT: {LOST_COMMIT}"]  # issue 9: this passed verify


def test_crashed_writer_is_a_note_and_its_parts_are_checked(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(6, DIM).args())
    w.flush()  # part 0: rows 0-3 (chunk 0 full), part 1: rows 4-5
    w.abort()
    report = verify_store(store)
    assert report.ok and report.notes == [
        f"segment {w.seg_id} is uncommitted (left by a crashed run; the next precompute or 'ddx cache gc' salvages "
        "its rows)"
    ]
    parts = Path(store.url, "segments", w.seg_id, "parts")
    (parts / "part-000001.parquet").unlink()
    assert verify_store(store).problems == [
        f"segments/{w.seg_id}/parts: cover rows 0..3, but HEARTBEAT records 6 flushed rows"
    ]
    (parts / "part-000000.parquet").unlink()
    (parts / "part-000002.parquet").write_bytes(b"")
    assert verify_store(store).problems[:2] == [
        f"segments/{w.seg_id}/parts/part-000000.parquet: is missing (later parts exist)",
        f"segments/{w.seg_id}/parts/part-000001.parquet: is missing (later parts exist)",
    ]


def test_damaged_index_part_of_an_abandoned_segment(new_store: Callable[..., TeacherStore]) -> None:
    """Parts are not in COMMIT: each carries a CRC32C of its columns, so changed content is caught before salvage."""
    store = new_store(DIM)
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(6, DIM).args())
    w.flush()
    w.abort()
    part = next(Path(store.url, "segments", w.seg_id, "parts").iterdir())
    table = pq.read_table(part)
    changed = table.set_column(3, "n_tokens", pa.array(table.column("n_tokens").to_numpy() + 1))
    pq.write_table(changed.replace_schema_metadata(table.schema.metadata), part)  # the old checksum kept
    (problem,) = verify_store(store).problems
    assert re.fullmatch(
        rf"segments/{w.seg_id}/parts/{part.name}: content does not match its checksum \({HEX8} != {HEX8}\)", problem
    )
    _flip(part, len(part.read_bytes()) // 2)
    assert verify_store(store).problems[0].startswith(f"segments/{w.seg_id}/parts/{part.name}: ")
