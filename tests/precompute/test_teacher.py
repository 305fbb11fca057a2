"""load_teacher: the TeacherSpec describes what actually runs; overrides, presets and weight identity."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from precompute.teacher import GTE_QWEN2_QUERY_PROMPT, TeacherConfig, load_teacher, weights_identity
from storage.errors import DdxError
from tests.precompute.test_pipeline import one_torch_thread  # noqa: F401 - autouse fixture
from tests.tiny_models import QWEN_QUERY_PROMPT


def test_spec_of_tiny_bert(tiny_bert: Path) -> None:
    enc = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))
    s = enc.spec
    assert (s.pooling, s.normalize, s.dim, s.max_seq_length, s.padding_side, s.dtype) == (
        "mean",
        True,
        32,
        128,
        "right",
        "float32",
    )
    assert (s.query_prompt, s.passage_prompt, s.model) == ("", "", str(tiny_bert))
    vectors = enc.encode(["a protein study", "the river city"], "passage")
    assert vectors.shape == (2, 32) and vectors.dtype == np.float32 and enc.forward_calls == 1
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_spec_of_tiny_qwen2_and_its_query_prompt(tiny_qwen2: Path) -> None:
    enc = load_teacher(TeacherConfig(model=str(tiny_qwen2), device="cpu"))
    s = enc.spec
    assert (s.pooling, s.padding_side, s.dim, s.query_prompt, s.passage_prompt) == (
        "lasttoken",
        "left",
        48,
        QWEN_QUERY_PROMPT,
        "",
    )
    text = "what is the capital"
    tok = enc.model.tokenizer
    q, p = enc.token_lengths([text], "query")[0], enc.token_lengths([text], "passage")[0]
    assert q == len(tok(QWEN_QUERY_PROMPT + text)["input_ids"]) and p == len(tok(text)["input_ids"])
    assert q > p + 20  # the prompt counts toward the length (and the token budget)
    assert not np.allclose(enc.encode([text], "query"), enc.encode([text], "passage"))


def test_token_lengths_truncate_at_max_seq_length(tiny_bert: Path) -> None:
    enc = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu", max_seq_length=16))
    long_text = " ".join(["protein"] * 100)
    lengths = enc.token_lengths(["cell", long_text] * 300, "passage")  # more than one tokenizer sub-batch
    assert lengths.dtype == np.int32 and len(lengths) == 600
    assert set(lengths[1::2].tolist()) == {16} and set(lengths[::2].tolist()) == {3}  # [CLS] cell [SEP]
    assert enc.spec.max_seq_length == 16


def test_overrides_change_the_model_and_the_spec(tiny_bert: Path) -> None:
    base = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))
    enc = load_teacher(
        TeacherConfig(
            model=str(tiny_bert),
            device="cpu",
            pooling="cls",
            normalize=False,
            padding_side="left",
            query_prompt="query: ",
            passage_prompt="passage: ",
        )
    )
    s = enc.spec
    assert (s.pooling, s.normalize, s.padding_side, s.query_prompt, s.passage_prompt) == (
        "cls",
        False,
        "left",
        "query: ",
        "passage: ",
    )
    assert enc.model.tokenizer.padding_side == "left"
    assert s.fingerprint != base.spec.fingerprint and s.weights_id == base.spec.weights_id
    norms = np.linalg.norm(enc.encode(["a protein study", "the river city"], "passage"), axis=1)
    assert not np.allclose(norms, 1.0)  # Normalize was removed
    assert {d[0] for d in base.spec.differences(s)} == {
        "pooling",
        "normalize",
        "padding_side",
        "query_prompt",
        "passage_prompt",
    }


def test_presets() -> None:
    auto = TeacherConfig(model="Alibaba-NLP/gte-Qwen2-7B-instruct").resolved()
    assert (auto.preset, auto.query_prompt, auto.pooling, auto.padding_side) == (
        "gte-qwen2",
        GTE_QWEN2_QUERY_PROMPT,
        "lasttoken",
        "left",
    )
    mine = TeacherConfig(model="x/gte-qwen2-1.5b", pooling="mean").resolved()
    assert mine.pooling == "mean" and mine.passage_prompt == ""  # flags win over the preset
    assert TeacherConfig(model="plain").resolved() == TeacherConfig(model="plain")
    e5 = TeacherConfig(model="m", preset="e5").resolved()
    assert (e5.query_prompt, e5.passage_prompt) == ("query: ", "passage: ")
    with pytest.raises(ValueError, match=r"Unknown teacher preset 'nope'; choose one of \['bge', 'e5'"):
        TeacherConfig(model="m", preset="nope")
    with pytest.raises(ValueError, match=r"Unknown pooling 'avg'; choose one of"):
        TeacherConfig(model="m", pooling="avg")


def test_weights_identity_follows_the_files_not_the_path(tiny_bert: Path, tmp_path: Path) -> None:
    folder, wid = weights_identity(str(tiny_bert))
    assert folder == str(tiny_bert) and wid.startswith("files:")
    moved = Path(shutil.copytree(tiny_bert, tmp_path / "moved"))
    assert weights_identity(str(moved))[1] == wid  # moving a model folder does not orphan its store
    under_cache = Path(shutil.copytree(tiny_bert, tmp_path / ".cache" / "ddx" / "models" / "bert"))
    assert weights_identity(str(under_cache))[1] == wid  # a model kept under ~/.cache hashes its own files
    (moved / "README.md").write_text("docs do not count")
    assert weights_identity(str(moved))[1] == wid
    weights = next(moved.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert weights_identity(str(moved))[1] != wid  # changed weights: another teacher


def test_weights_identity_errors(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(DdxError, match=r"is a file; pass the model's folder"):
        weights_identity(str(tiny_bert / "modules.json"))
    with pytest.raises(DdxError, match=r"Cannot load teacher 'nobody/no-such-model-xyz': not a local folder"):
        weights_identity("nobody/no-such-model-xyz")  # offline in tests: the hub cache has no such model
    (tmp_path / "empty").mkdir()
    with pytest.raises(DdxError, match=r"holds no model files"):
        weights_identity(str(tmp_path / "empty"))
