"""load_eval_set holds the corpus as columns (ids, keys) and streams its texts back in order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from distill.evaluate.inputs import load_eval_set
from precompute.sources import parse_source
from precompute.sources.errors import BadSourceError
from storage.errors import DdxError
from storage.keys import content_keys

PASSAGES = ["0\tzero", '1\t"one" quoted', "2\tdeux, café", "3\tthree", "4\tfour"]


@pytest.fixture
def marco(tmp_path: Path) -> Path:
    (tmp_path / "collection.tsv").write_text("\n".join(PASSAGES) + "\n", encoding="utf-8")
    (tmp_path / "queries.dev.tsv").write_text("10\tfirst\n11\tsecond\n12\tthird\n")
    (tmp_path / "qrels.dev.tsv").write_text("10 0 1 1\n11 0 3 0\n12 0 4 2\n13 0 2 1\n")  # 11: no positive; 13: no query
    return tmp_path


def test_corpus_is_columns_in_file_order(marco: Path) -> None:
    es = load_eval_set(parse_source(f"msmarco:{marco}"), "dev", strict=True)
    texts = [line.split("\t", 1)[1] for line in PASSAGES]
    assert isinstance(es.doc_ids, np.ndarray) and es.doc_ids.tolist() == ["0", "1", "2", "3", "4"]
    assert np.array_equal(es.doc_keys, content_keys("passage", texts))
    assert list(es.doc_text_blocks(size=2)) == [texts[:2], texts[2:4], texts[4:]]
    assert es.doc_texts == texts
    assert es.query_ids == ["10", "12"] and es.query_texts == ["first", "third"]
    assert set(es.qrels) == {"10", "12"}
    assert es.notes == [f"msmarco:{marco}: excluded 1 queries without a positive judgment and 1 judged query ids "
                        "absent from the queries file"]  # fmt: skip


def test_a_corpus_changed_after_loading_is_refused(marco: Path) -> None:
    es = load_eval_set(parse_source(f"msmarco:{marco}"), "dev", strict=True)
    (marco / "collection.tsv").write_text("\n".join([*PASSAGES[:4], "4\tfour, edited"]) + "\n")
    with pytest.raises(DdxError, match="the corpus changed while it was evaluated"):
        list(es.doc_text_blocks())


def test_unknown_judged_documents(marco: Path) -> None:
    (marco / "qrels.dev.tsv").write_text("10 0 1 1\n10 0 99 1\n")
    with pytest.raises(BadSourceError, match="1 judged document ids are not in the corpus; drop --strict"):
        load_eval_set(parse_source(f"msmarco:{marco}"), "dev", strict=True)
    with pytest.warns(UserWarning, match="1 judged document ids are not in the corpus"):
        es = load_eval_set(parse_source(f"msmarco:{marco}"), "dev", strict=False)
    assert len(es.doc_ids) == 5


class CountedId(str):
    """A query id that counts how often it is hashed (every set or dict lookup and insert hashes it)."""

    hashes = 0

    def __hash__(self) -> int:
        CountedId.hashes += 1
        return str.__hash__(self)


class ManyQueries:
    """A source with ``n`` judged queries, every other one without a positive judgment, and a one-passage corpus."""

    spec = name = "many"

    def __init__(self, n: int) -> None:
        self.ids = [CountedId(f"q{i}") for i in range(n)]

    def qrels(self, split: str) -> dict[str, dict[str, int]]:
        return {q: {"d0": i % 2} for i, q in enumerate(self.ids)}

    def iter_texts(self, role: str) -> Iterator[SimpleNamespace]:
        return (SimpleNamespace(id=q, text=f"text of {q}") for q in self.ids)

    def iter_text_blocks(self, role: str) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(ids=["d0"], keys=lambda: content_keys("passage", ["zero"]))


def test_query_selection_is_linear() -> None:
    """Excluding the unjudged queries hashes each id a bounded number of times (a set rebuilt per query: n²/2)."""
    n = 2_000
    source = ManyQueries(n)
    CountedId.hashes = 0
    es = load_eval_set(source, "dev", strict=True)  # type: ignore[arg-type]
    assert es.query_ids == source.ids[1::2]
    assert CountedId.hashes <= 20 * n
