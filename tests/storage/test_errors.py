"""Every error path of opening and creating a store, with the message a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import zarr

from storage import (
    DdxError,
    DimensionMismatchError,
    FingerprintMismatchError,
    FormatVersionError,
    StoreExistsError,
    StoreNotFoundError,
    TeacherStore,
)
from storage.metadata import sealed
from tests.storage.rows import make_rows, make_spec, write_rows


def test_open_missing_path(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match=r"No teacher store at '.*nowhere' \(zarr.json missing\)\. Run"):
        TeacherStore.open(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError):  # the builtin still catches it
        TeacherStore.open(tmp_path / "nowhere")


def test_open_path_that_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "vectors.npy"
    f.write_bytes(b"not a store")
    with pytest.raises(StoreNotFoundError, match="is a file, not a teacher store directory"):
        TeacherStore.open(f)
    with pytest.raises(StoreNotFoundError, match="is a file, not a store directory"):
        TeacherStore.create(f, make_spec())


def test_open_zarr_group_that_is_not_a_ddx_store(tmp_path: Path) -> None:
    zarr.open_group(str(tmp_path / "g"), mode="w", attributes={"other": 1})
    with pytest.raises(StoreNotFoundError, match="is a Zarr group but not a ddx teacher store"):
        TeacherStore.open(tmp_path / "g")


def test_create_over_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(StoreExistsError, match="already exists and is not empty"):
        TeacherStore.create(tmp_path / "busy", make_spec())
    (tmp_path / "empty").mkdir()
    TeacherStore.create(tmp_path / "empty", make_spec())  # an empty dir is fine
    with pytest.raises(FileExistsError):
        TeacherStore.create(tmp_path / "empty", make_spec())


def test_newer_format_version(new_store: Callable[..., TeacherStore]) -> None:
    """A newer ddx seals its attributes as this one does: a sealed unknown version is newer, not damage."""
    store = new_store()
    meta_path = Path(store.url) / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["ddx"] = sealed({**meta["attributes"]["ddx"], "format_version": 99})
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match=r"has format version 99; this ddx reads versions up to 3\. Upgrade"):
        TeacherStore.open(store.url)
    meta["attributes"]["ddx"] = sealed({**meta["attributes"]["ddx"], "format_version": "1"})  # not an int
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FormatVersionError, match="format version 1;"):
        TeacherStore.open(store.url)


def test_open_with_another_spec(new_store: Callable[..., TeacherStore]) -> None:
    store = new_store(16)
    write_rows(store, make_rows(5, 16))
    TeacherStore.open(store.url, make_spec(16, model="same weights, other path"))  # display-only field
    with pytest.raises(FingerprintMismatchError, match=r"was made by another teacher spec \(pooling: store has 'mean'"):
        TeacherStore.open(store.url, make_spec(16, pooling="cls"))
    with pytest.raises(DimensionMismatchError, match="holds 16-d vectors"):
        TeacherStore.open(store.url, make_spec(32))
    with pytest.raises(FingerprintMismatchError, match="query_prompt"):
        TeacherStore.open_or_create(store.url, make_spec(16, query_prompt="Query: "))


def test_open_or_create(tmp_path: Path) -> None:
    created = TeacherStore.open_or_create(tmp_path / "s", make_spec(), dtype="float32")
    assert created.dtype == "float32"
    with pytest.warns(UserWarning, match="keeps float32 vectors; --dtype float16 is ignored"):
        again = TeacherStore.open_or_create(tmp_path / "s", make_spec())
    assert again.fingerprint == created.fingerprint


def test_every_error_is_a_ddx_error() -> None:
    import storage.errors as errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), DdxError)
        assert issubclass(getattr(errors, name), ValueError)


def test_storage_does_not_import_torch() -> None:
    """Every storage module, imported in a fresh interpreter, loads no torch (tests/test_layout.py reads the source)."""
    code = (
        "import importlib, pkgutil, sys, storage; "
        "[importlib.import_module(m.name) for m in pkgutil.walk_packages(storage.__path__, 'storage.')]; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'sentence_transformers')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
