"""The data a checkpoint was trained on, so that ``ddx train --resume`` never continues onto other data.

The HF Trainer resumes by skipping the batches of the steps already trained in the current epoch, by position, in a
sampler rebuilt over the examples as they resolve *now*. That lands where the checkpoint stopped only if the
examples and everything that orders them are the same: another example list (a source edited, ``--allow-missing``
while precompute still fills the store, ``--mine-negatives`` over a grown store) or another ``--seed``,
``--batch-size``, ``--grad-accum``, world size, or token lengths (length grouping) shifts every position, so some
examples are trained twice in the resumed epoch and others never (1,000 texts, 1 % more at the resume: 220 twice,
217 never), silently.

So each checkpoint gets ``ddx_data.json`` (:func:`data_fingerprint`: counts, digests and the order settings;
:class:`distill.train.checkpoints.ManifestCallback` writes it and the manifest covers it), ``ddx_run.json`` gets
the same record, and ``--resume`` compares (:func:`check_resume_data`) and refuses a difference in one line that
names it. A checkpoint without the file (an older ddx, or a kill between the save and its manifest) resumes as
before, with a one-line warning that nothing could be checked.

The digests are over content keys, not positions into the run's text index, so a text added to a source that no
example uses changes nothing. Each key's first 8 bytes stand for it (they are a 64-bit blake2b of the text already):
one blake2b pass over them, gathered in blocks of 1 M, linear and with no copy of the whole list. Measured on this
project's 2-core dev machine: 10 M phase-1 texts 0.3 s; 10 M phase-2 examples with a positive and 7 negatives each
(90 M keys) 3.8 s, where the full 16-byte keys took 5.6 s: seconds, once, against the minutes resolving them takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from distill.train.config import TrainConfig
from distill.train.data import PreparedData
from storage.errors import DdxError, FingerprintMismatchError
from storage.fs import atomic_open

__all__ = ["DATA_FILE", "add_lengths", "check_resume_data", "data_fingerprint", "fingerprint_changes", "write_data"]

DATA_FILE = "ddx_data.json"
_BLOCK = 1 << 20  # key prefixes gathered and hashed at a time (8 MB)

# What each field is called in a refusal; digests say only "differ" (their values mean nothing to a reader).
_NAMES = {
    "phase": "phase",
    "examples": "examples",
    "texts": "texts",
    "queries": "queries",
    "positives": "positives",
    "negatives": "negatives",
    "seed": "--seed",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "world_size": "processes (world size)",
    "length_grouping": "--length-grouping",
    "lengths": "token lengths (another student tokenizer or --max-seq-length)",
}
_DIGESTS = frozenset({"texts", "queries", "positives", "negatives", "lengths"})


def _digest(prefixes: np.ndarray, positions: np.ndarray, offsets: np.ndarray | None = None) -> str:
    """blake2b of the key prefixes at ``positions`` in order (and of the row ``offsets`` of a ragged list)."""
    h = hashlib.blake2b(digest_size=16)
    if offsets is not None:
        h.update(np.ascontiguousarray(offsets, dtype="<i8").data)
    for s in range(0, len(positions), _BLOCK):
        h.update(np.take(prefixes, positions[s : s + _BLOCK]).data)
    return h.hexdigest()


def data_fingerprint(config: TrainConfig, data: PreparedData, *, world_size: int) -> dict[str, Any]:
    """What defines the examples and their batch order, without the token lengths (see :func:`add_lengths`).

    Args:
        config: the run's config (seed, batch size, accumulation, length grouping).
        data: the run's resolved data (:func:`distill.train.data.resolve_data`).
        world_size: processes training together (each takes every ``world_size``-th batch).

    Returns:
        A JSON-able dict: phase, example count, a digest per key list, and the order settings.
    """
    # The first 8 bytes of each content key: a 64-bit blake2b of the text already, half the bytes to gather and hash.
    keys = np.ascontiguousarray(np.ascontiguousarray(data.texts.keys).view("<u8")[::2])
    out: dict[str, Any] = {"format": 1, "phase": config.phase}
    if data.phase1 is not None:
        out |= {"examples": len(data.phase1), "texts": _digest(keys, data.phase1)}
    else:
        assert data.phase2 is not None  # resolve_data fills one of the two
        ex = data.phase2
        out |= {
            "examples": len(ex),
            "queries": _digest(keys, ex.query),
            "positives": _digest(keys, ex.positives.flat, ex.positives.offsets),
            "negatives": _digest(keys, ex.negatives.flat, ex.negatives.offsets),
        }
    return out | {
        "seed": config.seed,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "world_size": world_size,
        "length_grouping": config.length_grouping,
    }


def add_lengths(fingerprint: dict[str, Any], lengths: np.ndarray | None) -> dict[str, Any]:
    """``fingerprint`` with the digest of the examples' token lengths (they order length-grouped batches)."""
    digest = None if lengths is None else hashlib.blake2b(np.ascontiguousarray(lengths, "<i8").data, digest_size=16)
    return fingerprint | {"lengths": None if digest is None else digest.hexdigest()}


def fingerprint_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, in words (``"examples 1,000 → 1,010"``); only fields both have."""
    changes = []
    for field, name in _NAMES.items():
        if field not in current or field not in recorded or recorded[field] == current[field]:
            continue
        if field in _DIGESTS:  # lengths are None without length grouping: that change is named by itself
            if recorded[field] is not None and current[field] is not None:
                changes.append(f"{name} differ")
        else:
            changes.append(f"{name} {_show(recorded[field])} → {_show(current[field])}")
    return changes


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_data(folder: str | os.PathLike[str], fingerprint: dict[str, Any]) -> Path:
    """Write ``fingerprint`` into a checkpoint folder as ``ddx_data.json`` (atomically)."""
    path = Path(folder) / DATA_FILE
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(fingerprint, indent=1))
    return path


def _read_data(checkpoint: Path) -> dict[str, Any] | None:
    path = checkpoint / DATA_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise DdxError(
            f"{path} is unreadable ({exc}): the data checkpoint '{checkpoint}' was trained on is unknown. Delete "
            f"'{checkpoint.parent}' and rerun without --resume to start over."
        ) from exc


def check_resume_data(checkpoint: Path, current: dict[str, Any], *, announce: bool) -> None:
    """Refuse to resume ``checkpoint`` onto data or a batch order other than the ones it was trained on.

    Compares the fields ``current`` has (call it once before the student loads, once more with :func:`add_lengths`).
    A checkpoint that records nothing resumes, with a warning on stderr when ``announce`` (rank 0).

    Raises:
        FingerprintMismatchError: one line naming the checkpoint, what differs, and the fix.
    """
    recorded = _read_data(checkpoint)
    if recorded is None:
        if announce:
            print(
                f"ddx train: warning: {checkpoint.name} records no training-data fingerprint ({DATA_FILE}; saved by "
                "an older ddx, or killed before its manifest): resuming without checking that its data and batch "
                "order are unchanged.",
                file=sys.stderr,
                flush=True,
            )
        return
    changes = fingerprint_changes(recorded, current)
    if changes:
        raise FingerprintMismatchError(
            f"Checkpoint '{checkpoint}' was trained on other data or batch order than this run has: "
            f"{', '.join(changes)}. Resuming skips the trained batches by position, so some examples would be "
            "trained twice and others never. Restore what it trained on (the --data files and store as they were, "
            "the same --allow-missing, --skip-bad, --mine-negatives and the flags named), or start a new run: "
            f"rerun without --resume into a new --out (or after deleting '{checkpoint.parent}')."
        )
