"""HotpotQA: the real IRCoT dev sample (counted independently) and the HF / original layouts, hand-made."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from precompute.sources import Source, SourceOptions, join_title, parse_source, text_id
from precompute.sources.errors import BadSourceError
from precompute.sources.hotpotqa import parse_question
from tests.precompute.test_sources_contract import SourceContract

DEV = "hotpotqa-dev500/dev_subsampled.jsonl"

HF_ROW = {
    "id": "hf1",
    "question": "Which river runs through both towns?",
    "answer": "Avon",
    "context": {
        "title": ["Town A", "Town B", "Elsewhere"],
        "sentences": [["Town A lies on the Avon.", " It is old."], ["Town B is on the Avon too."], ["Unrelated."]],
    },
    "supporting_facts": {"title": ["Town A", "Town B", "Town A"], "sent_id": [0, 0, 1]},
}
ORIGINAL_ROW = {
    "_id": "o1",
    "question": "Where is Town A?",
    "context": [["Town A", ["Town A lies on the Avon.", " It is old."]], ["Far", ["Far away."]]],
    "supporting_facts": [["Town A", 0]],
}


def independent_count(path: Path) -> tuple[int, set[tuple[str, str]]]:
    """Questions and distinct (title, paragraph) pairs, read with nothing but json."""
    questions, paragraphs = 0, set()
    for line in path.open(encoding="utf-8"):
        obj = json.loads(line)
        questions += 1
        paragraphs.update((c["title"], c["paragraph_text"]) for c in obj["contexts"])
    return questions, paragraphs


class TestIRCoTDev(SourceContract):
    n_queries = 500
    n_passages = 4858  # checked against an independent count below

    @pytest.fixture
    def source(self, shared_data: Path) -> Source:
        return parse_source(f"hotpotqa:{shared_data / DEV}")

    def test_counts_match_an_independent_count(self, source: Source, shared_data: Path) -> None:
        questions, paragraphs = independent_count(shared_data / DEV)
        assert questions == 500 and len(paragraphs) == self.n_passages
        assert sum(1 for _ in source.iter_texts("passage")) == len(paragraphs)

    def test_two_supporting_positives_and_distractor_negatives(self, source: Source, shared_data: Path) -> None:
        assert source.splits() == ["dev"]
        examples = list(source.training_examples("dev"))
        assert len(examples) == 500
        assert all(len(e.positive_ids) == 2 for e in examples)
        first = json.loads((shared_data / DEV).open(encoding="utf-8").readline())
        ids = {
            c["title"]: text_id("passage", join_title(c["title"], c["paragraph_text"], "{title} {text}"))
            for c in first["contexts"]
        }
        supporting = {ids[c["title"]] for c in first["contexts"] if c["is_supporting"]}
        assert examples[0].query_id == first["question_id"]
        assert set(examples[0].positive_ids) == supporting
        assert set(examples[0].negative_ids) == set(ids.values()) - supporting
        assert len(examples[0].negative_ids) == 8

    def test_qrels_are_supporting_paragraphs(self, source: Source) -> None:
        qrels = source.qrels()
        assert len(qrels) == 500 and all(set(v.values()) == {1} and len(v) == 2 for v in qrels.values())

    def test_context_ids_are_positions_not_paragraph_ids(self, shared_data: Path) -> None:
        """Why passage ids are content ids: IRCoT's "id" repeats across questions for other paragraphs."""
        texts: dict[str, set[str]] = {}
        for line in (shared_data / DEV).open(encoding="utf-8"):
            for c in json.loads(line)["contexts"]:
                texts.setdefault(c["id"], set()).add(c["paragraph_text"])
        assert sorted(texts, key=int) == [str(i) for i in range(10)]
        assert all(len(v) > 1 for v in texts.values())


class TestOtherLayouts(SourceContract):
    n_queries, n_passages = 2, 4  # "Town A" is shared by both questions

    @pytest.fixture
    def source(self, tmp_path: Path) -> Source:
        folder = tmp_path / "hotpot"
        folder.mkdir()
        (folder / "hotpot_train.jsonl").write_text(json.dumps(HF_ROW) + "\n")
        (folder / "hotpot_dev_distractor_v1.json").write_text(json.dumps([ORIGINAL_ROW]))
        return parse_source(f"hotpotqa:{folder}")

    def test_one_split_per_file(self, source: Source) -> None:
        assert source.splits() == ["dev", "train"]
        (example,) = source.training_examples("train")
        town_a = text_id("passage", "Town A Town A lies on the Avon. It is old.")
        assert example.query_id == "hf1" and example.positive_ids[0] == town_a and len(example.negative_ids) == 1
        (original,) = source.training_examples("dev")
        assert original.positive_ids == (town_a,)

    def test_parquet_with_nested_columns(self, tmp_path: Path) -> None:
        pq.write_table(pa.Table.from_pylist([HF_ROW]), tmp_path / "validation.parquet")
        src = parse_source(f"hotpotqa:{tmp_path / 'validation.parquet'}")
        assert src.splits() == ["validation"]
        assert [len(e.positive_ids) for e in src.training_examples()] == [2]
        assert next(src.iter_texts("passage")).origin.endswith("validation.parquet[row 0]")


def test_parse_question_rejects_other_rows() -> None:
    with pytest.raises(ValueError, match="no 'contexts'"):
        parse_question({"question": "q?", "paragraphs": []})


class TestHotpotErrors:
    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"No such file or folder .*hotpotqa: expects a HotpotQA file"):
            parse_source(f"hotpotqa:{tmp_path / 'dev.jsonl'}")

    def test_folder_without_data(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"No \.jsonl/\.json/\.parquet files in"):
            parse_source(f"hotpotqa:{tmp_path}")

    def test_bad_rows_are_rejected_or_counted(self, tmp_path: Path) -> None:
        empty = dict(ORIGINAL_ROW, _id="o2", context=[["Titled", [" "]], ["", ["  "]]])
        lines = [json.dumps(ORIGINAL_ROW), json.dumps({"question": "q?"}), json.dumps(empty)]
        (tmp_path / "dev.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(BadSourceError, match=r"dev\.jsonl:2: not a HotpotQA question: no 'contexts'"):
            list(parse_source(f"hotpotqa:{tmp_path / 'dev.jsonl'}").iter_texts())
        src = parse_source(f"hotpotqa:{tmp_path / 'dev.jsonl'}", SourceOptions(skip_bad=True))
        assert (
            sum(1 for _ in src.iter_texts()) == 2 + 2 + 1
        )  # o1, o2; o1's paragraphs; "Titled" (a title alone is text)
        assert [b.split(": ", 1)[1] for b in src.bad] == [
            "not a HotpotQA question: no 'contexts' (IRCoT) or 'context' + 'supporting_facts' (hotpot_qa)",
            "empty paragraph under title '' in question 'o2'",
        ]
