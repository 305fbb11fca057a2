"""What runs inside the Ray workers of ``--engine ray`` (:mod:`precompute.ray_engine` is the driver).

:class:`TokenCounter` (CPU actors) counts each unit's tokens with the teacher's tokenizer alone;
:class:`UnitEncoder` (GPU or CPU actors) loads the teacher once and writes each unit as one committed segment,
after settling the unit's earlier attempts (:func:`settle_attempts`), so a retried unit stores every key once.
Neither imports Ray: Ray pickles the classes by reference and calls them, and the tests call them in-process too.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from precompute.config import TeacherConfig
from precompute.encode import AsyncWriter, default_token_budget, encode_role
from precompute.teacher import count_tokens, load_teacher, load_tokenizer
from storage.errors import DdxError
from storage.fs import Location
from storage.keys import KEY_DTYPE, keys_from_arrow
from storage.segment import SEGMENTS, SegmentReader, SegmentWriter, claim_and_salvage, segment_state
from storage.spec import TeacherSpec

__all__ = ["REPORT_SCHEMA", "FaultHook", "Job", "TokenCounter", "UnitEncoder", "settle_attempts", "unit_segment_id"]

# (event, info): "batch" after each encoded batch (encoder thread), "appended" after the writer thread appended
# one (its flushes done: info["rows_flushed"] is on disk), "committed" after the commit
FaultHook = Callable[[str, dict[str, Any]], None]

REPORT_SCHEMA = pa.schema(
    [
        ("unit", pa.int64()),
        ("segments", pa.list_(pa.string())),
        ("encoded", pa.int64()),
        ("reused", pa.int64()),
        ("tokens", pa.int64()),
        ("padded_tokens", pa.int64()),
        ("forward_calls", pa.int64()),
        ("error", pa.string()),  # a ddx error on the worker (one line): the driver stops the job with it
    ]
)
_ATTEMPT = re.compile(r"-a(\d+)$")


@dataclass(frozen=True)
class Job:
    """What every task of one run needs (pickled into the Ray workers)."""

    job: str  # short random id, in every unit segment's name
    store_url: str
    storage_options: dict[str, Any]
    stale_after: float
    teacher: TeacherConfig  # with device and dtype settled for the actors
    spec: dict[str, Any]  # TeacherSpec.to_dict() of the store
    dtype: str  # storage dtype
    chunk_rows: int
    flush_seconds: float
    token_budget: int | None
    max_batch: int


class TokenCounter:
    """CPU stage: each unit's token counts (prompt included, truncated at max_seq_length) as column ``n_tokens``.

    The tokenizer is loaded alone (no weights) and counts exactly as the loaded teacher would
    (:func:`precompute.teacher.count_tokens`); the encoder actors batch by these counts and store them, and
    spend their time on the teacher.
    """

    def __init__(self, job: Job) -> None:
        self.tokenizer, self.spec = load_tokenizer(job.teacher), TeacherSpec.from_dict(job.spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        counts = []
        for i in range(batch.num_rows):
            roles, texts = batch["roles"][i].as_py(), batch["texts"][i].as_py()
            n = np.empty(len(texts), np.int32)
            for role in ("query", "passage"):
                at = [j for j, r in enumerate(roles) if r == role]
                if at:
                    prompt, limit = self.spec.prompt(role), self.spec.max_seq_length
                    n[at] = count_tokens(self.tokenizer, [texts[j] for j in at], prompt, limit)
            counts.append(n)
        return batch.append_column("n_tokens", pa.array(counts, pa.list_(pa.int32())))


class UnitEncoder:
    """An encoder actor: loads the teacher once, then encodes units into committed segments (one each).

    ddx's own errors (a teacher whose loaded spec is not the store's, a damaged store, a full disk, an unreachable
    object store) are not raised through Ray, which would hand the driver a remote traceback: the actor reports the
    one-line message in its unit's row (``error``), and the driver stops the job with it.
    """

    def __init__(self, job: Job, fault_hook: FaultHook | None = None) -> None:
        self.job, self.hook = job, fault_hook
        self.error: str | None = None
        try:
            self.encoder = load_teacher(job.teacher)
            _check_loaded_spec(job, self.encoder.spec)
            self.budget = job.token_budget or default_token_budget(self.encoder.device)
        except (DdxError, OSError) as exc:
            self.error = _one_line(exc)  # reported with the first unit this actor gets
        self.loc = Location(job.store_url, job.storage_options, stale_after=job.stale_after)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reports = []
        for i in range(batch.num_rows):
            row = batch.slice(i, 1)
            if self.error is None:
                try:
                    reports.append(self._unit(row))
                    continue
                except (DdxError, OSError) as exc:
                    self.error = _one_line(exc)
            reports.append({"unit": int(row["unit"][0].as_py()), **_EMPTY_REPORT, "error": self.error})
        return pa.Table.from_pylist(reports, schema=REPORT_SCHEMA)

    def _unit(self, row: pa.Table) -> dict[str, Any]:
        unit = int(row["unit"][0].as_py())
        keys = keys_from_arrow(row["keys"][0].values)
        roles = np.asarray(row["roles"][0].as_py(), dtype=object)
        texts = row["texts"][0].as_py()
        n_tokens = np.asarray(row["n_tokens"][0].values.to_numpy(zero_copy_only=False), np.int32)
        done, segments, attempts = settle_attempts(self.loc, self.job.job, unit, self.job.stale_after)
        todo = ~np.isin(keys, done)
        report = {"unit": unit, **_EMPTY_REPORT, "segments": segments, "reused": int((~todo).sum())}
        if todo.any():
            report["segments"] = [*segments, self._write(unit, attempts, keys, roles, texts, n_tokens, todo, report)]
        return report

    def _write(
        self,
        unit: int,
        attempt: int,
        keys: np.ndarray,
        roles: np.ndarray,
        texts: list[str],
        n_tokens: np.ndarray,
        todo: np.ndarray,
        report: dict[str, Any],
    ) -> str:
        """Encode the rows ``todo`` into a new segment (this unit's attempt ``attempt``) and commit it."""
        job = self.job
        writer = SegmentWriter.create(
            self.loc,
            dim=int(job.spec["dim"]),
            dtype=job.dtype,
            chunk_rows=job.chunk_rows,
            flush_seconds=job.flush_seconds,
            seg_id=unit_segment_id(job.job, unit, attempt),
        )
        calls = self.encoder.forward_calls

        def batch_done(n: int, tokens: int) -> None:
            report["encoded"] += n
            self._event("batch", unit, writer, report)

        with AsyncWriter(writer, on_append=lambda: self._event("appended", unit, writer, report)) as out:
            for role in ("query", "passage"):
                at = np.flatnonzero(todo & (roles == role))
                if len(at):
                    real, padded = encode_role(
                        self.encoder,
                        keys[at],
                        [texts[i] for i in at],
                        role,
                        n_tokens[at],
                        out,
                        budget=self.budget,
                        max_batch=job.max_batch,
                        on_batch=batch_done,
                    )
                    report["tokens"] += real
                    report["padded_tokens"] += padded
        report["forward_calls"] = self.encoder.forward_calls - calls
        self._event("committed", unit, writer, report)
        return writer.seg_id

    def _event(self, event: str, unit: int, writer: SegmentWriter, report: dict[str, Any]) -> None:
        if self.hook is not None:
            info = {"unit": unit, "segment": writer.seg_id, "encoded": report["encoded"]}
            self.hook(event, info | {"rows_flushed": writer.rows_flushed})


_EMPTY_REPORT: dict[str, Any] = {
    "segments": [],
    "encoded": 0,
    "reused": 0,
    "tokens": 0,
    "padded_tokens": 0,
    "forward_calls": 0,
    "error": None,
}


def _check_loaded_spec(job: Job, loaded: TeacherSpec) -> None:
    """Refuse to write when the loaded teacher is not the spec the driver created the store with."""
    want = job.spec
    differ = [f"{k} {v!r} != {want.get(k)!r}" for k, v in loaded.to_dict().items() if want.get(k) != v]
    if differ:
        raise DdxError(
            f"Teacher {job.teacher.model!r} loaded with fingerprint {loaded.fingerprint}, but its files gave "
            f"{TeacherSpec.from_dict(want).fingerprint} (the store's): {', '.join(differ)}. Pass the differing "
            "fields as options (--padding-side, --max-seq-length, ...), or use the local engine."
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def unit_segment_id(job: str, unit: int, attempt: int) -> str:
    """``<UTC time>-ray<job>-u<unit>-a<attempt>``: sortable like every segment id, findable by unit."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-ray{job}-u{unit:06d}-a{attempt}"


def settle_attempts(
    loc: Location, job: str, unit: int, stale: float, poll: float = 0.25
) -> tuple[np.ndarray, list[str], int]:
    """The keys earlier attempts of a unit stored, their segments, and the next attempt number.

    Each earlier attempt's segment ends committed (salvaged under its claim once its writer is dead: at once on a
    local store, after ``stale`` seconds of heartbeat silence on an object store) or removed (it held nothing).

    Raises:
        DdxError: an earlier attempt still looks alive after ``3 × stale`` (10 minutes at least).
    """
    mark = f"-ray{job}-u{unit:06d}-a"
    names = sorted(n for n in loc.listdir(SEGMENTS) if mark in n and not n.startswith("."))
    attempts = [int(m.group(1)) for n in names if (m := _ATTEMPT.search(n))]
    keys, segments = [], []
    deadline = time.monotonic() + max(3 * stale, 600.0)
    for name in names:
        while (state := _settle(loc, name)) not in ("committed", "gone", "damaged"):
            if time.monotonic() > deadline:
                raise DdxError(f"Segment {name!r} of {loc.url!r}: an earlier attempt of unit {unit} is still {state}.")
            time.sleep(poll)
        if state == "committed":
            keys.append(SegmentReader(loc, name).index().keys)
            segments.append(name)
    done = np.concatenate(keys) if keys else np.empty(0, KEY_DTYPE)
    return done, segments, max(attempts, default=-1) + 1


def _settle(loc: Location, seg_id: str) -> str:
    """One step towards a final state: salvage an abandoned attempt; returns the segment's state after it."""
    state = segment_state(loc, seg_id)
    if state != "abandoned":
        return state
    result = claim_and_salvage(loc, seg_id)
    if result.outcome == "damaged":
        warnings.warn(result.detail + " Its texts are encoded again.", stacklevel=2)
        return "damaged"
    return segment_state(loc, seg_id)
