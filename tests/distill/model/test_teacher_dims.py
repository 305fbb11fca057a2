"""``--projection none``: the teacher's vectors cut and renormalised in one place, and the projection slot without a
projection (saved, reloaded, refused where an MLP is needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distill.model.model import StudentModelWithProjection
from distill.model.no_projection import NoProjection, load_projection
from distill.model.projection import PROJECTION_FILE, ProjectionLayer
from distill.model.teacher_dims import check_teacher_dims, truncate_teacher
from storage.errors import DdxError, DimensionMismatchError


def _direct(vectors: np.ndarray, dims: int) -> np.ndarray:
    """The first ``dims`` columns over their L2 norm, in float64 (a zero row stays zero)."""
    cut = vectors[:, :dims].astype(np.float64)
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return np.divide(cut, norms, out=np.zeros_like(cut), where=norms > 0)


def test_truncation_equals_a_direct_numpy_computation() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(6, 12)).astype(np.float16)  # the store's dtype
    vectors[2] = 0  # an all-zero row stays zero (no division by zero)
    for dims in (1, 5, 12):
        got = truncate_teacher(vectors, dims)
        assert got.dtype == np.float32 and got.shape == (6, dims)
        np.testing.assert_allclose(got, _direct(vectors, dims), rtol=0, atol=1e-6)
    assert np.allclose(np.linalg.norm(truncate_teacher(vectors, 5)[[0, 1, 3, 4, 5]], axis=1), 1.0)
    assert truncate_teacher(vectors, None) is vectors, "no dims: the full vectors, untouched"


def test_bad_dims_name_the_flag_and_the_fix() -> None:
    with pytest.raises(DimensionMismatchError, match=r"--teacher-dims 13 is more than the teacher's 12 dims.*<= 12"):
        truncate_teacher(np.ones((2, 12), np.float32), 13)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(DimensionMismatchError, match=r"--teacher-dims must be a whole number >= 1"):
            check_teacher_dims(bad, 12)  # type: ignore[arg-type]
    with pytest.raises(DimensionMismatchError, match="must be 2-D"):
        truncate_teacher(np.ones(12, np.float32), 4)


def test_no_projection_is_the_identity_and_saves_its_dims(tmp_path: Path) -> None:
    slot = NoProjection(8)
    x = torch.randn(3, 8)
    assert slot(x) is x and slot.teacher_dims == slot.teacher_dim == slot.student_dim == 8
    assert slot.to_sentence_transformer_modules() == []
    file = slot.save(tmp_path)
    payload = torch.load(file, weights_only=True)
    assert payload == {"format": 2, "kind": "none", "student_dim": 8, "teacher_dims": 8}
    restored = load_projection(tmp_path)
    assert isinstance(restored, NoProjection) and restored.teacher_dims == 8
    with pytest.raises(DdxError, match=r"belongs to a --projection none run: it holds no projection layer"):
        ProjectionLayer.load(tmp_path)
    layer = ProjectionLayer(8, 10, 12)
    layer.save(tmp_path / "mlp")
    assert isinstance(load_projection(tmp_path / "mlp" / PROJECTION_FILE), ProjectionLayer)
    with pytest.raises(DimensionMismatchError, match=r"expects 8-d student embeddings"):
        slot(torch.randn(2, 6))


def test_dims_other_than_the_students_are_refused() -> None:
    with pytest.raises(
        DimensionMismatchError,
        match=r"--teacher-dims 16 does not match the student's 32-d embeddings.*D must be 32\. Pass --teacher-dims 32",
    ):
        NoProjection(32, 16)


def test_model_without_projection_emits_its_student_vectors_and_a_normalised_hybrid(tiny_bert: Path) -> None:
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    model = StudentModelWithProjection.from_pretrained(str(tiny_bert), 48, device="cpu", projection="none")
    assert model.teacher_dims == model.teacher_dim == model.student_dim == 32
    out = model(model.tokenize(["what is a zebra?", "a quartz river"]))
    assert out["projected"] is out["student"]
    hybrid = model.to_hybrid(teacher_normalize=False)
    modules = list(hybrid.children())
    assert isinstance(modules[-1], Normalize) and not any(isinstance(m, Dense) for m in modules)
    assert sum(isinstance(m, Normalize) for m in modules) == 1, "the tiny student already normalises: no second one"
    texts = ["zebra", "a long river of quartz"]
    np.testing.assert_allclose(hybrid.encode(texts), model.encode_student(texts).numpy(), atol=1e-6)
    with pytest.raises(DimensionMismatchError, match=r"--teacher-dims 32 is more than the teacher's 24 dims"):
        StudentModelWithProjection.from_pretrained(str(tiny_bert), 24, device="cpu", projection="none")
