"""What evaluation searches: an eval set's texts, and their student, projected and teacher vectors.

An eval set is a source's split: its judged queries, the whole corpus (distractors included) and the
qrels. The model under evaluation encodes it once (:class:`Encoders`); the teacher's vectors come from
the store by content key (missing ones are encoded with ``--teacher`` or reported with the command
that adds them). :func:`mode_inputs` then hands each retrieval mode its queries and passages, the
store's passages streamed block by block.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill.search import PassageSource
from distill.train import RUN_FILE, read_run
from precompute.sources import Source
from storage.errors import BadSourceError, DdxError, MissingVectorsError
from storage.keys import content_keys
from storage.store import TeacherStore

if TYPE_CHECKING:  # both import torch; Encoders loads the one it needs when it runs
    from sentence_transformers import SentenceTransformer

    from distill.model import StudentModelWithProjection

__all__ = ["Encoders", "EvalSet", "SetVectors", "load_eval_set", "mode_inputs", "set_vectors"]


@dataclass
class EvalSet:
    """Queries, corpus and qrels of one source's split."""

    name: str
    source: Source
    query_ids: list[str]
    query_texts: list[str]
    doc_ids: list[str]
    doc_texts: list[str]
    qrels: dict[str, dict[str, int]]
    notes: list[str]


def load_eval_set(source: Source, split: str, strict: bool) -> EvalSet:
    """Read the split's judged queries, the whole corpus (distractors included) and the qrels.

    Raises:
        BadSourceError: the split has no qrels, or (``strict``) qrels name unknown documents.
    """
    qrels = source.qrels(split)
    if not qrels:
        raise BadSourceError(
            f"{source.spec}: split {split!r} has no qrels (splits with qrels: {source.splits()}). "
            "Pick one with --split."
        )
    docs = {r.id: r.text for r in source.iter_texts("passage")}
    queries = {r.id: r.text for r in source.iter_texts("query") if r.id in qrels}
    notes = []
    unknown_docs = {d for q in qrels.values() for d in q} - docs.keys()
    if unknown_docs:
        msg = f"{source.spec}: {len(unknown_docs)} judged document ids are not in the corpus (ignored)"
        if strict:
            raise BadSourceError(msg.replace(" (ignored)", "") + "; drop --strict to evaluate anyway.")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    unjudged = [q for q in queries if not any(v > 0 for v in qrels[q].values())]
    missing = [q for q in qrels if q not in queries]
    if unjudged or missing:
        notes.append(
            f"{source.spec}: excluded {len(unjudged)} queries without a positive judgment and "
            f"{len(missing)} judged query ids absent from the queries file"
        )
    qids = [q for q in queries if q not in set(unjudged)]
    if not qids:
        raise BadSourceError(f"{source.spec}: split {split!r} has no query with a positive judgment.")
    return EvalSet(
        source.name,
        source,
        qids,
        [queries[q] for q in qids],
        list(docs),
        list(docs.values()),
        {q: qrels[q] for q in qids},
        notes,
    )


class Encoders:
    """The model under evaluation: a ddx run (student + projection) or a plain sentence-transformer."""

    def __init__(self, path: str, device: str | None, batch_size: int, progress: bool = False) -> None:
        self.batch_size, self.progress = batch_size, progress
        self.run = read_run(path) if (Path(path) / RUN_FILE).exists() else None
        self.model: StudentModelWithProjection | None
        self.student: SentenceTransformer
        if self.run is not None:
            from distill.model import StudentModelWithProjection

            self.model = StudentModelWithProjection.load(path, device=device)
            self.student = self.model.student
        else:
            from sentence_transformers import SentenceTransformer

            self.model, self.student = None, SentenceTransformer(path, device=device)
        self.seconds, self.texts = 0.0, 0

    def student_vectors(self, texts: list[str], role: str) -> np.ndarray:
        start = time.perf_counter()
        prompts = getattr(self.student, "prompts", {}) or {}
        name = role if prompts.get(role) else ("document" if role == "passage" and prompts.get("document") else None)
        out = self.student.encode(
            texts, batch_size=self.batch_size, prompt_name=name, convert_to_numpy=True, show_progress_bar=self.progress
        )
        self.seconds += time.perf_counter() - start
        self.texts += len(texts)
        return out.astype(np.float32)

    def project_blocks(self, vectors: np.ndarray, rows: int = 16_384) -> Iterator[np.ndarray]:
        import torch

        assert self.model is not None
        with torch.inference_mode():
            for s in range(0, len(vectors), rows):
                block = torch.from_numpy(vectors[s : s + rows]).to(self.model.device)
                yield self.model.projection(block).float().cpu().numpy()

    def project(self, vectors: np.ndarray) -> np.ndarray:
        return np.concatenate(list(self.project_blocks(vectors))) if len(vectors) else vectors


@dataclass
class SetVectors:
    """One eval set's vectors, computed once and shared by every mode; teacher rows index the store."""

    q_s: np.ndarray  # student queries
    d_s: np.ndarray  # student passages
    q_p: np.ndarray | None = None  # projected student queries (ddx runs only)
    store: TeacherStore | None = None
    rows_q: np.ndarray | None = None  # store rows of the queries and passages (with a store only)
    rows_d: np.ndarray | None = None

    def teacher(self) -> tuple[TeacherStore, np.ndarray, np.ndarray]:
        if self.store is None or self.rows_q is None or self.rows_d is None:
            raise DdxError("The teacher and hybrid modes need teacher vectors: pass --store.")
        return self.store, self.rows_q, self.rows_d

    def projected_queries(self) -> np.ndarray:
        if self.q_p is None:
            raise DdxError("The hybrid and projected modes need a ddx run folder as --model.")
        return self.q_p


def set_vectors(
    es: EvalSet, enc: Encoders, store: TeacherStore | None, need_teacher: bool, teacher: str | None, title_join: str
) -> tuple[SetVectors, float]:
    """The set's vectors (teacher rows when a mode needs them or a projection can be compared) and the encode rate.

    Returns:
        ``(vectors, texts per second of the student's encoding)``.
    """
    start = enc.texts, enc.seconds
    v = SetVectors(enc.student_vectors(es.query_texts, "query"), enc.student_vectors(es.doc_texts, "passage"))
    rate = (enc.texts - start[0]) / max(enc.seconds - start[1], 1e-9)
    v.q_p = enc.project(v.q_s) if enc.model is not None else None
    if store is not None and (need_teacher or v.q_p is not None):
        v.store = store
        v.rows_q, v.rows_d = _teacher_rows(store, es, teacher, title_join)
    return v, rate


def mode_inputs(mode: str, v: SetVectors, enc: Encoders) -> tuple[np.ndarray, PassageSource]:
    """(queries, passages) of ``mode``; passages from the store or projected lazily, block by block."""
    if mode == "student":
        return v.q_s, v.d_s
    if mode == "projected":
        return v.projected_queries(), lambda: enc.project_blocks(v.d_s)
    store, rows_q, rows_d = v.teacher()
    queries = store.get_rows(rows_q, dtype="float32") if mode == "teacher" else v.projected_queries()
    return queries, _store_blocks(store, rows_d)


def _teacher_rows(store: TeacherStore, es: EvalSet, teacher: str | None, title_join: str) -> tuple[np.ndarray, ...]:
    """Store rows of the set's queries and passages; fills gaps with --teacher or stops with the command."""
    from distill.data import missing_vectors_command

    q_keys, d_keys = content_keys("query", es.query_texts), content_keys("passage", es.doc_texts)
    q_rows, d_rows = store.locate(q_keys), store.locate(d_keys)
    missing = int((q_rows < 0).sum() + (d_rows < 0).sum())
    if missing and teacher:
        _encode_missing(store, es, teacher, title_join)
        q_rows, d_rows = store.locate(q_keys), store.locate(d_keys)
    elif missing:
        raise MissingVectorsError(
            f"Store {store.url!r} lacks teacher vectors for {int((q_rows < 0).sum())} queries and "
            f"{int((d_rows < 0).sum())} passages of {es.source.spec}. Add them with:\n  "
            f"{missing_vectors_command(store, [es.source.spec])}\nor pass --teacher MODEL to encode them now."
        )
    return q_rows, d_rows


def _encode_missing(store: TeacherStore, es: EvalSet, teacher: str, title_join: str) -> None:
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    spec = store.spec
    cfg = TeacherConfig(
        model=teacher,
        pooling=spec.pooling,
        normalize=spec.normalize,
        max_seq_length=spec.max_seq_length,
        padding_side=spec.padding_side,
        dtype=spec.dtype,
        query_prompt=spec.query_prompt,
        passage_prompt=spec.passage_prompt,
    )
    precompute(
        PrecomputeConfig(store=store.url, data=(es.source.spec,), teacher=cfg, title_join=title_join),
        sources=[es.source],
    )
    store.refresh()


def _store_blocks(store: TeacherStore, rows: np.ndarray, size: int = 65_536) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (store.get_rows(rows[s : s + size], dtype="float32") for s in range(0, len(rows), size))
