"""tab_fields (polars) against the reference line reading: same fields whenever it answers, None otherwise."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import polars as pl
import pytest

from precompute.sources.reading import chunk_lines, iter_chunks
from precompute.sources.tab_lines import _BLANK, WHITESPACE, LineRejects, count_byte, tab_fields

# Pieces of MS MARCO-like text, the awkward ones included: quotes, inner \r, \x85, NUL, a BOM mid-line,
# non-breaking and other Unicode spaces, and \x1c (whitespace to str.isspace, not to Unicode).
PIECES = ["a", "1", "\r", "\x85", " ", '"', "'", "é", "日", "\x00", "\xa0", "\u2028", "\x1c", "\ufeff", '"a,b"', "xx"]


def _reference(chunk: bytes) -> tuple[list[tuple[int, list[str]]], list[tuple[int, str, str, str]]]:
    log = LineRejects()
    return [(n, line.split("\t")) for n, line in chunk_lines(chunk, 1, Path("f"), log)], log.items


def _messy_chunk(rng: random.Random, n_fields: int) -> bytes:
    lines = []
    for _ in range(rng.randint(1, 8)):
        fields = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 5))) for _ in range(n_fields)]
        fields = [rng.choice('a1"é日') + f if rng.random() < 0.95 else f for f in fields]  # mostly not blank
        if rng.random() < 0.1:
            fields.append("extra")
        lines.append("\t".join(fields) if rng.random() > 0.05 else "")
    text = "".join(line + rng.choice(["\n", "\r\n", "\r\r\n"]) for line in lines)
    data = (text.rstrip("\n") if rng.random() < 0.3 else text).encode("utf-8")
    return data.replace(b"1", b"\xff", 1) if rng.random() < 0.05 else data  # now and then, not UTF-8


@pytest.mark.parametrize("seed", range(3))
def test_polars_fields_equal_the_reference_split(seed: int) -> None:
    rng = random.Random(seed)
    answered = 0
    for _ in range(1500):
        n_fields = rng.choice([2, 3])
        chunk = _messy_chunk(rng, n_fields)
        columns = tab_fields(chunk, n_fields)
        if columns is None:
            continue
        answered += 1
        lines, rejects = _reference(chunk)
        rows = [list(row) for row in zip(*(c.to_list() for c in columns), strict=True)]
        assert rejects == []
        assert [n for n, _ in lines] == list(range(1, len(rows) + 1))  # row i is line i
        assert rows == [fields for _, fields in lines]
    assert answered > 400  # the fast path is exercised (about a third of the chunks), not only refused


@pytest.mark.parametrize(
    "chunk",
    [
        b"1\ta\n\n2\tb\n",  # a blank line: the reference skips it
        b"1\ta\tb\n",  # an extra field: text to the reference
        b"1\n",  # a missing field
        b"1\t \n",  # a blank field
        b"1\r\tx\n",  # polars would drop the \r ending a field
        b"\xef\xbb\xbf1\tx\n",  # polars would drop a BOM
        b"1\t\xff\n",  # not UTF-8
        b"",
    ],
)
def test_chunks_that_are_not_plain_are_refused(chunk: bytes) -> None:
    assert tab_fields(chunk, 2) is None


def is_blank(column: pl.Series) -> pl.Series:
    """Which strings tab_fields takes for blank (its ``_BLANK`` pattern): must be ``not s.strip()``."""
    return column.str.contains(_BLANK)


def test_blank_means_what_str_strip_means() -> None:
    assert "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace()) == WHITESPACE
    chars = [chr(c) for c in range(0x3100) if not 0xD800 <= c < 0xE000]
    assert is_blank(pl.Series(chars)).to_list() == [not c.strip() for c in chars]
    assert is_blank(pl.Series(["", " \x1c\u3000", " a "])).to_list() == [True, True, False]


def test_chunks_are_whole_lines_numbered_from_one(tmp_path: Path) -> None:
    path = tmp_path / "f.tsv"
    path.write_bytes(b"\xef\xbb\xbfa\tb\n" + b"c\td\n" * 5 + b"long line " * 10 + b"\nlast")
    chunks = list(iter_chunks(path, size=8))
    assert b"".join(c for _, c in chunks) == path.read_bytes()[3:]  # the BOM dropped, nothing else
    assert all(c.endswith(b"\n") for _, c in chunks[:-1])
    assert [first for first, _ in chunks] == [
        1 + sum(count_byte(c, b"\n") for _, c in chunks[:i]) for i in range(len(chunks))
    ]
