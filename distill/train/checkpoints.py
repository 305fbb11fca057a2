"""Checkpoints that ``ddx train --resume`` can trust: a manifest per save, and a fall-back past damaged ones.

The HF Trainer writes a checkpoint file by file (weights, optimizer, scheduler, RNG state, trainer state), with
no marker that it finished. A run killed mid-save, or a file truncated later, leaves a ``checkpoint-N`` that
``get_last_checkpoint`` still picks, and the resume dies in safetensors or ``torch.load`` with a traceback.

ddx writes ``ddx_checkpoint.json`` (size and blake2b of every file) once the Trainer has finished a checkpoint
(:class:`ManifestCallback`, on ``on_save``; just before it, ``ddx_data.json``, the data the checkpoint was trained
on: :mod:`distill.train.checkpoint_data`), and ``--resume`` takes the newest checkpoint that is complete:

* with a manifest: every listed file is there with its size and digest (a flipped byte is caught too);
* without one (a run of an older ddx, or a kill between the save and its manifest): the files resume needs are
  there and each is whole: a safetensors header whose tensors end exactly at the end of the file, torch zip
  archives whose every record matches its CRC, JSON that parses.

Checking costs one read of the checkpoint (about a second per GB). Newer checkpoints that are incomplete are moved
out of the Trainer's way (``checkpoints-incomplete/``): left in place, the Trainer's rotation, which orders
checkpoints by modification time, could delete a good checkpoint and keep a damaged one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from distill.train.checkpoint_data import write_data
from storage.errors import DdxError
from storage.fs import atomic_open

__all__ = ["MANIFEST", "ManifestCallback", "ResumePoint", "checkpoint_problem", "find_resume", "write_manifest"]

MANIFEST = "ddx_checkpoint.json"
SET_ASIDE = "checkpoints-incomplete"  # beside checkpoints/, outside the Trainer's "checkpoint-*" glob
_STEP = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_REQUIRED = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


def _digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def write_manifest(folder: str | os.PathLike[str], step: int) -> Path:
    """Record size and digest of every file of a finished checkpoint (written atomically, last)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "format": 1,
        "step": step,
        "files": {str(p.relative_to(folder)): {"size": p.stat().st_size, "blake2b": _digest(p)} for p in files},
    }
    with atomic_open(folder / MANIFEST, "w", encoding="utf-8") as f:
        f.write(json.dumps(manifest, indent=1))
    return folder / MANIFEST


def checkpoint_problem(folder: str | os.PathLike[str]) -> str | None:
    """Why ``folder`` cannot be resumed from (one short phrase), or None when it is complete."""
    folder = Path(folder)
    try:
        return _manifest_problem(folder) if (folder / MANIFEST).is_file() else _load_problem(folder)
    except OSError as exc:  # e.g. another rank moved it aside while this one read it
        return f"cannot be read ({exc.strerror or exc})"


def _manifest_problem(folder: Path) -> str | None:
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, want in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{name} has {size:,} bytes, {want['size']:,} when saved"
        if _digest(path) != want["blake2b"]:
            return f"{name} differs from what was saved (checksum)"
    return None


def _load_problem(folder: Path) -> str | None:
    """Whole-file checks for a checkpoint without a manifest."""
    missing = [n for n in _REQUIRED if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in _WEIGHTS):
        missing.insert(0, "model.safetensors")
    if not any(folder.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if missing:
        return f"{', '.join(missing)} missing"
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        problem = _file_problem(path)
        if problem:
            return f"{path.name} {problem}"
    return None


def _file_problem(path: Path) -> str | None:
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        return _torch_zip_problem(path)
    if path.suffix == ".json":
        try:
            json.loads(path.read_text())
        except (OSError, ValueError):
            return "is not valid JSON (truncated?)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """The header must parse and its last tensor must end exactly at the end of the file."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                return f"is truncated ({size:,} bytes, header alone needs {n + 8:,})"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return "has an unreadable header"
    if 8 + n + end != size:
        return f"is truncated ({size:,} bytes, its header describes {8 + n + end:,})"
    return None


def _torch_zip_problem(path: Path) -> str | None:
    """``torch.save`` writes a zip archive with a CRC per record; ``testzip`` reads every record and checks it."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as exc:
        return f"is truncated or damaged ({exc})"
    return f"is damaged (record {bad} fails its CRC)" if bad else None


@dataclass
class ResumePoint:
    """The checkpoint to resume from (None: start fresh) and the newer ones skipped as incomplete."""

    checkpoint: Path | None
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def announce(self) -> None:
        """Say on stderr what was skipped and where training resumes, and move the skipped checkpoints out of the
        Trainer's way (rank 0 only; see the module docstring)."""
        if not self.skipped:
            return
        assert self.checkpoint is not None  # find_resume raises when every checkpoint is incomplete
        skipped = "; ".join(f"{p.name}: {why}" for p, why in self.skipped)
        aside = self.checkpoint.parent.parent / SET_ASIDE
        print(
            f"ddx train: resuming from {self.checkpoint.name}, the newest complete checkpoint; skipped incomplete "
            f"{skipped} (moved to '{aside}').",
            file=sys.stderr,
            flush=True,
        )
        aside.mkdir(parents=True, exist_ok=True)
        for path, _ in self.skipped:
            if (aside / path.name).exists():
                shutil.rmtree(aside / path.name)
            os.replace(path, aside / path.name)


def find_resume(checkpoints: str | os.PathLike[str]) -> ResumePoint:
    """The newest complete ``checkpoint-N`` under ``checkpoints`` (None when there is none at all).

    Raises:
        DdxError: there are checkpoints, but none is complete (names each one's problem and the fix).
    """
    folder = Path(checkpoints)
    names = os.listdir(folder) if folder.is_dir() else []
    found = sorted(((int(m.group(1)), folder / n) for n in names if (m := _STEP.match(n))), reverse=True)
    skipped: list[tuple[Path, str]] = []
    for _, path in found:
        if not path.is_dir():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return ResumePoint(path, skipped)
        skipped.append((path, problem))
    if skipped:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped)
        raise DdxError(
            f"No complete checkpoint to resume from in '{folder}' ({reasons}). Delete '{folder}' and rerun "
            "without --resume to start over."
        )
    return ResumePoint(None)


class ManifestCallback(TrainerCallback):
    """Writes the manifest of each checkpoint once the Trainer has saved all of it (rank 0, after every rank).

    Args:
        data: the run's data fingerprint (:mod:`distill.train.checkpoint_data`), written into each checkpoint just
            before its manifest, which then covers it too; None: none.
    """

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data = data

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its rng_state_<rank>.pth
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            if self.data is not None:
                write_data(folder, self.data)
            write_manifest(folder, state.global_step)
