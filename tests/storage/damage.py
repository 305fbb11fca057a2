"""The damage matrix: every store file kind x {flip a byte, truncate, delete}, and what each reader does.

One tiny store (two committed format-3 segments and one abandoned with index parts) is copied per case,
one file damaged, then every reader runs: ``TeacherStore.open``, ``get`` and ``get_rows`` of every key,
a full ``iter_batches`` scan, ``verify_store``, and ``ddx cache verify`` / ``ddx cache info`` through
click's CliRunner. Each outcome is classified:

* readers: ``correct`` (every vector equals the one written), ``<ErrorType>`` (a one-line ddx error),
  ``WRONG`` (a vector differs) or ``CRASH <Type>`` (anything else: a traceback);
* verify: ``reported`` (a problem names the damaged file), ``MISSED``, or ``intact`` (not reported, and
  the file still means what it did: only possible in a part's Parquet footer, outside its columns);
* CLI: ``exit N`` (+ ``names file`` for verify, ``one line`` for errors, ``TRACEBACK`` when not).

``tests/storage/test_damage_matrix.py`` asserts the matrix; ``bench/damage_matrix.py`` prints it.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import DdxError, TeacherStore, verify_store
from storage.segment_format import read_index_bytes
from tests.storage.rows import Rows, make_rows, make_spec

DIM, CHUNK = 8, 4
FLIPS = (0.1, 0.5, 0.9, 1.0)  # where in the file a bit is flipped (fraction of its length; 1.0: the last byte)
DAMAGES = (*(f"flip@{int(f * 100)}%" for f in FLIPS), "truncate", "delete")


@dataclass(frozen=True)
class Pristine:
    """The undamaged store and what it holds."""

    path: Path
    rows: Rows  # every committed row
    files: dict[str, str]  # file kind -> path below the store root


@dataclass(frozen=True)
class Outcome:
    kind: str
    damage: str
    readers: dict[str, str]
    verify: str
    cli_verify: str
    cli_info: str

    @property
    def ok(self) -> bool:
        """Nothing silently wrong, no traceback, damage reported (or the file's meaning intact)."""
        readers_ok = all(v.startswith("correct") or v.endswith("Error") for v in self.readers.values())
        cli_ok = "TRACEBACK" not in self.cli_verify + self.cli_info
        verified = self.verify == "reported" and self.cli_verify.startswith("exit 1, names file")
        intact = self.verify == "intact" and all(v == "correct" for v in self.readers.values())
        return readers_ok and cli_ok and (verified or intact)


def build(base: Path) -> Pristine:
    """The store every case starts from: segments of 10 and 6 rows (4-row chunks), one abandoned with 2 parts."""
    store = TeacherStore.create(base / "store", make_spec(DIM))
    a, b = make_rows(10, DIM, prefix="a"), make_rows(6, DIM, prefix="b")
    for rows in (a, b):
        with store.writer(chunk_rows=CHUNK) as w:
            w.append(*rows.args())
    crashed = store.writer(chunk_rows=CHUNK, flush_seconds=3600)
    crashed.append(*make_rows(6, DIM, prefix="crashed").args())
    crashed.flush()
    crashed.abort()
    store.refresh()
    seg = next(s for s in store.segments if s.rows == 10).seg_id
    files = {
        "root zarr.json": "zarr.json",
        "COMMIT": f"segments/{seg}/COMMIT",
        "index.parquet": f"segments/{seg}/index.parquet",
        "vectors/zarr.json": f"segments/{seg}/vectors/zarr.json",
        "chunk": f"segments/{seg}/vectors/c/1/0",
        "last chunk (trimmed)": f"segments/{seg}/vectors/c/2/0",
        "index part": f"segments/{crashed.seg_id}/parts/part-000000.parquet",
    }
    rows = Rows(*(np.concatenate([getattr(a, f), getattr(b, f)]) for f in ("keys", "vectors", "roles", "n_tokens")))
    return Pristine(base / "store", rows, files)


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:
        at = min(len(data) - 1, int(float(how[5:-1]) / 100 * len(data)))
        changed = bytearray(data)
        changed[at] ^= 0x01
        path.write_bytes(bytes(changed))


def run_case(pristine: Pristine, kind: str, how: str, work: Path) -> Outcome:
    """Copy the store, damage ``kind``'s file ``how``, and run every reader."""
    target = work / f"{kind.replace('/', '_').replace(' ', '_')}-{how.replace('@', '').replace('%', '')}"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(pristine.path, target)
    file = pristine.files[kind]
    damage(target / file, how)
    readers = {name: _read(fn, pristine.rows, target) for name, fn in READERS.items()}
    report = verify_store(target)
    named = any(p.startswith(file + ":") or p.startswith(_segment_of(file)) for p in report.problems)
    verify = "reported" if named else ("intact" if _means_the_same(pristine, target, file) else "MISSED")
    return Outcome(kind, how, readers, verify, _cli(target, "verify", file), _cli(target, "info", file))


def _segment_of(file: str) -> str:
    """A lost COMMIT is reported on the segment (its COMMIT path): accept either."""
    return file + ":" if not file.endswith("COMMIT") else file.rsplit("/", 1)[0] + "/COMMIT:"


def _read(fn: Callable[[TeacherStore, Rows], np.ndarray], rows: Rows, path: Path) -> str:
    try:
        got = fn(TeacherStore.open(path), rows)
    except DdxError as exc:
        return type(exc).__name__ if "\n" not in str(exc) else f"CRASH multi-line {type(exc).__name__}"
    except Exception as exc:  # the matrix records any other exception as a crash: that is its point
        return f"CRASH {type(exc).__name__}"
    if np.array_equal(got, rows.vectors):
        return "correct"
    skipped = np.isnan(got).all(axis=1)
    if skipped.any() and np.array_equal(got[~skipped], rows.vectors[~skipped]):
        return f"correct, {int(skipped.sum())} rows skipped"  # a segment that lost its COMMIT: not committed
    return "WRONG"


def _scan(store: TeacherStore, rows: Rows) -> np.ndarray:
    """Every (key, vector) pair a scan yields, as rows in ``rows``' order; a key it skipped reads as NaN."""
    pairs = {}
    for keys, vecs in store.iter_batches(batch_size=3):
        pairs.update(zip((k.tobytes() for k in keys), vecs, strict=True))
    nan = np.full(rows.vectors.shape[1], np.nan, rows.vectors.dtype)
    return np.stack([pairs.get(k.tobytes(), nan) for k in rows.keys])


READERS: dict[str, Callable[[TeacherStore, Rows], np.ndarray]] = {
    "open": lambda s, r: r.vectors,
    "get": lambda s, r: s.get(r.keys),
    "get_rows": lambda s, r: s.get_rows(s.locate(r.keys)),
    "iter_batches": _scan,
}


def _means_the_same(pristine: Pristine, target: Path, file: str) -> bool:
    """Only index parts have bytes no check covers (Parquet footer text): is their content unchanged?"""
    if "/parts/" not in file or not (target / file).exists():
        return False
    try:
        before = read_index_bytes((pristine.path / file).read_bytes())
        after = read_index_bytes((target / file).read_bytes())
    except DdxError:
        return False
    return all(np.array_equal(getattr(before, f), getattr(after, f)) for f in ("keys", "rows", "roles", "crcs"))


def _cli(path: Path, command: str, file: str) -> str:
    from click.testing import CliRunner

    from cli.main import cli

    result = CliRunner().invoke(cli, ["cache", command, str(path)])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"exit {result.exit_code}, TRACEBACK {type(result.exception).__name__}"
    out = f"exit {result.exit_code}"
    if command == "verify" and file in result.output:
        out += ", names file"
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    if result.exit_code and command != "verify":
        out += ", one line" if len(errors) == 1 else ", TRACEBACK or no message"
    return out


def matrix(work: Path) -> list[Outcome]:
    """Every (file kind, damage) case, run from a fresh copy of one pristine store under ``work``."""
    pristine = build(work / "pristine")
    return [run_case(pristine, kind, how, work) for kind in pristine.files for how in DAMAGES]


def markdown(outcomes: list[Outcome]) -> str:
    """The matrix as a Markdown table (one row per case)."""
    head = ["file", "damage", *READERS, "verify_store", "`ddx cache verify`", "`ddx cache info`", "ok"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for o in outcomes:
        cells = [o.kind, o.damage, *o.readers.values(), o.verify, o.cli_verify, o.cli_info, "yes" if o.ok else "NO"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
