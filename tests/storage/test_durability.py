"""What a power cut can take back: every file COMMIT vouches for, and every rename that makes a file or folder
visible, reaches disk before the step that depends on it (fsyncs traced in order through os.fsync)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from storage import TeacherStore
from tests.storage.rows import make_rows, make_spec

DIM = 8


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Paths fsynced, in order (files and folders), as ``os.fsync`` sees them."""
    seen: list[str] = []
    real = os.fsync

    def traced(fd: int) -> None:
        seen.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", traced)
    return seen


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name a descriptor's file")
def test_a_commit_is_durable_in_order(tmp_path: Path, fsyncs: list[str]) -> None:
    store = TeacherStore.create(tmp_path / "store", make_spec(DIM))
    root = str(tmp_path / "store")
    made = [p for p in fsyncs if p.endswith(".creating/zarr.json")]  # written in a hidden folder, renamed into place
    assert made and fsyncs[-1] == str(tmp_path)  # the root metadata, then the store's name
    fsyncs.clear()
    w = store.writer(chunk_rows=4, flush_seconds=3600)
    w.append(*make_rows(6, DIM).args())  # 6 rows in chunks of 4: the commit resizes, rewriting vectors/zarr.json
    w.commit()
    seg = f"{root}/segments/{w.seg_id}"
    order = {p: i for i, p in enumerate(fsyncs)}  # the last fsync of each path
    commit_file = next(i for i, p in enumerate(fsyncs) if p.startswith(f"{seg}/.COMMIT") or p == f"{seg}/COMMIT")
    for needed in (f"{seg}/vectors/zarr.json", f"{seg}/vectors/c/1/0", f"{seg}/vectors", f"{root}/segments"):
        assert needed in order and order[needed] < commit_file, needed  # on disk before COMMIT vouches for it
    assert any(p == seg for p in fsyncs[commit_file + 1 :])  # COMMIT's rename itself is durable
    np.testing.assert_array_equal(TeacherStore.open(store.url).get(make_rows(6, DIM).keys), make_rows(6, DIM).vectors)
