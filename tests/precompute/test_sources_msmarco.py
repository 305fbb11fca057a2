"""MS MARCO files: the real toy triples (exact counts, exact text) and hand-made files for every other layout."""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pytest

from precompute.sources import MsMarcoSource, Source, SourceOptions, parse_source, tab_lines, text_id
from precompute.sources import msmarco as msmarco_module
from precompute.sources import reading as reading_module
from precompute.sources.errors import BadSourceError
from precompute.sources.msmarco import classify_msmarco, group_triples
from storage.keys import content_keys
from tests.precompute.test_sources_contract import SourceContract

# Raw quotes as MS MARCO has them. A quote that opens a field makes quote-aware readers drop the
# quotes (line 0) or swallow the following lines into one field (line 1). Line 2 holds a lone \r,
# on which Python's text mode splits lines.
COLLECTION = (
    '0\t"Hello," he said, and left.\n'
    '1\t"Unclosed quote: a 6 inch pipe.\n'
    "2\tA carriage\rreturn inside, and a trailing space \n"
    '3\tThe "middle" quotes.\n'
    "4\tPlain passage.\n"
)


class TestTriplesToy(SourceContract):
    n_passages = 89 + 146  # the collection, plus the 100 positives and 46 distinct negatives of the triples
    n_queries = 100

    @pytest.fixture
    def source(self, shared_data: Path) -> Source:
        return parse_source(f"msmarco:{shared_data / 'msmarco-triples-toy'}")

    def test_files_are_recognised(self, source: MsMarcoSource) -> None:
        assert [(f.role, f.split, f.path.parent.name) for f in source.files] == [
            ("collection", "", "full_collection"),
            ("triples", "train", "triplets"),
        ]
        assert source.splits() == ["train"]

    def test_exactly_100_examples_and_89_collection_passages(self, source: Source, shared_data: Path) -> None:
        examples = list(source.training_examples("train"))
        assert len(examples) == 100
        assert all(len(e.positive_ids) == 1 and len(e.negative_ids) == 1 for e in examples)
        collection = [r for r in source.iter_texts("passage") if "full_collection" in r.origin]
        assert len(collection) == 89

    def test_collection_text_is_kept_exactly(self, source: Source, shared_data: Path) -> None:
        raw = (shared_data / "msmarco-triples-toy" / "full_collection" / "raw.tsv").read_text(encoding="utf-8")
        expected = {pid: text for pid, text in (line.split("\t", 1) for line in raw.split("\n") if line)}
        got = {r.id: r.text for r in source.iter_texts("passage") if "full_collection" in r.origin}
        assert got == expected
        assert sum("â" in t for t in got.values()) > 0  # the original mojibake survives

    def test_triple_ids_are_content_ids(self, source: Source, shared_data: Path) -> None:
        line = (shared_data / "msmarco-triples-toy" / "triplets" / "raw.tsv").open(encoding="utf-8").readline()
        query, pos, neg = line.rstrip("\n").split("\t")
        first = next(iter(source.training_examples("train")))
        assert first.query_id == text_id("query", query)
        assert first.positive_ids == (text_id("passage", pos),)
        assert first.negative_ids == (text_id("passage", neg),)

    def test_a_single_file_is_a_source(self, shared_data: Path) -> None:
        src = parse_source(f"msmarco:{shared_data / 'msmarco-triples-toy' / 'triplets' / 'raw.tsv'}")
        assert sum(1 for _ in src.training_examples()) == 100
        assert sum(1 for _ in src.iter_texts("query")) == 100


@pytest.fixture
def marco(tmp_path: Path) -> Path:
    """A hand-made MS MARCO folder with every recognised file kind."""
    root = tmp_path / "marco"
    root.mkdir()
    (root / "collection.tsv").write_text(COLLECTION, encoding="utf-8", newline="")
    (root / "queries.train.tsv").write_text("10\twhat is a pipe\n11\twho said hello\n", encoding="utf-8")
    (root / "queries.dev.small.tsv").write_text("20\twhat is quoted\n", encoding="utf-8")
    (root / "qrels.train.tsv").write_text("10\t0\t1\t1\n11\t0\t0\t1\n", encoding="utf-8")
    (root / "qrels.dev.small.tsv").write_text("20 0 3 1\n20 0 4 0\n", encoding="utf-8")  # TREC, spaces
    with gzip.open(root / "qidpidtriples.train.full.tsv.gz", "wt") as f:
        f.write("10\t1\t4\n10\t1\t2\n10\t1\t4\n11\t0\t2\n10\t1\t3\n")
    hard = [{"qid": 11, "pos": [0], "neg": {"bm25": [2, 0, 4], "ance": [4, 3]}}]
    with gzip.open(root / "msmarco-hard-negatives.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(h) + "\n" for h in hard))
    (root / "README.txt").write_text("not a data file\n")
    return root


class TestHandMadeMarco(SourceContract):
    n_passages, n_queries = 5, 3

    @pytest.fixture
    def source(self, marco: Path) -> Source:
        return parse_source(f"msmarco:{marco}")

    def test_raw_quotes_never_merge_or_drop_rows(self, source: Source) -> None:
        got = [(r.id, r.text) for r in source.iter_texts("passage")]
        expected = [tuple(line.split("\t", 1)) for line in COLLECTION.split("\n") if line]
        assert got == expected
        assert got[0][1] == '"Hello," he said, and left.'
        assert got[2][1] == "A carriage\rreturn inside, and a trailing space "
        # the trap is real: the csv module reads the same bytes as other texts and fewer rows
        rows = list(csv.reader(io.StringIO(COLLECTION, newline=""), delimiter="\t"))
        assert rows[0] == ["0", "Hello, he said, and left."]
        assert len(rows) == 3 and rows[1][1].startswith("Unclosed quote: a 6 inch pipe.\n2\t")  # lines 1-3 merged

    def test_splits_keep_their_dots(self, source: Source) -> None:
        assert source.splits() == ["dev.small", "train"]
        assert source.qrels("dev.small") == {"20": {"3": 1, "4": 0}}
        assert source.qrels("train") == {"10": {"1": 1}, "11": {"0": 1}}

    def test_training_files_win_over_qrels(self, source: Source) -> None:
        examples = [(e.query_id, e.positive_ids, e.negative_ids) for e in source.training_examples("train")]
        assert examples == [
            ("10", ("1",), ("4", "2")),  # consecutive lines of one (query, positive) merge, deduped
            ("11", ("0",), ("2",)),
            ("10", ("1",), ("3",)),  # not consecutive: a new example (streaming, constant memory)
            ("11", ("0",), ("2", "4", "3")),  # hard negatives: systems unioned in order, positive excluded
        ]

    def test_qrels_give_examples_when_no_training_file(self, source: Source) -> None:
        assert [(e.query_id, e.positive_ids) for e in source.training_examples("dev.small")] == [("20", ("3",))]

    def test_iter_texts_is_lazy(self, tmp_path: Path) -> None:
        lines = [f"{i}\tpassage {i}\n" for i in range(10_000)]
        lines[9_000] = "no tab here\n"
        (tmp_path / "collection.tsv").write_text("".join(lines))
        stream = parse_source(f"msmarco:{tmp_path / 'collection.tsv'}").iter_texts()
        assert next(stream).text == "passage 0"  # the bad line far ahead is not read yet
        with pytest.raises(BadSourceError, match=r"collection\.tsv:9001: expected 'id<TAB>text', found no tab"):
            list(stream)


def test_classify_by_name() -> None:
    cases = {
        "collection.tsv.gz": ("collection", ""),
        "full_collection/raw.tsv": ("collection", ""),
        "queries.tsv": ("queries", ""),
        "triples.train.small.tsv": ("triples", "train"),
        "triplets/raw.tsv": ("triples", "train"),
        "qidpidtriples.train.full.2.tsv": ("id_triples", "train"),
        "qrels.dev.tsv": ("qrels", "dev"),
        "qrels.tsv": ("qrels", "all"),
        "qrels/test.tsv": ("qrels", "test"),
        "2019qrels-pass.txt": ("qrels", "2019qrels-pass"),
        "msmarco-hard-negatives.jsonl.gz": ("hard_negatives", "train"),
    }
    for name, expected in cases.items():
        found = classify_msmarco(Path("/x") / name)
        assert found is not None and (found.role, found.split) == expected, name
    assert classify_msmarco(Path("/x/notes.tsv")) is None


def test_group_triples_merges_only_consecutive_runs() -> None:
    examples = list(group_triples([("q", "p", "a"), ("q", "p", "b"), ("q", "r", "a"), ("q", "p", "c")]))
    assert [(e.positive_ids, e.negative_ids) for e in examples] == [
        (("p",), ("a", "b")),
        (("r",), ("a",)),
        (("p",), ("c",)),
    ]


class TestMarcoErrors:
    def test_missing_path(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"No such file or folder '.*gone'.*msmarco: expects"):
            parse_source(f"msmarco:{tmp_path / 'gone'}")

    def test_unrecognised_file(self, tmp_path: Path) -> None:
        (tmp_path / "notes.tsv").write_text("a\tb\n")
        with pytest.raises(BadSourceError, match=r"Cannot tell what MS MARCO file .*notes\.tsv.*tsv:PATH"):
            parse_source(f"msmarco:{tmp_path / 'notes.tsv'}")

    def test_folder_without_marco_files(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("x")
        with pytest.raises(BadSourceError, match="No MS MARCO files found under"):
            parse_source(f"msmarco:{tmp_path}")

    def test_triple_with_two_fields(self, tmp_path: Path) -> None:
        (tmp_path / "triples.train.tsv").write_text("q\tp\tn\nq\tonly two\n")
        src = MsMarcoSource("msmarco:t", str(tmp_path / "triples.train.tsv"), SourceOptions(skip_bad=True))
        assert len(list(src.training_examples())) == 1
        assert src.bad == [
            f"{tmp_path / 'triples.train.tsv'}:2: expected 3 tab-separated fields (query, positive, negative), got 2"
        ]

    def test_empty_passage_and_duplicate_pid(self, tmp_path: Path) -> None:
        (tmp_path / "collection.tsv").write_text("1\tone\n2\t \n1\tuno\n")
        src = parse_source(f"msmarco:{tmp_path}?skip_bad=1")
        assert [r.id for r in src.iter_texts()] == ["1"]
        assert src.bad[0].endswith("collection.tsv:2: empty text for id '2'")
        assert "duplicate id '1' with different texts at" in src.bad[1] and src.bad[1].endswith("collection.tsv:3")

    def test_damaged_gzip_names_the_file(self, tmp_path: Path) -> None:
        (tmp_path / "collection.tsv.gz").write_bytes(b"not gzip at all")
        with pytest.raises(BadSourceError, match=r"Cannot read '.*collection\.tsv\.gz'"):
            list(parse_source(f"msmarco:{tmp_path}").iter_texts())


# --- columns: the polars reading and the reference reading agree, record for record ------------------------------
MESSY = (
    '0\t"Hello," he said, and left.\n'
    "1\tcafé, naïve, 東京, mojibake â€™ kept\n"
    "2\tinner\rcarriage return and \x85 next line, kept\r\n"  # CRLF: the \r\n goes, the inner \r stays
    '3\t"Unclosed quote: a 6" pipe.\n'
    "4\ta tab\tinside the text\n"  # an extra tab is text (not plain: read line by line)
    "  5 \t  padded id, text kept with its spaces  \n"
    "\n"
    "6\tlast line without a newline"
)


def _records(path: Path, **options: object) -> list[tuple[str, str, str, str]]:
    src = MsMarcoSource("msmarco:x", str(path), SourceOptions(**options))  # type: ignore[arg-type]
    return [(r.id, r.text, r.role, r.origin) for r in src.iter_texts()]


def _reference(text: str) -> list[tuple[str, str]]:
    """The old line-by-line reading: split on \\n only, one \\r stripped, blank lines skipped, first tab splits."""
    out = []
    for line in text.split("\n"):
        line = line[:-1] if line.endswith("\r") else line
        if line.strip():
            rid, _, rest = line.partition("\t")
            out.append((rid.strip(), rest))
    return out


@pytest.mark.parametrize("chunk_bytes", [8 << 20, 64, 7])
def test_columns_keep_quotes_cr_x85_and_unicode_exactly(tmp_path: Path, monkeypatch, chunk_bytes: int) -> None:
    monkeypatch.setattr(reading_module, "CHUNK_BYTES", chunk_bytes)  # many chunks: line numbers carry over
    (tmp_path / "collection.tsv").write_bytes(MESSY.encode("utf-8"))
    got = _records(tmp_path / "collection.tsv")
    assert [(i, t) for i, t, _, _ in got] == _reference(MESSY)
    lines = [n for n, line in enumerate(MESSY.split("\n"), 1) if line.strip()]
    assert [o for *_, o in got] == [f"{tmp_path / 'collection.tsv'}:{n}" for n in lines]
    assert got[2][1] == "inner\rcarriage return and \x85 next line, kept"


def test_polars_and_line_by_line_readings_agree(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    """Every record and key is the same whether polars splits the chunk or the reference reads it line by line."""
    collection = shared_data / "msmarco-triples-toy" / "full_collection" / "raw.tsv"
    assert tab_lines.tab_fields(collection.read_bytes(), 2) is not None  # the toy (with mojibake) is plain
    (tmp_path / "collection.tsv").write_bytes(collection.read_bytes() + MESSY.encode())
    fast = _records(tmp_path / "collection.tsv", skip_bad=True)
    fast_blocks = list(MsMarcoSource("m", str(tmp_path), SourceOptions(skip_bad=True)).iter_text_blocks())
    monkeypatch.setattr(msmarco_module, "tab_fields", lambda chunk, n: None)
    assert _records(tmp_path / "collection.tsv", skip_bad=True) == fast
    slow_blocks = list(MsMarcoSource("m", str(tmp_path), SourceOptions(skip_bad=True)).iter_text_blocks())
    assert np.array_equal(
        np.concatenate([b.keys() for b in fast_blocks]), np.concatenate([b.keys() for b in slow_blocks])
    )
    assert np.array_equal(fast_blocks[0].keys(), content_keys("passage", fast_blocks[0].texts))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("7 no tab here", r"collection\.tsv:3: expected 'id<TAB>text', found no tab in '7 no tab here'"),
        ("\t a text without id", r"collection\.tsv:3: empty id"),
        ("8\t  ", r"collection\.tsv:3: empty text for id '8'"),
        ("9\tbad \udcff byte", r"collection\.tsv:3: not valid UTF-8 \(invalid start byte at byte 6\)"),
        ("1\tanother text for id 1", r"collection\.tsv:3: duplicate id '1' with different texts at .*:1 and .*:3"),
    ],
)
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    raw = f"1\tone\n2\ttwo\n{line}\n4\tfour\n".encode("utf-8", "surrogateescape")
    (tmp_path / "collection.tsv").write_bytes(raw)
    stream = parse_source(f"msmarco:{tmp_path}").iter_texts()
    assert [next(stream).id, next(stream).id] == ["1", "2"]  # the lines before the bad one come first
    with pytest.raises(BadSourceError, match=message) as err:
        list(stream)
    assert "\n" not in str(err.value)
    skipped = parse_source(f"msmarco:{tmp_path}?skip_bad=1")
    assert [r.id for r in skipped.iter_texts()] == ["1", "2", "4"] and len(skipped.bad) == 1


def test_blocks_are_the_records_as_columns(marco: Path) -> None:
    source = parse_source(f"msmarco:{marco}")
    blocks = list(source.iter_text_blocks())
    assert [r for b in blocks for r in b.records()] == list(source.iter_texts())
    assert {b.role for b in blocks} == {"passage", "query"}
    for b in blocks:
        assert np.array_equal(b.keys(), content_keys(b.role, b.texts))
    with pytest.raises(ValueError, match="Unknown role 'doc'"):
        source.iter_text_blocks("doc")


def test_text_triples_give_each_text_once_with_its_content_id(tmp_path: Path) -> None:
    lines = ["q1\tp1\tn1", "q1\tp1\tn2", "q2\tn1\tp1", "q1\tp2\tq1"]  # repeats within and across roles
    (tmp_path / "triples.train.tsv").write_text("\n".join(lines) + "\n")
    source = parse_source(f"msmarco:{tmp_path}")
    got = [(r.role, r.text, r.origin.rsplit(":", 1)[1]) for r in source.iter_texts()]
    queries = [("query", "q1", "1"), ("query", "q2", "3")]
    passages = [("passage", "p1", "1"), ("passage", "n1", "1"), ("passage", "n2", "2"), ("passage", "p2", "4")]
    passages.append(("passage", "q1", "4"))  # a query's text as a passage: another role, another id
    assert sorted(got) == sorted(queries + passages)
    assert [g for g in got if g[0] == "passage"] == passages  # file order within a role
    assert all(r.id == text_id(r.role, r.text) for r in source.iter_texts())
