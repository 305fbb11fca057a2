"""Every rank's summary in the store, and the job's total gathered by rank 0.

A multi-rank precompute (torchrun, ``srun``, or processes started with ``--rank/--world-size``) used to
report rank 0's own slice as if it were the job ("encoded 178" when the job encoded 350), and the other
ranks printed nothing. Now each rank writes its summary to ``<store>/runs/<job>/rank-<r>.json`` when it
finishes, and rank 0 waits (bounded by ``--report-wait``) for the others' files and adds up the job:
texts encoded, tokens, the slowest rank's time. No process group is needed, so separately launched
ranks are covered too; a rank that never reports is named in the total, which then says it is partial.

The job id is ``--job-id``, else torchrun's ``TORCHELASTIC_RUN_ID``, else SLURM's job and step ids, else a
hash of what defines the job (store, data, world size): separately launched ranks of one job agree on it
without talking, and a rerun of the same job replaces the old report.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from typing import Any

from storage.fs import Location

__all__ = ["RUNS", "job_id", "job_total", "record_rank"]

RUNS = "runs"
POLL_S = 1.0
ADDED = ("texts_read", "to_encode", "encoded", "skipped_bad", "tokens", "padded_tokens", "forward_calls")


def job_id(explicit: str | None, store: str, data: tuple[str, ...], world_size: int) -> str:
    """The id every rank of one job computes alike (see the module docstring)."""
    if explicit:
        return explicit
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return _folder_name(f"torchrun-{run_id}")
    if os.environ.get("SLURM_JOB_ID"):
        return _folder_name(f"slurm-{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_STEP_ID', '0')}")
    digest = hashlib.blake2b(json.dumps([store, sorted(data), world_size]).encode(), digest_size=6).hexdigest()
    return f"job-{digest}"


def _folder_name(text: str) -> str:
    """``text`` made safe as one folder name (a launcher's id may hold '/' or spaces)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:128]


def record_rank(loc: Location, job: str, summary: dict[str, Any]) -> None:
    """Write this rank's summary (atomically: rank 0 reads whole files or none)."""
    loc.makedirs(RUNS, job)
    loc.write_atomic(json.dumps(summary, indent=1).encode(), RUNS, job, f"rank-{summary['rank']}.json")


def job_total(loc: Location, job: str, world_size: int, wait_s: float, *, quiet: bool = False) -> dict[str, Any]:
    """Rank 0's view of the job: every rank's summary added up, once all reported or ``wait_s`` passed."""
    deadline = time.monotonic() + wait_s
    announced = False
    while True:
        ranks = _read_ranks(loc, job, world_size)
        missing = [r for r in range(world_size) if r not in ranks]
        if not missing or time.monotonic() >= deadline:
            break
        if not announced and not quiet:
            print(f"waiting up to {wait_s:.0f} s for ranks {missing} to report (job {job})", file=sys.stderr)
            announced = True
        time.sleep(POLL_S)
    total: dict[str, Any] = {"job": job, "world_size": world_size, "ranks_reported": sorted(ranks)}
    total.update({k: sum(int(r.get(k, 0)) for r in ranks.values()) for k in ADDED})
    total["seconds"] = max((float(r.get("seconds", 0.0)) for r in ranks.values()), default=0.0)
    total["texts_per_s"] = round(total["encoded"] / total["seconds"], 2) if total["seconds"] else 0.0
    total["segments"] = [r["segment"] for _, r in sorted(ranks.items()) if r.get("segment")]
    total["missing_ranks"] = missing
    total["complete"] = not missing
    return total


def _read_ranks(loc: Location, job: str, world_size: int) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for r in range(world_size):
        name = f"rank-{r}.json"
        if loc.exists(RUNS, job, name):
            try:
                out[r] = json.loads(loc.read_bytes(RUNS, job, name))
            except (OSError, ValueError):
                continue  # being replaced by a rerun of that rank: read it on the next poll
    return out
