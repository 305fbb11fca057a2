"""The folder a ``ddx train`` run writes, and its ``ddx_run.json``::

    out/
      student_base/          plain SentenceTransformer (student_dim vectors)
      hybrid/                plain SentenceTransformer emitting teacher-space vectors
      projection_layer.pt    projection weights and dims
      ddx_run.json           resolved config, store fingerprint and teacher spec, --projection and the teacher_dims
                             it trained into (null: the full vectors), data report and fingerprint, final losses
      train_log.jsonl        every logged step (loss and its parts, learning rate)
      train_loss.png         the loss and its parts against the step (with matplotlib)
      checkpoints/           HF checkpoints (optimizer, scheduler, RNG) with a ddx manifest each: --resume continues
                             from the newest complete one (distill.train.checkpoints), skipping damaged ones, and
                             only on the data it was trained on (its ddx_data.json: distill.train.checkpoint_data)

Training writes it (:mod:`distill.train.run`); evaluation and routing read it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from storage.errors import DdxError, DimensionMismatchError, FingerprintMismatchError
from storage.fs import atomic_open
from storage.store import TeacherStore

__all__ = ["RUN_FILE", "check_run_store", "read_run", "write_run"]

RUN_FILE = "ddx_run.json"


def read_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``ddx_run.json`` of a run folder.

    Raises:
        DdxError: the folder is not a finished ddx run.
    """
    file = Path(path) / RUN_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DdxError(
            f"{path!r} is not a finished ddx run ({RUN_FILE} missing or unreadable). Pass the --out "
            "folder of a completed 'ddx train' run."
        ) from exc


def write_run(out: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write ``payload`` as the run folder's ``ddx_run.json`` (atomically: readers see the old file or the new)."""
    with atomic_open(Path(out) / RUN_FILE, "w", encoding="utf-8") as f:
        f.write(json.dumps(payload, indent=2, default=str))


def check_run_store(run: dict[str, Any], run_path: str, store: TeacherStore) -> None:
    """Refuse a run that was trained against another store fingerprint, or into more teacher dims than it holds."""
    dims = run.get("teacher_dims")
    if dims is not None and dims > store.dim:
        raise DimensionMismatchError(
            f"Run {run_path!r} was trained into the teacher's first {dims} dims (--projection none --teacher-dims "
            f"{dims}), but store {store.url!r} holds {store.dim}-d vectors. Use the store the run was trained with "
            f"({run.get('store')!r}), or retrain against this one with --teacher-dims <= {store.dim}."
        )
    if run.get("store_fingerprint") != store.fingerprint:
        raise FingerprintMismatchError(
            f"Run {run_path!r} was trained against teacher fingerprint {run.get('store_fingerprint')} "
            f"({run.get('teacher_spec', {}).get('model')!r}), but store {store.url!r} holds {store.fingerprint} "
            f"({store.spec.model!r}). Use the store the run was trained with, or retrain against this one."
        )
