"""The projection MLP that maps student sentence embeddings into the teacher's vector space.

``student_dim → hidden_dim → teacher_dim`` as Linear → GELU → LayerNorm → Linear (768 → 1536 → 3584 for
all-mpnet-base-v2 under gte-Qwen2-7B-instruct: 6.7 M parameters, 6 % of the 109 M-parameter student).

The order of the layers is chosen so that the MLP is exactly expressible with sentence-transformers' built-in
modules — ``Dense(in, hidden, activation_function=nn.GELU())``, ``LayerNorm(hidden)``,
``Dense(hidden, out, activation_function=nn.Identity())`` — so a hybrid model (student + projection) saves as a
plain SentenceTransformer folder that loads without ddx installed. Two details keep that round trip exact:

* ``Dense`` saves its activation by class path and re-creates it with no arguments, so the GELU here is the
  default exact (erf) GELU; ``nn.GELU(approximate="tanh")`` would silently come back as the exact one.
* sentence-transformers' ``LayerNorm`` stores only its dimension, so the LayerNorm here keeps torch's default
  ``eps=1e-5`` and elementwise affine parameters.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from storage.errors import DdxError, DimensionMismatchError, FormatVersionError
from storage.fs import atomic_open

__all__ = [
    "FORMATS",
    "FORMAT_VERSION",
    "PROJECTION_FILE",
    "ProjectionLayer",
    "ProjectionNotFoundError",
    "projection_file",
    "read_projection_file",
]

PROJECTION_FILE = "projection_layer.pt"
FORMAT_VERSION = 1  # an MLP's file is still written as format 1, which every ddx reads
# 2: the file may say which kind fills the projection slot ("kind": "mlp" or "none", distill.model.no_projection);
# a file without "kind" is an MLP. Written only for kind "none", so that a ddx that reads format 1 alone refuses it
# with "upgrade ddx" instead of calling it malformed.
FORMATS = (1, 2)
_REQUIRED = {"mlp": ("state_dict", "student_dim", "hidden_dim", "teacher_dim"), "none": ("student_dim", "teacher_dims")}


class ProjectionNotFoundError(DdxError, FileNotFoundError):
    """No ``projection_layer.pt`` where one was expected."""


DEFAULT_STUDENT_DIM = 768  # all-mpnet-base-v2
DEFAULT_TEACHER_DIM = 3584  # gte-Qwen2-7B-instruct


def _one_of(name: str, value: int | None, alias: str, alias_value: int | None, default: int) -> int:
    """The dimension given under either name (both: they must agree), else ``default``."""
    if value is not None and alias_value is not None and value != alias_value:
        raise DdxError(f"ProjectionLayer got {name}={value!r} and {alias}={alias_value!r}; pass one of them.")
    given = value if value is not None else alias_value
    return default if given is None else given


class ProjectionLayer(nn.Module):
    """Two-layer MLP from student space to teacher space: Linear → GELU → LayerNorm → Linear.

    Called as the reference system calls it — ``ProjectionLayer()`` is the documented 768 → 1536 → 3584 MLP
    (all-mpnet-base-v2 into gte-Qwen2-7B-instruct's space), ``ProjectionLayer(768, 1536, 3584)`` is (input,
    hidden, output), ``input_dim=``/``output_dim=`` name them — or by ddx's names ``student_dim=``/``teacher_dim=``.

    Args:
        input_dim: Size of the student's sentence embedding (input); also ``student_dim``. Default 768.
        hidden_dim: Width of the hidden layer; ``None`` means ``2 * input_dim``.
        output_dim: Size of the teacher's vectors (output); also ``teacher_dim``. Default 3584.

    Raises:
        DdxError: If a dimension is not a positive integer, or one is given twice with two values.

    Example:
        >>> import torch
        >>> proj = ProjectionLayer(student_dim=4, teacher_dim=6)
        >>> proj(torch.randn(2, 4)).shape
        torch.Size([2, 6])
        >>> ProjectionLayer().fc2.weight.shape, ProjectionLayer(8, 16, 32).hidden_dim
        (torch.Size([3584, 1536]), 16)
    """

    teacher_dims: int | None = None  # the MLP maps into the teacher's full vectors (cf. no_projection.NoProjection)

    def __init__(
        self,
        input_dim: int | None = None,
        hidden_dim: int | None = None,
        output_dim: int | None = None,
        *,
        student_dim: int | None = None,
        teacher_dim: int | None = None,
    ) -> None:
        super().__init__()
        student_dim = _one_of("input_dim", input_dim, "student_dim", student_dim, DEFAULT_STUDENT_DIM)
        teacher_dim = _one_of("output_dim", output_dim, "teacher_dim", teacher_dim, DEFAULT_TEACHER_DIM)
        hidden_dim = 2 * student_dim if hidden_dim is None else hidden_dim
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("hidden_dim", hidden_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise DdxError(f"ProjectionLayer {name} must be a positive integer, got {value!r}.")
        self.student_dim = student_dim
        self.hidden_dim = hidden_dim
        self.teacher_dim = teacher_dim
        self.fc1 = nn.Linear(student_dim, hidden_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, teacher_dim)

    def forward(self, x: Tensor) -> Tensor:
        """Project ``[..., student_dim]`` embeddings to ``[..., teacher_dim]``.

        The input is cast to the layer's dtype, so a bf16 student feeds an fp32 projection without autocast.

        Raises:
            DimensionMismatchError: If the last dimension of ``x`` is not ``student_dim``.
        """
        if x.shape[-1] != self.student_dim:
            raise DimensionMismatchError(
                f"ProjectionLayer expects {self.student_dim}-d student embeddings, got shape {tuple(x.shape)}. "
                "Build the projection with student_dim equal to the student's embedding dimension."
            )
        x = x.to(self.fc1.weight.dtype)
        return self.fc2(self.norm(self.act(self.fc1(x))))

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, hidden_dim={self.hidden_dim}, teacher_dim={self.teacher_dim}"

    def to_sentence_transformer_modules(self) -> list[nn.Module]:
        """The same MLP as sentence-transformers modules, with copied weights (outputs equal to 1e-6).

        Returns:
            ``[Dense(student_dim, hidden_dim, GELU), LayerNorm(hidden_dim), Dense(hidden_dim, teacher_dim, Identity)]``
            on this layer's device and dtype, reading and writing ``features["sentence_embedding"]``.
        """
        from sentence_transformers.sentence_transformer.modules import Dense, LayerNorm

        first = Dense(self.student_dim, self.hidden_dim, activation_function=nn.GELU())
        norm = LayerNorm(self.hidden_dim)
        second = Dense(self.hidden_dim, self.teacher_dim, activation_function=nn.Identity())
        first.linear.load_state_dict(self.fc1.state_dict())
        norm.norm.load_state_dict(self.norm.state_dict())
        second.linear.load_state_dict(self.fc2.state_dict())
        weight = self.fc1.weight
        return [m.to(device=weight.device, dtype=weight.dtype) for m in (first, norm, second)]

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``directory/projection_layer.pt`` atomically (temp file + ``os.replace``).

        The file holds ``{"state_dict", "student_dim", "hidden_dim", "teacher_dim", "format": 1}`` with CPU tensors.

        Args:
            directory: Folder to write into; created if missing.

        Returns:
            The path of the written file.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / PROJECTION_FILE
        payload = {
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "student_dim": self.student_dim,
            "hidden_dim": self.hidden_dim,
            "teacher_dim": self.teacher_dim,
            "format": FORMAT_VERSION,
        }
        with atomic_open(target, "wb") as fh:
            torch.save(payload, fh)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> ProjectionLayer:
        """Restore a layer written by :meth:`save`.

        Args:
            path: The ``projection_layer.pt`` file, or the folder holding it.
            map_location: Device to load the tensors onto.

        Returns:
            The restored layer (in training mode, as a freshly built module is).

        Raises:
            ProjectionNotFoundError: If the file does not exist.
            FormatVersionError: If the file was written by a newer format.
            DdxError: If the file is unreadable or malformed.
        """
        file = projection_file(path)
        payload = read_projection_file(file, map_location)
        if payload.get("kind", "mlp") != "mlp":
            raise DdxError(
                f"'{file}' belongs to a --projection {payload['kind']} run: it holds no projection layer. Load the run "
                "with StudentModelWithProjection.load (or distill.model.no_projection.load_projection)."
            )
        return cls.from_payload(payload, file).to(map_location)

    @classmethod
    def from_payload(cls, payload: dict[str, Any], file: Path) -> ProjectionLayer:
        """The layer a checked MLP payload of :func:`read_projection_file` describes (on the payload's device)."""
        layer = cls(
            student_dim=payload["student_dim"], teacher_dim=payload["teacher_dim"], hidden_dim=payload["hidden_dim"]
        )
        try:
            layer.load_state_dict(payload["state_dict"])
        except RuntimeError as exc:
            raise DdxError(f"Projection layer file '{file}' has weights that do not fit its dimensions: {exc}") from exc
        return layer


def projection_file(path: str | os.PathLike[str]) -> Path:
    """The ``projection_layer.pt`` of a run folder (or the file itself).

    Raises:
        ProjectionNotFoundError: If there is no such file.
    """
    path = Path(path)
    file = path / PROJECTION_FILE if path.is_dir() else path
    if not file.is_file():
        raise ProjectionNotFoundError(
            f"No projection layer at '{file}'. Pass the folder a training run wrote (it holds {PROJECTION_FILE})."
        )
    return file


def read_projection_file(file: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate the dict stored in a projection file (either kind; ``"kind"`` absent means ``"mlp"``).

    Raises:
        FormatVersionError: If the file was written by a newer format.
        DdxError: If the file is unreadable or malformed.
    """
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for damaged files
        raise DdxError(f"Projection layer file '{file}' is unreadable ({type(exc).__name__}: {exc}).") from exc
    if not isinstance(payload, dict) or "format" not in payload:
        raise DdxError(f"Projection layer file '{file}' is malformed: missing ['format']. Re-save it with ddx.")
    if payload["format"] not in FORMATS:
        raise FormatVersionError(
            f"Projection layer file '{file}' has format {payload['format']!r}; this ddx reads formats "
            f"{', '.join(map(str, FORMATS))}. Upgrade ddx to load it."
        )
    kind = payload.get("kind", "mlp")
    if kind not in _REQUIRED:
        raise DdxError(f"Projection layer file '{file}' has an unknown kind {kind!r}. Upgrade ddx to load it.")
    missing = [key for key in _REQUIRED[kind] if key not in payload]
    if missing:
        raise DdxError(f"Projection layer file '{file}' is malformed: missing {missing}. Re-save it with ddx.")
    return payload
