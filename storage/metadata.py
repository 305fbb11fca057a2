"""What the store's JSON metadata files must hold, checked before anyone trusts them.

Readers trust three small files: the root ``zarr.json`` (format, TeacherSpec, fingerprint, dim,
storage dtype), each segment's ``COMMIT`` (rows, chunk size, checksums) and its
``vectors/zarr.json`` (array shape, dtype, chunking). Each ``*_problems`` function lists what is wrong
with one of them as :class:`Damage` (file + what): readers raise the first as an ``IntegrityError``
naming the file and the repair, ``verify`` reports them all.

Format 2 seals the root attributes and COMMIT with a ``checksum`` (sha256 of their canonical JSON,
:func:`sealed`) and records the sha256 of ``vectors/zarr.json`` in COMMIT, so any changed byte that
still parses is caught, not only the fields checked one by one. Format 3 records the same; a format-3
segment's last chunk file holds only the rows it has (:func:`storage.segment_format.chunk_rows_in`). Format-1
files have no seals and are checked field by field. The seal is defined once for all formats: a sealed
file of an unknown version was written by a newer ddx (``FormatVersionError``), an unsealed one was
damaged (``IntegrityError``).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from storage.errors import FormatVersionError, IntegrityError, StoreNotFoundError
from storage.fs import Location
from storage.spec import TeacherSpec, spec_problems

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "Damage",
    "commit_problems",
    "commit_store_problems",
    "parse_json",
    "read_root_attrs",
    "repair_hint",
    "root_problems",
    "seal_matches",
    "sealed",
    "vectors_meta_problems",
]

# 3: a segment's last chunk file holds its rows only (not padded to chunk_rows); 2: per-row CRC32C in the index,
# sealed root/COMMIT; 1: chunk CRCs only
FORMAT_VERSION = 3
STORAGE_DTYPES = ("float16", "float32")
_SEGMENTS = "segments"  # storage.segment_format.SEGMENTS (which imports this module)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_FIELDS: dict[int, dict[str, type]] = {
    1: {"rows": int, "chunk_rows": int, "chunk_crc32c": list, "index_sha256": str},
    2: {
        "rows": int,
        "chunk_rows": int,
        "dim": int,
        "dtype": str,
        "chunk_crc32c": list,
        "index_sha256": str,
        "vectors_meta_sha256": str,
        "checksum": str,
    },
}
_COMMIT_FIELDS[3] = _COMMIT_FIELDS[2]  # the same record; only the last chunk file's size differs


@dataclass(frozen=True)
class Damage:
    """One problem with one store file: ``file`` is the path below the store root."""

    file: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"

    def error(self, url: str) -> IntegrityError:
        """The one-line error a reader raises: the file, what is wrong, how to see all damage and repair."""
        where = f"{url.rstrip('/')}/{self.file}"
        return IntegrityError(f"Store file {where} is damaged: {self.what}. {repair_hint(url, self.file)}", self)


def repair_hint(url: str, file: str) -> str:
    """How to repair damage in ``file``: a segment is recomputed after removing it; the root must be restored."""
    verify = f"Run 'ddx cache verify {url}' to list all damage"
    parts = file.split("/")
    if parts[0] == "segments" and len(parts) > 2:
        return (
            f"{verify}; to repair, delete {url.rstrip('/')}/segments/{parts[1]} and rerun the precompute that "
            "wrote it (only that segment's texts are recomputed)."
        )
    return f"{verify}; restore {file} from a backup (the vectors in segments/ cannot be used without it)."


def sealed(obj: dict[str, Any]) -> dict[str, Any]:
    """``obj`` with its ``checksum``: sha256 of its canonical JSON (sorted keys, no spaces), checksum left out."""
    return {**obj, "checksum": _seal(obj)}


def _seal(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != "checksum"}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def seal_matches(obj: dict[str, Any]) -> bool:
    """True when ``obj`` carries the checksum :func:`sealed` would give it."""
    return bool(obj.get("checksum") == _seal(obj))


def _sealed(obj: dict[str, Any], version: Any) -> bool:
    """Whether ``obj`` must match its seal: format 2 on, or any object carrying one. Format 1 had none, so a
    flipped bit turning '3' into '1' must not turn the checks off (the seal covers the version too)."""
    return (_is_int(version) and version >= 2) or "checksum" in obj


def _seal_problem(obj: dict[str, Any]) -> str | None:
    return None if seal_matches(obj) else "its content does not match its checksum (a changed byte)"


def parse_json(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(object, None) or (None, why it is not a JSON object)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"not valid JSON ({type(exc).__name__} at byte {getattr(exc, 'pos', '?')})"
    if not isinstance(doc, dict):
        return None, f"not a JSON object (a {type(doc).__name__})"
    return doc, None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def root_problems(doc: dict[str, Any]) -> list[Damage]:
    """Everything wrong with a parsed root ``zarr.json`` of a ddx store (its ``attributes.ddx`` present)."""
    out = []
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group":
        out.append("not a Zarr v3 group (zarr_format/node_type changed)")
    attrs = doc["attributes"]["ddx"]
    version = attrs.get("format_version")
    if _sealed(attrs, version) and (p := _seal_problem(attrs)):
        out.append(p)
    spec_data = attrs.get("teacher_spec")
    spec_wrong = ["is missing"] if not isinstance(spec_data, dict) else spec_problems(spec_data)
    out += [f"teacher_spec: {p}" for p in spec_wrong]
    if isinstance(spec_data, dict) and not spec_wrong:
        spec = TeacherSpec.from_dict(spec_data)
        if attrs.get("fingerprint") != spec.fingerprint:
            out.append(f"fingerprint {attrs.get('fingerprint')!r} != {spec.fingerprint!r} computed from teacher_spec")
        if attrs.get("dim") != spec.dim:
            out.append(f"dim {attrs.get('dim')!r} != teacher_spec.dim {spec.dim}")
    if attrs.get("storage_dtype") not in STORAGE_DTYPES:
        out.append(f"storage_dtype {attrs.get('storage_dtype')!r} is not one of {STORAGE_DTYPES}")
    return [Damage("zarr.json", w) for w in out]


def commit_problems(doc: dict[str, Any], file: str) -> list[Damage]:
    """Everything wrong with a parsed COMMIT (``file`` names it in the result)."""
    version = doc.get("format_version")
    if version not in _COMMIT_FIELDS or not _is_int(version):
        return [Damage(file, f"format_version {version!r} is not one of {sorted(_COMMIT_FIELDS)}")]
    out = []
    if _sealed(doc, version) and (p := _seal_problem(doc)):
        out.append(p)
    for name, kind in _COMMIT_FIELDS[version].items():
        value = doc.get(name)
        if not isinstance(value, kind) or (kind is int and not _is_int(value)):
            out.append(f"{name} is {value!r}, expected {kind.__name__}")
    if out:
        return [Damage(file, w) for w in out]
    rows, chunk_rows, crcs = doc["rows"], doc["chunk_rows"], doc["chunk_crc32c"]
    if rows < 0 or chunk_rows <= 0:
        out.append(f"rows {rows} / chunk_rows {chunk_rows} out of range")
    elif len(crcs) != -(-rows // chunk_rows):
        out.append(f"{len(crcs)} chunk checksums for {rows} rows in chunks of {chunk_rows}")
    if not all(_is_int(c) and 0 <= c < 1 << 32 for c in crcs):
        out.append("chunk_crc32c holds a value that is not a 32-bit checksum")
    shas = [doc["index_sha256"]] + ([doc["vectors_meta_sha256"]] if version >= 2 else [])
    if not all(_SHA256.match(s) for s in shas):
        out.append("a sha256 is not 64 hex digits")
    if version >= 2 and (doc["dim"] <= 0 or doc["dtype"] not in STORAGE_DTYPES):
        out.append(f"dim {doc['dim']} / dtype {doc['dtype']!r} out of range")
    return [Damage(file, w) for w in out]


def commit_store_problems(commit: dict[str, Any], file: str, *, dim: int | None, dtype: str | None) -> list[Damage]:
    """A (valid) format-2 COMMIT whose dim or dtype differs from the store's: a segment of another store."""
    if commit["format_version"] < 2:
        return []  # format 1 records neither; vectors/zarr.json is compared with the store instead
    out = []
    if dim is not None and commit["dim"] != dim:
        out.append(f"records {commit['dim']}-d vectors, the store (root zarr.json) {dim}-d")
    if dtype is not None and commit["dtype"] != dtype:
        out.append(f"records {commit['dtype']} vectors, the store (root zarr.json) {dtype}")
    return [Damage(file, w) for w in out]


def vectors_meta_problems(
    data: bytes, commit: dict[str, Any], file: str, *, dim: int | None, dtype: str | None
) -> list[Damage]:
    """Everything wrong with a segment's ``vectors/zarr.json`` given its (valid) COMMIT.

    ``dim``/``dtype`` are what the store expects (None when unknown, e.g. the root is damaged);
    format-2 COMMITs also record their own and the file's sha256.
    """
    out = []
    if commit["format_version"] >= 2:
        if hashlib.sha256(data).hexdigest() != commit["vectors_meta_sha256"]:
            out.append("does not match the sha256 recorded in COMMIT")
        dim, dtype = commit["dim"], commit["dtype"]
    meta, why = parse_json(data)
    if meta is None:
        return [Damage(file, w) for w in [*out, str(why)]]
    rows, chunk_rows = commit["rows"], commit["chunk_rows"]
    shape = meta.get("shape")
    chunks = _dig(meta, "chunk_grid", "configuration", "chunk_shape")
    if not isinstance(shape, list) or len(shape) != 2 or shape[0] != rows or (dim is not None and shape[1] != dim):
        out.append(f"shape {shape!r} != [{rows}, {dim if dim is not None else 'dim'}] (COMMIT rows, store dim)")
    if not isinstance(chunks, list) or not chunks or chunks[0] != chunk_rows:
        out.append(f"chunk shape {chunks!r} does not start with COMMIT's chunk_rows {chunk_rows}")
    if meta.get("data_type") not in STORAGE_DTYPES or (dtype is not None and meta.get("data_type") != dtype):
        out.append(f"data_type {meta.get('data_type')!r} != store dtype {dtype!r}")
    return [Damage(file, w) for w in out]


def _dig(doc: Any, *keys: str) -> Any:
    """``doc[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return doc


def read_root_attrs(loc: Location) -> dict[str, Any]:
    """The root zarr.json's ``ddx`` attributes, checked (:func:`root_problems`) before anyone trusts them.

    Raises:
        StoreNotFoundError: no store at ``loc`` (or not a ddx store).
        FormatVersionError: a newer ddx wrote it (its attributes sealed as this ddx seals them).
        IntegrityError: zarr.json is missing beside segments/, unparsable, or fails a check.
    """
    if loc.isfile():
        raise StoreNotFoundError(f"{loc.url!r} is a file, not a teacher store directory. Pass the store's folder.")
    if not loc.exists("zarr.json"):
        if loc.listdir(_SEGMENTS):
            raise Damage("zarr.json", "is missing, but segments/ is there (the root metadata was deleted)").error(
                loc.url
            )
        raise StoreNotFoundError(
            f"No teacher store at {loc.url!r} (zarr.json missing). "
            f"Run 'ddx precompute-teacher --store {loc.url} ...' first."
        )
    data = loc.read_bytes("zarr.json")
    doc, why = parse_json(data)
    if doc is None:
        raise Damage("zarr.json", str(why)).error(loc.url)
    attrs = _ddx_attrs(doc)
    if attrs is None:
        if b'"teacher_spec"' in data:
            raise Damage("zarr.json", "holds a teacher_spec outside attributes.ddx (a changed byte)").error(loc.url)
        raise StoreNotFoundError(f"{loc.url!r} is a Zarr group but not a ddx teacher store (no 'ddx' attributes).")
    version = attrs.get("format_version")
    number = version if _is_int(version) else None
    if number is None or not 1 <= number <= FORMAT_VERSION:
        if ("checksum" in attrs and not seal_matches(attrs)) or (number is not None and number < 1):
            raise Damage("zarr.json", f"format_version reads {version!r} and the attributes fail their checksum").error(
                loc.url
            )
        raise FormatVersionError(
            f"Store {loc.url!r} has format version {version}; this ddx reads versions up to {FORMAT_VERSION}. "
            "Upgrade ddx (pip install -U ddx) to read it."
        )
    problems = root_problems(doc)
    if problems:
        raise problems[0].error(loc.url)
    return attrs


def _ddx_attrs(doc: dict[str, Any]) -> dict[str, Any] | None:
    attributes = doc.get("attributes")
    attrs = attributes.get("ddx") if isinstance(attributes, dict) else None
    return attrs if isinstance(attrs, dict) else None
