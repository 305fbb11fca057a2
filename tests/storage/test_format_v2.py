"""The committed format-2 store still opens, returns its vectors and checks every row.

``format_v2_store/`` was written by ``make_format_fixture.py`` and is never regenerated. Format 2 adds a
``crc32c`` column to the index (CRC32C(key ‖ row bytes)), seals the root attributes and COMMIT with a
sha256, and records vectors/zarr.json's sha256 in COMMIT. It holds the same rows as format 1.

The rule (number 10 of the project's style guide, ``../shared/STYLE.md`` beside this repository, not in it):
once the store format is released, keep a tiny committed store of each format version and test that it opens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pyarrow.parquet as pq
import pytest

from storage import IntegrityError, TeacherStore, store_info, verify_store
from storage.metadata import seal_matches
from tests.storage.test_format_v1 import SPEC, _expected

FIXTURE = Path(__file__).resolve().parent / "format_v2_store"


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    """A copy, so no test can change the committed fixture."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v2"))


def test_v2_store_opens_and_returns_its_vectors(v2: Path) -> None:
    store = TeacherStore.open(v2, SPEC)
    assert store.format_version == 2 and store.dtype == "float16" and store.dim == 4
    assert store.fingerprint == "681eea18f45aec8c8e5f38c53a37199e"  # the spec, so the fingerprint, is format 1's
    assert len(store.segments) == 2 and store.rows == 8 and len(store) == 7 and store.index.duplicates == 1
    assert all(seg.has_row_checksums for seg in store.segments)
    keys, vectors = _expected()
    np.testing.assert_array_equal(store.get(keys), vectors)
    np.testing.assert_array_equal(store.get(keys[::-1], dtype="float32"), vectors[::-1].astype(np.float32))
    np.testing.assert_array_equal(store.get_rows(store.locate(keys)), vectors)
    assert len(np.concatenate([k for k, _ in store.iter_batches(batch_size=2)])) == 8
    report = verify_store(v2)
    assert report.ok and (report.segments, report.rows, report.chunks) == (2, 8, 3)
    assert store_info(store)["format_version"] == 2


def test_v2_layout(v2: Path) -> None:
    """What format 2 writes, checked from the files alone: seals, and each row's CRC32C(key ‖ row)."""
    attrs = json.loads((v2 / "zarr.json").read_text())["attributes"]["ddx"]
    assert attrs["format_version"] == 2 and seal_matches(attrs)
    keys, vectors = _expected()
    by_key = {bytes(k): v for k, v in zip(keys.tolist(), vectors, strict=True)}
    checked = 0
    for seg in sorted(p for p in (v2 / "segments").iterdir() if p.is_dir()):
        commit = json.loads((seg / "COMMIT").read_text())
        assert commit["format_version"] == 2 and seal_matches(commit) and commit["dim"] == 4
        index = pq.read_table(seg / "index.parquet").to_pydict()
        for key, crc in zip(index["key"], index["crc32c"], strict=True):
            row = by_key[key].astype("<f2").tobytes()
            assert google_crc32c.value(key + row) == crc
            checked += 1
    assert checked == 8


def test_v2_store_refuses_a_damaged_row(v2: Path) -> None:
    seg = next(p for p in (v2 / "segments").iterdir() if p.is_dir())
    chunk = seg / "vectors" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[2] ^= 0x01  # row 0, value 1: a one-bit change
    chunk.write_bytes(bytes(data))
    keys, _ = _expected()
    with pytest.raises(IntegrityError, match=rf"{seg.name}/vectors/c/0/0 is damaged: row 0 \(chunk 0, global row"):
        TeacherStore.open(v2).get(keys)
