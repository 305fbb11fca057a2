"""The projection slot of a ``--projection none`` model: no projection, and the ``D`` it was trained for.

:class:`NoProjection` fills :class:`distill.model.model.StudentModelWithProjection`'s projection slot in that mode
(:mod:`distill.model.teacher_dims` says what the mode is): the identity, saved as the run's ``projection_layer.pt``
(format 2, ``"kind": "none"``, with ``D``), so the run folder says which mode it is, the file stays the run's commit
marker, and every loader reads the one file. :func:`load_projection` reads a ``projection_layer.pt`` of either kind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.model.projection import PROJECTION_FILE, ProjectionLayer, projection_file, read_projection_file
from distill.model.teacher_dims import check_teacher_dims
from storage.errors import DdxError, DimensionMismatchError
from storage.fs import atomic_open

__all__ = ["NONE_FORMAT", "NoProjection", "Projection", "load_projection"]

NONE_FORMAT = 2  # projection_layer.pt format of a NoProjection (distill.model.projection.FORMATS)


class NoProjection(nn.Module):
    """The projection slot of a ``--projection none`` model: the identity on the student's ``d``-dim embeddings.

    Its outputs are compared with :func:`truncate_teacher` ``(teacher, teacher_dims)``. ``teacher_dim`` (the
    dimension of what the model emits, as for :class:`ProjectionLayer`) equals ``student_dim`` equals
    ``teacher_dims``; the module docstring says why ``D`` must be the student's dimension.

    Args:
        student_dim: The student's embedding dimension ``d``.
        teacher_dims: ``D``, the teacher dimensions the student is trained into; ``None`` means ``student_dim``.

    Raises:
        DimensionMismatchError: If ``teacher_dims`` is not ``student_dim``, or a dimension is not a positive integer.

    Example:
        >>> NoProjection(4)(torch.ones(2, 4)).shape, NoProjection(4).teacher_dims
        (torch.Size([2, 4]), 4)
    """

    hidden_dim = None

    def __init__(self, student_dim: int, teacher_dims: int | None = None) -> None:
        super().__init__()
        if isinstance(student_dim, bool) or not isinstance(student_dim, int) or student_dim < 1:
            raise DimensionMismatchError(f"NoProjection student_dim must be a positive integer, got {student_dim!r}.")
        dims = student_dim if teacher_dims is None else teacher_dims
        check_teacher_dims(dims, dims)  # a whole number >= 1
        if dims != student_dim:
            raise DimensionMismatchError(
                f"--teacher-dims {dims} does not match the student's {student_dim}-d embeddings: with --projection "
                "none the student's own output is trained into the teacher's first D dims, so D must be "
                f"{student_dim}. Pass --teacher-dims {student_dim} (or leave it out), or use --projection mlp."
            )
        self.student_dim = self.teacher_dim = self.teacher_dims = dims

    def forward(self, x: Tensor) -> Tensor:
        """The student's embeddings ``[..., d]`` as they are.

        Raises:
            DimensionMismatchError: If the last dimension of ``x`` is not ``student_dim``.
        """
        if x.shape[-1] != self.student_dim:
            raise DimensionMismatchError(
                f"This --projection none model expects {self.student_dim}-d student embeddings, got shape "
                f"{tuple(x.shape)}. Use the student it was trained with."
            )
        return x

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dims={self.teacher_dims}"

    def to_sentence_transformer_modules(self) -> list[nn.Module]:
        """No modules: a hybrid model of this mode is the student alone (plus ``Normalize``)."""
        return []

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/projection_layer.pt`` (``{"format": 2, "kind": "none", "student_dim", "teacher_dims"}``)
        atomically; it is the run's commit marker, as an MLP's file is."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / PROJECTION_FILE
        payload = {"format": NONE_FORMAT, "kind": "none", "student_dim": self.student_dim}
        payload["teacher_dims"] = self.teacher_dims
        with atomic_open(target, "wb") as fh:
            torch.save(payload, fh)
        return target


Projection = ProjectionLayer | NoProjection


def load_projection(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> Projection:
    """The projection slot a run saved: a :class:`ProjectionLayer` or a :class:`NoProjection`.

    Args:
        path: The run folder, or its ``projection_layer.pt``.
        map_location: Device for the tensors.

    Raises:
        ProjectionNotFoundError: If there is no ``projection_layer.pt``.
        FormatVersionError, DdxError: If the file is newer, unreadable or malformed.
    """
    file = projection_file(path)
    payload: dict[str, Any] = read_projection_file(file, map_location)
    if payload.get("kind", "mlp") == "mlp":
        return ProjectionLayer.from_payload(payload, file).to(map_location)
    try:
        return NoProjection(int(payload["student_dim"]), int(payload["teacher_dims"]))
    except DdxError as exc:
        raise DdxError(f"Projection layer file '{file}' is malformed ({exc}). Re-save it with ddx.") from exc
