"""load_teacher: the TeacherSpec describes what actually runs; overrides, presets and weight identity."""

from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from precompute.config import GTE_QWEN2_QUERY_PROMPT
from precompute.teacher import (
    TeacherConfig,
    count_tokens,
    expected_spec,
    load_teacher,
    load_tokenizer,
    spec_from_files,
    weights_identity,
)
from storage.errors import DdxError
from storage.keys import content_keys
from storage.spec import TeacherSpec
from storage.store import TeacherStore
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


def test_weights_id_cache_is_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The weights-id cache is rewritten by temp file and rename (a new inode), never truncated in place."""
    monkeypatch.setenv("DDX_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights one")
    first = weights_identity(str(model))[1]
    cache = tmp_path / "cache" / "weights-ids.json"
    inode = cache.stat().st_ino
    (model / "model.safetensors").write_bytes(b"weights two")
    assert weights_identity(str(model))[1] != first
    assert cache.stat().st_ino != inode, "a reader could have met a torn cache file"
    assert len(json.loads(cache.read_text())) == 2 and [p.name for p in cache.parent.iterdir()] == [cache.name]


def test_weights_identity_errors(tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(DdxError, match=r"is a file; pass the model's folder"):
        weights_identity(str(tiny_bert / "modules.json"))
    with pytest.raises(DdxError, match=r"Cannot load teacher 'nobody/no-such-model-xyz': not a local folder"):
        weights_identity("nobody/no-such-model-xyz")  # offline in tests: the hub cache has no such model
    (tmp_path / "empty").mkdir()
    with pytest.raises(DdxError, match=r"holds no model files"):
        weights_identity(str(tmp_path / "empty"))


# -- the spec from files alone (checked against a store before the weights load) -------------------------------------


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def _variant(source: Path, target: Path, edit: str) -> Path:
    """A copy of a tiny model whose config files take another of the forms real models have."""
    folder = Path(shutil.copytree(source, target))
    if edit == "tokenizer-longer-than-positions":  # capped at config.json's max_position_embeddings (128)
        _edit_json(folder / "tokenizer_config.json", model_max_length=512)
    elif edit == "max-seq-length-in-st-config":  # sentence_bert_config.json wins, uncapped
        _edit_json(folder / "sentence_bert_config.json", max_seq_length=64)
    elif edit == "legacy-pooling-config":  # the format of models saved before sentence-transformers 6
        (folder / "1_Pooling" / "config.json").write_text(
            json.dumps(
                {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}
            )
        )
    elif edit == "do-lower-case":  # sentence-transformers lowercases before a cased tokenizer
        _edit_json(folder / "sentence_bert_config.json", do_lower_case=True)
    elif edit == "no-saved-prompts":
        (folder / "config_sentence_transformers.json").unlink()
    elif edit == "dense-head":
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Dense

        model = SentenceTransformer(str(source), device="cpu")
        model.insert(2, Dense(32, 16))  # before Normalize: the output is 16-d
        shutil.rmtree(folder)
        model.save(str(folder))
    return folder


@pytest.mark.parametrize(
    ("model", "edit", "overrides"),
    [
        ("bert", None, {}),
        ("qwen", None, {}),
        ("bert", None, dict(pooling="cls", normalize=False, padding_side="left", max_seq_length=16)),
        ("bert", None, dict(query_prompt="query: ", passage_prompt="passage: ", dtype="float32")),
        ("qwen", None, dict(normalize=False, passage_prompt="doc: ", pooling="mean")),
        ("bert", "tokenizer-longer-than-positions", {}),
        ("bert", "max-seq-length-in-st-config", {}),
        ("bert", "legacy-pooling-config", {}),
        ("qwen", "no-saved-prompts", {}),
        ("qwen", "do-lower-case", {}),
        ("bert", "dense-head", {}),
    ],
)
def test_expected_spec_from_files_is_the_loaded_spec(
    tiny_bert: Path, tiny_qwen2: Path, tmp_path: Path, model: str, edit: str | None, overrides: dict[str, Any]
) -> None:
    """Every field read from the files (no weights) equals what the loaded teacher reports: a prediction that
    differed would refuse a store the teacher actually matches. Only tiny BERT's padding side is left to the load
    (its tokenizer_config.json does not save one: the tokenizer class's default applies). ``spec_from_files``
    settles it from the tokenizer alone: its whole spec, so its fingerprint, is the loaded teacher's (what the
    Ray driver creates the store with), and the tokenizer alone counts tokens as the loaded teacher does."""
    path = {"bert": tiny_bert, "qwen": tiny_qwen2}[model]
    if edit:
        path = _variant(path, tmp_path / "variant", edit)
    config = TeacherConfig(model=str(path), device="cpu", **overrides)
    expected = expected_spec(config)
    encoder = load_teacher(config)
    loaded = encoder.spec.to_dict()
    assert expected == {k: loaded[k] for k in expected}
    unsettled = {f.name for f in fields(TeacherSpec)} - set(expected)
    assert unsettled == (set() if model == "qwen" or "padding_side" in overrides else {"padding_side"})
    assert spec_from_files(config) == encoder.spec
    assert spec_from_files(config).fingerprint == encoder.spec.fingerprint
    texts = ["a protein study of the heart", "zebra " * 300, "Ünïcödé — 漢字", "x", "The Protein STUDY"]
    tokenizer = load_tokenizer(config)
    for role in ("query", "passage"):
        counted = count_tokens(tokenizer, texts, encoder.spec.prompt(role), encoder.spec.max_seq_length)
        np.testing.assert_array_equal(counted, encoder.token_lengths(texts, role))


def test_expected_spec_leaves_out_what_the_files_do_not_settle(tiny_bert: Path, tmp_path: Path) -> None:
    """An unknown module type, or a tokenizer without a saved padding side: those fields are left to the load."""
    folder = Path(shutil.copytree(tiny_bert, tmp_path / "odd"))
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "x", "path": "", "type": "my_package.modules.Whitening"})
    (folder / "modules.json").write_text(json.dumps(modules))
    _edit_json(folder / "tokenizer_config.json", padding_side=None)
    expected = expected_spec(TeacherConfig(model=str(folder), device="cpu"))
    assert "dim" not in expected and "padding_side" not in expected
    assert (expected["pooling"], expected["normalize"], expected["max_seq_length"]) == ("mean", True, 128)


def test_expected_spec_loads_no_weights(tiny_bert: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(SentenceTransformer, "__init__", refuse)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", refuse)
    assert expected_spec(TeacherConfig(model=str(tiny_bert), device="cpu"))["dim"] == 32
    spec = spec_from_files(TeacherConfig(model=str(tiny_bert), dtype="bfloat16"))  # a driver planning GPU actors
    assert (spec.dim, spec.padding_side, spec.dtype) == (32, "right", "bfloat16")


def test_spec_from_files_names_what_the_files_do_not_settle(tiny_bert: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(tiny_bert, tmp_path / "odd"))
    modules = json.loads((folder / "modules.json").read_text())
    modules.insert(2, {"idx": 2, "name": "x", "path": "", "type": "my_package.modules.Whitening"})
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(DdxError, match=r"its files do not settle dim without loading its weights.*local engine"):
        spec_from_files(TeacherConfig(model=str(folder), device="cpu"))


@pytest.mark.parametrize(
    ("env", "gpus", "want"),
    [
        ({"LOCAL_RANK": "1"}, 2, "cuda:1"),
        ({"SLURM_LOCALID": "1"}, 2, "cuda:1"),  # srun without torchrun
        ({"LOCAL_RANK": "0", "SLURM_LOCALID": "1"}, 2, "cuda:0"),  # torchrun's own rank wins
        ({"SLURM_LOCALID": "3"}, 1, "cuda:0"),  # --gpus-per-task=1: each task sees its GPU as cuda:0
        ({}, 4, "cuda:0"),
    ],
)
def test_default_device_follows_the_launcher(
    env: dict[str, str], gpus: int, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from precompute.teacher import default_device

    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert default_device() == want


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_blocks_give_the_eager_vectors(device: str, tiny_qwen2: Path, tmp_path: Path) -> None:
    """--compile: every block compiled once (dynamic shapes: batches of any size and length reuse it), the same
    spec, and the eager teacher's vectors to float noise through the real pipeline (a misaligned row: ~0.1)."""
    import torch

    from precompute.pipeline import PrecomputeConfig, precompute
    from tests.precompute.test_pipeline import write_beir
    from tests.tiny_models import tiny_corpus

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    eager = load_teacher(TeacherConfig(model=str(tiny_qwen2), device=device))
    compiled = load_teacher(TeacherConfig(model=str(tiny_qwen2), device=device, compile=True))
    assert compiled.spec == eager.spec
    blocks = compiled.model[0].auto_model.layers
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None for b in blocks)
    texts = tiny_corpus(50, seed=9)
    folder = write_beir(tmp_path / "beir", texts, texts[:10])
    for name, enc in (("eager", eager), ("compiled", compiled)):
        config = PrecomputeConfig(
            store=str(tmp_path / name),
            data=(f"beir:{folder}",),
            teacher=TeacherConfig(model=str(tiny_qwen2)),
            token_budget=96,
            max_batch_size=7,
            progress=False,
        )
        with torch._dynamo.config.patch(error_on_recompile=name == "compiled"):  # compiled once, at load
            summary = precompute(config, encoder=enc)
        assert summary.encoded == 60 and summary.forward_calls > 8  # many batch shapes
    for role, role_texts in (("passage", texts), ("query", texts[:10])):
        a, b = (TeacherStore.open(tmp_path / n).get(content_keys(role, role_texts)) for n in ("eager", "compiled"))
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-2 if device == "cuda" else 1e-3)
