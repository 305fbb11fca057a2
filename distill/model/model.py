"""The trained object: a sentence-transformer student with the projection as part of the model.

The projection lives inside this module (not inside the loss) so that ``parameters()``, ``state_dict()``,
optimizer state, checkpoints, resume and DDP's gradient all-reduce cover it: a projection owned by the loss is
neither checkpointed nor all-reduced by the sentence-transformers trainer, so every rank would drift apart and a
resumed run would restart it from random weights.

A saved run folder holds three things, written in this order (the projection file last, as the commit marker):

* ``student_base/`` — the student alone, a plain SentenceTransformer folder (``student_dim`` vectors);
* ``hybrid/`` — student modules + ``Dense(GELU)``, ``LayerNorm``, ``Dense`` (+ ``Normalize``), one plain
  SentenceTransformer folder that emits teacher-space vectors and loads without ddx installed;
* ``projection_layer.pt`` — the projection weights and dimensions (see :mod:`distill.model.projection`).

A ``--projection none`` model (:mod:`distill.model.teacher_dims`) holds a :class:`NoProjection` in the projection
slot: ``projected`` is then the student's own embedding, compared with the teacher's first ``teacher_dims``
dimensions (renormalised); ``hybrid/`` is the student (+ ``Normalize``), and ``projection_layer.pt`` records ``D``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from distill.model.no_projection import NoProjection, Projection, load_projection
from distill.model.projection import DEFAULT_TEACHER_DIM, PROJECTION_FILE, ProjectionLayer
from distill.model.teacher_dims import check_teacher_dims
from storage.errors import DdxError, DimensionMismatchError
from storage.fs import replace_dir

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["HYBRID_DIR", "STUDENT_DIR", "StudentModelWithProjection"]

STUDENT_DIR = "student_base"
HYBRID_DIR = "hybrid"


class StudentModelWithProjection(nn.Module):
    """A SentenceTransformer student and a :class:`ProjectionLayer`, trained and saved as one model.

    Args:
        student: The student: a SentenceTransformer (its last module produces ``sentence_embedding``), or a
            hub id / folder to load one from (as the reference system is called: ``StudentModelWithProjection(
            "sentence-transformers/all-mpnet-base-v2")``).
        projection: Maps the student's embedding dimension to the teacher's; ``None`` builds a fresh one from
            the student's dimension to ``teacher_dim`` (hidden ``2 × student_dim``). A :class:`NoProjection` makes a
            ``--projection none`` model (the student trained into the teacher's first dims).
        teacher_dim: Output size of a fresh projection (default 3584, gte-Qwen2-7B-instruct's); ignored with
            ``projection``.

    Raises:
        DimensionMismatchError: If the student's embedding dimension is not ``projection.student_dim``.

    Example:
        >>> name = "sentence-transformers/all-mpnet-base-v2"
        >>> model = StudentModelWithProjection(name)  # doctest: +SKIP
        >>> out = model(model.tokenize(["what is a zebra?"]))  # doctest: +SKIP
        >>> out["student"].shape, out["projected"].shape  # doctest: +SKIP
        (torch.Size([1, 768]), torch.Size([1, 3584]))
    """

    def __init__(
        self,
        student: SentenceTransformer | str | os.PathLike[str],
        projection: Projection | None = None,
        *,
        teacher_dim: int = DEFAULT_TEACHER_DIM,
    ) -> None:
        super().__init__()
        if isinstance(student, str | os.PathLike):
            from sentence_transformers import SentenceTransformer

            student = SentenceTransformer(str(student))
        student_dim = _embedding_dim(student)
        if projection is None:
            projection = ProjectionLayer(student_dim=student_dim, teacher_dim=teacher_dim).to(student.device)
        if student_dim != projection.student_dim:
            raise DimensionMismatchError(
                f"The student emits {student_dim}-d embeddings but the projection expects {projection.student_dim}-d "
                f"(ProjectionLayer student_dim={projection.student_dim}, teacher_dim={projection.teacher_dim}). "
                f"Build the projection with student_dim={student_dim}, or use the student it was trained with."
            )
        self.student = student
        self.projection: Projection = projection

    @property
    def student_dim(self) -> int:
        """Dimension of the student's sentence embeddings."""
        return self.projection.student_dim

    @property
    def teacher_dim(self) -> int:
        """Dimension of the projected (teacher-space) vectors."""
        return self.projection.teacher_dim

    @property
    def teacher_dims(self) -> int | None:
        """``D`` of a ``--projection none`` model: its vectors are compared with the teacher's first ``D`` dims,
        renormalised (:func:`distill.model.teacher_dims.truncate_teacher`); ``None``: the teacher's full vectors."""
        return self.projection.teacher_dims

    @property
    def device(self) -> torch.device:
        """Device of the student's parameters."""
        return self.student.device

    @classmethod
    def from_pretrained(
        cls,
        student_name_or_path: str,
        teacher_dim: int,
        *,
        hidden_dim: int | None = None,
        max_seq_length: int | None = None,
        device: str | None = None,
        projection: str = "mlp",
        teacher_dims: int | None = None,
    ) -> StudentModelWithProjection:
        """Load a student sentence-transformer and attach a freshly initialised projection to ``teacher_dim``.

        Args:
            student_name_or_path: Hub id or local folder of a sentence-transformer.
            teacher_dim: Dimension of the teacher's vectors (the store's ``dim``).
            hidden_dim: Hidden width of the projection; ``None`` means ``2 * student_dim``.
            max_seq_length: Override the student's maximum sequence length.
            device: Device for both parts; ``None`` lets sentence-transformers choose.
            projection: ``"mlp"`` (a new :class:`ProjectionLayer`) or ``"none"`` (a :class:`NoProjection`: the
                student trained into the teacher's first ``teacher_dims`` dims).
            teacher_dims: ``D`` for ``projection="none"`` (default: the student's dimension, which it must equal).

        Returns:
            The combined model. The projection is initialised from torch's global RNG: seed it for reproducibility.

        Raises:
            DimensionMismatchError: ``teacher_dims`` is not the student's dimension, or more than ``teacher_dim``.
        """
        from sentence_transformers import SentenceTransformer

        student = SentenceTransformer(student_name_or_path, device=device)
        if max_seq_length is not None:
            student.max_seq_length = max_seq_length
        if projection == "none":
            slot = NoProjection(_embedding_dim(student), teacher_dims)
            check_teacher_dims(slot.teacher_dims, teacher_dim)
            return cls(student, slot)
        layer = ProjectionLayer(student_dim=_embedding_dim(student), teacher_dim=teacher_dim, hidden_dim=hidden_dim)
        return cls(student, layer.to(student.device))

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Embed pre-tokenized text with the student, then project it.

        Args:
            features: Token tensors as the student's tokenizer makes them: ``input_ids``, ``attention_mask``
                and, for BERT-like students, ``token_type_ids`` ([B, T] each). Not modified.

        Returns:
            ``{"student": [B, student_dim] sentence embeddings (exactly what the plain student gives),
            "projected": [B, teacher_dim]}``.
        """
        embedding = self.student(dict(features))["sentence_embedding"]
        return {"student": embedding, "projected": self.projection(embedding)}

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the student transformer's layer activations in backward instead of keeping them.

        A layer then keeps only its input (``T × hidden`` per sequence) instead of ~35 times that (mpnet at 512
        tokens in fp32 with eager attention; bench/phase2_memory.py has the arithmetic), for one more forward of each
        layer in backward (~+1/3 compute). Non-reentrant (``use_reentrant=False``): exact under DDP with unused
        parameters and when no input needs a gradient; dropout is replayed from the saved RNG state.

        Raises:
            DdxError: If no module of the student supports it (e.g. static embeddings: nothing to recompute).
        """
        # sentence-transformers >= 6 names it activation_checkpointing_enable; older releases only have the alias
        enable = (
            getattr(self.student, "activation_checkpointing_enable", None) or self.student.gradient_checkpointing_enable
        )
        enable({"use_reentrant": False})
        if not any(getattr(m, "gradient_checkpointing", False) is True for m in self.student.modules()):
            raise DdxError(
                f"Gradient checkpointing is not available for this student ({type(self.student[0]).__name__}: no "
                "transformer layers to recompute). Train without --gradient-checkpointing."
            )

    def tokenize(self, texts: Sequence[str], *, prompt_name: str | None = None) -> dict[str, Tensor]:
        """Tokenize texts the way the student does (its prompts and max length), on the student's device.

        Args:
            texts: The texts of one batch.
            prompt_name: A key of ``student.prompts`` to prepend; ``None`` uses the student's default prompt, if any.

        Returns:
            Token tensors to pass to :meth:`forward`.
        """
        prompt = _resolve_prompt(self.student, prompt_name)
        features = self.student.preprocess(list(texts), prompt=prompt)
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in features.items()}

    def encode_student(self, texts: Sequence[str], *, batch_size: int = 64, prompt_name: str | None = None) -> Tensor:
        """Student-space embeddings ``[N, student_dim]`` (CPU, float32) of ``texts``; batched, eval mode, no grad."""
        return self._encode(texts, "student", batch_size=batch_size, prompt_name=prompt_name)

    def encode_projected(self, texts: Sequence[str], *, batch_size: int = 64, prompt_name: str | None = None) -> Tensor:
        """Teacher-space embeddings ``[N, teacher_dim]`` (CPU, float32) of ``texts``; batched, eval mode, no grad.

        Not normalized: normalize them (or use the hybrid model saved with ``teacher_normalize=True``) when the
        teacher's vectors are. A ``--projection none`` model returns its student embeddings (``teacher_dims`` wide).
        """
        return self._encode(texts, "projected", batch_size=batch_size, prompt_name=prompt_name)

    def _encode(self, texts: Sequence[str], key: str, *, batch_size: int, prompt_name: str | None) -> Tensor:
        """Encode longest-first (less padding per batch), then restore the input order."""
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        was_training = self.training
        self.eval()
        chunks = []
        try:
            with torch.no_grad():
                for start in range(0, len(order), batch_size):
                    batch = [texts[i] for i in order[start : start + batch_size]]
                    chunks.append(self(self.tokenize(batch, prompt_name=prompt_name))[key].float().cpu())
        finally:
            self.train(was_training)
        dim = self.student_dim if key == "student" else self.teacher_dim
        out = torch.cat(chunks) if chunks else torch.empty(0, dim)
        result = torch.empty_like(out)
        result[torch.tensor(order, dtype=torch.long)] = out
        return result

    def to_hybrid(self, *, teacher_normalize: bool) -> SentenceTransformer:
        """One SentenceTransformer that emits teacher-space vectors: the student's modules + the projection's.

        The student's modules are shared (not copied); the projection's are copies
        (:meth:`ProjectionLayer.to_sentence_transformer_modules`). Prompts and the default prompt carry over; the
        similarity function is cosine; a student ``truncate_dim`` does not (it would cut teacher-space vectors).
        A ``--projection none`` model's hybrid is the student, normalised (its index: the teacher's first
        ``teacher_dims`` dims, renormalised, :func:`distill.model.teacher_dims.truncate_teacher`).

        Args:
            teacher_normalize: Append ``Normalize()`` so outputs are unit vectors, as normalized teacher vectors are.
                Always so without a projection: the cut teacher vectors are renormalised.
        """
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize

        modules = [*self.student.children(), *self.projection.to_sentence_transformer_modules()]
        if (teacher_normalize or self.teacher_dims is not None) and not isinstance(modules[-1], Normalize):
            modules.append(Normalize())
        hybrid = SentenceTransformer(
            modules=modules,
            device=str(self.device),
            prompts={name: text or "" for name, text in self.student.prompts.items()},
            default_prompt_name=self.student.default_prompt_name,
            similarity_fn_name="cosine",
        )
        hybrid.module_kwargs = self.student.module_kwargs  # keyed by module index, which the student's keep
        return hybrid

    def save(self, out_dir: str | os.PathLike[str], *, teacher_normalize: bool) -> Path:
        """Write ``student_base/``, ``hybrid/`` and ``projection_layer.pt`` (last, as the commit marker; a
        ``--projection none`` model's records its mode and ``teacher_dims``).

        Each folder is written under a temporary name and renamed into place; an older projection file is removed
        first, so a crash never leaves a projection next to a student it was not trained with.

        Args:
            out_dir: Run output folder; created if missing.
            teacher_normalize: Whether the hybrid model L2-normalizes its outputs (match the teacher).

        Returns:
            ``out_dir`` as a Path.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / PROJECTION_FILE).unlink(missing_ok=True)
        replace_dir(out / STUDENT_DIR, lambda tmp: self.student.save(str(tmp)))
        hybrid = self.to_hybrid(teacher_normalize=teacher_normalize)
        replace_dir(out / HYBRID_DIR, lambda tmp: hybrid.save(str(tmp)))
        self.projection.save(out)
        return out

    @classmethod
    def load(cls, out_dir: str | os.PathLike[str], *, device: str | None = None) -> StudentModelWithProjection:
        """Restore a model saved by :meth:`save` from ``student_base/`` and ``projection_layer.pt``.

        Args:
            out_dir: The folder :meth:`save` wrote.
            device: Device for both parts; ``None`` lets sentence-transformers choose.

        Raises:
            DdxError: If ``student_base/`` is missing.
            ProjectionNotFoundError: If ``projection_layer.pt`` is missing (an interrupted save).
            DimensionMismatchError: If the two do not fit together.

        A ``--projection none`` run comes back with its :class:`NoProjection` (``teacher_dims`` set).
        """
        from sentence_transformers import SentenceTransformer

        out = Path(out_dir)
        student_dir = out / STUDENT_DIR
        if not (student_dir / "modules.json").is_file():
            raise DdxError(
                f"No student model at '{student_dir}' (modules.json missing). Pass the folder that "
                "StudentModelWithProjection.save wrote."
            )
        projection = load_projection(out)
        student = SentenceTransformer(str(student_dir), device=device)
        return cls(student, projection.to(student.device))


def _embedding_dim(student: SentenceTransformer) -> int:
    """The student's sentence-embedding size (sentence-transformers >= 6 renamed the getter)."""
    getter = getattr(student, "get_embedding_dimension", None) or student.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        raise DimensionMismatchError(
            "Cannot tell the student's embedding dimension (no module reports it). Add a Pooling or Dense module."
        )
    return int(dim)


def _resolve_prompt(student: SentenceTransformer, prompt_name: str | None) -> str | None:
    """The prompt text for ``prompt_name``, or the student's default prompt, or None."""
    name = prompt_name if prompt_name is not None else student.default_prompt_name
    if name is None:
        return None
    if name not in student.prompts:
        raise DdxError(f"Prompt name {name!r} is not one of the student's prompts {sorted(student.prompts)}.")
    return student.prompts[name]
