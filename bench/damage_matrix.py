"""Print the store damage matrix (docs/integrity.md) from real runs: file kind x damage -> what each reader did.

Builds one tiny store (two committed format-3 segments of 10 and 6 rows in 4-row chunks, plus an
abandoned segment with two index parts), then for every file kind and every damage (a bit flipped at
10/50/90 % of the file and in its last byte, the file cut in half, the file deleted) copies the store,
damages the one file and runs every reader on the copy: ``TeacherStore.open``, ``get`` and ``get_rows``
of every committed key, a full ``iter_batches`` scan, ``verify_store``, ``ddx cache verify`` and
``ddx cache info``. The cases and their classification live in ``tests/storage/damage.py``, which
``tests/storage/test_damage_matrix.py`` asserts on; this script only prints them.

Exit status 0 when every case is ok (nothing wrong returned, no traceback, the damage reported).

Example:
    python bench/damage_matrix.py              # the Markdown table
    python bench/damage_matrix.py --json       # one object per case
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ is not installed: run from a checkout

from tests.storage.damage import markdown, matrix


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object per case instead of the table")
    args = p.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ddx-damage-") as work:
        outcomes = matrix(Path(work))
    if args.json:
        json.dump([{**dataclasses.asdict(o), "ok": o.ok} for o in outcomes], sys.stdout, indent=1)
        print()
    else:
        print(markdown(outcomes))
        bad = sum(not o.ok for o in outcomes)
        print(f"\n{len(outcomes)} cases, {bad} not ok, {time.perf_counter() - started:.1f} s")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
