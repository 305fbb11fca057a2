"""Issue 9 items 4 and 5: damage to any store file is never read as data, verify names the file, and every
error the issue found as a traceback is now one line naming the file and the fix.

The matrix itself (every file kind x {flip a byte at 4 places, truncate, delete}) is built in
``tests/storage/damage.py``; ``python bench/damage_matrix.py`` prints it for docs/integrity.md.
"""

from __future__ import annotations

import errno
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zarr.storage._local as zarr_local
from click.testing import CliRunner

from cli.main import cli
from cli.options import one_line
from storage import DiskFullError, TeacherStore
from storage.fs import Location
from tests.storage.damage import DAMAGES, Pristine, build, markdown, matrix
from tests.storage.rows import make_rows

DDX = str(Path(sys.executable).with_name("ddx"))


def test_every_damage_is_refused_or_harmless_and_reported(tmp_path: Path) -> None:
    outcomes = matrix(tmp_path)
    assert len(outcomes) == 7 * len(DAMAGES)
    bad = [o for o in outcomes if not o.ok]
    assert not bad, "\n" + markdown(bad)
    readers = [v for o in outcomes for v in o.readers.values()]
    assert "WRONG" not in readers and not any(v.startswith("CRASH") for v in readers)
    assert all(o.verify == "reported" for o in outcomes)  # no "intact" case occurs with these flips


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Pristine:
    return build(tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def store(pristine: Pristine, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine.path, tmp_path / "store"))


def _cache(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["cache", *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _one_error_line(output: str) -> str:
    assert "Traceback" not in output
    (line,) = [x for x in output.splitlines() if x.startswith("Error:")]
    return line


def test_misspelt_root_field_is_damage_not_a_newer_ddx(pristine: Pristine, store: Path) -> None:
    """Issue 9: "TeacherSpec has no field(s) ['max_seq_lengti']; this store may come from a newer ddx"."""
    root = store / "zarr.json"
    root.write_text(root.read_text().replace('"max_seq_length"', '"max_seq_lengti"'))
    for command in ("info", "ls"):
        code, out = _cache(command, str(store))
        line = _one_error_line(out)
        assert code == 1 and "zarr.json is damaged: its content does not match its checksum" in line
        assert "newer ddx" not in line and f"Run 'ddx cache verify {store}'" in line
    code, out = _cache("verify", str(store))
    assert code == 1 and "DAMAGED: zarr.json: teacher_spec: unknown field 'max_seq_lengti'" in out


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("COMMIT", r"COMMIT is damaged: not valid JSON \(JSONDecodeError at byte \d+\)"),
        ("index.parquet", r"index.parquet is damaged: does not match the sha256 recorded in COMMIT"),
        ("vectors/zarr.json", r"vectors/zarr.json is damaged: does not match the sha256 recorded in COMMIT"),
    ],
)
def test_truncated_segment_files_are_one_line(pristine: Pristine, store: Path, file: str, expected: str) -> None:
    """Issue 9: COMMIT truncated (JSONDecodeError), index.parquet truncated (ArrowInvalid in info/ls),
    vectors/zarr.json truncated (JSONDecodeError)."""
    path = store / pristine.files["COMMIT"].rsplit("/", 1)[0] / file
    path.write_bytes(path.read_bytes()[:-25])
    for command in ("info", "ls"):
        # ls/info read COMMITs only (issue 10): the index is read, and its damage reported, with --duplicates
        args = (command, str(store), "--duplicates") if file == "index.parquet" else (command, str(store))
        if file == "index.parquet":
            assert _cache(command, str(store))[0] == 0
        code, out = _cache(*args)
        assert code == 1
        assert re.search(expected, _one_error_line(out))
        assert "to repair, delete" in out


def test_deleted_vectors_meta_names_the_file(pristine: Pristine, store: Path) -> None:
    """Issue 9: a deleted vectors/zarr.json was a bare "No such file or directory"."""
    (store / pristine.files["vectors/zarr.json"]).unlink()
    code, out = _cache("info", str(store))
    line = _one_error_line(out)
    assert code == 1 and f"{pristine.files['vectors/zarr.json']} is damaged: is missing. Run 'ddx cache verify" in line


def test_real_cli_verify_exits_1_naming_the_file(pristine: Pristine, store: Path) -> None:
    chunk = store / pristine.files["chunk"]
    data = bytearray(chunk.read_bytes())
    data[7] ^= 0x01
    chunk.write_bytes(bytes(data))
    done = subprocess.run([DDX, "cache", "verify", str(store)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"DAMAGED: {pristine.files['chunk']}: chunk 1 checksum mismatch: CRC32C of its data" in done.stderr


@pytest.fixture
def fill_disk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """Call it, and from then on every write below a store fails with ENOSPC: zarr's own writes and Location's."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    def fill() -> None:
        monkeypatch.setattr(zarr_local, "_put", no_space)
        monkeypatch.setattr(Location, "write_atomic", lambda self, data, *parts: no_space(self.join(*parts)))

    return fill


def test_rerun_with_a_full_disk_is_disk_full_error(
    pristine: Pristine, store: Path, fill_disk: Callable[[], None]
) -> None:
    """Issue 9: a precompute rerun with 0 bytes free raised OSError ENOSPC from inside zarr."""
    fill_disk()
    opened = TeacherStore.open(store)
    before = sorted(p.name for p in (store / "segments").iterdir())
    with pytest.raises(DiskFullError, match=r"Disk full while writing segment .*: 0 rows of this run are saved"):
        opened.writer(chunk_rows=4)
    assert sorted(p.name for p in (store / "segments").iterdir()) == before  # no empty segment left behind
    rows = make_rows(10, 8, prefix="a")
    np.testing.assert_array_equal(TeacherStore.open(store).get(rows.keys), rows.vectors)


def test_precompute_cli_with_a_full_disk_is_one_line(
    tiny_bert: Path, tmp_path: Path, fill_disk: Callable[[], None]
) -> None:
    from tests.precompute.test_pipeline import write_beir

    args = ["precompute-teacher", "--teacher", str(tiny_bert), "--store", str(tmp_path / "s"), "--no-progress"]
    first = write_beir(tmp_path / "a", ["one passage", "another passage"])
    assert CliRunner().invoke(cli, [*args, "--data", f"beir:{first}"]).exit_code == 0
    fill_disk()
    again = write_beir(tmp_path / "b", ["a third passage"])
    result = CliRunner().invoke(cli, [*args, "--data", f"beir:{again}"])
    line = _one_error_line(result.output)
    assert result.exit_code == 1 and line.startswith("Error: Disk full while writing segment ")
    assert "committed segments are untouched. Free space and rerun the same command" in line
    fresh = CliRunner().invoke(cli, [*args[:4], str(tmp_path / "new"), "--no-progress", "--data", f"beir:{again}"])
    assert _one_error_line(fresh.output).startswith("Error: Disk full while creating store ")


def test_gc_on_a_read_only_store_is_one_line(pristine: Pristine, store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 9: ``ddx cache gc`` on a read-only store raised OSError EROFS."""
    import os

    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    def no_write(self: Location, *parts: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", self.join(*parts))

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(Location, "remove", no_write)
    monkeypatch.setattr(Location, "write_atomic", lambda self, data, *parts: no_write(self, *parts))
    code, out = _cache("gc", str(store))
    line = _one_error_line(out)
    assert code == 1 and line.startswith("Error: Read-only file system: ")
    assert "run this where the path is writable" in line


def test_dataloader_worker_errors_become_their_own_line() -> None:
    """Training reads vectors in DataLoader workers; torch re-raises their errors with the worker's traceback."""
    wrapped = (
        "Caught IntegrityError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\n    raise IntegrityError(msg)\n'
        "storage.errors.IntegrityError: Store file s/segments/a/vectors/c/0/0 is damaged: row 3 (chunk 0) ..."
    )
    assert one_line(wrapped) == "Store file s/segments/a/vectors/c/0/0 is damaged: row 3 (chunk 0) ..."
    assert one_line("plain message") == "plain message"
