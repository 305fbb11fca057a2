"""Bad input, wrong stores and a full disk: a clear error, and nothing already stored is lost."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from precompute.pipeline import PrecomputeConfig, precompute
from precompute.sources import Source, SourceOptions, TextRecord
from precompute.sources.errors import BadSourceError
from precompute.teacher import TeacherConfig, TeacherEncoder, load_teacher
from storage.errors import (
    DimensionMismatchError,
    DiskFullError,
    FingerprintMismatchError,
    FormatVersionError,
    StoreExistsError,
    StoreNotFoundError,
)
from storage.fs import Location
from storage.keys import content_keys
from storage.maintenance import verify_store
from storage.metadata import sealed
from storage.store import TeacherStore
from tests.precompute.test_pipeline import (
    direct,
    one_torch_thread,  # noqa: F401 - autouse fixture
    run,
    write_beir,
)
from tests.tiny_models import build_tiny_qwen2, tiny_corpus

SEED_TEXTS = tiny_corpus(24, seed=30)


@pytest.fixture(scope="module")
def bert(tiny_bert: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))


@pytest.fixture
def seeded(bert: TeacherEncoder, tmp_path: Path) -> Path:
    """A store holding one committed segment of 24 passages: what must survive every error below."""
    store = tmp_path / "store"
    run(store, write_beir(tmp_path / "seed", SEED_TEXTS), bert)
    return store


def assert_intact(store_path: Path) -> None:
    """The seeded rows are all there, with their values, and the store verifies."""
    store = TeacherStore.open(store_path)
    keys = content_keys("passage", SEED_TEXTS)
    assert store.contains(keys).all()
    assert np.isfinite(store.get(keys)).all() and np.abs(store.get(keys)).sum() > 0
    assert verify_store(store).ok


def beir_lines(folder: Path, lines: list[str]) -> Path:
    folder.mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def passage(pid: str, text: str) -> str:
    return json.dumps({"_id": pid, "title": "", "text": text})


# -- bad sources ---------------------------------------------------------------------------------------------------


def test_missing_folder(bert: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    with pytest.raises(BadSourceError, match=r"No such file or folder '.*nowhere' \(beir: expects a BEIR folder"):
        run(seeded, tmp_path / "nowhere", bert)
    assert_intact(seeded)


def test_beir_folder_without_corpus(bert: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    folder = tmp_path / "only-queries"
    folder.mkdir()
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1", "text": "what"}) + "\n")
    with pytest.raises(BadSourceError, match=r"BEIR folder '.*only-queries' has no corpus\.jsonl; corpus\.jsonl is"):
        run(seeded, folder, bert)
    assert_intact(seeded)


def test_malformed_json_line_names_file_and_line(bert: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    folder = beir_lines(
        tmp_path / "bad",
        [passage("a", "fine one"), passage("b", "fine two"), '{"_id": "c", "text": ', passage("d", "fine four")],
    )
    with pytest.raises(BadSourceError, match=r"corpus\.jsonl:3: malformed JSON .*--skip-bad"):
        run(seeded, folder, bert)
    assert_intact(seeded)
    assert len(TeacherStore.open(seeded).segments) == 1  # stopped in the scan: no segment was started

    summary = run(seeded, folder, bert, skip_bad=True)
    assert (summary.skipped_bad, summary.sources[0]["skipped_bad"], summary.encoded) == (1, 1, 3)
    assert TeacherStore.open(seeded).contains(content_keys("passage", ["fine one", "fine two", "fine four"])).all()
    assert_intact(seeded)


def test_empty_and_whitespace_texts(bert: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    folder = beir_lines(tmp_path / "empty", [passage("a", "fine"), passage("b", "   \t "), passage("c", "")])
    with pytest.raises(BadSourceError, match=r"corpus\.jsonl:2: empty text for id 'b'"):
        run(seeded, folder, bert)
    summary = run(seeded, folder, bert, skip_bad=True)
    assert (summary.skipped_bad, summary.encoded) == (2, 1)
    assert_intact(seeded)


class WhitespaceSource(Source):
    """A source that does not check its texts itself: the pipeline must."""

    kind = "test"

    def iter_texts(self, role: str | None = None) -> Iterator[TextRecord]:
        yield TextRecord("1", "fine", "passage", "mem:1")
        yield TextRecord("2", " \n ", "passage", "mem:2")


def test_pipeline_rejects_blank_texts_from_any_source(bert: TeacherEncoder, seeded: Path) -> None:
    from precompute.pipeline import PrecomputeConfig

    config = PrecomputeConfig(store=str(seeded), data=("test:mem",), teacher=TeacherConfig(model="m"), progress=False)
    with pytest.raises(BadSourceError, match=r"mem:2: empty text for id '2' \(passage\)"):
        precompute(config, encoder=bert, sources=[WhitespaceSource("test:mem", "mem", SourceOptions())])
    assert_intact(seeded)


def test_duplicate_id_with_different_texts(bert: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    folder = beir_lines(
        tmp_path / "dup",
        [
            passage("p1", "first text"),
            passage("p2", "other"),
            passage("p1", "first text"),
            passage("p1", "a different text"),
        ],
    )
    with pytest.raises(
        BadSourceError,
        match=r"corpus\.jsonl:4: duplicate id 'p1' with different texts at "
        r".*corpus\.jsonl:1 and .*corpus\.jsonl:4",
    ):
        run(seeded, folder, bert)
    summary = run(seeded, folder, bert, skip_bad=True)  # the same id with the same text (line 3) is no error
    assert (summary.skipped_bad, summary.encoded) == (1, 2)
    assert_intact(seeded)


# -- wrong stores --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen32(tmp_path_factory: pytest.TempPathFactory) -> TeacherEncoder:
    """A tiny Qwen2 with tiny BERT's dimension (32): its store conflict is a fingerprint, not a dimension."""
    path = build_tiny_qwen2(tmp_path_factory.mktemp("models") / "qwen32", dim=32)
    return load_teacher(TeacherConfig(model=str(path), device="cpu"))


def test_store_of_another_teacher_names_the_fields(qwen32: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    folder = write_beir(tmp_path / "beir", ["new text"])
    with pytest.raises(
        FingerprintMismatchError,
        match=r"was made by another teacher spec \(weights_id: store has "
        r"'files:.*pooling: store has 'mean', requested 'lasttoken'.*"
        r"padding_side: store has 'right', requested 'left'",
    ):
        run(seeded, folder, qwen32)
    assert_intact(seeded)


def test_same_model_other_pooling_names_only_pooling(tiny_bert: Path, seeded: Path, tmp_path: Path) -> None:
    cls = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu", pooling="cls"))
    with pytest.raises(
        FingerprintMismatchError,
        match=r"\(pooling: store has 'mean', requested 'cls'\)\. Use the "
        r"store's settings \(see 'ddx cache info",
    ):
        run(seeded, write_beir(tmp_path / "beir", ["new text"]), cls)
    assert_intact(seeded)


def test_dimension_that_disagrees_with_the_store(qwen: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    with pytest.raises(
        DimensionMismatchError,
        match=r"holds 32-d vectors of .*tiny-bert.*, but the teacher "
        r".*tiny-qwen2.* gives 48-d vectors",
    ):
        run(seeded, write_beir(tmp_path / "beir", ["new text"]), qwen)
    assert_intact(seeded)


@pytest.fixture
def qwen(tiny_qwen2: Path) -> TeacherEncoder:
    return load_teacher(TeacherConfig(model=str(tiny_qwen2), device="cpu"))


def test_store_from_a_newer_format(bert: TeacherEncoder, seeded: Path, tmp_path: Path) -> None:
    meta = seeded / "zarr.json"
    original = meta.read_text()
    doc = json.loads(original)
    doc["attributes"]["ddx"] = sealed({**doc["attributes"]["ddx"], "format_version": 99})  # as a newer ddx writes it
    meta.write_text(json.dumps(doc))
    with pytest.raises(FormatVersionError, match=r"has format version 99; this ddx reads versions up to 3\. Upgrade"):
        run(seeded, write_beir(tmp_path / "beir", ["new text"]), bert)
    assert json.loads(meta.read_text())["attributes"]["ddx"]["format_version"] == 99  # left as it was
    meta.write_text(original)
    assert_intact(seeded)


def test_store_path_that_is_a_file(bert: TeacherEncoder, tmp_path: Path) -> None:
    target = tmp_path / "store.txt"
    target.write_text("my notes")
    with pytest.raises(StoreNotFoundError, match=r"store\.txt' is a file, not a store directory"):
        run(target, write_beir(tmp_path / "beir", ["new text"]), bert)
    assert target.read_text() == "my notes"


def test_store_path_that_is_another_folder(bert: TeacherEncoder, tmp_path: Path) -> None:
    """A non-empty folder that is no store: an error at once (no waiting for a concurrent creator), nothing written."""
    folder = tmp_path / "my-project"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    os.utime(folder, (time.time() - 3600, time.time() - 3600))  # not being created by another rank right now
    started = time.monotonic()
    with pytest.raises(StoreExistsError, match=r"my-project' already exists and is not empty; open it, or pick a new"):
        run(folder, write_beir(tmp_path / "beir", ["new text"]), bert)
    assert time.monotonic() - started < 5
    assert [p.name for p in folder.iterdir()] == ["notes.txt"]


# -- spec mismatches found before the teacher's weights load --------------------------------------------------------


class TeacherLoaded(AssertionError):
    """Raised when a test's precompute gets as far as loading the teacher's weights."""


@pytest.fixture
def teacher_loads() -> Iterator[list[str]]:
    """Every SentenceTransformer load is recorded and stopped with :class:`TeacherLoaded`; yields the record."""
    from sentence_transformers import SentenceTransformer

    loads: list[str] = []

    def refuse(self: Any, model_name_or_path: Any = None, *args: Any, **kwargs: Any) -> None:
        loads.append(str(model_name_or_path))
        raise TeacherLoaded(f"the teacher's weights loaded: {model_name_or_path}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SentenceTransformer, "__init__", refuse)
        yield loads


def _precompute_with(store: Path, folder: Path, model: Path, **teacher: Any) -> None:
    """A precompute as ``ddx precompute-teacher`` runs it: the teacher is loaded from the config."""
    config = TeacherConfig(model=str(model), device="cpu", **teacher)
    precompute(PrecomputeConfig(store=str(store), data=(f"beir:{folder}",), teacher=config, progress=False))


@pytest.mark.parametrize(
    ("teacher", "named"),
    [
        ({"pooling": "cls"}, "pooling: store has 'mean', requested 'cls'"),
        ({"normalize": False}, "normalize: store has True, requested False"),
        ({"max_seq_length": 64}, "max_seq_length: store has 128, requested 64"),
        ({"query_prompt": "query: "}, "query_prompt: store has '', requested 'query: '"),
        ({"padding_side": "left"}, "padding_side: store has 'right', requested 'left'"),
        ({"dtype": "bfloat16"}, "dtype: store has 'float32', requested 'bfloat16'"),
    ],
)
def test_spec_mismatch_is_found_before_the_teacher_loads(
    tiny_bert: Path, seeded: Path, tmp_path: Path, teacher_loads: list[str], teacher: dict[str, Any], named: str
) -> None:
    with pytest.raises(FingerprintMismatchError, match=rf"was made by another teacher spec \({re.escape(named)}\)"):
        _precompute_with(seeded, write_beir(tmp_path / "beir", ["new text"]), tiny_bert, **teacher)
    assert teacher_loads == []
    assert_intact(seeded)


def test_other_weights_and_dimension_are_found_before_the_teacher_loads(
    tiny_bert: Path, tiny_qwen2: Path, seeded: Path, tmp_path: Path, teacher_loads: list[str]
) -> None:
    folder = write_beir(tmp_path / "beir", ["new text"])
    with pytest.raises(
        DimensionMismatchError, match=r"holds 32-d vectors of .*tiny-bert.*, but the teacher .*gives 48-d"
    ):
        _precompute_with(seeded, folder, tiny_qwen2)
    changed = Path(shutil.copytree(tiny_bert, tmp_path / "retrained"))
    weights = changed / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(FingerprintMismatchError, match=r"\(weights_id: store has 'files:\w+', requested 'files:\w+'\)"):
        _precompute_with(seeded, folder, changed)
    assert teacher_loads == []


def test_matching_spec_goes_on_to_load_the_teacher(
    tiny_bert: Path, seeded: Path, tmp_path: Path, teacher_loads: list[str]
) -> None:
    """The control: the same teacher passes the early check (and would then load)."""
    with pytest.raises(TeacherLoaded):
        _precompute_with(seeded, write_beir(tmp_path / "beir", ["new text"]), tiny_bert)
    assert teacher_loads == [str(tiny_bert)]


# -- disk full -----------------------------------------------------------------------------------------------------


def test_disk_full_mid_write_then_rerun_completes(
    bert: TeacherEncoder, tiny_bert: Path, seeded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC on the 4th chunk-file write (chunk files go through ``Location.write_atomic``, as in
    tests/storage/test_disk_full.py)."""
    texts = tiny_corpus(80, seed=31)
    folder = write_beir(tmp_path / "new", texts)
    put, writes = Location.write_atomic, []

    def full_after_three(self: Location, data: bytes, *parts: str, sync: bool = True) -> None:
        if "/vectors/c/" in "/".join(parts):
            writes.append("/".join(parts))
            if len(writes) > 3:
                raise OSError(errno.ENOSPC, "No space left on device", self.join(*parts))
        put(self, data, *parts, sync=sync)

    monkeypatch.setattr(Location, "write_atomic", full_after_three)
    with pytest.raises(
        DiskFullError,
        match=r"Disk full while writing segment '.*': \d+ rows of this run are saved, "
        r"committed segments are untouched\. Free space and rerun the same command",
    ):
        run(seeded, folder, bert, flush_rows=8, flush_seconds=0, max_batch_size=8)
    assert_intact(seeded)  # committed segments stay readable, even while the failed one sits beside them
    store = TeacherStore.open(seeded)
    [(failed, state)] = store.uncommitted_segments()
    assert state == "abandoned"  # the writer let go of its lock

    monkeypatch.setattr(Location, "write_atomic", put)  # space freed
    summary = run(seeded, folder, bert, flush_rows=8, flush_seconds=0)
    [salvaged] = summary.salvaged
    assert salvaged["segment"] == failed and 0 < salvaged["rows"] < len(texts)
    assert summary.encoded == len(set(texts)) - salvaged["rows"]
    store = TeacherStore.open(seeded)
    assert store.uncommitted_segments() == [] and store.index.duplicates == 0
    np.testing.assert_allclose(
        store.get(content_keys("passage", texts)).astype(np.float32),
        direct(tiny_bert, texts, "passage"),
        atol=2e-3,
        rtol=0,
    )
    assert_intact(seeded)
