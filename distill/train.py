"""``ddx train``: phase 1 (MSE + cosine) and phase 2 (InfoNCE + MSE) through one training path.

A phase is data: its loss, its dataset and its hyper-parameters. ``train`` resolves the sources
against the store (every teacher vector must already be there: the teacher never runs), builds the
dataset and batch sampler, hands them to :class:`distill.trainer.DistillTrainer`, and writes the run
folder::

    out/
      student_base/          plain SentenceTransformer (student_dim vectors)
      hybrid/                plain SentenceTransformer emitting teacher-space vectors
      projection_layer.pt    projection weights and dims
      ddx_run.json           resolved config, store fingerprint and teacher spec, data report, final losses
      train_log.jsonl        every logged step (loss and its parts, learning rate)
      checkpoints/           HF checkpoints (optimizer, scheduler, RNG) with a ddx manifest each: --resume continues
                             from the newest complete one (distill.checkpoints), skipping damaged ones
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from storage.errors import DdxError, FingerprintMismatchError
from storage.store import TeacherStore

__all__ = ["RUN_FILE", "TrainConfig", "TrainResult", "read_run", "train", "train_phase1", "train_phase2"]

RUN_FILE = "ddx_run.json"

# The values of TrainConfig's choice fields; the three loss options are spelled as the losses' parameters.
ProjectionInit = Literal["ridge", "random"]
MseReduction = Literal["element", "vector"]
InfoNceSpace = str  # "projected", "hybrid", "student", or several joined with "+" (distill.losses.infonce_spaces)
NegativesScope = Literal["own", "batch"]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Defaults follow common distillation practice; each comment says why."""

    phase: int  # 1: match teacher vectors on diverse text; 2: contrastive with hard negatives
    store: str  # teacher store (read only)
    data: tuple[str, ...]  # source specs, as for precompute
    out: str  # run folder
    student: str | None = None  # student model (phase 1, or phase 2 without --init)
    init: str | None = None  # run folder to start from (phase 2 starts from phase 1)
    split: str | None = "train"  # split(s) of examples, comma-separated ("train,dev"); phase 1 leaves out queries
    #                              judged only in other splits (no test leakage); None: every split
    hard_negatives: tuple[str, ...] = ()  # extra example files (e.g. the ST MS MARCO hard-negatives jsonl)
    mine_negatives: int = 0  # mine K negatives per query from the stored teacher vectors
    mine_margin: float = 0.95  # mined negatives must score below margin × the weakest positive's score
    num_negatives: int = 7  # hard negatives per query per step
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 32  # per device; phase 2 also uses every other query's positive as a negative
    lr: float = 2e-5  # student learning rate (pretrained weights: keep it small)
    projection_lr: float | None = None  # default: 1e-4 after a ridge warm start, 1e-3 from random; phase 2: = lr
    warmup: float = 0.1  # < 1: fraction of steps; >= 1: number of steps
    weight_decay: float = 0.01
    seed: int = 42
    bf16: bool = False
    fp16: bool = False
    grad_accum: int = 1
    max_seq_length: int | None = None  # student tokens per text (default: the student's own)
    projection_hidden: int | None = None  # default 2 × student_dim
    projection_init: ProjectionInit = "ridge"  # new projections: "ridge" fits the output layer on stored
    #                                            vectors; "random" starts from random weights
    mse_weight: float | None = None  # default 0.4 (phase 1) / 0.2 (phase 2)
    mse_reduction: MseReduction = "vector"  # squared distance per vector (weights then mean what they say;
    #                                         torch's "element" mean over B·D makes MSE ~1/D of the other terms)
    cos_weight: float = 0.6  # phase 1
    infonce_weight: float = 0.8  # phase 2
    temperature: float = 0.05  # InfoNCE softmax temperature on cosine similarities
    # Where phase-2 InfoNCE runs: "projected" (projected student on both sides), "hybrid" (projected queries vs the
    # stored teacher passages), "student", or several joined with "+", their terms averaged. The default trains both
    # the projected passages and the queries' alignment with a teacher index (docs/DESIGN.md, "Losses").
    infonce_space: InfoNceSpace = "projected+hybrid"
    negatives_scope: NegativesScope = "batch"  # hard negatives shared across the batch ("batch") or per query ("own")
    # Phase 2: sequences per forward of the cached (GradCache) step, which gives the full batch's gradient with the
    # activations of this many sequences held at a time, for one more forward without a graph. 8 keeps MiniLM at 256
    # tokens near 2.3 GB on CPU and mpnet at 512 tokens near 7 GB (fp32) on a GPU, where up to ~100 fits and runs
    # faster (docs/DESIGN.md, "Phase-2 memory"); None or 0: the plain step, all 288 sequences' activations at once.
    mini_batch_size: int | None = 8
    gradient_checkpointing: bool = False  # recompute the student's layer activations in backward (less memory, +30 %)
    length_grouping: bool = True  # batch similar lengths together (less padding)
    allow_missing: bool = False  # drop examples lacking teacher vectors instead of stopping
    skip_bad: bool = False  # drop unknown ids / queries without positives instead of stopping
    expect_teacher: str | None = None  # refuse a store made by another teacher (model id or path)
    title_join: str = "{title} {text}"  # must match the precompute run's
    resume: bool = False  # continue from the newest complete checkpoint in out/checkpoints
    num_workers: int = 2  # DataLoader workers
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    token_cache: str | None = None  # token tables folder (default: $DDX_CACHE_DIR or ~/.cache/ddx)
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.phase not in (1, 2):
            raise DdxError(f"TrainConfig.phase must be 1 or 2, got {self.phase!r}.")
        if not self.data and not self.hard_negatives:
            raise DdxError("TrainConfig.data is empty: pass at least one --data SOURCE.")
        if self.student is None and self.init is None:
            raise DdxError("Pass --student (a sentence-transformers model) or --init (a previous run folder).")
        if self.bf16 and self.fp16:
            raise DdxError("Choose one of --bf16 and --fp16.")
        if self.projection_init not in ("ridge", "random"):
            raise DdxError(f"projection_init must be 'ridge' or 'random', got {self.projection_init!r}.")
        if self.negatives_scope not in ("batch", "own"):
            raise DdxError(f"negatives_scope must be 'batch' or 'own', got {self.negatives_scope!r}.")
        from distill.losses import infonce_spaces

        infonce_spaces(self.infonce_space)  # DdxError naming the choices
        for name in ("batch_size", "grad_accum", "num_negatives"):
            if getattr(self, name) < (0 if name == "num_negatives" else 1):
                raise DdxError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}.")
        size = self.mini_batch_size
        if size is not None and not (isinstance(size, int) and size >= 0):
            raise DdxError(
                f"TrainConfig.mini_batch_size must be a whole number >= 0 (0: the plain step), got "
                f"{self.mini_batch_size!r}."
            )

    @property
    def resolved_projection_lr(self) -> float:
        if self.projection_lr is not None:
            return self.projection_lr
        if self.phase == 2 or self.init:
            return self.lr
        return 1e-4 if self.projection_init == "ridge" else 1e-3

    @property
    def resolved_mse_weight(self) -> float:
        return self.mse_weight if self.mse_weight is not None else (0.4 if self.phase == 1 else 0.2)


@dataclass
class TrainResult:
    """Paths of a finished run and what happened in it."""

    out: str
    student_base: str
    hybrid: str
    projection: str
    steps: int
    first_loss: float | None
    final_loss: float | None
    report: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_run(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``ddx_run.json`` of a run folder.

    Raises:
        DdxError: the folder is not a finished ddx run.
    """
    file = Path(path) / RUN_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise DdxError(
            f"{path!r} is not a finished ddx run ({RUN_FILE} missing or unreadable). Pass the --out "
            "folder of a completed 'ddx train' run."
        ) from exc


def check_run_store(run: dict[str, Any], run_path: str, store: TeacherStore) -> None:
    """Refuse a run that was trained against another store fingerprint."""
    if run.get("store_fingerprint") != store.fingerprint:
        raise FingerprintMismatchError(
            f"Run {run_path!r} was trained against teacher fingerprint {run.get('store_fingerprint')} "
            f"({run.get('teacher_spec', {}).get('model')!r}), but store {store.url!r} holds {store.fingerprint} "
            f"({store.spec.model!r}). Use the store the run was trained with, or retrain against this one."
        )


def _check_teacher(store: TeacherStore, expected: str | None) -> None:
    """Refuse a store of another teacher than ``expected`` (the model as typed, or part of its weights id)."""
    if expected and expected != store.spec.model and expected not in store.spec.weights_id:
        raise FingerprintMismatchError(
            f"Store {store.url!r} holds vectors of teacher {store.spec.model!r}, but this run expects {expected!r}. "
            "Point --store at that teacher's store, or drop --expect-teacher."
        )


def train(config: TrainConfig) -> TrainResult:
    """Run one phase end to end and write the run folder (see module docstring).

    Raises:
        StoreNotFoundError, FingerprintMismatchError: the store is missing or another teacher's.
        MissingVectorsError: needed texts have no teacher vector (message has the command to add them).
        BadSourceError: unknown ids, queries without positives, malformed data.
        DimensionMismatchError: the student and projection (or --init run) disagree on dims.
        DdxError: ``resume`` is set and every checkpoint in ``out/checkpoints`` is incomplete.

    Every error above is raised before the student's weights load (only the dimension check needs them).
    """
    from distill.run import run_training

    store = TeacherStore.open(config.store)
    _check_teacher(store, config.expect_teacher)
    if config.init:
        check_run_store(read_run(config.init), config.init, store)
    return run_training(config, store)


def end_distributed() -> bool:
    """Tear down the process group ``ddx train`` ran under (torchrun), once every rank has finished.

    ``transformers`` starts the group and never ends it. A rank that exits with gloo work threads still alive can
    abort with SIGABRT ("terminate called without an active exception") and NCCL warns about a leaked group, so
    the command ends it: a barrier (no rank leaves while a peer still talks to it), then ``destroy_process_group``.
    Only for a successful run; after a failure torchrun stops the other ranks. No-op outside torch.distributed.

    Returns:
        Whether this process was rank 0 of the group (True when not distributed): the one that reports.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    return rank == 0


def train_phase1(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Phase 1: ``0.4·MSE + 0.6·(1 − cos)`` between projected student and teacher vectors."""
    base = config or TrainConfig(phase=1, **overrides)
    return train(replace(base, phase=1, **(overrides if config else {})))


def train_phase2(config: TrainConfig | None = None, **overrides: Any) -> TrainResult:
    """Phase 2: ``0.8·InfoNCE + 0.2·MSE`` with hard and in-batch negatives."""
    base = config or TrainConfig(phase=2, **overrides)
    return train(replace(base, phase=2, **(overrides if config else {})))
