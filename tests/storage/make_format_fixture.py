"""Write ``format_v<N>_store/``: a tiny committed store of the current format version N.

Run once per released format, from the repository root, and commit the folder it writes:

    python tests/storage/make_format_fixture.py

It refuses to overwrite a version's store: each stands for stores users already have, and
``test_format_v<N>.py`` checks that today's code still opens it and returns these vectors.

The rule (number 10 of the project's style guide, ``../shared/STYLE.md`` beside this repository, not in it):
once the store format is released, keep a tiny committed store of each format version and test that it opens.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from storage import FORMAT_VERSION, TeacherSpec, TeacherStore, content_keys, role_code

HERE = Path(__file__).resolve().parent
TARGET = HERE / f"format_v{FORMAT_VERSION}_store"

SPEC = TeacherSpec(
    model="fixture/tiny-teacher",
    weights_id="hub:fixture/tiny-teacher@0000000000000000000000000000000000000001",
    pooling="lasttoken",
    normalize=False,
    max_seq_length=32,
    dim=4,
    query_prompt="Query: ",
    padding_side="left",
)

# (role, text, vector): two segments of 4-row chunks; "shared" is in both, with the same vector
SEGMENT_A = [
    ("passage", "The cat sat on the mat.", [1.0, 0.5, -1.0, 0.25]),
    ("passage", "Zarr stores chunked arrays.", [2.0, -0.5, 0.0, 8.0]),
    ("query", "what do cats sit on", [-3.0, 1.5, 0.125, 0.0]),
    ("passage", "shared", [0.75, 0.75, -0.75, -0.75]),
    ("query", "ends with a NUL?\x00", [100.0, -100.0, 0.5, 1.0]),
]
SEGMENT_B = [
    ("passage", "shared", [0.75, 0.75, -0.75, -0.75]),
    ("query", "The cat sat on the mat.", [4.0, 4.0, 4.0, 4.0]),  # same text as a passage: another key
    ("passage", "Ünïcödé — 漢字", [-0.25, 0.0, 0.0, 65504.0]),
]


def write_segment(store: TeacherStore, rows: list[tuple[str, str, list[float]]]) -> None:
    roles = np.array([role_code(r) for r, _, _ in rows], dtype=np.uint8)
    keys = content_keys([r for r, _, _ in rows], [t for _, t, _ in rows])
    vectors = np.array([v for _, _, v in rows], dtype=np.float16)
    with store.writer(chunk_rows=4) as w:
        w.append(keys, vectors, roles, np.arange(1, len(rows) + 1, dtype=np.int32))


def main() -> int:
    if TARGET.exists():
        print(f"{TARGET} exists: a released format's store is never regenerated.")
        return 1
    store = TeacherStore.create(TARGET, SPEC, dtype="float16")
    write_segment(store, SEGMENT_A)
    write_segment(store, SEGMENT_B)
    size = sum(p.stat().st_size for p in TARGET.rglob("*") if p.is_file())
    print(f"wrote {TARGET} ({size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
