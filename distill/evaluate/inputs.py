"""What evaluation searches: an eval set's texts, and their student, projected and teacher vectors.

An eval set is a source's split: its judged queries, the whole corpus (distractors included) and the
qrels. The model under evaluation encodes it once (:class:`Encoders`); the teacher's vectors come from
the store by content key (missing ones are encoded with ``--teacher`` or reported with the command
that adds them). :func:`mode_inputs` then hands each retrieval mode its queries and passages, the
store's passages streamed block by block in store-row order (searches map results back to documents).

The student's corpus vectors are kept for every mode that searches them, on disk (:class:`SpilledVectors`),
not in RAM: as one float32 array they grew RSS by 3.0 GiB at 2 M passages of 384-d (13 GiB at MS MARCO's
8.84 M); spilled, encoding adds about one encoded block whatever the corpus size (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distill.model.run_file import RUN_FILE, read_run
from distill.search.search import PassageSource
from distill.search.search_inputs import store_blocks
from precompute.pipeline import PrecomputeConfig, missing_vectors_command, precompute
from precompute.sources import Source
from precompute.sources.errors import BadSourceError
from precompute.teacher import TeacherConfig
from storage.errors import DdxError, MissingVectorsError
from storage.keys import KEY_DTYPE, content_keys
from storage.store import TeacherStore

if TYPE_CHECKING:  # both import torch; Encoders loads the one it needs when it runs
    from sentence_transformers import SentenceTransformer

    from distill.model.model import StudentModelWithProjection

__all__ = ["Encoders", "EvalSet", "SetVectors", "SpilledVectors", "load_eval_set", "mode_inputs", "set_vectors"]

STUDENT_CORPUS_MODES = frozenset({"student", "projected"})  # modes that search student-encoded passages
TEACHER_MODES = frozenset({"teacher", "hybrid"})  # modes that search stored teacher passages
ENCODE_BLOCK = 65_536  # corpus texts a model encodes per call (sorted by length within it); one call below this


@dataclass
class EvalSet:
    """Queries, corpus and qrels of one source's split.

    The corpus is held as columns: its ids (a numpy unicode array, position = document number) and
    content keys (``S16``). Its texts stay in the source and stream back a block at a time when a
    model encodes them (:meth:`doc_text_blocks`): MS MARCO's 8.8 M passages are 2.9 GB of text, which
    a dict of every passage held as Python strings (several GB).
    """

    name: str
    source: Source
    query_ids: list[str]
    query_texts: list[str]
    doc_ids: np.ndarray
    doc_keys: np.ndarray
    qrels: dict[str, dict[str, int]]
    notes: list[str]

    def doc_text_blocks(self, size: int = ENCODE_BLOCK) -> Iterator[list[str]]:
        """The corpus texts in ``doc_ids`` order, ``size`` at a time, read from the source again.

        Raises:
            DdxError: the source no longer gives the corpus it gave (a file changed since loading).
        """
        texts: list[str] = []
        done = 0
        for block in self.source.iter_text_blocks("passage"):
            expected = self.doc_ids[done : done + len(block)].tolist()
            if block.ids != expected or not np.array_equal(block.keys(), self.doc_keys[done : done + len(block)]):
                raise DdxError(f"{self.source.spec}: the corpus changed while it was evaluated; rerun the evaluation.")
            done += len(block)
            texts += block.texts
            while len(texts) >= size:
                yield texts[:size]
                texts = texts[size:]
        if texts:
            yield texts
        if done != len(self.doc_ids):
            raise DdxError(f"{self.source.spec}: the corpus changed while it was evaluated; rerun the evaluation.")

    @property
    def doc_texts(self) -> list[str]:
        """Every corpus text in one list (small sets, scripts); encoding streams :meth:`doc_text_blocks`."""
        return [t for block in self.doc_text_blocks() for t in block]


def load_eval_set(source: Source, split: str, strict: bool) -> EvalSet:
    """Read the split's judged queries, the whole corpus (distractors included) and the qrels.

    The corpus is read as blocks of columns into ids and content keys only (for MS MARCO: ~0.4 GB).

    Raises:
        BadSourceError: the split has no qrels, or (``strict``) qrels name unknown documents.
    """
    qrels = source.qrels(split)
    if not qrels:
        raise BadSourceError(
            f"{source.spec}: split {split!r} has no qrels (splits with qrels: {source.splits()}). "
            "Pick one with --split."
        )
    doc_ids, doc_keys, unknown_docs = _corpus_columns(source, {d for q in qrels.values() for d in q})
    queries = {r.id: r.text for r in source.iter_texts("query") if r.id in qrels}
    notes = []
    if unknown_docs:
        msg = f"{source.spec}: {len(unknown_docs)} judged document ids are not in the corpus (ignored)"
        if strict:
            raise BadSourceError(msg.replace(" (ignored)", "") + "; drop --strict to evaluate anyway.")
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
    unjudged = {q for q in queries if not any(v > 0 for v in qrels[q].values())}
    missing = [q for q in qrels if q not in queries]
    if unjudged or missing:
        notes.append(
            f"{source.spec}: excluded {len(unjudged)} queries without a positive judgment and "
            f"{len(missing)} judged query ids absent from the queries file"
        )
    qids = [q for q in queries if q not in unjudged]
    if not qids:
        raise BadSourceError(f"{source.spec}: split {split!r} has no query with a positive judgment.")
    qrels = {q: qrels[q] for q in qids}
    return EvalSet(source.name, source, qids, [queries[q] for q in qids], doc_ids, doc_keys, qrels, notes)


def _corpus_columns(source: Source, judged: set[str]) -> tuple[np.ndarray, np.ndarray, set[str]]:
    """``(ids, keys, judged ids not in the corpus)`` of the source's passages, read block by block."""
    ids: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    found: set[str] = set()
    for block in source.iter_text_blocks("passage"):
        ids.append(np.array(block.ids, dtype=str))
        keys.append(block.keys())
        found.update(i for i in block.ids if i in judged)
    if not ids:
        return np.empty(0, dtype=str), np.empty(0, KEY_DTYPE), judged
    return np.concatenate(ids), np.concatenate(keys), judged - found


class Encoders:
    """The model under evaluation: a ddx run (student + projection) or a plain sentence-transformer."""

    def __init__(self, path: str, device: str | None, batch_size: int, progress: bool = False) -> None:
        self.batch_size, self.progress = batch_size, progress
        self.run = read_run(path) if (Path(path) / RUN_FILE).exists() else None
        self.model: StudentModelWithProjection | None
        self.student: SentenceTransformer
        if self.run is not None:
            from distill.model.model import StudentModelWithProjection

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

    @property
    def teacher_dims(self) -> int | None:
        """``D`` of a ``--projection none`` run: its hybrid searches the teacher's first D dims, renormalised."""
        return self.model.teacher_dims if self.model is not None else None


class SpilledVectors:
    """``[n, dim]`` float32 vectors in an unnamed temp file, written and read a block at a time: bounded RAM.

    The file comes from :func:`tempfile.TemporaryFile` in ``TMPDIR`` (point it at a disk, not a tmpfs, for a
    large corpus): it has no name, so the OS frees it when it is closed, when this object is collected, or when the
    process ends, after an error or a kill too. Reads copy blocks out with ``preadv`` rather than through a map,
    so the process holds the block it reads, not every page it has read.

    Example:
        >>> spilled = SpilledVectors(2)
        >>> spilled.append(np.ones((3, 2), np.float32))
        >>> len(spilled), [b.shape for b in spilled.blocks(2)], spilled[np.array([2])].tolist()
        (3, [(2, 2), (1, 2)], [[1.0, 1.0]])
    """

    def __init__(self, dim: int) -> None:
        self.dim, self.rows = dim, 0
        self._file = tempfile.TemporaryFile(prefix="ddx-vectors-")  # noqa: SIM115 (lives as long as this object)

    def append(self, vectors: np.ndarray) -> None:
        """Add rows at the end (cast to float32)."""
        self._file.write(_bytes(np.ascontiguousarray(vectors, np.float32)))
        self._file.flush()  # reads go straight to the descriptor
        self.rows += len(vectors)

    def __len__(self) -> int:
        return self.rows

    def blocks(self, size: int = ENCODE_BLOCK) -> Iterator[np.ndarray]:
        """The rows in order, ``size`` at a time, each a fresh array."""
        for start in range(0, self.rows, size):
            yield self._read(start, min(size, self.rows - start))

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        """Rows at indices ``rows`` (a sample: one read a row)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.rows):
            raise IndexError(f"row indices must be in 0..{self.rows - 1}, got {rows.min()}..{rows.max()}.")
        return np.concatenate([self._read(int(r), 1) for r in rows]) if len(rows) else self._read(0, 0)

    def close(self) -> None:
        """Free the file now (collection does it too)."""
        self._file.close()

    def _read(self, start: int, n: int) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        view, done, offset = _bytes(out), 0, start * self.dim * 4
        while done < view.nbytes:
            got = os.preadv(self._file.fileno(), [view[done:]], offset + done)
            if got == 0:
                raise DdxError(f"Internal: the spilled vectors file ends {view.nbytes - done} bytes early.")
            done += got
        return out


def _bytes(array: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array (empty ones too, which ``memoryview.cast`` refuses)."""
    return memoryview(array.reshape(-1).view(np.uint8))  # type: ignore[arg-type]


@dataclass
class SetVectors:
    """One eval set's vectors, computed once and shared by every mode; teacher rows index the store."""

    q_s: np.ndarray  # student queries
    d_s: SpilledVectors | None  # student passages (on disk): None when no mode searches them (teacher, hybrid, routed)
    q_p: np.ndarray | None = None  # projected student queries (ddx runs only)
    store: TeacherStore | None = None
    rows_q: np.ndarray | None = None  # store rows of the queries and passages (with a store only)
    rows_d: np.ndarray | None = None

    def student_corpus(self) -> SpilledVectors:
        if self.d_s is None:
            raise DdxError("Internal: the student corpus was not encoded for these modes (set_vectors' modes).")
        return self.d_s

    def teacher(self) -> tuple[TeacherStore, np.ndarray, np.ndarray]:
        if self.store is None or self.rows_q is None or self.rows_d is None:
            raise DdxError("The teacher and hybrid modes need teacher vectors: pass --store.")
        return self.store, self.rows_q, self.rows_d

    def projected_queries(self) -> np.ndarray:
        if self.q_p is None:
            raise DdxError("The hybrid and projected modes need a ddx run folder as --model.")
        return self.q_p


def set_vectors(
    es: EvalSet,
    enc: Encoders,
    store: TeacherStore | None,
    modes: Collection[str],
    teacher: str | None,
    title_join: str,
) -> tuple[SetVectors, float]:
    """The set's vectors for ``modes`` and the student's encode rate.

    The student encodes the corpus only for the modes that search student-side passages (``student``,
    ``projected``): the teacher and hybrid modes, and so the routing curve, search stored teacher passages and
    encode the queries alone — at MS MARCO's 8.8 M passages, hours of student encoding saved. Teacher rows are
    located when a mode needs them or a projection can be compared.

    Returns:
        ``(vectors, texts per second of the student's encoding)``.
    """
    start = enc.texts, enc.seconds
    corpus = _student_corpus(es, enc) if STUDENT_CORPUS_MODES & set(modes) else None
    v = SetVectors(enc.student_vectors(es.query_texts, "query"), corpus)
    need_teacher = bool(TEACHER_MODES & set(modes))
    rate = (enc.texts - start[0]) / max(enc.seconds - start[1], 1e-9)
    v.q_p = enc.project(v.q_s) if enc.model is not None else None
    if store is not None and (need_teacher or v.q_p is not None):
        v.store = store
        v.rows_q, v.rows_d = _teacher_rows(store, es, teacher, title_join)
    return v, rate


def _student_corpus(es: EvalSet, enc: Encoders) -> SpilledVectors:
    """Student vectors of the corpus, encoded :data:`ENCODE_BLOCK` texts at a time into a spilled file."""
    out: SpilledVectors | None = None
    try:
        for texts in es.doc_text_blocks():
            vectors = enc.student_vectors(texts, "passage")
            if out is None:
                out = SpilledVectors(vectors.shape[1])
            out.append(vectors)
            del vectors  # one encoded block alive at a time, not this one beside the next
        if out is None:
            out = SpilledVectors(enc.student_vectors([], "passage").shape[1])
    except BaseException:
        if out is not None:
            out.close()  # now, not when the traceback lets go of it
        raise
    return out


def mode_inputs(mode: str, v: SetVectors, enc: Encoders) -> tuple[np.ndarray, PassageSource]:
    """(queries, passages) of ``mode``; passages from the store or projected lazily, block by block.

    The teacher mode searches the full stored vectors; the hybrid searches them as the run was trained against
    them: whole, or (``--projection none``) cut to the first ``enc.teacher_dims`` dims and renormalised.
    """
    if mode in STUDENT_CORPUS_MODES:
        d_s = v.student_corpus()
        if mode == "student":
            return v.q_s, d_s.blocks
        return v.projected_queries(), lambda: (p for block in d_s.blocks() for p in enc.project_blocks(block))
    store, rows_q, rows_d = v.teacher()
    if mode == "teacher":
        return store.get_rows(rows_q, dtype="float32"), store_blocks(store, rows_d)
    return v.projected_queries(), store_blocks(store, rows_d, dims=enc.teacher_dims)


def _teacher_rows(store: TeacherStore, es: EvalSet, teacher: str | None, title_join: str) -> tuple[np.ndarray, ...]:
    """Store rows of the set's queries and passages; fills gaps with --teacher or stops with the command."""
    q_keys, d_keys = content_keys("query", es.query_texts), es.doc_keys
    q_rows, d_rows = store.locate(q_keys), store.locate(d_keys)
    missing = int((q_rows < 0).sum() + (d_rows < 0).sum())
    if missing and teacher:
        config = PrecomputeConfig(
            store=store.url,
            data=(es.source.spec,),
            teacher=TeacherConfig.for_spec(teacher, store.spec),
            title_join=title_join,
        )
        precompute(config, sources=[es.source])
        store.refresh()
        q_rows, d_rows = store.locate(q_keys), store.locate(d_keys)
    elif missing:
        raise MissingVectorsError(
            f"Store {store.url!r} lacks teacher vectors for {int((q_rows < 0).sum())} queries and "
            f"{int((d_rows < 0).sum())} passages of {es.source.spec}. Add them with:\n  "
            f"{missing_vectors_command(store, [es.source.spec])}\nor pass --teacher MODEL to encode them now."
        )
    return q_rows, d_rows
