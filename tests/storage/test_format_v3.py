"""The committed format-3 store still opens, returns its vectors and checks every row; its last chunks are trimmed.

``format_v3_store/`` was written by ``make_format_fixture.py`` and is never regenerated. Format 3 is format 2 with
each segment's last chunk file holding only its own rows (rows + CRC32C), not ``chunk_rows`` rows padded with zeros:
a writer that does not know its row count (a Ray actor's unit, a run's last rows) no longer pads up to a 28 MiB chunk.

The rule (number 10 of the project's style guide, ``../shared/STYLE.md`` beside this repository, not in it):
once the store format is released, keep a tiny committed store of each format version and test that it opens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from storage import IntegrityError, TeacherStore, store_info, verify_store
from storage.metadata import seal_matches
from tests.storage.test_format_v1 import SPEC, _expected

FIXTURE = Path(__file__).resolve().parent / "format_v3_store"
ROW = 4 * 2  # 4-d float16


@pytest.fixture
def v3(tmp_path: Path) -> Path:
    """A copy, so no test can change the committed fixture."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v3"))


def test_v3_store_opens_and_returns_its_vectors(v3: Path) -> None:
    store = TeacherStore.open(v3, SPEC)
    assert store.format_version == 3 and store.dtype == "float16" and store.dim == 4
    assert store.fingerprint == "681eea18f45aec8c8e5f38c53a37199e"  # the spec, so the fingerprint, is format 1's
    assert len(store.segments) == 2 and store.rows == 8 and len(store) == 7 and store.index.duplicates == 1
    keys, vectors = _expected()
    np.testing.assert_array_equal(store.get(keys), vectors)
    np.testing.assert_array_equal(store.get(keys[::-1], dtype="float32"), vectors[::-1].astype(np.float32))
    store.gather_mode = "mmap"
    np.testing.assert_array_equal(store.get_rows(store.locate(keys)), vectors)
    assert len(np.concatenate([k for k, _ in store.iter_batches(batch_size=2)])) == 8
    report = verify_store(v3)
    assert report.ok and (report.segments, report.rows, report.chunks) == (2, 8, 3)
    assert store_info(store)["format_version"] == 3


def test_v3_last_chunks_hold_their_rows_only(v3: Path) -> None:
    """5 rows in chunks of 4: a full chunk and one of 1 row; 3 rows: one chunk of 3 rows (format 2 padded both)."""
    sizes = {}
    for seg in sorted(p for p in (v3 / "segments").iterdir() if p.is_dir()):
        commit = json.loads((seg / "COMMIT").read_text())
        assert commit["format_version"] == 3 and seal_matches(commit) and commit["chunk_rows"] == 4
        sizes[commit["rows"]] = [
            (seg / "vectors" / "c" / str(c) / "0").stat().st_size for c in range(2 if commit["rows"] > 4 else 1)
        ]
    assert sizes == {5: [4 * ROW + 4, 1 * ROW + 4], 3: [3 * ROW + 4]}


def test_v3_store_refuses_a_padded_last_chunk(v3: Path) -> None:
    """A format-3 last chunk must hold exactly its rows: padding it back is damage, named with the size expected."""
    seg = next(p for p in (v3 / "segments").iterdir() if p.is_dir() and (p / "vectors" / "c" / "1").exists())
    chunk = seg / "vectors" / "c" / "1" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[:-4] + bytes(3 * ROW) + data[-4:])
    report = verify_store(v3)
    assert report.problems == [f"segments/{seg.name}/vectors/c/1/0: has 36 bytes, expected 12 (1 x 4 float16 + CRC)"]
    keys, _ = _expected()
    with pytest.raises(IntegrityError, match=r"c/1/0 is damaged: has 36 bytes, expected 12"):
        TeacherStore.open(v3).get(keys)
