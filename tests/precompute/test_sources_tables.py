"""Generic tables (jsonl, parquet, csv, tsv) and HF datasets, offline, from small temp files."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from precompute.sources import Source, SourceOptions, TableSource, parse_source, resolve_layout, text_id
from precompute.sources.errors import BadSourceError
from tests.precompute.test_sources_contract import SourceContract

TRIPLETS = {
    "anchor": ["what is ddx", "what is a teacher"],
    "positive": ["ddx distils retrievers.", "A large embedding model."],
    "negative": ["A medical term.", "A school job."],
}


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class TestJsonlTriplets(SourceContract):
    n_queries, n_passages = 2, 4  # the rows share a negative; row 1 repeats its positive as a negative

    @pytest.fixture
    def source(self, tmp_path: Path) -> Source:
        rows = [
            {"question": "q one", "answer": "p one", "negatives": ["n shared", "n one", "p one"]},
            {"question": "q two", "answer": "p two", "negatives": ["n shared"], "extra": 1},
        ]
        return parse_source(f"jsonl:{jsonl(tmp_path / 'pairs.jsonl', rows)}?query=question&positive=answer")

    def test_layout_and_examples(self, source: TableSource) -> None:
        layout = source.layouts["train"]
        assert (layout.kind, layout.negatives) == ("pairs", ("negatives",))
        first = next(iter(source.training_examples()))
        assert first.query_id == text_id("query", "q one")
        assert first.negative_ids == (text_id("passage", "n shared"), text_id("passage", "n one"))  # positive left out
        assert source.qrels() == {
            text_id("query", "q one"): {text_id("passage", "p one"): 1},
            text_id("query", "q two"): {text_id("passage", "p two"): 1},
        }


class TestCsvWideNegatives(SourceContract):
    n_queries, n_passages = 2, 5

    @pytest.fixture
    def source(self, tmp_path: Path) -> Source:
        text = (
            "query,positive,negative_1,negative_2\r\n"
            'q1,"a passage, with a comma","a ""quoted"" one",n2\r\n'
            'q2,"two\nlines",n3,\r\n'
        )
        (tmp_path / "train.csv").write_text(text, encoding="utf-8", newline="")
        return parse_source(f"csv:{tmp_path / 'train.csv'}")

    def test_quoted_csv_is_parsed(self, source: Source, texts: list) -> None:
        passages = [r.text for r in texts if r.role == "passage"]
        assert passages == ["a passage, with a comma", 'a "quoted" one', "n2", "two\nlines", "n3"]
        assert texts[-1].origin.endswith("train.csv:4")  # the row that spans lines 3-4 ends on line 4

    def test_empty_negative_cells_are_absent_negatives(self, source: Source) -> None:
        assert [len(e.negative_ids) for e in source.training_examples()] == [2, 1]

    def test_empty_positive_is_rejected(self, tmp_path: Path) -> None:
        (tmp_path / "p.csv").write_text("query,positive\nq1,\n")
        with pytest.raises(BadSourceError, match=r"p\.csv:2: empty or missing positive in column 'positive'"):
            list(parse_source(f"csv:{tmp_path / 'p.csv'}").iter_texts())


class TestTsvCorpus(SourceContract):
    n_passages, n_queries = 3, 0

    @pytest.fixture
    def source(self, tmp_path: Path) -> Source:
        lines = ["docid\ttitle\tbody", '1\t\t"Unclosed quote', '2\tT\tsays "hi"', "3\t\tplain "]
        (tmp_path / "docs.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return parse_source(f"tsv:{tmp_path / 'docs.tsv'}?text=body")

    def test_quotes_are_text(self, texts: list) -> None:
        assert [(r.id, r.text) for r in texts] == [("1", '"Unclosed quote'), ("2", 'T says "hi"'), ("3", "plain")]

    def test_no_splits_for_a_corpus(self, source: Source) -> None:
        assert source.splits() == [] and source.qrels() == {} and list(source.training_examples()) == []


class TestParquetCorpusAndQrels(SourceContract):
    n_passages, n_queries = 2, 0

    @pytest.fixture
    def source(self, tmp_path: Path) -> Source:
        table = pa.table({"_id": [1, 2], "title": ["A", None], "text": ["alpha", "beta"], "vec": [[0.1], [0.2]]})
        pq.write_table(table, tmp_path / "corpus.parquet")
        return parse_source(f"parquet:{tmp_path / 'corpus.parquet'}")

    def test_ids_are_strings_and_titles_joined(self, texts: list) -> None:
        assert [(r.id, r.text, r.origin.rsplit("/", 1)[1]) for r in texts] == [
            ("1", "A alpha", "corpus.parquet[row 0]"),
            ("2", "beta", "corpus.parquet[row 1]"),
        ]

    def test_qrels_table(self, tmp_path: Path) -> None:
        (tmp_path / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\t1\t2\nq1\t2\t0\nq2\t2\t1\n")
        src = parse_source(f"tsv:{tmp_path / 'test.tsv'}")
        assert src.splits() == ["test"] and list(src.iter_texts()) == []
        assert src.qrels("test") == {"q1": {"1": 2, "2": 0}, "q2": {"2": 1}}
        assert [(e.query_id, e.positive_ids) for e in src.training_examples()] == [("q1", ("1",)), ("q2", ("2",))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict of triplets (train: 2 rows, test: 1) written with save_to_disk."""
    path = tmp_path_factory.mktemp("hf") / "triplets"
    train = datasets.Dataset.from_dict(TRIPLETS)
    datasets.DatasetDict({"train": train, "test": train.select([1])}).save_to_disk(str(path))
    return path


class TestHFSavedToDisk(SourceContract):
    n_queries, n_passages = 2, 4

    @pytest.fixture
    def source(self, saved: Path) -> Source:
        return parse_source(f"hf:{saved}")

    def test_splits_and_layout(self, source: TableSource) -> None:
        assert source.splits() == ["test", "train"]
        assert source.layouts["train"].columns == {"query": "anchor", "positive": "positive"}
        assert [e.query_id for e in source.training_examples("test")] == [text_id("query", "what is a teacher")]

    def test_origin_names_dataset_split_and_row(self, source: Source, saved: Path) -> None:
        assert [r.origin for r in source.iter_texts("query")] == [f"{saved}[train]:0", f"{saved}[train]:1"]

    def test_one_split_by_name(self, saved: Path) -> None:
        assert parse_source(f"hf:{saved}:test").splits() == ["test"]


class TestHFDataFiles:
    def test_parquet_file_with_mapped_columns(self, tmp_path: Path) -> None:
        datasets.Dataset.from_dict({"doc": ["d1"], "body": ["text one"]}).to_parquet(str(tmp_path / "c.parquet"))
        src = parse_source(f"hf:{tmp_path / 'c.parquet'}", SourceOptions(columns={"id": "doc", "text": "body"}))
        assert [(r.id, r.text, r.role) for r in src.iter_texts()] == [("d1", "text one", "passage")]

    def test_queries_split_reads_id_text_as_queries(self, tmp_path: Path) -> None:
        queries = datasets.Dataset.from_dict({"_id": ["q1"], "title": [""], "text": ["a question"]})
        datasets.DatasetDict({"queries": queries}).save_to_disk(str(tmp_path / "beir"))
        assert [r.role for r in parse_source(f"hf:{tmp_path / 'beir'}").iter_texts()] == ["query"]

    def test_not_in_offline_cache(self, monkeypatch: pytest.MonkeyPatch) -> None:
        # datasets and huggingface_hub read the offline flag once, at import, which may precede the conftest's env
        import huggingface_hub.constants

        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        with pytest.raises(
            BadSourceError, match=r"'nobody/no-such-set' split 'train' is not in the local cache and the hub is offline"
        ):
            parse_source("hf:nobody/no-such-set:train")


class TestLayoutErrors:
    def test_unknown_layout_lists_columns_and_fix(self, tmp_path: Path) -> None:
        path = jsonl(tmp_path / "x.jsonl", [{"foo": 1, "bar": "b"}])
        with pytest.raises(BadSourceError, match=r"columns \['foo', 'bar'\]\. Name the columns on the spec, e\.g\."):
            parse_source(f"jsonl:{path}")

    def test_mapping_to_a_missing_column(self, tmp_path: Path) -> None:
        path = jsonl(tmp_path / "x.jsonl", [{"query": "q", "positive": "p"}])
        with pytest.raises(
            BadSourceError, match=r"has no column\(s\) \['question'\]; its columns are \['query', 'positive'\]"
        ):
            parse_source(f"jsonl:{path}?query=question")

    def test_unknown_field(self) -> None:
        with pytest.raises(BadSourceError, match=r"Unknown column field\(s\) \['body'\]"):
            resolve_layout(["text"], {"body": "text"}, where="x")

    def test_forced_layout(self, tmp_path: Path) -> None:
        path = jsonl(tmp_path / "x.jsonl", [{"id": "q1", "text": "a question"}])
        assert next(parse_source(f"jsonl:{path}?layout=queries").iter_texts()).role == "query"
        with pytest.raises(BadSourceError, match=r"Unknown layout 'query'.*layouts are \['corpus', 'queries'"):
            parse_source(f"jsonl:{path}?layout=query")
        with pytest.raises(BadSourceError, match=r"read as pairs needs field\(s\) \['query', 'positive'\]"):
            parse_source(f"jsonl:{path}?layout=pairs")

    def test_split_parameter_names_the_table(self, tmp_path: Path) -> None:
        path = jsonl(tmp_path / "x.jsonl", [{"query": "q", "positive": "p"}])
        assert parse_source(f"jsonl:{path}?split=dev").splits() == ["dev"]

    def test_folder_given_for_a_file(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"is a folder, but jsonl: expects a \.jsonl file"):
            parse_source(f"jsonl:{tmp_path}")

    def test_tsv_row_with_extra_field(self, tmp_path: Path) -> None:
        (tmp_path / "d.tsv").write_text("id\ttext\n1\tone\n2\ttwo\tthree\n")
        src = parse_source(f"tsv:{tmp_path / 'd.tsv'}")
        with pytest.raises(BadSourceError, match=r"d\.tsv:3: expected 2 tab-separated fields as in the header, got 3"):
            list(src.iter_texts())

    def test_not_parquet(self, tmp_path: Path) -> None:
        (tmp_path / "x.parquet").write_text("nope")
        with pytest.raises(BadSourceError, match=r"Cannot read parquet file '.*x\.parquet'"):
            parse_source(f"parquet:{tmp_path / 'x.parquet'}")

    def test_malformed_jsonl_line(self, tmp_path: Path) -> None:
        (tmp_path / "x.jsonl").write_text('{"text": "a"}\n{"text": \n{"text": "c"}\n')
        with pytest.raises(BadSourceError, match=r"x\.jsonl:2: malformed JSON"):
            list(parse_source(f"jsonl:{tmp_path / 'x.jsonl'}").iter_texts())
        src = parse_source(f"jsonl:{tmp_path / 'x.jsonl'}?skip_bad=1")
        assert [r.text for r in src.iter_texts()] == ["a", "c"] and len(src.bad) == 1
