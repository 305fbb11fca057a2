"""``python -m cli.main train`` that stalls half-way through writing one checkpoint, so a test can SIGKILL it there.

When the Trainer has written ``checkpoint-<DDX_STALL_STEP>``'s weights and ``optimizer.pt``, this cuts
``optimizer.pt`` to half its bytes (what a kill in the middle of ``torch.save`` leaves), writes
``DDX_STALL_MARKER``, and sleeps: the scheduler, RNG and trainer state are never written. Everything else is the
real command, run as a real process.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from transformers import Trainer

from cli.main import main

STEP = int(os.environ["DDX_STALL_STEP"])
MARKER = Path(os.environ["DDX_STALL_MARKER"])
_save = Trainer._save_optimizer_and_scheduler


def _stall(self: Any, output_dir: str) -> None:
    _save(self, output_dir)
    if self.state.global_step == STEP:
        optimizer = Path(output_dir) / "optimizer.pt"
        data = optimizer.read_bytes()
        optimizer.write_bytes(data[: len(data) // 2])
        MARKER.write_text(output_dir)
        time.sleep(600)


if __name__ == "__main__":
    Trainer._save_optimizer_and_scheduler = _stall  # type: ignore[method-assign]
    main()
