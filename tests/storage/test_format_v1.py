"""The committed format-1 store still opens and returns its vectors.

``format_v1_store/`` was written by ``make_format_fixture.py`` and is never regenerated: it stands for
stores users already have. The expected values below are spelled out here on purpose, not imported.

The rule (number 10 of the project's style guide, ``../shared/STYLE.md`` beside this repository, not in it):
once the store format is released, keep a tiny committed store of each format version and test that it opens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import TeacherSpec, TeacherStore, content_keys, store_info, verify_store

FIXTURE = Path(__file__).resolve().parent / "format_v1_store"

SPEC = TeacherSpec(
    model="fixture/tiny-teacher",
    weights_id="hub:fixture/tiny-teacher@0000000000000000000000000000000000000001",
    pooling="lasttoken",
    normalize=False,
    max_seq_length=32,
    dim=4,
    query_prompt="Query: ",
    padding_side="left",
)
EXPECTED = [
    ("passage", "The cat sat on the mat.", [1.0, 0.5, -1.0, 0.25]),
    ("passage", "Zarr stores chunked arrays.", [2.0, -0.5, 0.0, 8.0]),
    ("query", "what do cats sit on", [-3.0, 1.5, 0.125, 0.0]),
    ("passage", "shared", [0.75, 0.75, -0.75, -0.75]),
    ("query", "ends with a NUL?\x00", [100.0, -100.0, 0.5, 1.0]),
    ("query", "The cat sat on the mat.", [4.0, 4.0, 4.0, 4.0]),
    ("passage", "Ünïcödé — 漢字", [-0.25, 0.0, 0.0, 65504.0]),
]


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy, so no test can change the committed fixture."""
    return Path(shutil.copytree(FIXTURE, tmp_path / "v1"))


def _expected() -> tuple[np.ndarray, np.ndarray]:
    keys = content_keys([r for r, _, _ in EXPECTED], [t for _, t, _ in EXPECTED])
    return keys, np.array([v for _, _, v in EXPECTED], dtype=np.float16)


def test_v1_store_opens_and_returns_its_vectors(v1: Path) -> None:
    store = TeacherStore.open(v1, SPEC)
    assert store.format_version == 1 and store.dtype == "float16" and store.dim == 4
    assert store.fingerprint == "681eea18f45aec8c8e5f38c53a37199e"
    assert len(store.segments) == 2 and store.rows == 8 and len(store) == 7
    assert store.index.duplicates == 1
    keys, vectors = _expected()
    np.testing.assert_array_equal(store.get(keys), vectors)
    np.testing.assert_array_equal(store.get(keys[::-1], dtype="float32"), vectors[::-1].astype(np.float32))
    np.testing.assert_array_equal(store.get_rows(store.locate(keys)), vectors)
    scanned = np.concatenate([k for k, _ in store.iter_batches(batch_size=2)])
    assert len(scanned) == 8 and len(set(scanned.tolist())) == 7  # every row, the shared key twice
    assert store.contains(content_keys("passage", ["what do cats sit on"])).tolist() == [False]  # role is in the key


def test_v1_store_verifies_and_reports(v1: Path) -> None:
    store = TeacherStore.open(v1)
    report = verify_store(store)
    assert report.ok and (report.segments, report.rows, report.chunks) == (2, 8, 3)
    info = store_info(store, duplicates=True)
    assert info["format_version"] == 1 and info["roles"] == {"passage": 4, "query": 3}
    rows = store_info(store)["roles"]  # COMMITs of format 1 have no role counts: read from each index
    assert sum(rows.values()) == 8 and rows["query"] == 3
    assert store.uncommitted_segments() == []


def test_v1_layout_is_plain_zarr(v1: Path) -> None:
    root = json.loads((v1 / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["attributes"]["ddx"]["format_version"] == 1
    _, vectors = _expected()
    got = []
    for seg in sorted((v1 / "segments").iterdir()):
        if not seg.is_dir():
            continue
        assert json.loads((seg / "COMMIT").read_text())["format_version"] == 1
        got.append(zarr.open_array(str(seg / "vectors"), mode="r")[:])
    stacked = np.concatenate(got)
    assert stacked.shape == (8, 4)
    assert {tuple(r) for r in stacked.tolist()} == {tuple(r) for r in vectors.tolist()}
