"""``ddx precompute-teacher``: run the teacher once over every text not yet in the store.

Two streaming passes over the sources keep memory flat whatever the corpus size:

1. **scan**: read every text, compute its content key, drop keys seen before (within and across
   sources) and keys the store already holds, keep this rank's slice. Only keys are kept: 16 bytes a
   text. Bad input stops the run here, before any GPU time is spent.
2. **encode**: read again, collect the texts still to do into windows, sort each window by token
   length, cut token-budget batches, encode under ``torch.inference_mode`` and hand the vectors to a
   writer thread, so the accelerator never waits for the disk.

A crash loses at most one flush interval: the next run salvages the abandoned segment (its flushed
rows become a committed segment) and encodes only what is still missing.
"""

from __future__ import annotations

import math
import os
import queue
import re
import shlex
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from precompute.batching import padding_waste, token_budget_batches
from precompute.config import PrecomputeConfig
from precompute.job_report import job_id, job_total, record_rank
from precompute.sources import Source, SourceOptions, TextRecord, parse_source
from precompute.sources.errors import BadSourceError
from precompute.teacher import TeacherEncoder, expected_spec, load_teacher
from storage.errors import DdxError
from storage.fs import Location
from storage.heartbeat import beat_interval, stale_after
from storage.keys import KEY_DTYPE, KeySet, content_keys, first_occurrence, key_slice, role_code
from storage.metadata import read_root_attrs
from storage.segment import SegmentWriter, claim_and_salvage, read_heartbeat, segment_state
from storage.spec import TeacherSpec
from storage.store import TeacherStore, default_chunk_rows

__all__ = ["PrecomputeConfig", "PrecomputeSummary", "missing_vectors_command", "precompute", "resolve_rank"]

SCAN_BLOCK = 8192  # records hashed per numpy call


@dataclass
class PrecomputeSummary:
    """What a run did; ``to_dict`` is the ``--json`` output."""

    store: str
    fingerprint: str
    rank: int
    world_size: int
    sources: list[dict[str, Any]] = field(default_factory=list)
    texts_read: int = 0
    unique_texts: int = 0
    already_stored: int = 0
    other_ranks: int = 0
    to_encode: int = 0
    encoded: int = 0
    skipped_bad: int = 0
    tokens: int = 0
    padded_tokens: int = 0
    forward_calls: int = 0
    salvaged: list[dict[str, Any]] = field(default_factory=list)
    segment: str | None = None
    seconds: float = 0.0
    job: str | None = None  # the id the ranks report under (<store>/runs/<job>/)
    job_total: dict[str, Any] | None = None  # rank 0 of a multi-rank job: every rank added up (job_report)

    @property
    def padding_waste(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        rate = self.encoded / self.seconds if self.seconds else 0.0
        out.update(
            padding_waste=round(self.padding_waste, 4),
            texts_per_s=round(rate, 2),
            tokens_per_s=round(self.tokens / self.seconds, 1) if self.seconds else 0.0,
        )
        return out


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size) from the arguments, else torchrun's RANK/WORLD_SIZE, else SLURM, else (0, 1)."""
    env_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    env_world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS"))
    r = rank if rank is not None else int(env_rank or 0)
    w = world_size if world_size is not None else int(env_world or 1)
    if not 0 <= r < w:
        raise DdxError(f"Rank {r} is outside world size {w}.")
    return r, w


def precompute(
    config: PrecomputeConfig, *, encoder: TeacherEncoder | None = None, sources: list[Source] | None = None
) -> PrecomputeSummary:
    """Encode every text of ``config.data`` the store lacks, and commit it as one new segment.

    Args:
        config: what to read, where to store, how to batch.
        encoder: an already loaded teacher (tests, benchmarks); loaded from ``config.teacher`` when None.
        sources: already opened sources; parsed from ``config.data`` when None.

    Returns:
        The run's summary (``encoded == 0`` when everything was already stored).

    Raises:
        BadSourceError: malformed input (nothing is encoded or written).
        FingerprintMismatchError, DimensionMismatchError: the store holds another teacher's vectors.
        DiskFullError: the disk filled; committed segments are intact and a rerun resumes.
    """
    started = time.perf_counter()
    rank, world = resolve_rank(config.rank, config.world_size)
    options = SourceOptions(skip_bad=config.skip_bad, title_join=config.title_join)
    sources = sources if sources is not None else [parse_source(s, options) for s in config.data]
    encoder = encoder or _load_teacher(config)
    calls_before = encoder.forward_calls  # a caller's encoder may have run before: report this run's calls
    store = TeacherStore.open_or_create(config.store, encoder.spec, dtype=config.storage_dtype)
    summary = PrecomputeSummary(store=store.url, fingerprint=store.fingerprint, rank=rank, world_size=world)
    summary.salvaged = [{"segment": s, "rows": n} for s, n in _salvage_all(store, rank=rank, world=world)]
    todo = _scan(sources, store, config, rank, world, summary)
    if len(todo):
        _encode(sources, store, encoder, todo, config, rank, world, summary)
    summary.forward_calls = encoder.forward_calls - calls_before
    summary.seconds = round(time.perf_counter() - started, 3)
    if world > 1:
        _report_job(store, config, summary)
    return summary


def _report_job(store: TeacherStore, config: PrecomputeConfig, summary: PrecomputeSummary) -> None:
    """Record this rank's summary in the store; rank 0 then totals the job (:mod:`precompute.job_report`)."""
    summary.job = job_id(config.job_id, store.url, config.data, summary.world_size)
    try:
        record_rank(store.loc, summary.job, summary.to_dict())
    except OSError as exc:  # a read-only store that needed nothing encoded: the run itself succeeded
        print(f"rank {summary.rank}: summary not recorded in {store.url}/runs ({exc})", file=sys.stderr)
    if summary.rank == 0:
        summary.job_total = job_total(
            store.loc, summary.job, summary.world_size, config.report_wait, quiet=not config.progress
        )


def _load_teacher(config: PrecomputeConfig) -> TeacherEncoder:
    """``load_teacher``, once the store is known to take this teacher's vectors as far as the files tell.

    Under ``progress=False`` transformers' own "Loading weights" bar stays off too.
    """
    _check_store_before_loading(config)
    if config.progress:
        return load_teacher(config.teacher)
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load_teacher(config.teacher)
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _check_store_before_loading(config: PrecomputeConfig) -> None:
    """Refuse an existing store of another teacher spec from the config and the model's files alone.

    Loading gte-Qwen2-7B takes minutes; every spec field but a few exotic cases is settled by the config and the
    model folder's JSON files (:func:`precompute.teacher.expected_spec`), so a mismatch is found in seconds. The
    store is checked again against the loaded model's full spec (``open_or_create``).

    Raises:
        FingerprintMismatchError, DimensionMismatchError: as ``TeacherStore.open`` with the full spec would.
    """
    loc = Location(config.store)
    if not (loc.isdir() and loc.exists("zarr.json")):
        return  # a new store is created from the loaded model's spec
    stored = TeacherSpec.from_dict(read_root_attrs(loc)["teacher_spec"])  # the root file only: no segments read
    stored.check_matches(replace(stored, **expected_spec(config.teacher)), loc.url)


def _salvage_all(store: TeacherStore, wait_s: float = 300.0, *, rank: int = 0, world: int = 1) -> list[tuple[str, int]]:
    """Salvage abandoned segments; returns (segment, rows) for those this process committed.

    Each segment is salvaged under its claim, so of many processes starting at once (torchrun ranks
    after a crash) exactly one commits it and reports its rows. The others wait until it is done, so
    their scan counts its rows as stored instead of encoding them again. A salvager that dies releases
    its claim and the next try here finishes the job; after ``wait_s`` this run goes on regardless.

    A remote segment whose writer beat recently is watched first (:func:`_watch_active`): a writer killed
    moments ago is salvaged as soon as its silence reaches ``stale_after``, instead of its rows being
    encoded again by this run and salvaged as duplicates by the next; a live one is a run overlapping
    this one, named in a warning.
    """
    states = store.uncommitted_segments()
    pending = {s for s, state in states if state in ("abandoned", "salvaging")}
    active = [s for s, state in states if state == "active" and _may_overlap(s, rank, world)]
    if active:
        pending |= _watch_active(store, active, loud=rank == 0)
    done: list[tuple[str, int]] = []
    deadline = time.monotonic() + wait_s
    while pending and time.monotonic() < deadline:
        for seg_id in sorted(pending):
            result = claim_and_salvage(store.loc, seg_id)
            if result.outcome == "busy":
                continue  # another process is salvaging it right now
            pending.discard(seg_id)
            if result.outcome == "salvaged":
                done.append((seg_id, result.rows))
            elif result.outcome == "damaged":
                warnings.warn(result.detail, stacklevel=3)
        if pending:
            time.sleep(0.05)
    store.refresh()
    return done


_SEGMENT_SLICE = re.compile(r"-r(\d+)of(\d+)-[0-9a-f]+$")  # storage.segment_format.new_segment_id's tail


def _may_overlap(seg_id: str, rank: int, world: int) -> bool:
    """Whether the segment's writer may encode keys of this rank's slice (True when its id does not say).

    Slices depend on the key alone (:func:`storage.keys.key_slice`: its first 8 bytes mod the world size), so
    slice r' of w' and slice r of w share keys exactly when r' = r modulo gcd(w', w): never for another rank of
    the same world size (this job's other ranks, or a killed run's, which those ranks watch themselves).
    """
    found = _SEGMENT_SLICE.search(seg_id)
    if found is None:
        return True
    r, w = int(found[1]), int(found[2])
    g = math.gcd(w, world) if w > 0 else 1
    return r % g == rank % g


def _watch_active(store: TeacherStore, seg_ids: list[str], *, loud: bool) -> set[str]:
    """Tell a dead writer from a live one among uncommitted segments that look 'active'; returns the dead.

    Local stores need no watching: 'active' means the writer's flock is held, which the kernel drops when the
    process dies, so each is a live run overlapping this one (warned about at once). On an object store,
    'active' means a heartbeat younger than ``stale_after``, which a writer killed a moment ago also has. Each
    heartbeat is read again every half beat interval until

    * it **advances**: the writer is alive, a run overlapping this one, so this run encodes its in-flight
      texts too. One warning names the segments (duplicates are harmless: lookups use the first row);
    * it **goes stale** (its silence reaches ``stale_after``, or its writer marked it closed): the writer is
      dead and the segment is returned, to be salvaged now, before the scan, so its rows are not encoded again;
    * the segment is committed or removed meanwhile: its rows are stored (or gone) and the scan sees which.

    The verdict "dead" is the store's own (:func:`storage.segment.segment_state`), not an earlier guess such as
    "two beat intervals of silence": a live writer gives up only after ``stale_after`` of failed beats
    (:meth:`storage.heartbeat.Beat.check`) and keeps flushing until then, so salvaging it sooner could commit a
    segment that it then rewrites; and the interval it beats at follows its own ``stale_after``, which need not
    be this process's. A live writer is recognised within one of its beats (5 s at most), a dead one after at
    most ``stale_after`` (the whole wait is bounded by that, plus a poll): a minute at the default, against
    encoding its rows twice. A heartbeat that neither advances nor goes stale by then (clocks that disagree by
    more than ``stale_after``) is left alone, with the warning.
    """
    live: list[str] = []
    dead: set[str] = set()
    if store.loc.is_local:
        live = sorted(seg_ids)
    else:
        stale = stale_after(store.loc)
        poll = min(1.0, beat_interval(stale) / 2)
        first = {s: read_heartbeat(store.loc, s) for s in seg_ids}
        watching = set(seg_ids)
        if loud:
            print(
                f"{store.url}: waiting up to {stale:g} s to tell whether the writer of {_names(watching)} is alive "
                f"(heartbeat advancing: a run overlapping this one) or dead (silent for stale_after = {stale:g} s: "
                "salvaged before the scan, so its rows are not encoded again)",
                file=sys.stderr,
            )
        deadline = time.monotonic() + stale + poll
        while watching and time.monotonic() < deadline:
            time.sleep(poll)
            for seg_id in sorted(watching):
                state = segment_state(store.loc, seg_id)
                if state == "active" and read_heartbeat(store.loc, seg_id) == first[seg_id]:
                    continue  # silent so far, not yet for stale_after
                watching.discard(seg_id)
                if state == "active":
                    live.append(seg_id)
                elif state in ("abandoned", "salvaging"):
                    dead.add(seg_id)
        live = sorted(live) + sorted(watching)
    if live and loud:
        print(
            f"warning: {store.url}: {_names(live)} {'is' if len(live) == 1 else 'are'} being written by another run "
            "(its writer is alive): texts it has in flight may be encoded twice, by it and by this run "
            "(duplicates are harmless: lookups use the first)",
            file=sys.stderr,
        )
    return dead


def _names(seg_ids: set[str] | list[str], most: int = 3) -> str:
    """'segment X', 'segments X, Y', or 'segments X, Y, Z and 4 more'."""
    names = sorted(seg_ids)
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"segment{'s' if len(names) > 1 else ''} {shown}"


def _iter_blocks(sources: list[Source], roles: tuple[str, ...]) -> Iterator[tuple[int, list[TextRecord]]]:
    for i, source in enumerate(sources):
        block: list[TextRecord] = []
        for rec in source.iter_texts():
            if rec.role not in roles:
                continue
            if not rec.text.strip():
                raise BadSourceError(f"{rec.origin or source.spec}: empty text for id {rec.id!r} ({rec.role}).")
            block.append(rec)
            if len(block) == SCAN_BLOCK:
                yield i, block
                block = []
        if block:
            yield i, block


def _block_keys(block: list[TextRecord]) -> np.ndarray:
    return content_keys([r.role for r in block], [r.text for r in block])


def _key_blocks(sources: list[Source], roles: tuple[str, ...]) -> Iterator[tuple[int, str, np.ndarray]]:
    """Pass 1's reading: ``(source index, role, content keys)`` per block, the texts read as columns."""
    for i, source in enumerate(sources):
        for block in source.iter_text_blocks():  # every role: bad input of any role stops the run here
            if block.role not in roles:
                continue
            if (row := block.first_blank()) is not None:
                origin, rid = block.origins[row] or source.spec, block.ids[row]
                raise BadSourceError(f"{origin}: empty text for id {rid!r} ({block.role}).")
            yield i, block.role, block.keys()


def _scan(
    sources: list[Source],
    store: TeacherStore,
    config: PrecomputeConfig,
    rank: int,
    world: int,
    summary: PrecomputeSummary,
) -> np.ndarray:
    """Pass 1: sorted keys this rank must encode."""
    seen = KeySet()
    todo_parts: list[np.ndarray] = []
    per_source: list[dict[str, Any]] = [{"spec": s.spec, "queries": 0, "passages": 0} for s in sources]
    for i, role, keys in _key_blocks(sources, config.roles):
        per_source[i]["queries" if role == "query" else "passages"] += len(keys)
        summary.texts_read += len(keys)
        keys = keys[seen.add_new(keys)]  # first occurrences of keys not seen before: O(block), whatever was seen
        summary.unique_texts += len(keys)
        stored = store.contains(keys)
        summary.already_stored += int(stored.sum())
        keys = keys[~stored]
        mine = key_slice(keys, rank, world)
        summary.other_ranks += int((~mine).sum())
        todo_parts.append(keys[mine])
    for i, s in enumerate(sources):
        per_source[i]["skipped_bad"] = len(s.bad)
        summary.skipped_bad += len(s.bad)
    summary.sources = per_source
    todo = np.concatenate(todo_parts) if todo_parts else np.empty(0, KEY_DTYPE)
    if config.limit is not None:
        todo = todo[: config.limit]
    summary.to_encode = len(todo)
    return np.sort(todo)


def _encode(
    sources: list[Source],
    store: TeacherStore,
    encoder: TeacherEncoder,
    todo: np.ndarray,
    config: PrecomputeConfig,
    rank: int,
    world: int,
    summary: PrecomputeSummary,
) -> None:
    """Pass 2: encode the texts of ``todo`` into one new segment."""
    budget = config.token_budget or (65_536 if encoder.device.startswith("cuda") else 8_192)
    done = np.zeros(len(todo), dtype=bool)
    bar = _progress(len(todo), config.progress and rank == 0)
    # Pass 1 counted the rows: a segment smaller than one default chunk gets one chunk of exactly its size
    # (zarr pads the last chunk to full size, so a 300-text top-up would otherwise take 32 MiB on disk).
    chunk_rows = config.flush_rows or min(default_chunk_rows(store.dim, store.dtype), max(len(todo), 1))
    writer = store.writer(rank=rank, world_size=world, chunk_rows=chunk_rows, flush_seconds=config.flush_seconds)
    summary.segment = writer.seg_id
    with AsyncWriter(writer) as out:
        window: list[tuple[bytes, TextRecord]] = []
        for _, block in _iter_blocks(sources, config.roles):
            keys = _block_keys(block)
            pos = np.minimum(np.searchsorted(todo, keys), len(todo) - 1)
            hit = (todo[pos] == keys) & ~done[pos] & first_occurrence(keys)
            done[pos[hit]] = True
            window.extend((keys[j], block[j]) for j in np.flatnonzero(hit))
            while len(window) >= config.window:  # a block may overfill it: never hold more than --window texts
                _encode_window(window[: config.window], encoder, out, budget, config.max_batch_size, summary, bar)
                window = window[config.window :]
        _encode_window(window, encoder, out, budget, config.max_batch_size, summary, bar)
    bar.close()
    if not done.all():
        warnings.warn(
            f"{int((~done).sum())} texts found in the first pass were gone in the second "
            "(did a source file change during the run?); rerun to encode them.",
            stacklevel=2,
        )


def _encode_window(
    window: list[tuple[bytes, TextRecord]],
    encoder: TeacherEncoder,
    out: AsyncWriter,
    budget: int,
    max_batch: int,
    summary: PrecomputeSummary,
    bar: Any,
) -> None:
    for role in ("query", "passage"):
        items = [(k, r.text) for k, r in window if r.role == role]
        if not items:
            continue
        keys = np.array([k for k, _ in items], dtype=KEY_DTYPE)
        texts = [t for _, t in items]
        lengths = encoder.token_lengths(texts, role)
        batches = token_budget_batches(lengths, budget, max_batch)
        real, padded = padding_waste(lengths, batches)
        summary.tokens += real
        summary.padded_tokens += padded
        for b in batches:
            vectors = encoder.encode([texts[i] for i in b], role)
            out.put(keys[b], vectors, np.full(len(b), role_code(role), np.uint8), lengths[b])
            summary.encoded += len(b)
            bar.tokens = getattr(bar, "tokens", 0) + int(lengths[b].sum())
            bar.update(len(b))
            bar.set_postfix_str(f"{bar.tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="text",
        desc="precompute",
        file=sys.stderr,
        disable=not enabled,
        dynamic_ncols=True,
        smoothing=0.05,
    )


class AsyncWriter:
    """Feeds a SegmentWriter from a background thread so encoding never waits for disk.

    The queue is bounded (8 batches), so a slow disk slows the encoder instead of filling RAM.
    On success the segment is committed; on any error it is flushed and left for salvage.
    """

    def __init__(self, writer: SegmentWriter, depth: int = 8) -> None:
        self.writer = writer
        self._queue: queue.Queue[tuple[np.ndarray, ...] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ddx-writer", daemon=True)

    def __enter__(self) -> AsyncWriter:
        self._thread.start()
        return self

    def put(self, keys: np.ndarray, vectors: np.ndarray, roles: np.ndarray, n_tokens: np.ndarray) -> None:
        self._raise_if_failed()
        self._queue.put((keys, vectors, roles, n_tokens))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.append(*item)
                except BaseException as exc:
                    self._error = exc

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is None:
            self.writer.commit()
            return
        try:
            if self._error is None:
                self.writer.flush()
        except (OSError, DdxError):
            pass  # the original error is the one to report
        finally:
            self.writer.abort()
        self._raise_if_failed()


def missing_vectors_command(store: TeacherStore, source_specs: list[str]) -> str:
    """The exact ``ddx precompute-teacher`` command that adds the missing texts with the store's teacher."""
    s = store.spec
    parts = ["ddx precompute-teacher", f"--teacher {shlex.quote(s.model)}", f"--store {shlex.quote(store.url)}"]
    parts += [f"--data {shlex.quote(spec)}" for spec in source_specs]
    parts += [
        f"--pooling {s.pooling}",
        "--normalize" if s.normalize else "--no-normalize",
        f"--max-seq-length {s.max_seq_length}",
        f"--padding-side {s.padding_side}",
        f"--dtype {s.dtype}",
        f"--query-prompt {shlex.quote(s.query_prompt)}",
        f"--passage-prompt {shlex.quote(s.passage_prompt)}",
    ]
    return " ".join(parts)
