"""Spec parsing, the package's public API, and the id ledger behind once-per-id streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import precompute.sources as sources
from precompute.sources import SOURCE_KINDS, BeirSource, SourceOptions, TextRecord, parse_source
from precompute.sources.errors import BadSourceError
from precompute.sources.hf import parse_hf_location
from precompute.sources.ledger import IdLedger, unique_records
from precompute.sources.registry import split_spec


def test_star_import_exports_exactly_the_public_api() -> None:
    namespace: dict = {}
    exec("from precompute.sources import *", namespace)  # raises if a name in __all__ does not resolve
    assert set(namespace) - {"__builtins__"} == set(sources.__all__)
    assert namespace["parse_source"] is parse_source and namespace["SOURCE_KINDS"] is SOURCE_KINDS


TWO_PASSAGES = [("1", "alpha"), ("2", "beta")]


def _table_rows() -> list[dict[str, str]]:
    return [{"_id": i, "text": t} for i, t in TWO_PASSAGES]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _text(path: Path, content: str) -> Path:
    path.write_text(content, encoding="utf-8")
    return path


def _beir(tmp: Path) -> Path:
    (tmp / "beir").mkdir()
    _write_jsonl(tmp / "beir" / "corpus.jsonl", [{**r, "title": ""} for r in _table_rows()])
    return tmp / "beir"


def _parquet(tmp: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(_table_rows()), tmp / "corpus.parquet")
    return tmp / "corpus.parquet"


def _hotpotqa(tmp: Path) -> Path:
    from tests.precompute.test_sources_hotpotqa import HF_ROW

    return _write_jsonl(tmp / "dev.jsonl", [HF_ROW])


# kind -> (writes a small input under tmp and returns its location, the (id, text, role) records it must yield;
# None: the format has its own ids and roles, checked in its own test module: here both roles must come back)
LOCATIONS = {
    "beir": (_beir, TWO_PASSAGES),
    "msmarco": (lambda tmp: _text(tmp / "collection.tsv", "1\talpha\n2\tbeta\n"), TWO_PASSAGES),
    "hotpotqa": (_hotpotqa, None),
    "nq": (lambda tmp: Path(__file__).parent / "source_fixtures" / "nq", None),
    "hf": (lambda tmp: _write_jsonl(tmp / "corpus.jsonl", _table_rows()), TWO_PASSAGES),
    "jsonl": (lambda tmp: _write_jsonl(tmp / "corpus.jsonl", _table_rows()), TWO_PASSAGES),
    "parquet": (_parquet, TWO_PASSAGES),
    "csv": (lambda tmp: _text(tmp / "corpus.csv", '_id,text\n1,alpha\n2,"beta"\n'), TWO_PASSAGES),
    "tsv": (lambda tmp: _text(tmp / "corpus.tsv", "_id\ttext\n1\talpha\n2\tbeta\n"), TWO_PASSAGES),
}


def test_every_registered_kind_has_a_case_here() -> None:
    assert set(SOURCE_KINDS) == set(LOCATIONS)


@pytest.mark.parametrize("kind", list(LOCATIONS))
def test_each_kind_opens_its_own_reader(kind: str, tmp_path: Path) -> None:
    """``parse_source("KIND:LOCATION")`` dispatches to the registered class, which reads the location."""
    write, expected = LOCATIONS[kind]
    source = parse_source(f"{kind}:{write(tmp_path)}")
    assert type(source) is SOURCE_KINDS[kind] and source.kind == kind
    records = [(r.id, r.text, r.role) for r in source.iter_texts()]
    if expected is None:
        assert {role for _, _, role in records} == {"query", "passage"}, records
    else:
        assert records == [(i, t, "passage") for i, t in expected]


def test_real_sources_open_by_spec(shared_data: Path) -> None:
    assert isinstance(parse_source(f"beir:{shared_data / 'scifact'}"), BeirSource)
    assert parse_source(f"msmarco:{shared_data / 'msmarco-triples-toy'}").name == "msmarco-triples-toy"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("beir:data/scifact", ("beir", "data/scifact", {})),
        (
            "jsonl:my.jsonl?query=question&positive=answer",
            ("jsonl", "my.jsonl", {"query": "question", "positive": "answer"}),
        ),
        ("jsonl:what?.jsonl", ("jsonl", "what?.jsonl", {})),  # a "?" without "=" is part of the path
        ("hf:a/b:c:train[:10]?layout=pairs", ("hf", "a/b:c:train[:10]", {"layout": "pairs"})),
        ("tsv:x.tsv?negative=n1,n2", ("tsv", "x.tsv", {"negative": "n1,n2"})),
    ],
)
def test_split_spec(spec: str, expected: tuple) -> None:
    assert split_spec(spec) == expected


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("sentence-transformers/natural-questions", ("sentence-transformers/natural-questions", None, None)),
        ("BeIR/scifact:corpus", ("BeIR/scifact", "corpus", None)),
        ("BeIR/scifact-qrels:test", ("BeIR/scifact-qrels", None, "test")),
        (
            "sentence-transformers/all-nli:triplet:train[:100]",
            ("sentence-transformers/all-nli", "triplet", "train[:100]"),
        ),
    ],
)
def test_parse_hf_location(location: str, expected: tuple) -> None:
    assert parse_hf_location(location) == expected


class TestSpecErrors:
    def test_unknown_kind_lists_the_kinds(self) -> None:
        with pytest.raises(
            BadSourceError, match=r"Unknown source kind 'bier'.*kinds are beir, msmarco, hotpotqa, nq, hf, jsonl"
        ):
            parse_source("bier:data/scifact")

    def test_no_kind(self) -> None:
        with pytest.raises(BadSourceError, match=r"Unknown source kind ''.*Write KIND:LOCATION"):
            parse_source("data/scifact")

    def test_no_location(self) -> None:
        with pytest.raises(BadSourceError, match=r"names no location; write beir:PATH"):
            parse_source("beir:")

    def test_columns_on_a_fixed_format(self) -> None:
        with pytest.raises(BadSourceError, match=r"beir: does not take parameter\(s\) \['query'\].*skip_bad"):
            parse_source("beir:x?query=q")

    def test_bad_flag_and_title_rule(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"skip_bad='maybe'.*write skip_bad=1 or skip_bad=0"):
            parse_source("beir:x?skip_bad=maybe")
        with pytest.raises(BadSourceError, match=r"title_join must contain '\{text\}'"):
            parse_source("beir:x?title_join=%7Btitle%7D")

    def test_params_override_shared_options(self, tmp_path: Path) -> None:
        (tmp_path / "c.jsonl").write_text('{"doc": "d1", "body": "b", "title": "T"}\n')
        shared = SourceOptions(columns={"id": "doc"}, title_join="{title}: {text}")
        src = parse_source(f"jsonl:{tmp_path / 'c.jsonl'}?text=body&skip_bad=yes", shared)
        assert src.options.columns == {"id": "doc", "text": "body"} and src.options.skip_bad
        assert [(r.id, r.text) for r in src.iter_texts()] == [("d1", "T: b")]


class FakeSource(BeirSource):
    def __init__(self, skip_bad: bool = False) -> None:  # no folder needed to receive rejects
        self.options, self.bad, self.spec = SourceOptions(skip_bad=skip_bad), [], "fake"


class TestLedger:
    def test_conflict_found_after_the_table_grew_names_both_origins(self) -> None:
        ledger = IdLedger()
        first = [TextRecord(str(i), f"t{i}", "passage", f"data/part-0001.jsonl:{i + 1}") for i in range(5)]
        assert len(list(ledger.admit(first, FakeSource()))) == 5
        grow = [TextRecord(f"g{i}", "g", "passage", f"g.tsv:{i + 1}") for i in range(5000)]
        assert len(list(ledger.admit(grow, FakeSource()))) == 5000  # the table grows: entries move
        again = [TextRecord("3", "t3", "passage", "b.tsv:1"), TextRecord("3", "other", "passage", "b.tsv:2")]
        with pytest.raises(
            BadSourceError, match=r"duplicate id '3' with different texts at data/part-0001\.jsonl:4 and b\.tsv:2"
        ):
            list(ledger.admit(again, FakeSource()))

    def test_roles_are_separate_id_spaces(self) -> None:
        records = [TextRecord("1", "a query", "query", "q:1"), TextRecord("1", "a passage", "passage", "c:1")]
        assert len(list(unique_records(records, FakeSource()))) == 2

    @pytest.mark.parametrize("origin", ["x.parquet[row 12]", "ds[train]:7", "no digits", "f:123456789012345"])
    def test_origins_round_trip(self, origin: str) -> None:
        ledger = IdLedger()
        assert ledger._decode(ledger._encode(origin)) == origin

    def test_many_ids_across_chunks(self) -> None:
        records = (TextRecord(str(i % 30_000), f"t{i % 30_000}", "passage", f"f:{i}") for i in range(60_000))
        source = FakeSource()
        assert sum(1 for _ in unique_records(records, source)) == 30_000 and source.bad == []
