"""What every source promises, as a suite each source's tests subclass (the zarr ``StoreTests`` pattern).

A subclass provides a ``source`` fixture and the counts it expects; the suite checks roles, ids,
streaming, role filtering, qrels types and that training examples point at texts the source yields.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from precompute.sources import Source, TextRecord


class SourceContract:
    """Base of the per-source suites; not collected itself (no ``Test`` prefix)."""

    n_passages: int = -1  # -1: not checked
    n_queries: int = -1
    examples_closed: bool = True  # every example id is among the source's texts

    @pytest.fixture
    def texts(self, source: Source) -> list[TextRecord]:
        return list(source.iter_texts())

    def test_counts(self, texts: list[TextRecord]) -> None:
        roles = Counter(r.role for r in texts)
        if self.n_passages >= 0:
            assert roles["passage"] == self.n_passages
        if self.n_queries >= 0:
            assert roles["query"] == self.n_queries

    def test_records_are_well_formed(self, texts: list[TextRecord]) -> None:
        for r in texts:
            assert r.role in ("query", "passage")
            assert isinstance(r.id, str) and r.id and r.id == r.id.strip()
            assert isinstance(r.text, str) and r.text.strip()
            assert not r.text.endswith(("\n", "\r"))
            assert r.origin

    def test_each_id_once_per_role(self, texts: list[TextRecord]) -> None:
        repeats = Counter((r.role, r.id) for r in texts)
        assert max(repeats.values(), default=1) == 1

    def test_streams_and_filters_by_role(self, source: Source, texts: list[TextRecord]) -> None:
        for role in ("query", "passage"):
            stream = source.iter_texts(role)
            assert isinstance(stream, Iterator) and not isinstance(stream, list | tuple)
            assert list(stream) == [r for r in texts if r.role == role]

    def test_unknown_role_is_refused(self, source: Source) -> None:
        with pytest.raises(ValueError, match="Unknown role 'doc'"):
            source.iter_texts("doc")

    def test_qrels_are_graded_ints(self, source: Source) -> None:
        for split in source.splits():
            for judged in source.qrels(split).values():
                assert all(isinstance(p, str) and type(g) is int for p, g in judged.items())

    def test_examples_point_at_texts(self, source: Source, texts: list[TextRecord]) -> None:
        queries = {r.id for r in texts if r.role == "query"}
        passages = {r.id for r in texts if r.role == "passage"}
        for split in source.splits():
            for ex in source.training_examples(split):
                assert ex.positive_ids and not set(ex.positive_ids) & set(ex.negative_ids)
                assert len(set(ex.negative_ids)) == len(ex.negative_ids)
                if self.examples_closed:
                    assert ex.query_id in queries
                    assert set(ex.positive_ids) | set(ex.negative_ids) <= passages

    def test_split_selection(self, source: Source) -> None:
        assert source.qrels("nope") == {} and list(source.training_examples("nope")) == []
        parts = [source.qrels(s) for s in source.splits()]
        merged = source.qrels()  # None: every split
        assert set(merged) == set().union(*parts)
        for qid, judged in merged.items():
            assert judged.keys() == set().union(*(p.get(qid, {}) for p in parts))
