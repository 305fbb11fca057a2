"""precompute(): stored vectors equal a direct SentenceTransformer encode, each text is encoded once, reruns reuse.

Helpers here (``write_beir``, ``run``, ``direct``) are shared by the other pipeline and CLI tests.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from precompute.batching import padding_waste, token_budget_batches
from precompute.pipeline import PrecomputeConfig, PrecomputeSummary, precompute, resolve_rank
from precompute.teacher import PendingVectors, TeacherConfig, TeacherEncoder, load_teacher
from storage.keys import content_keys, key_slice
from storage.store import TeacherStore
from tests.tiny_models import QWEN_QUERY_PROMPT, tiny_corpus

ATOL = 2e-3  # float16 storage of unit vectors: ~5e-4 rounding, plus batch-composition noise


# -- helpers (imported by the other test modules) ----------------------------------------------------------------


def write_beir(folder: Path, passages: list[Any], queries: list[Any] = ()) -> Path:
    """A BEIR folder: strings become ``{"_id": "p<i>", "title": "", "text": s}`` (queries ``q<i>``), dicts stay."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, items, prefix in (("corpus.jsonl", passages, "p"), ("queries.jsonl", queries, "q")):
        if name == "queries.jsonl" and not items:
            continue
        rows = [
            x if isinstance(x, dict) else {"_id": f"{prefix}{i}", "title": "", "text": x} for i, x in enumerate(items)
        ]
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def run(store: Path, folders: list[Path] | Path, encoder: TeacherEncoder, **kw: Any) -> PrecomputeSummary:
    """One precompute over BEIR ``folders`` with an already loaded encoder."""
    folders = [folders] if isinstance(folders, Path) else folders
    config = PrecomputeConfig(
        store=str(store),
        data=tuple(f"beir:{f}" for f in folders),
        teacher=TeacherConfig(model=encoder.spec.model),
        progress=False,
        **kw,
    )
    return precompute(config, encoder=encoder)


@cache
def _sentence_transformer(path: str) -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def default_device_atol() -> float:
    """Tolerance of a precompute on ddx's *default* device (CLI, subprocesses) against :func:`direct` (fp32, CPU).

    With CUDA present ddx computes in bfloat16 (8-bit mantissa): on an H100 the tiny BERT's stored vectors
    differed from the fp32 encode by up to 5.0e-3. A misaligned row is off by ~0.1, so 2e-2 still catches one.
    """
    import torch

    return 2e-2 if torch.cuda.is_available() else ATOL


def direct(model_path: Path, texts: list[str], role: str) -> np.ndarray:
    """A plain ``SentenceTransformer(path).encode``: queries with ``prompt_name="query"`` when the model has one."""
    model = _sentence_transformer(str(model_path))
    prompt_name = "query" if role == "query" and "query" in model.prompts else None
    return model.encode(texts, prompt_name=prompt_name, convert_to_numpy=True)


def stored(store: Path, role: str, texts: list[str]) -> np.ndarray:
    return TeacherStore.open(store).get(content_keys(role, texts)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run: on the shared 2-core machine two OpenMP threads made tiny
    forward passes up to 20x slower whenever another job held a core. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bert(tiny_bert: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))


@pytest.fixture(scope="module")
def qwen(tiny_qwen2: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_qwen2), device="cpu"))


class Recorder:
    """What really ran: texts per role through ``encoder.launch``, and calls of the model's forward."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {"query": [], "passage": []}
        self.forwards = 0

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


@pytest.fixture
def recorder(bert: TeacherEncoder, monkeypatch: pytest.MonkeyPatch):
    """Wraps ``bert.launch`` (texts per role) and counts its model's forward passes with a hook."""
    rec, original = Recorder(), bert.launch

    def launch(texts: list[str], role: str) -> PendingVectors:
        rec.texts[role].extend(texts)
        return original(texts, role)

    monkeypatch.setattr(bert, "launch", launch)
    handle = bert.model.register_forward_hook(lambda *_: setattr(rec, "forwards", rec.forwards + 1))
    yield rec
    handle.remove()


# -- round trip ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["bert", "qwen"])
def test_round_trip_equals_direct_encode(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    encoder: TeacherEncoder = request.getfixturevalue(which)
    model_path = request.getfixturevalue("tiny_bert" if which == "bert" else "tiny_qwen2")
    texts = tiny_corpus(40, seed=3)
    passages = [
        {"_id": f"p{i}", "title": "Gene study" if i % 3 == 0 else "", "text": t} for i, t in enumerate(texts[:30])
    ]
    queries = texts[30:]
    folder = write_beir(tmp_path / "beir", passages, queries)
    summary = run(tmp_path / "store", folder, encoder, token_budget=256, max_batch_size=8)

    fed = [f"Gene study {t}" if i % 3 == 0 else t for i, t in enumerate(texts[:30])]  # the BEIR title join
    assert summary.encoded == 40 and summary.forward_calls > 1
    for role, role_texts in (("passage", fed), ("query", queries)):
        np.testing.assert_allclose(
            stored(tmp_path / "store", role, role_texts), direct(model_path, role_texts, role), atol=ATOL, rtol=0
        )


def test_stored_spec_records_the_teacher(bert: TeacherEncoder, qwen: TeacherEncoder, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", ["one passage here"], ["a query"])
    expected = {
        bert: {"pooling": "mean", "padding_side": "right", "query_prompt": "", "passage_prompt": "", "dim": 32},
        qwen: {
            "pooling": "lasttoken",
            "padding_side": "left",
            "query_prompt": QWEN_QUERY_PROMPT,
            "passage_prompt": "",
            "dim": 48,
        },
    }
    for i, (encoder, fields) in enumerate(expected.items()):
        run(tmp_path / f"s{i}", folder, encoder)
        store = TeacherStore.open(tmp_path / f"s{i}")
        assert store.spec == encoder.spec
        assert {k: getattr(store.spec, k) for k in fields} == fields
        assert (store.spec.dtype, store.spec.normalize, store.spec.max_seq_length) == ("float32", True, 128)
        assert store.dtype == "float16" and store.spec.weights_id.startswith("files:")
        attrs = json.loads((tmp_path / f"s{i}" / "zarr.json").read_text())["attributes"]["ddx"]
        assert attrs["fingerprint"] == encoder.spec.fingerprint and attrs["teacher_spec"] == encoder.spec.to_dict()


def test_storage_dtype_float32_keeps_full_precision(bert: TeacherEncoder, tiny_bert: Path, tmp_path: Path) -> None:
    texts = tiny_corpus(12, seed=4)
    run(tmp_path / "s", write_beir(tmp_path / "beir", texts), bert, storage_dtype="float32")
    store = TeacherStore.open(tmp_path / "s")
    assert store.dtype == "float32"
    np.testing.assert_allclose(
        store.get(content_keys("passage", texts)), direct(tiny_bert, texts, "passage"), atol=1e-5
    )


def test_small_windows_and_budgets_give_the_same_vectors(bert: TeacherEncoder, tmp_path: Path) -> None:
    texts = tiny_corpus(60, seed=5)
    folder = write_beir(tmp_path / "beir", texts)
    run(tmp_path / "a", folder, bert)
    small = run(
        tmp_path / "b", folder, bert, window=7, token_budget=40, max_batch_size=3, flush_rows=4, flush_seconds=0
    )
    assert small.forward_calls >= 60 // 3
    # batch composition moves values by float noise only (~1e-5); a misaligned row would be off by ~0.1
    np.testing.assert_allclose(
        stored(tmp_path / "a", "passage", texts), stored(tmp_path / "b", "passage", texts), atol=1e-4, rtol=0
    )


# -- dedup and reuse ----------------------------------------------------------------------------------------------


def test_each_text_is_encoded_once_and_reruns_reuse(bert: TeacherEncoder, recorder: Recorder, tmp_path: Path) -> None:
    a = write_beir(tmp_path / "a", ["alpha beta", "gamma", "alpha beta", "delta one"], ["alpha beta", "who is"])
    b = write_beir(tmp_path / "b", [{"_id": "x", "title": "", "text": "gamma"}, "epsilon"], ["who is", "where"])
    store = tmp_path / "store"

    first = run(store, [a, b], bert)
    # distinct (role, text): passages alpha beta, gamma, delta one, epsilon; queries alpha beta, who is, where
    assert sorted(recorder.texts["passage"]) == ["alpha beta", "delta one", "epsilon", "gamma"]
    assert sorted(recorder.texts["query"]) == ["alpha beta", "where", "who is"]
    assert (first.texts_read, first.unique_texts, first.to_encode, first.encoded) == (10, 7, 7, 7)
    assert first.forward_calls == recorder.forwards == 2  # one batch per role
    s = TeacherStore.open(store)
    assert (len(s), s.rows, s.index.duplicates, len(s.segments)) == (7, 7, 0, 1)

    recorder.reset()
    calls = bert.forward_calls
    second = run(store, [a, b], bert)
    assert bert.forward_calls == calls and recorder.forwards == 0  # the teacher did not run
    assert (second.encoded, second.forward_calls, second.already_stored, second.segment) == (0, 0, 7, None)
    assert len(TeacherStore.open(store).segments) == 1  # and no empty segment was left

    c = write_beir(tmp_path / "c", ["epsilon", "zeta new", "eta new"], ["where", "new query"])
    third = run(store, [a, b, c], bert)
    assert sorted(recorder.texts["passage"]) == ["eta new", "zeta new"] and recorder.texts["query"] == ["new query"]
    assert (third.encoded, third.already_stored, third.forward_calls) == (3, 7, 2)
    s = TeacherStore.open(store)
    assert (len(s), s.index.duplicates, len(s.segments)) == (10, 0, 2)
    assert [src["passages"] for src in third.sources] == [4, 2, 3]  # per source, as read (before dedup)
    # a top-up of 3 texts takes 3 rows on disk, not a default chunk padded with zeros
    chunk = store / "segments" / third.segment / "vectors" / "c" / "0" / "0"
    assert chunk.stat().st_size == 3 * s.dim * 2 + 4


def test_roles_option_encodes_only_that_role(bert: TeacherEncoder, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", ["p one", "p two"], ["q one"])
    summary = run(tmp_path / "s", folder, bert, roles=("query",))
    assert summary.encoded == 1
    store = TeacherStore.open(tmp_path / "s")
    assert store.contains(content_keys("query", ["q one"])).all()
    assert not store.contains(content_keys("passage", ["p one", "p two"])).any()


def test_limit_encodes_a_prefix_and_a_rerun_completes(bert: TeacherEncoder, tmp_path: Path) -> None:
    texts = tiny_corpus(20, seed=6)
    folder = write_beir(tmp_path / "beir", texts)
    assert run(tmp_path / "s", folder, bert, limit=0).encoded == 0
    assert TeacherStore.open(tmp_path / "s").segments == []
    first = run(tmp_path / "s", folder, bert, limit=5)
    assert (first.to_encode, first.encoded) == (5, 5)
    assert len(TeacherStore.open(tmp_path / "s")) == 5
    rest = run(tmp_path / "s", folder, bert)
    assert (rest.already_stored, rest.encoded) == (5, len(set(texts)) - 5)
    store = TeacherStore.open(tmp_path / "s")
    assert store.contains(content_keys("passage", texts)).all() and store.index.duplicates == 0


def test_two_ranks_write_disjoint_segments_covering_every_key(bert: TeacherEncoder, tmp_path: Path) -> None:
    texts = tiny_corpus(50, seed=7)
    folder = write_beir(tmp_path / "beir", texts[:40], texts[40:])
    keys = np.concatenate([content_keys("passage", texts[:40]), content_keys("query", texts[40:])])
    keys = np.unique(keys)
    r0 = run(tmp_path / "s", folder, bert, rank=0, world_size=2, report_wait=0)
    r1 = run(tmp_path / "s", folder, bert, rank=1, world_size=2)
    mine0 = key_slice(keys, 0, 2)
    assert (r0.encoded, r0.other_ranks) == (int(mine0.sum()), int((~mine0).sum()))
    assert 0 < r0.encoded < len(keys)
    assert (r1.encoded, r1.already_stored, r1.other_ranks) == (int((~mine0).sum()), r0.encoded, 0)
    assert "-r0of2-" in r0.segment and "-r1of2-" in r1.segment

    store = TeacherStore.open(tmp_path / "s")
    by_segment = {seg.seg_id: seg.index().keys for seg in store.segments}
    k0, k1 = by_segment[r0.segment], by_segment[r1.segment]
    assert key_slice(k0, 0, 2).all() and key_slice(k1, 1, 2).all()
    assert len(np.intersect1d(k0, k1)) == 0
    assert np.array_equal(np.sort(np.concatenate([k0, k1])), keys)  # every key exactly once
    assert run(tmp_path / "s", folder, bert, rank=0, world_size=2, report_wait=0).encoded == 0


def test_resolve_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_rank(None, None) == (0, 1)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert resolve_rank(None, None) == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert resolve_rank(None, None) == (1, 3)  # torchrun's variables win over SLURM's
    assert resolve_rank(0, 2) == (0, 2)  # arguments win over both
    with pytest.raises(ValueError, match=r"Rank 3 is outside world size 3"):
        resolve_rank(3, None)


# -- config and batching ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"data": ()}, r"data is empty: pass at least one --data SOURCE"),
        ({"roles": ("doc",)}, r"roles must be 'query' and/or 'passage', got \('doc',\)"),
        ({"roles": ()}, r"roles must be 'query' and/or 'passage'"),
        ({"limit": -1}, r"--limit must be >= 0, got -1"),
        ({"window": 0}, r"window and max_batch_size must be positive"),
        ({"max_batch_size": 0}, r"window and max_batch_size must be positive"),
    ],
)
def test_precompute_config_validation(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"store": "s", "data": ("beir:x",), "teacher": TeacherConfig(model="m")}
    with pytest.raises(ValueError, match=message):
        PrecomputeConfig(**{**base, **kwargs})


def test_token_budget_batches_cover_every_text_within_budget() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=1000)
    batches = token_budget_batches(lengths, token_budget=1024, max_batch_size=16)
    flat = np.concatenate(batches)
    assert np.array_equal(np.sort(flat), np.arange(1000))  # each text exactly once
    assert all(len(b) <= 16 and (len(b) == 1 or len(b) * lengths[b].max() <= 1024) for b in batches)
    longest_first = [int(lengths[b].max()) for b in batches]
    assert longest_first == sorted(longest_first, reverse=True)
    real, padded = padding_waste(lengths, batches)
    assert real == int(lengths.sum()) and real <= padded < real * 1.1  # sorting keeps padding small
    assert [b.tolist() for b in token_budget_batches(np.array([500, 3]), 100, 8)] == [[0], [1]]  # over budget alone
    with pytest.raises(ValueError, match="token_budget and max_batch_size must be positive"):
        token_budget_batches(lengths, 0, 8)


def test_summary_to_dict_reports_rates_and_padding(bert: TeacherEncoder, tmp_path: Path) -> None:
    summary = run(tmp_path / "s", write_beir(tmp_path / "beir", tiny_corpus(30, seed=8)), bert)
    d = summary.to_dict()
    json.dumps(d)  # the --json output
    assert d["encoded"] == 30 and d["tokens"] > 0 and d["padded_tokens"] >= d["tokens"]
    assert d["padding_waste"] == round(1 - d["tokens"] / d["padded_tokens"], 4)
    assert d["texts_per_s"] > 0 and d["segment"] == summary.segment and d["fingerprint"] == bert.spec.fingerprint
