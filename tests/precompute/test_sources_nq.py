"""NQ in DPR's layout, from the hand-made files in source_fixtures/nq (no NQ data is on disk)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from precompute.sources import NQSource, Source, SourceOptions, parse_source, text_id
from precompute.sources.errors import BadSourceError
from tests.precompute.test_sources_contract import SourceContract

FIXTURES = Path(__file__).parent / "source_fixtures" / "nq"
DEV_Q1 = "who sings does he love me with reba"


class TestNQFolder(SourceContract):
    # dev: 2 questions, passages 11828866, 789, 5; train: 1 question, passages 100, 101 and one without id
    n_queries, n_passages = 3, 6

    @pytest.fixture
    def source(self) -> Source:
        return parse_source(f"nq:{FIXTURES}")

    def test_splits_from_file_names(self, source: Source) -> None:
        assert source.splits() == ["dev", "train"]

    def test_dev_examples(self, source: Source) -> None:
        examples = list(source.training_examples("dev"))  # the question without a positive gives none
        assert [(e.query_id, e.positive_ids, e.negative_ids) for e in examples] == [
            (text_id("query", DEV_Q1), ("11828866",), ("5", "789"))  # hard negatives first, deduped
        ]
        assert source.qrels("dev") == {text_id("query", DEV_Q1): {"11828866": 1}}

    def test_train_examples_use_given_ids_and_exclude_positives(self, source: Source) -> None:
        (example,) = source.training_examples("train")
        no_id = text_id("passage", "France France's capital is Paris.")
        assert example == type(example)("train-7", ("100", no_id), ("101",))

    def test_titles_are_joined(self, source: Source) -> None:
        texts = {r.id: r.text for r in source.iter_texts("passage")}
        assert (
            texts["5"] == "Linda Davis Linda Kaye Davis (born November 26, 1962) is an American country music singer."
        )
        assert texts["11828866"].startswith('Does He Love You "Does He Love You" is a song')


class TestNQSingleFile(SourceContract):
    n_queries, n_passages = 2, 3

    @pytest.fixture
    def source(self) -> Source:
        return NQSource("nq:dev", str(FIXTURES / "biencoder-nq-dev.json"), SourceOptions())

    def test_the_only_split_needs_no_name(self, source: Source) -> None:
        assert len(list(source.training_examples())) == 1


class TestNQErrors:
    def test_missing_path(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"No such file or folder .*nq: expects a DPR-style NQ file"):
            parse_source(f"nq:{tmp_path / 'nq-train.json'}")

    def test_not_json(self, tmp_path: Path) -> None:
        (tmp_path / "nq-dev.json").write_text('[{"question": "a"}, oops]')
        with pytest.raises(BadSourceError, match=r"Cannot parse '.*nq-dev\.json' as JSON"):
            list(parse_source(f"nq:{tmp_path}").iter_texts())

    def test_duplicate_passage_id_with_other_text(self, tmp_path: Path) -> None:
        rows = [
            {"question": "q1", "positive_ctxs": [{"title": "", "text": "one", "passage_id": "7"}]},
            {"question": "q2", "positive_ctxs": [{"title": "", "text": "two", "passage_id": "7"}]},
        ]
        (tmp_path / "nq-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(BadSourceError, match=r"duplicate id '7' with different texts at .*jsonl:1 and .*jsonl:2"):
            list(parse_source(f"nq:{tmp_path}").iter_texts())

    def test_bad_records_counted_under_skip_bad(self, tmp_path: Path) -> None:
        rows = [{"question": " "}, {"question": "q", "positive_ctxs": [{"title": "t"}, {"title": "", "text": " "}]}]
        (tmp_path / "nq-train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        src = parse_source(f"nq:{tmp_path}?skip_bad=true")
        assert [r.text for r in src.iter_texts()] == ["q"]
        assert [b.rsplit(": ", 1)[1] for b in src.bad] == [
            "missing or empty 'question'",
            'a context without a "text" string',
            "empty context text",
        ]
