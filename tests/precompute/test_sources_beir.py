"""BEIR folders: real SciFact and the MS MARCO DL-19 subset, plus hand-made folders for each error path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from precompute.sources import BeirSource, Source, SourceOptions, parse_source
from precompute.sources.errors import BadSourceError
from tests.precompute.test_sources_contract import SourceContract


def write_beir(folder: Path, corpus: list[str], queries: list[str] = (), qrels: dict[str, str] | None = None) -> Path:
    """A BEIR folder from raw jsonl lines (so tests can write malformed ones) and raw qrels texts."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(line + "\n" for line in corpus), encoding="utf-8")
    if queries:
        (folder / "queries.jsonl").write_text("".join(line + "\n" for line in queries), encoding="utf-8")
    for split, text in (qrels or {}).items():
        (folder / "qrels").mkdir(exist_ok=True)
        (folder / "qrels" / f"{split}.tsv").write_bytes(text.encode())
    return folder


def doc(i: str, text: str, title: str = "") -> str:
    return json.dumps({"_id": i, "title": title, "text": text})


class TestSciFact(SourceContract):
    n_passages, n_queries = 5183, 1109

    @pytest.fixture
    def source(self, shared_data: Path) -> Source:
        return parse_source(f"beir:{shared_data / 'scifact'}")

    def test_splits_and_qrels_counts(self, source: Source) -> None:
        assert source.splits() == ["test", "train"]
        for split, pairs, queries in (("train", 919, 809), ("test", 339, 300)):
            qrels = source.qrels(split)
            assert sum(len(v) for v in qrels.values()) == pairs
            assert len(qrels) == queries
            assert {g for v in qrels.values() for g in v.values()} == {1}

    def test_crlf_qrels_leave_no_carriage_return(self, source: Source) -> None:
        qrels = source.qrels("train")
        assert not any("\r" in q or any("\r" in p for p in v) for q, v in qrels.items())
        assert qrels["0"] == {"31715818": 1}

    def test_title_is_joined(self, source: Source, shared_data: Path) -> None:
        first = json.loads((shared_data / "scifact" / "corpus.jsonl").open().readline())
        record = next(source.iter_texts("passage"))
        assert record.id == first["_id"] == "4983"
        assert record.text == f"{first['title']} {first['text']}"
        assert record.origin.endswith("corpus.jsonl:1")

    def test_title_join_rule_is_applied(self, shared_data: Path) -> None:
        src = parse_source(f"beir:{shared_data / 'scifact'}", SourceOptions(title_join="{title}\n\n{text}"))
        assert next(src.iter_texts("passage")).text.startswith("Microstructural development of human newborn")
        assert "imaging.\n\nAlterations" in next(src.iter_texts("passage")).text

    def test_training_examples_are_positives_only(self, source: Source) -> None:
        examples = list(source.training_examples("train"))
        assert len(examples) == 809
        assert sum(len(e.positive_ids) for e in examples) == 919
        assert all(e.negative_ids == () for e in examples)

    def test_none_means_every_split(self, source: Source) -> None:
        assert len(source.qrels()) == len(set(source.qrels("train")) | set(source.qrels("test"))) == 1109


class TestMsMarcoDL19(SourceContract):
    n_passages, n_queries = 5000, 50

    @pytest.fixture
    def source(self, shared_data: Path) -> Source:
        return parse_source(f"beir:{shared_data / 'msmarco-dl19-subset'}")

    def test_headerless_graded_qrels(self, source: Source) -> None:
        qrels = source.qrels()  # the only split: "test"
        assert sum(len(v) for v in qrels.values()) == 4102
        assert len(qrels) == 43
        assert {g for v in qrels.values() for g in v.values()} == {1, 2, 3}
        assert qrels["19335"]["1720389"] == 1  # the first line is data, not a header

    def test_empty_titles_leave_bare_text(self, source: Source) -> None:
        record = next(source.iter_texts("passage"))
        assert record.text.startswith("Fahrenheit Scale-Daniel Gabriel Fahrenheit.")


class TestHandMadeBeir(SourceContract):
    n_passages, n_queries = 3, 2

    @pytest.fixture
    def source(self, tmp_path: Path) -> Source:
        folder = write_beir(
            tmp_path / "mini",
            [doc("d1", "alpha", "A"), doc("d2", "beta"), doc("d3", "", "Only a title")],
            [json.dumps({"_id": "q1", "text": "first?"}), json.dumps({"_id": "q2", "text": "second?"})],
            {"train": "query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\nq1\td2\t0\r\nq2\td2\t2\r\n"},
        )
        negatives = [
            {"query-id": "q1", "pos": ["d1"], "neg": ["d3", "d1", "d3", "d2"]},
            {"query-id": "q9", "neg": ["d1"]},
        ]
        (folder / "hard_negatives.jsonl").write_text("".join(json.dumps(n) + "\n" for n in negatives))
        return parse_source(f"beir:{folder}")

    def test_title_only_passage_is_kept(self, texts: list) -> None:
        assert [r.text for r in texts if r.role == "passage"] == ["A alpha", "beta", "Only a title"]

    def test_hard_negatives_join_training_examples(self, source: Source) -> None:
        examples = {e.query_id: e for e in source.training_examples("train")}
        assert examples["q1"].positive_ids == ("d1",)
        assert examples["q1"].negative_ids == ("d3", "d2")  # deduped, positives removed, grade-0 d2 allowed
        assert examples["q2"].negative_ids == ()
        assert source.qrels("train")["q1"] == {"d1": 1, "d2": 0}

    def test_a_query_on_many_lines_reads_in_linear_time(self, tmp_path: Path) -> None:
        """hard_negatives.jsonl with one line per (query, negative) pair: a query's lists grew by concatenation,
        quadratic in its lines (measured 0.53 / 2.43 / 13.1 s at 20k / 40k / 80k lines); now appended."""
        import time

        folder = write_beir(
            tmp_path / "many",
            [doc("d1", "alpha")],
            [json.dumps({"_id": "q1", "text": "first?"})],
            {"train": "query-id\tcorpus-id\tscore\r\nq1\td1\t1\r\n"},
        )

        def seconds(lines: int) -> float:
            path = folder / "hard_negatives.jsonl"
            path.write_text("".join(f'{{"query-id": "q1", "neg": ["n{i}"]}}\n' for i in range(lines)))
            best = float("inf")
            for _ in range(3):
                source = parse_source(f"beir:{folder}")
                start = time.perf_counter()
                (example,) = list(source.training_examples("train"))
                best = min(best, time.perf_counter() - start)
            assert len(example.negative_ids) == lines
            return best

        small, large = seconds(20_000), seconds(40_000)
        assert large / small < 3.2, (small, large)  # linear: ~2; the quadratic read was ~4.6


class TestBeirErrors:
    def test_missing_folder(self, tmp_path: Path) -> None:
        with pytest.raises(BadSourceError, match=r"No such file or folder '.*nowhere' \(beir: expects a BEIR folder"):
            parse_source(f"beir:{tmp_path / 'nowhere'}")

    def test_file_instead_of_folder(self, tmp_path: Path) -> None:
        path = write_beir(tmp_path / "b", [doc("1", "x")]) / "corpus.jsonl"
        with pytest.raises(BadSourceError, match=r"is a file, but beir: expects a BEIR folder.*Pass the folder"):
            parse_source(f"beir:{path}")

    def test_folder_without_corpus(self, tmp_path: Path) -> None:
        (tmp_path / "empty").mkdir()
        with pytest.raises(
            BadSourceError, match=r"BEIR folder '.*empty' has no corpus.jsonl; corpus.jsonl is required"
        ):
            BeirSource("beir:x", str(tmp_path / "empty"), SourceOptions())

    def test_malformed_json_line_names_file_and_line(self, tmp_path: Path) -> None:
        src = parse_source(f"beir:{write_beir(tmp_path / 'b', [doc('1', 'x'), '{broken', doc('3', 'z')])}")
        with pytest.raises(BadSourceError, match=r"corpus\.jsonl:2: malformed JSON"):
            list(src.iter_texts())

    def test_skip_bad_counts_and_continues(self, tmp_path: Path) -> None:
        lines = [doc("1", "x"), "{broken", doc("3", "  "), '["a list"]', json.dumps({"text": "no id"}), doc("6", "y")]
        src = parse_source(f"beir:{write_beir(tmp_path / 'b', lines)}", SourceOptions(skip_bad=True))
        assert [r.id for r in src.iter_texts()] == ["1", "6"]
        assert len(src.bad) == 4
        assert src.bad[0].endswith(
            "corpus.jsonl:2: malformed JSON (Expecting property name enclosed in double quotes at column 2)"
        )
        assert "corpus.jsonl:3: empty text for id '3'" in src.bad[1]

    def test_empty_text_is_rejected(self, tmp_path: Path) -> None:
        src = parse_source(f"beir:{write_beir(tmp_path / 'b', [doc('1', chr(9) + '  ')])}")
        with pytest.raises(BadSourceError, match=r"corpus\.jsonl:1: empty text for id '1'.*--skip-bad"):
            list(src.iter_texts())

    def test_duplicate_id_with_different_texts(self, tmp_path: Path) -> None:
        src = parse_source(
            f"beir:{write_beir(tmp_path / 'b', [doc('X', 'one'), doc('Y', 'y'), doc('X', 'one'), doc('X', 'two')])}"
        )
        with pytest.raises(
            BadSourceError, match=r"duplicate id 'X' with different texts at .*corpus\.jsonl:1 and .*corpus\.jsonl:4"
        ):
            list(src.iter_texts())

    def test_same_id_same_text_yields_once(self, tmp_path: Path) -> None:
        src = parse_source(f"beir:{write_beir(tmp_path / 'b', [doc('X', 'one'), doc('X', 'one')])}")
        assert [r.id for r in src.iter_texts()] == ["X"]

    def test_undecodable_line_names_the_file(self, tmp_path: Path) -> None:
        folder = write_beir(tmp_path / "b", [doc("1", "x")])
        (folder / "corpus.jsonl").write_bytes(b'{"_id": "1", "text": "caf\xe9"}\n')
        with pytest.raises(BadSourceError, match=r"corpus\.jsonl:1: not valid UTF-8"):
            list(parse_source(f"beir:{folder}").iter_texts())

    def test_bad_qrels_score(self, tmp_path: Path) -> None:
        folder = write_beir(tmp_path / "b", [doc("1", "x")], qrels={"test": "q\t1\t1\nq\t2\thigh\n"})
        with pytest.raises(BadSourceError, match=r"test\.tsv:2: relevance 'high' is not an integer"):
            parse_source(f"beir:{folder}").qrels("test")
