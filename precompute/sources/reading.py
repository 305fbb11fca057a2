"""File reading shared by the sources: path checks, exact line streaming, JSON lines, qrels, splits.

Files are read in chunks of whole lines (:func:`iter_chunks`, ~8 MiB), split on ``\\n`` only, and
decoded a chunk at a time. That keeps a stray ``\\r`` or ``\\x85`` inside an MS MARCO passage from
splitting its line (Python's text mode treats both as line ends), lets CRLF files (BEIR qrels) lose
exactly their ``\\r\\n``, and turns one undecodable line into one rejected record instead of a dead
stream (a chunk that does not decode is decoded line by line). ``.gz`` files are read through gzip
transparently. Column readers (:mod:`.tab_lines`) take the same chunks to polars.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol, cast

import numpy as np

from .base import Qrels, Source, TrainExample
from .errors import BadSourceError

__all__ = [
    "Rejects",
    "check_role",
    "chosen_splits",
    "chunk_lines",
    "files_by_split",
    "is_record_file",
    "iter_chunks",
    "iter_json_lines",
    "iter_lines",
    "iter_objects",
    "iter_parquet_rows",
    "merge_qrels",
    "open_bytes",
    "parquet_columns",
    "parse_grade",
    "positives_only",
    "read_qrels",
    "require_dir",
    "require_file",
    "require_path",
    "split_from_name",
]

ROLE_NAMES = ("query", "passage")
CHUNK_BYTES = 8 << 20  # bytes read at a time (whole lines): ~23 k MS MARCO passages
BOM = b"\xef\xbb\xbf"
SPLIT_WORDS = ("train", "dev", "validation", "val", "test", "eval")
RECORD_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")  # question files (HotpotQA, NQ)


class Rejects(Protocol):
    """Where a reader sends a bad record: a :class:`.base.Source`, or a log that hands it on later."""

    def reject(self, origin: str, reason: str, fix: str = "") -> None: ...


def check_role(role: str | None) -> None:
    """Raise ValueError unless ``role`` is None, "query" or "passage"."""
    if role is not None and role not in ROLE_NAMES:
        raise ValueError(f"Unknown role {role!r}; expected 'query', 'passage' or None (both).")


def require_path(path: Path, kind: str, expect: str) -> Path:
    """``path`` if it exists, else a BadSourceError naming it and saying what ``kind:`` expects."""
    if not path.exists():
        raise BadSourceError(
            f"No such file or folder '{path}' ({kind}: expects {expect}). Check the path and spelling."
        )
    return path


def require_dir(path: Path, kind: str, expect: str) -> Path:
    """``path`` if it is a folder; BadSourceError when missing or a file."""
    require_path(path, kind, expect)
    if not path.is_dir():
        raise BadSourceError(f"'{path}' is a file, but {kind}: expects {expect}. Pass the folder that holds it.")
    return path


def require_file(path: Path, kind: str, expect: str) -> Path:
    """``path`` if it is a file; BadSourceError when missing or a folder."""
    require_path(path, kind, expect)
    if path.is_dir():
        raise BadSourceError(f"'{path}' is a folder, but {kind}: expects {expect}. Pass the file itself.")
    return path


def open_bytes(path: Path) -> IO[bytes]:
    """Open ``path`` for binary reading (gunzipped when it ends in ``.gz``).

    Raises:
        BadSourceError: the file cannot be opened.
    """
    try:
        return cast(IO[bytes], gzip.open(path, "rb")) if path.name.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise BadSourceError(f"Cannot open '{path}': {e.strerror or e}.") from e


def iter_chunks(path: Path, size: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Stream ``(first line number, chunk)`` of a file: whole lines, about ``size`` bytes each (:data:`CHUNK_BYTES`).

    Every chunk but the last ends in ``\\n``; line numbers are 1-based. A UTF-8 byte-order mark at the
    start of the file is dropped.

    Raises:
        BadSourceError: the file cannot be opened or read (gzip damage).
    """
    with open_bytes(path) as f:
        try:
            line, rest = 1, f.read(len(BOM))
            rest = b"" if rest == BOM else rest
            while buf := f.read(size or CHUNK_BYTES):
                cut = buf.rfind(b"\n") + 1
                if not cut:  # a line longer than a chunk: read on
                    rest += buf
                    continue
                chunk, rest = rest + buf[:cut], buf[cut:]
                yield line, chunk
                line += int(np.count_nonzero(np.frombuffer(chunk, np.uint8) == 10))  # 2x bytes.count
            if rest:
                yield line, rest
        except (OSError, EOFError) as e:
            raise BadSourceError(f"Cannot read '{path}': {e}. The file may be truncated or not gzip.") from e


def chunk_lines(chunk: bytes, first: int, path: Path, source: Rejects) -> Iterator[tuple[int, str]]:
    """Stream ``(line number, line)`` of the non-blank lines of a chunk: line ending stripped, text exact.

    A line that is not UTF-8 goes to ``source.reject``. This is the reference reading of a line: the
    column readers give the same fields or fall back to it.
    """
    try:
        lines = chunk.decode("utf-8").split("\n")
    except UnicodeDecodeError:
        yield from _decode_each(chunk, first, path, source)
        return
    if chunk.endswith(b"\n"):
        lines.pop()
    for n, line in enumerate(lines, first):
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            yield n, line


def _decode_each(chunk: bytes, first: int, path: Path, source: Rejects) -> Iterator[tuple[int, str]]:
    lines = chunk.split(b"\n")
    if chunk.endswith(b"\n"):
        lines.pop()
    for n, raw in enumerate(lines, first):
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reason = f"not valid UTF-8 ({e.reason} at byte {e.start})"
            source.reject(f"{path}:{n}", reason, "Re-encode the file as UTF-8.")
            continue
        if line.strip():
            yield n, line


def iter_lines(path: Path, source: Source) -> Iterator[tuple[str, str]]:
    """Stream ``(origin, line)`` of a text file: 1-based ``path:line``, line ending stripped, text exact.

    Blank lines are skipped. A line that is not UTF-8 goes to ``source.reject`` (skipped under
    ``skip_bad``). A leading UTF-8 byte-order mark is dropped.

    Raises:
        BadSourceError: the file cannot be opened or read (gzip damage), or a line is not UTF-8.
    """
    for first, chunk in iter_chunks(path):
        for n, line in chunk_lines(chunk, first, path, source):
            yield f"{path}:{n}", line


def iter_json_lines(path: Path, source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(origin, object)`` from a JSON-lines file; malformed lines go to ``source.reject``."""
    for origin, line in iter_lines(path, source):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            source.reject(origin, f"malformed JSON ({e.msg} at column {e.colno})", "Fix or remove the line.")
            continue
        if not isinstance(obj, dict):
            source.reject(origin, f"expected a JSON object, got {type(obj).__name__}")
            continue
        yield origin, obj


def iter_objects(path: Path, source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(origin, object)`` from ``.jsonl``, ``.json`` (an array, or JSON lines) or ``.parquet``.

    A JSON array is loaded whole (DPR ships its NQ files so); its origins are ``path[index]``.

    Raises:
        BadSourceError: the file cannot be opened or parsed (or, unless skip_bad, a record is malformed).
    """
    name = path.name.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        yield from iter_parquet_rows(path)
        return
    if name.endswith(".json"):
        with open_bytes(path) as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            yield from _iter_json_array(path, source)
            return
    yield from iter_json_lines(path, source)


def _iter_json_array(path: Path, source: Source) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        with open_bytes(path) as f:
            items = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError, EOFError) as e:
        raise BadSourceError(f"Cannot parse '{path}' as JSON: {e}. Fix the file or convert it to JSON lines.") from e
    for i, obj in enumerate(items):
        if isinstance(obj, dict):
            yield f"{path}[{i}]", obj
        else:
            source.reject(f"{path}[{i}]", f"expected a JSON object, got {type(obj).__name__}")


def iter_parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream ``(origin, row)`` of a parquet file batch by batch; origins are ``path[row N]`` (0-based).

    Raises:
        BadSourceError: the file is not readable parquet or lacks one of ``columns``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        reader = pq.ParquetFile(path)
        row = 0
        for batch in reader.iter_batches(batch_size=4096, columns=columns):
            for obj in batch.to_pylist():
                yield f"{path}[row {row}]", obj
                row += 1
    except (pa.ArrowException, OSError) as e:
        raise BadSourceError(f"Cannot read parquet file '{path}': {e}.") from e


def parquet_columns(path: Path) -> list[str]:
    """Column names of a parquet file (its schema only is read).

    Raises:
        BadSourceError: the file is not readable parquet.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (pa.ArrowException, OSError) as e:
        raise BadSourceError(f"Cannot read parquet file '{path}': {e}.") from e


def parse_grade(value: str) -> int | None:
    """A relevance grade as int ("2", "1.0" → 2, 1); None when ``value`` is not an integer."""
    try:
        return int(value)
    except ValueError:
        try:
            f = float(value)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def read_qrels(path: Path, source: Source) -> Qrels:
    """Qrels of one file: BEIR ``query-id corpus-id score`` (header optional) or TREC ``qid 0 pid rel``.

    Columns are split on tabs, or on runs of spaces when a line has no tab. The header is
    recognised by a non-integer score on the first line (BEIR copies without a header exist).

    Raises:
        BadSourceError: a line with another column count or a non-integer score (unless skip_bad).
    """
    qrels: Qrels = {}
    for i, (origin, line) in enumerate(iter_lines(path, source)):
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) not in (3, 4):
            source.reject(origin, f"expected 3 (BEIR) or 4 (TREC) qrels columns, got {len(cols)}")
            continue
        qid, pid, score = (cols[0], cols[1], cols[2]) if len(cols) == 3 else (cols[0], cols[2], cols[3])
        grade = parse_grade(score.strip())
        if grade is None:
            if i == 0:  # a header: BEIR's "query-id corpus-id score"
                continue
            source.reject(origin, f"relevance {score!r} is not an integer")
            continue
        qrels.setdefault(qid.strip(), {})[pid.strip()] = grade
    return qrels


def positives_only(qrels: Qrels) -> Iterator[TrainExample]:
    """One example per judged query: its passages graded > 0, no negatives (queries without any are left out)."""
    for qid, judged in qrels.items():
        positives = tuple(pid for pid, grade in judged.items() if grade > 0)
        if positives:
            yield TrainExample(qid, positives)


def split_from_name(name: str, default: str) -> str:
    """Split named by a file name ("biencoder-nq-dev.json" → "dev"), else ``default``."""
    for word in re.split(r"[-_.\s]+", name.lower()):
        if word in SPLIT_WORDS:
            return word
    return default


def is_record_file(path: Path, root: Path) -> bool:
    """Whether ``path`` is a record file (``.jsonl``, ``.json``, ``.parquet``, gzipped JSON) directly in ``root``."""
    return path.parent == root and path.name.lower().endswith(RECORD_FILE_SUFFIXES)


def files_by_split(root: Path, default_split: str, missing: str) -> dict[str, list[Path]]:
    """``root`` (a file) or its record files, grouped by the split each name says (else ``default_split``).

    Raises:
        BadSourceError: ``root`` is a folder without record files (the message is ``missing``).
    """
    paths = [root] if root.is_file() else sorted(p for p in root.iterdir() if is_record_file(p, root))
    if not paths:
        raise BadSourceError(missing)
    files: dict[str, list[Path]] = {}
    for p in paths:
        files.setdefault(split_from_name(p.name, default_split), []).append(p)
    return files


def chosen_splits(split: str | None, available: list[str]) -> list[str]:
    """The splits a call covers: all of ``available`` for None, ``[split]`` when available, else none.

    An unknown split gives nothing, as the base class does for formats without judgments; callers
    that need judgments check for emptiness and name ``splits()`` in their message.
    """
    if split is None:
        return list(available)
    return [split] if split in available else []


def merge_qrels(parts: Iterable[Qrels]) -> Qrels:
    """Several qrels as one (a later grade of the same pair wins)."""
    merged: Qrels = {}
    for qrels in parts:
        for qid, judged in qrels.items():
            merged.setdefault(qid, {}).update(judged)
    return merged
