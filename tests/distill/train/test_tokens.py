"""TokenTable: content-keyed student token ids, tokenized once, shared across runs, padded on the tokenizer's side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import distill.train.data as data_module
import distill.train.tokens as tokens_module
from distill.train.data import PreparedData, TextIndex
from distill.train.tokens import TokenTable, default_cache_dir, tokenizer_fingerprint
from precompute.sources.base import TextRecord
from storage.index import KeyIndex
from storage.keys import content_keys, role_code
from tests.tiny_models import tiny_corpus

TEXTS = tiny_corpus(12, seed=3)


@pytest.fixture(scope="module")
def bert_tokenizer(tiny_bert: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_bert / "hf"))


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_qwen2: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_qwen2 / "hf"))
    assert tok.padding_side == "left"
    return tok


def _expected(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    return tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]


def test_add_locate_gather(bert_tokenizer, tmp_path: Path) -> None:
    table = TokenTable.for_tokenizer(bert_tokenizer, 16, tmp_path)
    keys = content_keys("passage", TEXTS)
    assert (table.locate(keys) == -1).all() and len(table) == 0
    assert table.add(keys[:8], TEXTS[:8]) == 8
    assert table.add(keys[4:], TEXTS[4:]) == 4, "only the keys not yet tokenized are added"
    assert table.add(keys, TEXTS) == 0
    assert len(list(table.directory.glob("part-*.arrow"))) == 2
    handles = table.locate(keys)
    assert (handles >= 0).all() and len(set(handles.tolist())) == len(TEXTS)
    # Handles from both parts, in any order: each gives exactly the tokenizer's ids (truncated at max_length).
    order = np.array([11, 0, 5, 9, 2, 7])
    got = table.gather(handles[order])
    for ids, want in zip(got, _expected(bert_tokenizer, [TEXTS[i] for i in order], 16), strict=True):
        assert ids.dtype == np.int32 and ids.tolist() == want
    assert table.lengths(handles[order]).tolist() == [
        len(w) for w in _expected(bert_tokenizer, [TEXTS[i] for i in order], 16)
    ]
    assert max(table.lengths(handles)) == 16 and min(table.lengths(handles)) < 16
    assert table.locate(content_keys("query", TEXTS[:1]))[0] == -1, "the role is part of the key"


def test_duplicate_keys_in_one_add_are_tokenized_once(bert_tokenizer, tmp_path: Path) -> None:
    table = TokenTable.for_tokenizer(bert_tokenizer, 32, tmp_path)
    keys = content_keys("passage", [TEXTS[0], TEXTS[1], TEXTS[0]])
    assert table.add(keys, [TEXTS[0], TEXTS[1], TEXTS[0]]) == 2 and len(table) == 2


def test_pad_right(bert_tokenizer, tmp_path: Path) -> None:
    table = TokenTable.for_tokenizer(bert_tokenizer, 32, tmp_path)
    assert table.padding_side == "right"
    seqs = [np.array([5, 6, 7], np.int32), np.array([8], np.int32)]
    ids, mask = table.pad(seqs)
    pad = bert_tokenizer.pad_token_id
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.tolist() == [[5, 6, 7], [8, pad, pad]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_left_matches_tokenizer(qwen_tokenizer, tmp_path: Path) -> None:
    table = TokenTable.for_tokenizer(qwen_tokenizer, 64, tmp_path)
    assert table.padding_side == "left" and table.pad_id == qwen_tokenizer.pad_token_id
    texts = TEXTS[:4]
    keys = content_keys("passage", texts)
    table.add(keys, texts)
    ids, mask = table.pad(table.gather(table.locate(keys)))
    want = qwen_tokenizer(texts, truncation=True, max_length=64, padding=True, return_tensors="np")
    assert ids.tolist() == want["input_ids"].tolist() and mask.tolist() == want["attention_mask"].tolist()
    assert (mask[:, -1] == 1).all(), "left padding: every row ends with a real token"


def test_table_reused_across_instances(bert_tokenizer, tmp_path: Path) -> None:
    keys = content_keys("passage", TEXTS)
    first = TokenTable.for_tokenizer(bert_tokenizer, 16, tmp_path)
    first.add(keys[:6], TEXTS[:6])
    second = TokenTable.for_tokenizer(bert_tokenizer, 16, tmp_path)
    assert second.directory == first.directory and len(second) == 6
    assert second.add(keys, TEXTS) == 6, "a second run tokenizes only what the first did not"
    assert len(first) == 6
    first.reload()
    assert len(first) == 12, "reload picks up parts another instance added"
    assert [a.tolist() for a in first.gather(first.locate(keys))] == [
        a.tolist() for a in second.gather(second.locate(keys))
    ]


def test_fingerprint_covers_max_length_and_tokenizer(bert_tokenizer, qwen_tokenizer, tmp_path: Path) -> None:
    fp = tokenizer_fingerprint(bert_tokenizer, 16)
    assert fp == tokenizer_fingerprint(bert_tokenizer, 16)
    assert fp != tokenizer_fingerprint(bert_tokenizer, 32)
    assert fp != tokenizer_fingerprint(qwen_tokenizer, 16)
    short = TokenTable.for_tokenizer(bert_tokenizer, 16, tmp_path)
    long = TokenTable.for_tokenizer(bert_tokenizer, 32, tmp_path)
    assert short.directory != long.directory
    short.add(content_keys("passage", TEXTS), TEXTS)
    assert len(long) == 0, "ids truncated at 16 must never serve a max length of 32"


def test_fingerprint_ignores_the_tokenizers_call_history(bert_tokenizer, tmp_path: Path) -> None:
    """transformers leaves the last call's truncation/padding on the backend; the table must not move because of it
    (it did: ``TokenTable.add`` itself turned truncation on, and the next run got a new, empty table)."""
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(bert_tokenizer.name_or_path)
    before = tokenizer_fingerprint(fresh, 16)
    fresh(TEXTS[:2], truncation=True, max_length=7)
    fresh(TEXTS[:2], padding="max_length", max_length=40, truncation=True)
    assert fresh.backend_tokenizer.truncation is not None and fresh.backend_tokenizer.padding is not None
    assert tokenizer_fingerprint(fresh, 16) == before
    table = TokenTable.for_tokenizer(fresh, 16, tmp_path)
    table.add(content_keys("passage", TEXTS), TEXTS)
    assert TokenTable.for_tokenizer(fresh, 16, tmp_path).directory == table.directory


def test_default_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, bert_tokenizer) -> None:
    monkeypatch.setenv("DDX_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    table = TokenTable.for_tokenizer(bert_tokenizer, 16)
    assert table.directory.parent == tmp_path / "cache" / "tokens"


class _StubTokenizer:
    """Ids [1, len(text), 3]: cheap, and each row still says which text it came from."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, batch: list[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [[1, len(t), 3] for t in batch]}


class _ListSource:
    def __init__(self, records: list[TextRecord]) -> None:
        self.records = records

    def iter_texts(self):
        return iter(self.records)


class _CountingIndex(KeyIndex):
    """KeyIndex that counts its builds and the keys they sort."""

    builds = 0
    keys_sorted = 0

    @classmethod
    def build(cls, parts):  # type: ignore[no-untyped-def]
        cls.builds += 1
        cls.keys_sorted += sum(len(p[0]) for p in parts)
        return super().build(parts)


def _prepared(texts: list[str]) -> PreparedData:
    keys = np.unique(content_keys("passage", texts))
    index = TextIndex(keys, np.full(len(keys), role_code("passage"), np.uint8), np.zeros(len(keys), np.int16))
    return PreparedData(texts=index, to_tokenize=np.arange(len(keys)))


def _texts(n: int) -> list[str]:
    return [f"text {i} " + "x" * (i % 7) for i in range(n)]


def test_filling_a_table_block_by_block_is_linear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``add_tokens`` meets new texts block by block; the table must sort each key into its index a bounded number of
    times and write few parts. It re-mapped every part and rebuilt the whole index after each block: N texts in
    blocks of B sorted ~N²/2B keys and wrote N/B parts (1.6 M texts: 40 s, 10 M: ~27 min and 1,220 parts)."""
    monkeypatch.setattr(data_module, "BLOCK", 10)
    monkeypatch.setattr(tokens_module, "KeyIndex", _CountingIndex)
    texts = _texts(600)
    table = TokenTable(tmp_path, _StubTokenizer(), 16)
    data = _prepared(texts)
    source = _ListSource([TextRecord(str(i), t, "passage") for i, t in enumerate(texts + texts[:40])])
    _CountingIndex.builds = _CountingIndex.keys_sorted = 0

    assert data.add_tokens([source], table) == len(texts), "a text repeated in a later block is tokenized once"

    assert _CountingIndex.keys_sorted <= 2 * len(texts), "each key sorted into the index O(1) times, not once a block"
    assert len(list(tmp_path.glob("part-*.arrow"))) == 1, "60 blocks of new texts make one part, not 60"
    got = table.gather(data.texts.tokens)
    want = {k: [1, len(t), 3] for k, t in zip(content_keys("passage", texts).tolist(), texts, strict=True)}
    assert [g.tolist() for g in got] == [want[k] for k in data.texts.keys.tolist()]


def _blocks(texts: list[str], size: int):
    for s in range(0, len(texts), size):
        yield content_keys("passage", texts[s : s + size]), texts[s : s + size]


def test_add_blocks_rolls_parts_over_and_reads_every_record_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "PART_ROWS", 64)
    monkeypatch.setattr(tokens_module, "BATCH_ROWS", 16)
    texts = _texts(200)
    table = TokenTable(tmp_path, _StubTokenizer(), 16)
    assert table.add_blocks(_blocks(texts, 7)) == 200
    assert table.add_blocks(_blocks(texts[:30] + texts[:30], 9)) == 0, "keys already in the table are skipped"
    assert len(list(tmp_path.glob("part-*.arrow"))) == 4, "ceil(200 / 64) parts"
    assert not list(tmp_path.glob(".*")), "no temp file left behind"
    keys = content_keys("passage", texts)
    for t in (table, TokenTable(tmp_path, _StubTokenizer(), 16)):
        handles = t.locate(keys)
        assert len(t) == 200 and sorted(handles.tolist()) == list(range(200))
        assert [g.tolist() for g in t.gather(handles[::-1])] == [[1, len(x), 3] for x in texts[::-1]]
        assert t.lengths(handles).tolist() == [3] * 200


def test_add_blocks_tokenizes_a_key_met_in_an_earlier_block_once(tmp_path: Path) -> None:
    texts = _texts(50)
    table = TokenTable(tmp_path, _StubTokenizer(), 16)
    again = [*texts[10:20], *texts[40:], *texts[:5]]
    assert table.add_blocks([*_blocks(texts, 8), *_blocks(again, 6)]) == 50
    assert len(table) == 50 and table._index.duplicates == 0


def test_add_blocks_keeps_full_parts_and_drops_the_open_one_when_a_block_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "PART_ROWS", 20)
    monkeypatch.setattr(tokens_module, "BATCH_ROWS", 8)
    texts = _texts(50)

    def failing():
        yield from _blocks(texts[:45], 9)
        raise RuntimeError("bad source row")

    table = TokenTable(tmp_path, _StubTokenizer(), 16)
    with pytest.raises(RuntimeError, match="bad source row"):
        table.add_blocks(failing())
    assert len(list(tmp_path.glob("part-*.arrow"))) == 2 and not list(tmp_path.glob(".*"))
    assert len(table) == 40, "the two full parts are committed and mapped; the 5 rows of the open one are not"
    assert table.add_blocks(_blocks(texts, 50)) == 10
    assert [g.tolist() for g in table.gather(table.locate(content_keys("passage", texts)))] == [
        [1, len(x), 3] for x in texts
    ]
