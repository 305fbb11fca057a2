"""``ddx precompute-teacher --engine ray``: Ray Data as the engine of a multi-node precompute.

The driver never runs the teacher. It computes the teacher's spec from the model's files
(:func:`precompute.teacher_files.spec_from_files`: no weights), opens or creates the store, salvages what crashed
runs left (:func:`precompute.recovery.salvage_abandoned`) and plans once (:func:`precompute.plan.plan_texts`).
The plan is sorted by text length and cut into *units* of ``unit_rows`` texts; then::

    ray.data.from_arrow(units)        one block per unit: keys fixed_size_binary(16), roles, texts (list columns,
                                      so no batching or block split can cut a unit)
      .map_batches(TokenCounter)      CPU actors: the teacher's tokenizer alone counts every text (actors, not
                                      tasks: Ray Data would fuse a task stage into the encoder actors)
      .map_batches(UnitEncoder)       encoder actors (num_gpus=1 each, or CPU actors): the teacher loaded once per
                                      actor; per unit: token-budget batches, one segment written and committed
    driver: one report per unit (texts, tokens, segments, or a worker's one-line error) -> the run summary

The worker side is :mod:`precompute.ray_workers`. The driver holds the plan's texts in memory while it builds the
units (MS MARCO's 8.8 M passages: ~3 GB of text), and Ray's object store holds them once more until they are encoded.

**Commits without a commit hook.** Ray Data gives a map actor no "finished" call, so an actor does not keep one
segment open for its life: each unit is written to a segment of its own and committed before its task returns.
When the task returns, its rows are durable; an actor killed mid-unit leaves an uncommitted segment (its flushed
chunks and index parts) that salvage commits, exactly as for a killed local run. ``ddx cache compact`` merges the
many unit segments afterwards (open cost grows with segments).

**Exactly once under retries.** A unit's segments are named ``<time>-ray<job>-u<unit>-a<attempt>``. Before encoding,
a task settles the earlier attempts of its unit: a committed one's keys are done; an uncommitted one is salvaged
under its claim (:func:`storage.segment.claim_and_salvage`: its flushed rows committed, or it is removed when it
holds none) once its writer is dead: at once on a local store (the writer's flock died with it), after
``stale_after`` of heartbeat silence on an object store. Only the keys no attempt stored are encoded, into attempt
``a<n+1>``. So a retried unit — killed before, during or after its commit — stores each key once, and a key is
lost only if no attempt ever stores it, which Ray's retries (``max_restarts``, ``max_task_retries``: unlimited
by default) prevent while the job runs. A rerun plans only what is missing: everything stored, it encodes nothing
and starts no actor.

Example:
    >>> from precompute.config import PrecomputeConfig, RayConfig, TeacherConfig
    >>> config = PrecomputeConfig(store="s3://bucket/gte7b", data=("msmarco:s3://bucket/msmarco",),
    ...                           teacher=TeacherConfig(model="Alibaba-NLP/gte-Qwen2-7B-instruct"))
    >>> summary = precompute_ray(config, RayConfig(address="auto"))  # doctest: +SKIP
    >>> summary.encoded, len(summary.segments)                        # doctest: +SKIP
    (8841823, 540)
"""

from __future__ import annotations

import contextlib
import re
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from precompute.config import PrecomputeConfig, RayConfig, TeacherConfig
from precompute.encode import progress_bar
from precompute.pipeline import PrecomputeSummary
from precompute.plan import TextPlan, plan_texts
from precompute.ray_workers import FaultHook, Job, TokenCounter, UnitEncoder
from precompute.recovery import salvage_abandoned
from precompute.sources import Source
from precompute.teacher import spec_from_files
from storage.errors import DdxError
from storage.heartbeat import stale_after
from storage.spec import TeacherSpec
from storage.store import TeacherStore, default_chunk_rows

__all__ = ["RAY_MIN_VERSION", "FaultHook", "RayConfig", "import_ray", "precompute_ray"]

RAY_MIN_VERSION = (2, 9)


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a one-line error saying how to install it.

    Raises:
        DdxError: Ray (with Ray Data) is not installed, or older than 2.9.
    """
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise DdxError(
            f"--engine ray needs Ray Data ({exc.name or 'ray'} is not installed): pip install 'ddx[ray]'"
        ) from exc
    version = tuple(int(p) for p in re.findall(r"\d+", ray.__version__)[:2])
    if version < RAY_MIN_VERSION:
        raise DdxError(f"--engine ray needs ray[data] >= 2.9, found {ray.__version__}: pip install 'ddx[ray]'")
    return ray


def precompute_ray(
    config: PrecomputeConfig,
    ray_config: RayConfig | None = None,
    *,
    sources: list[Source] | None = None,
    fault_hook: FaultHook | None = None,
) -> PrecomputeSummary:
    """Encode every text of ``config.data`` the store lacks on a Ray cluster, one committed segment per unit.

    Args:
        config: what to read, where to store, how to batch (``rank``/``world_size``/``job_id``/``window`` are the
            local engine's: Ray plans one job over the whole data).
        ray_config: the cluster, the actors and the unit size (default :class:`RayConfig`).
        sources: already opened sources (read on the driver); parsed from ``config.data`` when None.
        fault_hook: fault injection for tests, called inside the encoder actors as ``hook(event, info)`` after each
            batch (``"batch"``) and after a unit's commit (``"committed"``); ``info`` has ``unit``, ``segment``,
            ``encoded`` and ``rows_flushed``. It must be picklable (a module-level function).

    Returns:
        The run summary (``engine="ray"``, ``segments``: the units' segments; ``encoded == 0`` when everything
        was stored already: then no actor is started).

    Raises:
        DdxError: Ray is missing, the teacher's files do not settle its spec, an actor's loaded teacher has another
            fingerprint than the files said, or a unit failed for good.
        BadSourceError, FingerprintMismatchError, DimensionMismatchError: as :func:`precompute.pipeline.precompute`.
    """
    started = time.perf_counter()
    rc = ray_config or RayConfig()
    if config.rank is not None or config.world_size is not None:
        raise DdxError(
            "--rank/--world-size pick one slice for the local engine; --engine ray plans the whole job at once "
            "(drop them)."
        )
    ray = import_ray()
    with _ray_session(ray, rc):
        gpus = rc.actor_gpus if rc.actor_gpus is not None else (1.0 if _cluster_gpus(ray) else 0.0)
        teacher = _actor_teacher(config.teacher, gpus)
        spec = spec_from_files(teacher)  # the driver loads no weights: the store is created from the files
        store = TeacherStore.open_or_create(config.store, spec, dtype=config.storage_dtype)
        summary = PrecomputeSummary(store=store.url, fingerprint=store.fingerprint, rank=0, world_size=1)
        summary.engine = "ray"
        summary.salvaged = [{"segment": s, "rows": n} for s, n in salvage_abandoned(store)]
        plan = plan_texts(config, store, sources=sources)
        summary.add_counts(plan.counts)
        summary.to_encode = len(plan)
        if len(plan):
            job = _job(config, store, teacher, spec)
            actors = rc.actors or max(1, int(_cluster_gpus(ray) // gpus) if gpus else 1)
            bar = progress_bar(len(plan), config.progress)
            for report in _run(
                ray, plan, job, rc, actors=actors, gpus=gpus, hook=fault_hook, quiet=not config.progress
            ):
                _add(summary, report)
                bar.update(report["encoded"] + report["reused"])
            bar.close()
    summary.seconds = round(time.perf_counter() - started, 3)
    return summary


@contextlib.contextmanager
def _ray_session(ray: Any, rc: RayConfig) -> Iterator[None]:
    """Join the cluster (or start a local Ray) unless this process is connected already; leave what it started."""
    if ray.is_initialized():
        yield
        return
    ray.init(address=rc.address)
    try:
        yield
    finally:
        ray.shutdown()


def _cluster_gpus(ray: Any) -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def _actor_teacher(teacher: TeacherConfig, gpus: float) -> TeacherConfig:
    """The teacher config the actors load: device and dtype set for where they run, not for the driver."""
    device = teacher.device or ("cuda:0" if gpus > 0 else "cpu")  # an actor sees its GPU as cuda:0
    dtype = teacher.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return replace(teacher, device=device, dtype=dtype)


def _job(config: PrecomputeConfig, store: TeacherStore, teacher: TeacherConfig, spec: TeacherSpec) -> Job:
    return Job(
        job=uuid.uuid4().hex[:8],
        store_url=store.url,
        storage_options=dict(store.loc.storage_options),
        stale_after=stale_after(store.loc),
        teacher=teacher,
        spec=spec.to_dict(),
        dtype=store.dtype,
        chunk_rows=config.flush_rows or default_chunk_rows(store.dim, store.dtype),
        flush_seconds=config.flush_seconds,
        token_budget=config.token_budget,
        max_batch=config.max_batch_size,
    )


def _add(summary: PrecomputeSummary, report: dict[str, Any]) -> None:
    """Add a unit's report to the summary.

    Raises:
        DdxError: the unit failed on its worker (the worker's one-line message; finished units stay committed).
    """
    if report["error"]:
        raise DdxError(
            f"{report['error']} (Ray unit {report['unit']}; units finished so far are committed: rerun to resume)"
        )
    summary.encoded += report["encoded"]
    summary.tokens += report["tokens"]
    summary.padded_tokens += report["padded_tokens"]
    summary.forward_calls += report["forward_calls"]
    summary.segments += report["segments"]


def _run(
    ray: Any, plan: TextPlan, job: Job, rc: RayConfig, *, actors: int, gpus: float, hook: FaultHook | None, quiet: bool
) -> Iterator[dict[str, Any]]:
    """Stream the units through the tokenizer tasks and the encoder actors; yield each unit's report."""
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = not quiet
    ds = ray.data.from_arrow(_units(plan.table, rc.unit_rows))
    ds = ds.map_batches(  # actors, not tasks: Ray Data would fuse a task stage into the encoder actors
        TokenCounter,
        fn_constructor_kwargs={"job": job},
        batch_size=1,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=max(1, actors)),
        num_cpus=1,
    )
    remote_args = {"max_restarts": rc.max_restarts, "max_task_retries": rc.max_task_retries}
    remote_args = {k: v for k, v in remote_args.items() if v != -1}  # -1: Ray Data's own default for map actors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Ray >= 2.60 names **ray_remote_args deprecated
        ds = ds.map_batches(
            UnitEncoder,
            fn_constructor_kwargs={"job": job, "fault_hook": hook},
            batch_size=1,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(size=actors),
            num_gpus=gpus,
            num_cpus=rc.actor_cpus,
            **remote_args,
        )
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            yield from batch.to_pylist()
    except ray.exceptions.RayError as exc:  # not a ddx error (those come back as rows): a crash, an OOM kill, a bug
        raise DdxError(f"The Ray job failed: {_remote_error_line(exc)} (the Ray logs have the traceback)") from exc


def _units(plan: pa.Table, unit_rows: int) -> list[pa.Table]:
    """The plan sorted by text length (a unit's texts pad alike) and cut into one-row tables, a unit each."""
    order = pc.sort_indices(pa.table({"n": pc.utf8_length(plan["text"])}), sort_keys=[("n", "descending")])
    units = []
    for unit, start in enumerate(range(0, plan.num_rows, unit_rows)):
        part = plan.take(order[start : start + unit_rows])  # a copy: a unit's block holds only its own texts
        offsets = pa.array([0, part.num_rows], pa.int32())
        units.append(
            pa.table(
                {
                    "unit": pa.array([unit], pa.int64()),
                    "keys": pa.ListArray.from_arrays(offsets, part["key"].combine_chunks()),
                    "roles": pa.ListArray.from_arrays(offsets, part["role"].combine_chunks()),
                    "texts": pa.ListArray.from_arrays(offsets, part["text"].combine_chunks()),
                }
            )
        )
    return units


def _remote_error_line(exc: BaseException) -> str:
    """The first ``SomeError: message`` line of a Ray error's remote traceback (else its first line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    found = next((m.group(0) for line in lines if (m := _ERROR_LINE.match(line))), None)
    return found or (lines[0] if lines else type(exc).__name__)


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Interrupt): .+$")
