"""StudentModelWithProjection: forward, state_dict coverage, and the three saved artifacts loading on their own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.model.model import HYBRID_DIR, STUDENT_DIR, StudentModelWithProjection
from distill.model.projection import PROJECTION_FILE, ProjectionLayer, ProjectionNotFoundError
from storage.errors import DdxError, DimensionMismatchError

TEACHER_DIM = 40
TEXTS = [
    "what is the capital of the country",
    "zebra",
    "a study of protein and gene risk in heart cancer patient trial with a dose effect",
    "the team won the first game of the season",
]


@pytest.fixture
def model(tiny_bert: Path) -> StudentModelWithProjection:
    torch.manual_seed(0)
    return StudentModelWithProjection.from_pretrained(str(tiny_bert), TEACHER_DIM, device="cpu").eval()


@pytest.fixture
def saved(model: StudentModelWithProjection, tmp_path: Path) -> Path:
    return model.save(tmp_path / "run", teacher_normalize=True)


def test_forward_shapes_and_student_output(model: StudentModelWithProjection, tiny_bert: Path) -> None:
    from sentence_transformers import SentenceTransformer

    features = model.tokenize(TEXTS)
    keys_before = set(features)
    out = model(features)
    assert out["student"].shape == (4, 32) and out["projected"].shape == (4, TEACHER_DIM)
    assert set(features) == keys_before, "forward must not modify the caller's features"
    plain = SentenceTransformer(str(tiny_bert), device="cpu").eval()
    with torch.no_grad():
        expected = plain({k: features[k] for k in ("input_ids", "attention_mask")})["sentence_embedding"]
    torch.testing.assert_close(out["student"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["projected"], model.projection(out["student"]))
    assert (model.student_dim, model.teacher_dim, model.projection.hidden_dim) == (32, TEACHER_DIM, 64)


def test_projection_is_part_of_the_model(model: StudentModelWithProjection) -> None:
    state = model.state_dict()
    projection_keys = {k for k in state if k.startswith("projection.")}
    assert projection_keys == {f"projection.{k}" for k in model.projection.state_dict()}
    assert any(k.startswith("student.") for k in state)
    param_ids = {id(p) for p in model.parameters()}
    assert all(id(p) in param_ids for p in model.projection.parameters())


def test_encode_helpers_keep_input_order(model: StudentModelWithProjection) -> None:
    with torch.no_grad():
        out = model(model.tokenize(TEXTS))
    student = model.encode_student(TEXTS, batch_size=3)
    projected = model.encode_projected(TEXTS, batch_size=3)
    torch.testing.assert_close(student, out["student"], rtol=0, atol=1e-5)
    torch.testing.assert_close(projected, out["projected"], rtol=0, atol=1e-5)
    assert model.encode_projected([]).shape == (0, TEACHER_DIM)


def test_save_writes_three_artifacts(saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == sorted([STUDENT_DIR, HYBRID_DIR, PROJECTION_FILE])
    modules = json.loads((saved / HYBRID_DIR / "modules.json").read_text())
    names = [m["type"].rsplit(".", 1)[1] for m in modules]
    assert names == ["Transformer", "Pooling", "Normalize", "Dense", "LayerNorm", "Dense", "Normalize"]


def test_student_base_reproduces_student(model: StudentModelWithProjection, saved: Path) -> None:
    from sentence_transformers import SentenceTransformer

    plain = SentenceTransformer(str(saved / STUDENT_DIR), device="cpu")
    assert plain.get_embedding_dimension() == 32
    expected = model.encode_student(TEXTS)
    torch.testing.assert_close(plain.encode(TEXTS, convert_to_tensor=True), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("normalize", [True, False])
def test_hybrid_reproduces_projected(model: StudentModelWithProjection, tmp_path: Path, normalize: bool) -> None:
    from sentence_transformers import SentenceTransformer

    out = model.save(tmp_path / "run", teacher_normalize=normalize)
    hybrid = SentenceTransformer(str(out / HYBRID_DIR), device="cpu")
    assert hybrid.get_embedding_dimension() == TEACHER_DIM
    expected = model.encode_projected(TEXTS)
    if normalize:
        expected = F.normalize(expected, dim=-1)
    got = hybrid.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_hybrid_keeps_prompts_and_last_token_pooling(tiny_qwen2: Path, tmp_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(1)
    model = StudentModelWithProjection.from_pretrained(str(tiny_qwen2), TEACHER_DIM, device="cpu")
    out = model.save(tmp_path / "run", teacher_normalize=False)
    hybrid = SentenceTransformer(str(out / HYBRID_DIR), device="cpu")
    assert hybrid.prompts["query"] == model.student.prompts["query"]
    got = hybrid.encode(TEXTS, prompt_name="query", convert_to_tensor=True)
    expected = model.encode_projected(TEXTS, prompt_name="query")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, model.encode_projected(TEXTS), atol=1e-3), "prompt had no effect"


def test_load_round_trip(model: StudentModelWithProjection, saved: Path) -> None:
    restored = StudentModelWithProjection.load(saved, device="cpu").eval()
    assert (restored.student_dim, restored.teacher_dim) == (32, TEACHER_DIM)
    features = model.tokenize(TEXTS)
    with torch.no_grad():
        a, b = model(features), restored(features)
    torch.testing.assert_close(b["student"], a["student"], rtol=0, atol=1e-6)
    torch.testing.assert_close(b["projected"], a["projected"], rtol=0, atol=1e-6)


def test_save_overwrites_previous_run(model: StudentModelWithProjection, saved: Path) -> None:
    with torch.no_grad():
        model.projection.fc2.bias.add_(1.0)
    model.save(saved, teacher_normalize=True)
    restored = StudentModelWithProjection.load(saved, device="cpu")
    torch.testing.assert_close(restored.projection.fc2.bias, model.projection.fc2.bias)
    assert not [p.name for p in saved.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_dimension_mismatch_names_both_and_fix(model: StudentModelWithProjection) -> None:
    wrong = ProjectionLayer(student_dim=16, teacher_dim=TEACHER_DIM)
    with pytest.raises(DimensionMismatchError, match=r"emits 32-d embeddings but the projection expects 16-d.*"):
        StudentModelWithProjection(model.student, wrong)
    with pytest.raises(DimensionMismatchError, match=r"Build the projection with student_dim=32"):
        StudentModelWithProjection(model.student, wrong)


def test_load_errors(saved: Path, tmp_path: Path) -> None:
    (saved / PROJECTION_FILE).unlink()
    with pytest.raises(ProjectionNotFoundError, match=rf"No projection layer at '.*{PROJECTION_FILE}'"):
        StudentModelWithProjection.load(saved, device="cpu")
    with pytest.raises(DdxError, match=rf"No student model at '.*{STUDENT_DIR}' \(modules.json missing\)"):
        StudentModelWithProjection.load(tmp_path / "empty", device="cpu")


def test_unknown_prompt_name(model: StudentModelWithProjection) -> None:
    with pytest.raises(DdxError, match="Prompt name 'passage' is not one of the student's prompts"):
        model.tokenize(TEXTS, prompt_name="passage")


def test_reference_call_forms(tiny_bert: Path) -> None:
    """A model name or a SentenceTransformer, the projection built to the teacher's dimension when not given."""
    from sentence_transformers import SentenceTransformer

    by_name = StudentModelWithProjection(str(tiny_bert), teacher_dim=TEACHER_DIM)
    assert (by_name.student_dim, by_name.teacher_dim) == (32, TEACHER_DIM)
    assert StudentModelWithProjection(tiny_bert).teacher_dim == 3584  # the reference teacher's by default
    student = SentenceTransformer(str(tiny_bert), device="cpu")
    given = ProjectionLayer(student_dim=32, teacher_dim=8)
    assert StudentModelWithProjection(student, given).projection is given
    assert StudentModelWithProjection(student=student, projection=given).teacher_dim == 8
