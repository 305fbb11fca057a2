"""One bit turning a format-3 file's version into '1' (0x33 → 0x31) must not switch its checks off: format 1 had
no seal, but the seal covers the version, so a COMMIT or root zarr.json carrying one is held to it."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import IntegrityError, TeacherStore, verify_store
from tests.storage.rows import make_rows, make_spec, write_rows

DIM = 8


def _flip_version(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = data.index(b'"format_version": 3') + len(b'"format_version": ')
    data[at] ^= 0x02  # '3' -> '1'
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("file", ["COMMIT", "zarr.json"])
def test_a_version_flipped_to_1_is_damage(file: str, tmp_path: Path) -> None:
    store = TeacherStore.create(tmp_path / "store", make_spec(DIM))
    write_rows(store, make_rows(8, DIM))
    seg = TeacherStore.open(store.url).segments[0].seg_id
    target = tmp_path / "store" / ("segments" if file == "COMMIT" else "") / (seg if file == "COMMIT" else "") / file
    _flip_version(target)
    with pytest.raises(IntegrityError, match=rf"{file}.*(checksum|a changed byte)"):
        TeacherStore.open(store.url)
    assert not verify_store(store.url).ok
