"""prepare_data: sources resolved against the store into phase-1 texts or phase-2 examples (no training)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest

from distill.train.data import IdMap, Ragged, eval_query_ids, id_hashes, prepare_data
from distill.train.tokens import TokenTable
from precompute.pipeline import missing_vectors_command
from precompute.sources import SourceOptions, parse_source
from precompute.sources.errors import BadSourceError
from storage.keys import content_keys
from storage.store import TeacherStore
from tests.distill.conftest import N_PASSAGES, N_QUERIES, TRAIN_QUERIES, Corpus, write_beir


@pytest.fixture
def table(tiny_bert: Path, tmp_path: Path) -> TokenTable:
    from transformers import AutoTokenizer

    return TokenTable.for_tokenizer(AutoTokenizer.from_pretrained(str(tiny_bert / "hf")), 128, tmp_path / "tok")


def _sources(*specs: str) -> list:
    return [parse_source(s, SourceOptions()) for s in specs]


def _position(texts, role: str, text: str) -> int:
    return int(texts.positions(content_keys(role, [text]))[0])


def test_ragged_rows() -> None:
    r = Ragged.from_lists([[1, 2], [], [3, 4, 5]])
    assert len(r) == 3 and r.row(0).tolist() == [1, 2] and r.row(1).tolist() == [] and r.row(2).tolist() == [3, 4, 5]
    assert r.lengths().tolist() == [2, 0, 3]
    assert [r.select(np.array([2, 0])).row(i).tolist() for i in range(2)] == [[3, 4, 5], [1, 2]]
    assert [row.tolist() for row in r.rows()] == [[1, 2], [], [3, 4, 5]]
    assert len(Ragged.from_lists([])) == 0 and Ragged.from_lists([]).rows() == []
    both = Ragged.concat([r, Ragged.from_lists([]), r])
    assert [row.tolist() for row in both.rows()] == [[1, 2], [], [3, 4, 5]] * 2 and both.flat.dtype == np.int64


def test_id_map_refuses_one_id_for_two_texts() -> None:
    positions = np.array([0, 1])  # two different texts of the text index
    with pytest.raises(BadSourceError, match=r"beir:x: two different texts share one id.*Deduplicate"):
        IdMap.build([id_hashes("passage", ["d1", "d1"])], [positions], "beir:x")
    same = IdMap.build([id_hashes("passage", ["d1", "d1"])], [positions[[0, 0]]], "beir:x")
    assert same.lookup("passage", ["d1", "d2"]).tolist() == [0, -1]
    assert same.lookup("query", ["d1"]).tolist() == [-1]  # the role is part of the id
    assert IdMap.build([], [], "empty").lookup("query", ["q"]).tolist() == [-1]


def test_id_lookup_in_any_order_equals_a_dict() -> None:
    ids = [f"id{i}" for i in range(5000)]
    rng = np.random.default_rng(0)
    positions = rng.permutation(5000)
    id_map = IdMap.build(
        [id_hashes("passage", ids[:2500]), id_hashes("passage", ids[2500:])], [positions[:2500], positions[2500:]], "x"
    )
    want = dict(zip(ids, positions.tolist(), strict=True))
    asked = [ids[j] if j < 5000 else f"missing{j}" for j in rng.integers(0, 6000, 20000)]
    assert id_map.lookup("passage", asked).tolist() == [want.get(i, -1) for i in asked]


def test_eval_only_queries_are_held_out(corpus: Corpus) -> None:
    (source,) = _sources(corpus.spec)
    assert eval_query_ids(source, "train") == {f"q{i}" for i in range(TRAIN_QUERIES, N_QUERIES)}


def test_phase1_texts(corpus: Corpus, teacher_store: Path, table: TokenTable) -> None:
    store = TeacherStore.open(teacher_store)
    data = prepare_data(_sources(corpus.spec), store, table, phase=1)
    assert data.phase1 is not None and data.phase2 is None
    assert len(data.phase1) == N_PASSAGES + TRAIN_QUERIES
    assert data.report == {
        "texts": N_PASSAGES + TRAIN_QUERIES,
        "missing_vectors": 0,
        "held_out_queries": N_QUERIES - TRAIN_QUERIES,
    }
    kept = set(data.phase1.tolist())
    assert _position(data.texts, "query", corpus.queries["q0"]) in kept
    assert _position(data.texts, "query", corpus.queries["q35"]) not in kept, "test-only query leaked into phase 1"
    assert (data.texts.gids[data.phase1] >= 0).all() and (data.texts.tokens[data.phase1] >= 0).all()
    # The teacher vector at each text's row is the one stored under its key.
    np.testing.assert_array_equal(
        store.get_rows(data.texts.gids[data.phase1[:5]]), store.get(data.texts.keys[data.phase1[:5]])
    )


def test_phase2_examples(corpus: Corpus, teacher_store: Path, table: TokenTable) -> None:
    data = prepare_data(_sources(corpus.spec), TeacherStore.open(teacher_store), table, phase=2)
    ex = data.phase2
    assert ex is not None and len(ex) == TRAIN_QUERIES
    assert data.report["unknown_ids"] == {} and data.report["missing_vectors"] == 0
    queries = {_position(data.texts, "query", corpus.queries[f"q{i}"]): f"q{i}" for i in range(TRAIN_QUERIES)}
    assert set(ex.query.tolist()) == set(queries)
    for i in range(len(ex)):
        qid = queries[int(ex.query[i])]
        want_pos = [_position(data.texts, "passage", corpus.passages[d]) for q, d in corpus.qrels["train"] if q == qid]
        want_neg = [_position(data.texts, "passage", corpus.passages[d]) for d in corpus.negatives[qid]]
        assert sorted(ex.positives.row(i).tolist()) == sorted(want_pos)
        assert sorted(ex.negatives.row(i).tolist()) == sorted(want_neg)
    needed = np.concatenate([ex.query, ex.positives.flat, ex.negatives.flat])
    assert (data.texts.tokens[needed] >= 0).all()


def test_tokens_are_added_once(corpus: Corpus, teacher_store: Path, table: TokenTable) -> None:
    store = TeacherStore.open(teacher_store)
    prepare_data(_sources(corpus.spec), store, table, phase=1)
    parts = sorted(table.directory.glob("part-*.arrow"))
    assert len(table) == N_PASSAGES + TRAIN_QUERIES
    prepare_data(_sources(corpus.spec), store, table, phase=2)
    assert sorted(table.directory.glob("part-*.arrow")) == parts, "phase 2 needed no new tokens"


def test_same_text_in_two_sources_is_one_text(
    corpus: Corpus, teacher_store: Path, table: TokenTable, tmp_path: Path
) -> None:
    """A second data set with the same passages under other ids: one text each, one store row, both resolve."""
    renamed = {f"other-{pid}": text for pid, text in list(corpus.passages.items())[:20]}
    q = corpus.queries["q3"]
    folder = write_beir(tmp_path / "other", renamed, {"x": q}, {"train": [("x", "other-d0")]})
    data = prepare_data(_sources(corpus.spec, f"beir:{folder}"), TeacherStore.open(teacher_store), table, phase=2)
    assert len(data.texts.keys) == N_PASSAGES + N_QUERIES
    assert len(data.phase2) == TRAIN_QUERIES + 1
    last = len(data.phase2) - 1
    assert data.phase2.source[last] == 1
    assert data.phase2.positives.row(last).tolist() == [_position(data.texts, "passage", corpus.passages["d0"])]


def test_hard_negatives_file_resolves_ids_of_another_source(
    corpus: Corpus, teacher_store: Path, table: TokenTable, tmp_path: Path
) -> None:
    path = tmp_path / "extra-hard-negatives.jsonl"
    path.write_text(json.dumps({"qid": "q0", "pos": ["d0"], "neg": {"bm25": ["d7", "d8"]}}) + "\n")
    data = prepare_data(_sources(corpus.spec, f"msmarco:{path}"), TeacherStore.open(teacher_store), table, phase=2)
    assert len(data.phase2) == TRAIN_QUERIES + 1
    last = len(data.phase2) - 1
    assert sorted(data.phase2.negatives.row(last).tolist()) == sorted(
        _position(data.texts, "passage", corpus.passages[d]) for d in ("d7", "d8")
    )


def test_missing_vectors_command_is_a_valid_command_line(teacher_store: Path, tiny_qwen2: Path) -> None:
    store = TeacherStore.open(teacher_store)
    argv = shlex.split(missing_vectors_command(store, ["beir:/data/a b", "msmarco:/x"]))
    assert argv[:2] == ["ddx", "precompute-teacher"]
    flags = {"--normalize", "--no-normalize"}
    options, i = {}, 2
    while i < len(argv):
        takes_value = argv[i] not in flags
        options[argv[i]] = argv[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    assert options["--teacher"] == str(tiny_qwen2) and options["--store"] == store.url
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--data"] == ["beir:/data/a b", "msmarco:/x"]
    spec = store.spec
    assert options["--query-prompt"] == spec.query_prompt and "\n" in spec.query_prompt
    assert options["--pooling"] == spec.pooling == "lasttoken" and options["--padding-side"] == "left"
    assert options["--dtype"] == spec.dtype and int(options["--max-seq-length"]) == spec.max_seq_length
    assert options["--normalize"] is True and "--data" in options


def test_block_resolution_equals_a_per_example_reference() -> None:
    """Examples resolved a block at a time equal the per-example rule: positives in order (duplicates kept),
    negatives sorted, unique and never a positive of the same query; queries without a known query id or
    positive dropped; unknown ids counted. Blocks of 7 cut the 60 examples unevenly."""
    from types import SimpleNamespace

    import distill.train.data as data
    from storage.keys import content_keys

    rng = np.random.default_rng(3)
    pids, qids = [f"p{i}" for i in range(40)], [f"q{i}" for i in range(60)]
    pkeys, qkeys = content_keys("passage", pids), content_keys("query", qids)
    keys = np.concatenate([pkeys, qkeys])
    order = np.argsort(keys)
    texts = data.TextIndex(keys[order], np.zeros(len(keys), np.uint8), np.zeros(len(keys), np.int16))
    id_map = IdMap.build(
        [id_hashes("passage", pids), id_hashes("query", qids)], [texts.positions(pkeys), texts.positions(qkeys)], "x"
    )
    known = [*pids, "unknown-a", "unknown-b"]
    examples = [
        SimpleNamespace(
            query_id=qids[i] if i % 9 else "unknown-q",
            positive_ids=tuple(known[j] for j in rng.integers(0, len(known), int(rng.integers(0, 3)))),
            negative_ids=tuple(known[j] for j in rng.integers(0, len(known), int(rng.integers(0, 6)))),
        )
        for i in range(60)
    ]
    source = SimpleNamespace(spec="x", splits=lambda: ["train"], training_examples=lambda name: iter(examples))

    def position(role: str, id_: str) -> int:
        if id_ not in (pids if role == "passage" else qids):
            return -1
        key = content_keys(role, [id_])[0]
        return int(np.flatnonzero(texts.keys == key)[0])

    want_q, want_p, want_n, unknown = [], [], [], 0
    for ex in examples:
        q = position("query", ex.query_id)
        p = np.array([position("passage", i) for i in ex.positive_ids], dtype=np.int64)
        n = np.array([position("passage", i) for i in ex.negative_ids], dtype=np.int64)
        unknown += int(q < 0) + int((p < 0).sum()) + int((n < 0).sum())
        if q < 0 or not (p >= 0).any():
            continue
        want_q.append(q)
        want_p.append(p[p >= 0])
        want_n.append(np.setdiff1d(n[n >= 0], p))

    block = data.RESOLVE_BLOCK
    data.RESOLVE_BLOCK = 7
    try:
        got, report = data.resolve_examples([source], texts, [id_map], None, skip_bad=True)
    finally:
        data.RESOLVE_BLOCK = block
    assert got.query.tolist() == want_q and len(got) == len(want_q) > 0
    assert all(got.positives.row(i).tolist() == want_p[i].tolist() for i in range(len(got)))
    assert all(got.negatives.row(i).tolist() == want_n[i].tolist() for i in range(len(got)))
    assert report["unknown_ids"] == {"x": unknown} and report["no_positive"] == {"x": 60 - len(want_q)}
