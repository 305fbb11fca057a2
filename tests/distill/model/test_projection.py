"""ProjectionLayer: shapes, save/load round trip and its errors, and the sentence-transformers equivalent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distill.model.projection import PROJECTION_FILE, ProjectionLayer, ProjectionNotFoundError
from storage.errors import DdxError, DimensionMismatchError, FormatVersionError


@pytest.fixture
def layer() -> ProjectionLayer:
    torch.manual_seed(0)
    return ProjectionLayer(student_dim=8, teacher_dim=12, hidden_dim=10)


def test_shapes_and_default_hidden_dim() -> None:
    proj = ProjectionLayer(student_dim=6, teacher_dim=20)
    assert proj.hidden_dim == 12
    assert proj(torch.randn(3, 6)).shape == (3, 20)
    assert proj(torch.randn(2, 4, 6)).shape == (2, 4, 20)
    n_params = sum(p.numel() for p in proj.parameters())
    assert n_params == (6 * 12 + 12) + 2 * 12 + (12 * 20 + 20)


def test_layer_order_is_linear_gelu_layernorm_linear(layer: ProjectionLayer) -> None:
    x = torch.randn(4, 8)
    hidden = nn.functional.gelu(x @ layer.fc1.weight.T + layer.fc1.bias)
    hidden = nn.functional.layer_norm(hidden, (10,), layer.norm.weight, layer.norm.bias, eps=1e-5)
    expected = hidden @ layer.fc2.weight.T + layer.fc2.bias
    torch.testing.assert_close(layer(x), expected)


def test_wrong_input_dim_names_both(layer: ProjectionLayer) -> None:
    with pytest.raises(DimensionMismatchError, match=r"expects 8-d student embeddings, got shape \(2, 5\)"):
        layer(torch.randn(2, 5))


@pytest.mark.parametrize("kwargs", [{"student_dim": 0, "teacher_dim": 4}, {"student_dim": 4, "teacher_dim": 2.5}])
def test_bad_dims_rejected(kwargs: dict) -> None:
    with pytest.raises(DdxError, match="must be a positive integer"):
        ProjectionLayer(**kwargs)


def test_save_load_round_trip(layer: ProjectionLayer, tmp_path: Path) -> None:
    file = layer.save(tmp_path / "run")
    assert file == tmp_path / "run" / PROJECTION_FILE
    payload = torch.load(file, weights_only=True)
    assert {k: payload[k] for k in ("student_dim", "hidden_dim", "teacher_dim", "format")} == {
        "student_dim": 8,
        "hidden_dim": 10,
        "teacher_dim": 12,
        "format": 1,
    }
    assert set(payload["state_dict"]) == set(layer.state_dict())
    x = torch.randn(3, 8)
    for source in (tmp_path / "run", file):  # the folder or the file itself
        restored = ProjectionLayer.load(source)
        assert (restored.student_dim, restored.hidden_dim, restored.teacher_dim) == (8, 10, 12)
        torch.testing.assert_close(restored(x), layer(x), rtol=0, atol=0)
    assert not list((tmp_path / "run").glob("*.tmp")), "temp file left behind"


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ProjectionNotFoundError, match=rf"No projection layer at '.*{PROJECTION_FILE}'"):
        ProjectionLayer.load(tmp_path)
    with pytest.raises(FileNotFoundError):
        ProjectionLayer.load(tmp_path / "nowhere.pt")


def test_load_garbage_file(tmp_path: Path) -> None:
    (tmp_path / PROJECTION_FILE).write_bytes(b"not a torch file")
    with pytest.raises(DdxError, match=rf"'.*{PROJECTION_FILE}' is unreadable"):
        ProjectionLayer.load(tmp_path)


def test_load_malformed_and_newer_format(layer: ProjectionLayer, tmp_path: Path) -> None:
    file = layer.save(tmp_path)
    payload = torch.load(file, weights_only=True)
    torch.save({k: v for k, v in payload.items() if k != "teacher_dim"}, file)
    with pytest.raises(DdxError, match=r"malformed: missing \['teacher_dim'\]"):
        ProjectionLayer.load(file)
    torch.save({**payload, "format": 3}, file)
    with pytest.raises(FormatVersionError, match="has format 3; this ddx reads formats 1, 2"):
        ProjectionLayer.load(file)
    torch.save({**payload, "teacher_dim": 13}, file)
    with pytest.raises(DdxError, match="weights that do not fit"):
        ProjectionLayer.load(file)


def test_sentence_transformer_modules_match(layer: ProjectionLayer, tmp_path: Path) -> None:
    from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm

    modules = layer.to_sentence_transformer_modules()
    assert [type(m).__name__ for m in modules] == ["Dense", "LayerNorm", "Dense"]
    x = torch.randn(5, 8)
    features = {"sentence_embedding": x}
    for module in modules:
        features = module(features)
    torch.testing.assert_close(features["sentence_embedding"], layer(x), rtol=0, atol=1e-6)
    # Copies, not views: training the layer further must not change a saved hybrid.
    assert modules[0].linear.weight.data_ptr() != layer.fc1.weight.data_ptr()

    # Dense re-creates its activation from the saved class path: GELU must come back as exact GELU.
    (tmp_path / "dense").mkdir()
    (tmp_path / "norm").mkdir()
    modules[0].save(str(tmp_path / "dense"))
    modules[1].save(str(tmp_path / "norm"))
    dense, norm = Dense.load(str(tmp_path / "dense")), LayerNorm.load(str(tmp_path / "norm"))
    assert isinstance(dense.activation_function, nn.GELU)
    assert dense.activation_function.approximate == "none"
    reloaded = norm({"sentence_embedding": dense({"sentence_embedding": x})["sentence_embedding"]})
    expected = layer.norm(layer.act(layer.fc1(x)))
    torch.testing.assert_close(reloaded["sentence_embedding"], expected, rtol=0, atol=1e-6)


def test_reference_call_forms() -> None:
    """As users of the reference system write it: no arguments, positional (input, hidden, output), its names."""
    default = ProjectionLayer()
    assert (default.student_dim, default.hidden_dim, default.teacher_dim) == (768, 1536, 3584)
    assert default.fc1.weight.shape == (1536, 768) and default.fc2.weight.shape == (3584, 1536)
    positional = ProjectionLayer(768, 1536, 3584)
    assert (positional.student_dim, positional.hidden_dim, positional.teacher_dim) == (768, 1536, 3584)
    named = ProjectionLayer(input_dim=8, output_dim=12)
    assert (named.student_dim, named.hidden_dim, named.teacher_dim) == (8, 16, 12)
    assert ProjectionLayer(student_dim=8, teacher_dim=12).hidden_dim == 16  # ddx's own names still work
    assert ProjectionLayer(8, student_dim=8).student_dim == 8  # the same value under both names is fine
    with pytest.raises(DdxError, match="input_dim=8 and student_dim=9; pass one of them"):
        ProjectionLayer(8, student_dim=9)
