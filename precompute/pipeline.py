"""``ddx precompute-teacher``: run the teacher once over every text not yet in the store (the local engine:
one process, or one process per torchrun/SLURM rank; ``--engine ray`` is :mod:`precompute.ray_engine`).

Two streaming passes over the sources keep memory flat whatever the corpus size (:mod:`precompute.plan`):

1. **scan**: read every text, compute its content key, drop keys seen before (within and across
   sources) and keys the store already holds, keep this rank's slice. Only keys are kept: 16 bytes a
   text. Bad input stops the run here, before any GPU time is spent.
2. **encode**: read again, collect the texts still to do into windows, sort each window by token
   length, cut token-budget batches, encode under ``torch.inference_mode`` and hand the vectors to a
   writer thread, so the accelerator never waits for the disk (:mod:`precompute.encode`).

A crash loses at most one flush interval: the next run salvages the abandoned segment (its flushed
rows become a committed segment, :mod:`precompute.recovery`) and encodes only what is still missing.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from precompute.config import PrecomputeConfig
from precompute.encode import AsyncWriter, default_token_budget, encode_role, progress_bar
from precompute.job_report import job_id, job_total, record_rank
from precompute.plan import KeyPlan, ScanCounts, iter_todo, open_sources, scan_keys
from precompute.recovery import salvage_abandoned
from precompute.sources import Source, TextRecord
from precompute.teacher import TeacherEncoder, expected_spec, load_teacher
from storage.errors import DdxError
from storage.fs import Location
from storage.keys import KEY_DTYPE
from storage.metadata import read_root_attrs
from storage.spec import TeacherSpec
from storage.store import TeacherStore


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
    segments: list[str] = field(default_factory=list)  # --engine ray: one per unit of work
    engine: str = "local"
    seconds: float = 0.0
    job: str | None = None  # the id the ranks report under (<store>/runs/<job>/)
    job_total: dict[str, Any] | None = None  # rank 0 of a multi-rank job: every rank added up (job_report)

    def add_counts(self, counts: ScanCounts) -> None:
        """Take the plan's pass-1 counts (texts read, distinct, stored, other ranks', skipped; per source)."""
        self.sources = counts.sources
        self.texts_read, self.unique_texts, self.already_stored = (
            counts.texts_read,
            counts.unique_texts,
            counts.already_stored,
        )
        self.other_ranks, self.skipped_bad = counts.other_ranks, counts.skipped_bad

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
    sources = sources if sources is not None else open_sources(config)
    encoder = encoder or _load_teacher(config)
    calls_before = encoder.forward_calls  # a caller's encoder may have run before: report this run's calls
    store = TeacherStore.open_or_create(config.store, encoder.spec, dtype=config.storage_dtype)
    summary = PrecomputeSummary(store=store.url, fingerprint=store.fingerprint, rank=rank, world_size=world)
    summary.salvaged = [{"segment": s, "rows": n} for s, n in salvage_abandoned(store, rank=rank, world=world)]
    plan = scan_keys(sources, store, roles=config.roles, limit=config.limit, rank=rank, world_size=world)
    summary.add_counts(plan.counts)
    summary.to_encode = len(plan.keys)
    if len(plan.keys):
        _encode(sources, store, encoder, plan, config, rank, world, summary)
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


def _encode(
    sources: list[Source],
    store: TeacherStore,
    encoder: TeacherEncoder,
    plan: KeyPlan,
    config: PrecomputeConfig,
    rank: int,
    world: int,
    summary: PrecomputeSummary,
) -> None:
    """Pass 2: encode the texts of ``plan`` into one new segment (its last chunk holds just its rows)."""
    budget = config.token_budget or default_token_budget(encoder.device)
    bar = progress_bar(len(plan.keys), config.progress and rank == 0)
    writer = store.writer(rank=rank, world_size=world, chunk_rows=config.flush_rows, flush_seconds=config.flush_seconds)
    summary.segment = writer.seg_id
    with AsyncWriter(writer) as out:
        window: list[tuple[bytes, TextRecord]] = []
        for keys, records in iter_todo(sources, plan.keys, config.roles):
            window.extend(zip(keys, records, strict=True))
            while len(window) >= config.window:  # a block may overfill it: never hold more than --window texts
                _encode_window(window[: config.window], encoder, out, budget, config.max_batch_size, summary, bar)
                window = window[config.window :]
        _encode_window(window, encoder, out, budget, config.max_batch_size, summary, bar)
    bar.close()


def _encode_window(
    window: list[tuple[bytes, TextRecord]],
    encoder: TeacherEncoder,
    out: AsyncWriter,
    budget: int,
    max_batch: int,
    summary: PrecomputeSummary,
    bar: Any,
) -> None:
    def done(texts: int, tokens: int) -> None:
        summary.encoded += texts
        bar.tokens = getattr(bar, "tokens", 0) + tokens
        bar.update(texts)
        bar.set_postfix_str(f"{bar.tokens / max(bar.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)

    for role in ("query", "passage"):
        items = [(k, r.text) for k, r in window if r.role == role]
        if not items:
            continue
        keys = np.array([k for k, _ in items], dtype=KEY_DTYPE)
        texts = [t for _, t in items]
        lengths = encoder.token_lengths(texts, role)
        real, padded = encode_role(
            encoder, keys, texts, role, lengths, out, budget=budget, max_batch=max_batch, on_batch=done
        )
        summary.tokens += real
        summary.padded_tokens += padded


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
