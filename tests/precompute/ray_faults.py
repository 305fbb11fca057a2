"""Fault injection for the Ray engine's tests, imported inside Ray's actor processes (so: small, no test imports).

``kill_once(marker_dir, event, info)`` SIGKILLs the calling process (an encoder actor) at the points the test names,
once each: a marker file created exclusively records that it happened, so Ray's retry of the unit goes through.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

# (event, unit, condition on info): mid-unit once rows of the segment are flushed (an uncommitted segment with
# index parts for salvage), and right after a unit's commit (its task had not returned: Ray retries it). The
# mid-unit kill is on the writer thread's "appended" event: the encoder's "batch" events can all pass before the
# writer thread flushed anything (a unit fits in its queue), and then that kill never happened (seen under load).
KILLS = (
    ("appended", 1, lambda info: info["rows_flushed"] > 0),
    ("committed", 2, lambda info: True),
)


def kill_once(marker_dir: str, event: str, info: dict[str, Any]) -> None:
    for name, unit, condition in KILLS:
        if event == name and info["unit"] == unit and condition(info):
            try:
                fd = os.open(Path(marker_dir) / f"{name}-u{unit}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # killed once already: this is Ray's retry
            os.write(fd, f"{info}\n".encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
