"""The routed encoder: one SentenceTransformer that encodes most queries with the student and the rest with the teacher.

``ddx router export`` writes a SentenceTransformer folder whose single module is :class:`RoutedEncoder`::

    models/routed/
      modules.json, config_sentence_transformers.json   (type: distill.route.routed_model.RoutedEncoder)
      routed_config.json   teacher reference (hub id or path), the store's TeacherSpec and fingerprint, threshold
      student/             the run's student (plain SentenceTransformer)
      projection_layer.pt  the run's projection
      router.pt            the encoder router's MLP and its calibration scores

A query batch is encoded by the student; the router scores each student embedding; the projection maps every
query into the teacher's space (L2-normalised when the teacher's vectors are); queries scoring **above** the
threshold are re-encoded by the teacher, with the teacher's own query prompt from the store's TeacherSpec, and
replace their projected vectors. Output: teacher-space vectors, searchable against the teacher's index.
Passages (``encode_document``) are not routed: the index is the teacher's, so they always go to the teacher.
``encode`` without a task encodes its texts as queries.

The teacher loads on first use (a batch with a routed query, or a passage), with the store's spec applied, and
must reproduce the store's fingerprint; loading the folder checks the teacher's files against it already (no
weights loaded), so a wrong teacher is refused at once. sentence-transformers ≥ 6 imports module classes outside
its own package only with ``trust_remote_code=True``; the class is imported from the installed ddx, not from the
folder::

    model = SentenceTransformer("models/routed", trust_remote_code=True)
    vectors = model.encode_query(["what is a zebra?"])
    model[0].last_decisions, model[0].threshold      # the last batch's routing, and the threshold
    model[0].teacher_usage = 0.3                      # re-calibrate: 30 % of the fit queries go to the teacher
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.modules import InputModule

from distill.model.model import STUDENT_DIR
from distill.model.no_projection import load_projection
from distill.model.projection import ProjectionLayer
from distill.route.config import RouterExportConfig, check_usage
from distill.route.router import Router, RouterMLP, student_identity, threshold_for_usage
from precompute.teacher import TeacherConfig, expected_spec
from storage.errors import DdxError, FingerprintMismatchError
from storage.fs import replace_dir
from storage.spec import TeacherSpec

__all__ = ["RoutedEncoder", "RouterExportConfig", "export_routed"]

CONFIG_FILE = "routed_config.json"
STUDENT_SUBDIR = "student"
ROUTER_WEIGHTS = "router.pt"


class RoutedEncoder(InputModule):
    """Student + projection for every query, the teacher for queries the router scores above the threshold.

    Attributes:
        threshold: queries with a router score above it go to the teacher (settable).
        teacher_usage: the fraction of the fit queries that the threshold sends to the teacher (settable: sets the
            threshold from the calibration scores); None when the threshold was set directly.
        last_texts, last_scores, last_decisions: the last batch's texts (in sentence-transformers' length-sorted
            batch order), router scores and decisions (True: encoded by the teacher).
    """

    config_file_name = CONFIG_FILE
    forward_kwargs = {"task"}  # noqa: RUF012 - sentence-transformers reads this class attribute
    save_in_root = True

    def __init__(
        self,
        student: SentenceTransformer,
        projection: ProjectionLayer,
        router: RouterMLP,
        *,
        teacher: str,
        teacher_spec: dict[str, Any],
        store_fingerprint: str,
        calibration: np.ndarray,
        teacher_usage: float | None = None,
        threshold: float | None = None,
        teacher_revision: str | None = None,
        teacher_trust_remote_code: bool = False,
        student_id: str = "",
    ) -> None:
        super().__init__()
        self.student, self.projection, self.router = student, projection, router.eval()
        self.teacher, self.teacher_revision = teacher, teacher_revision
        self.teacher_trust_remote_code = teacher_trust_remote_code
        self.spec = TeacherSpec.from_dict(teacher_spec)
        self.store_fingerprint, self.student_id = store_fingerprint, student_id
        self.calibration = np.sort(np.asarray(calibration, dtype=np.float64))
        self._teacher_encoder: Any = None
        self._usage: float | None = None
        self._threshold = float("inf")
        if threshold is not None:
            self.threshold = threshold
        else:
            self.teacher_usage = 0.2 if teacher_usage is None else teacher_usage
        self.last_texts: list[str] = []
        self.last_scores: np.ndarray = np.zeros(0)
        self.last_decisions: np.ndarray = np.zeros(0, dtype=bool)

    # --- routing settings -------------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or np.isnan(value):
            raise DdxError(f"The routing threshold must be a number, got {value!r}.")
        self._threshold, self._usage = float(value), None

    @property
    def teacher_usage(self) -> float | None:
        return self._usage

    @teacher_usage.setter
    def teacher_usage(self, usage: float) -> None:
        check_usage(usage)
        self._threshold, self._usage = threshold_for_usage(self.calibration, usage), float(usage)

    # --- sentence-transformers module interface ---------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:  # type: ignore[override]
        return self.student.tokenizer

    @property
    def max_seq_length(self) -> int | None:
        return self.student.max_seq_length

    def get_embedding_dimension(self) -> int:
        return self.spec.dim

    def preprocess(
        self, inputs: Sequence[Any], prompt: str | None = None, task: str | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """Texts (kept for the teacher) and, for queries, the student's tokens (keys prefixed ``student_``)."""
        if prompt:
            raise DdxError(
                "The routed model applies its own prompts (the student's and the teacher's from the store's spec): "
                "call encode_query / encode_document without prompt or prompt_name."
            )
        texts = [str(t) for t in inputs]
        features: dict[str, Any] = {"texts": texts}
        if task != "document":
            tokens = self.student.preprocess(texts, prompt=_student_query_prompt(self.student))
            features |= {f"student_{k}": v for k, v in tokens.items()}
        return features

    def forward(self, features: dict[str, Any], task: str | None = None, **kwargs: Any) -> dict[str, Any]:
        texts = features["texts"]
        if task == "document":
            return {**features, "sentence_embedding": self._teacher_vectors(texts, "passage")}
        tokens = {k.removeprefix("student_"): v for k, v in features.items() if k.startswith("student_")}
        student = self.student(tokens)["sentence_embedding"]
        out = self.projection(student)
        if self.spec.normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        scores = self.router(student)
        routed = (scores > self._threshold).cpu().numpy()
        if routed.any():
            out = out.clone()
            picked = np.flatnonzero(routed)
            out[torch.from_numpy(picked).to(out.device)] = self._teacher_vectors([texts[i] for i in picked], "query")
        self.last_texts, self.last_decisions = list(texts), routed
        self.last_scores = scores.detach().double().cpu().numpy()
        return {**features, "sentence_embedding": out}

    def route(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Which of ``texts`` (in input order) the current threshold sends to the teacher; the teacher does not run."""
        decisions = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                feats = self.student.preprocess(
                    list(texts[s : s + batch_size]), prompt=_student_query_prompt(self.student)
                )
                feats = {k: v.to(self.router.device) if hasattr(v, "to") else v for k, v in feats.items()}
                decisions.append(
                    (self.router(self.student(feats)["sentence_embedding"]) > self._threshold).cpu().numpy()
                )
        return np.concatenate(decisions) if decisions else np.zeros(0, dtype=bool)

    # --- the teacher -------------------------------------------------------------------------------------------------
    def load_teacher(self) -> Any:
        """Load the teacher now (it loads on first use otherwise); refuse it unless it reproduces the store's spec.

        Raises:
            FingerprintMismatchError: the loaded teacher's spec has another fingerprint than the store's.
        """
        if self._teacher_encoder is None:
            from precompute.teacher import load_teacher  # looked up on use: tests guard it (tests/distill/conftest.py)

            config = TeacherConfig.for_spec(
                self.teacher,
                self.spec,
                revision=self.teacher_revision,
                trust_remote_code=self.teacher_trust_remote_code,
                device=str(self.router.device),
            )
            encoder = load_teacher(config)
            if encoder.spec.fingerprint != self.store_fingerprint:
                diffs = "; ".join(f"{n}: store {a!r}, loaded {b!r}" for n, a, b in self.spec.differences(encoder.spec))
                raise FingerprintMismatchError(
                    f"Teacher {self.teacher!r} does not reproduce the store's vectors (fingerprint "
                    f"{encoder.spec.fingerprint} vs {self.store_fingerprint}: {diffs or 'weights'}). "
                    "Export again with the teacher that wrote the store."
                )
            self._teacher_encoder = encoder
        return self._teacher_encoder

    def _teacher_vectors(self, texts: list[str], role: str) -> torch.Tensor:
        vectors = self.load_teacher().encode(texts, role)
        return torch.from_numpy(vectors).to(self.router.device)

    # --- saving and loading -------------------------------------------------------------------------------------------
    def get_config_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "teacher": self.teacher,
            "teacher_revision": self.teacher_revision,
            "teacher_trust_remote_code": self.teacher_trust_remote_code,
            "teacher_spec": self.spec.to_dict(),
            "store_fingerprint": self.store_fingerprint,
            "student_id": self.student_id,
            "teacher_usage": self._usage,
            "threshold": None if self._usage is not None else self._threshold,
        }

    def save(self, output_path: str, *args: Any, **kwargs: Any) -> None:
        out = Path(output_path)
        self.student.save(str(out / STUDENT_SUBDIR), create_model_card=False)
        self.projection.save(out)
        payload = {"state_dict": self.router.state_dict(), "in_dim": self.router.in_dim, "hidden": self.router.hidden}
        torch.save({**payload, "calibration": torch.as_tensor(self.calibration)}, out / ROUTER_WEIGHTS)
        (out / CONFIG_FILE).write_text(json.dumps(self.get_config_dict(), indent=2))

    @classmethod
    def load(  # type: ignore[override]
        cls, model_name_or_path: str, subfolder: str = "", **kwargs: Any
    ) -> RoutedEncoder:
        """Load a folder written by :func:`export_routed`; checks the teacher's files against the store's spec."""
        folder = Path(model_name_or_path) / subfolder
        config = json.loads((folder / CONFIG_FILE).read_text())
        student = SentenceTransformer(str(folder / STUDENT_SUBDIR), device="cpu")
        payload = torch.load(folder / ROUTER_WEIGHTS, map_location="cpu", weights_only=True)
        router = RouterMLP(in_dim=payload["in_dim"], hidden=payload["hidden"])
        router.load_state_dict(payload["state_dict"])
        module = cls(
            student,
            ProjectionLayer.load(folder),
            router,
            teacher=config["teacher"],
            teacher_spec=config["teacher_spec"],
            store_fingerprint=config["store_fingerprint"],
            calibration=payload["calibration"].numpy(),
            teacher_usage=config.get("teacher_usage"),
            threshold=config.get("threshold"),
            teacher_revision=config.get("teacher_revision"),
            teacher_trust_remote_code=bool(config.get("teacher_trust_remote_code")),
            student_id=config.get("student_id", ""),
        )
        check_teacher_files(module.teacher, module.spec, module.teacher_revision, module.teacher_trust_remote_code)
        return module


def _student_query_prompt(student: SentenceTransformer) -> str | None:
    """The prompt evaluation gives the student's queries (distill.evaluate.inputs.Encoders): the router was fit on
    it."""
    prompts = getattr(student, "prompts", {}) or {}
    name = "query" if prompts.get("query") else student.default_prompt_name
    return (prompts.get(name) or None) if name else None


def check_teacher_files(
    teacher: str, spec: TeacherSpec, revision: str | None = None, trust: bool | None = None
) -> None:
    """Refuse a teacher whose files (weights, dimension) do not give the store's spec; loads no weights.

    Raises:
        FingerprintMismatchError: naming each field that differs.
    """
    expected = expected_spec(TeacherConfig.for_spec(teacher, spec, revision=revision, trust_remote_code=trust))
    stored = spec.to_dict()
    diffs = [(k, stored[k], v) for k, v in expected.items() if k != "model" and k in stored and stored[k] != v]
    if diffs:
        lines = "; ".join(f"{k}: store has {a!r}, {teacher!r} gives {b!r}" for k, a, b in diffs)
        raise FingerprintMismatchError(
            f"Teacher {teacher!r} does not match the store the router was fitted on ({lines}). "
            f"Pass the teacher that wrote the store ({spec.model!r})."
        )


def export_routed(config: RouterExportConfig) -> dict[str, Any]:
    """Write the routed SentenceTransformer folder ``config.out`` (see the module docstring).

    Returns:
        ``{"out", "teacher", "threshold", "teacher_usage"}``.

    Raises:
        RouterNotFoundError: no router at ``config.router``.
        FingerprintMismatchError: the teacher does not match the store's spec, or the run is not the router's.
        DdxError: a usage outside [0, 1], a router without an encoder model, or a ``--projection none`` run.
    """
    router = Router.load(config.router)
    run = config.model or router.meta.get("run", "")
    if student_identity(run) != router.meta.get("student_id"):
        raise FingerprintMismatchError(
            f"Run {run!r} is not the student router {config.router!r} was fitted with. Pass --model with that run."
        )
    projection = load_projection(run)
    if not isinstance(projection, ProjectionLayer):
        raise DdxError(
            f"Run {run!r} was trained with --projection none: its queries are {projection.teacher_dims}-d (against the "
            "teacher's first dims) and routed ones the teacher's full vectors, but a routed model returns one vector "
            "per query for one index. Export a --projection mlp run (this run's routing curve: ddx evaluate --routed)."
        )
    spec = TeacherSpec.from_dict(router.meta["teacher_spec"])
    teacher = str(Path(config.teacher).resolve()) if Path(config.teacher).is_dir() else config.teacher
    check_teacher_files(teacher, spec, config.revision, config.trust_remote_code)
    module = RoutedEncoder(
        SentenceTransformer(str(Path(run) / STUDENT_DIR), device="cpu"),
        projection,
        router.model("encoder"),
        teacher=teacher,
        teacher_spec=spec.to_dict(),
        store_fingerprint=router.meta["store_fingerprint"],
        calibration=router.calibration["encoder"],
        teacher_usage=config.teacher_usage,
        threshold=config.threshold,
        teacher_revision=config.revision,
        teacher_trust_remote_code=bool(config.trust_remote_code),
        student_id=router.meta["student_id"],
    )
    routed = SentenceTransformer(modules=[module], device="cpu", similarity_fn_name="cosine")
    replace_dir(config.out, lambda tmp: routed.save(str(tmp), create_model_card=False))
    return {"out": config.out, "teacher": teacher, "threshold": module.threshold, "teacher_usage": module.teacher_usage}
