"""The training config: one :class:`TrainConfig` per ``ddx train`` run (the leaf of ``distill.train``).

A phase is data: its loss, its dataset and its hyper-parameters. :func:`distill.train.run.train` resolves the
sources against the store, builds the dataset and batch sampler, hands them to
:class:`distill.train.trainer.DistillTrainer`, and writes the run folder (:mod:`distill.model.run_file`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

from storage.errors import DdxError

__all__ = ["INFONCE_SPACES", "MSE_REDUCTION", "TrainConfig", "infonce_spaces", "option"]

T = TypeVar("T")


def option(default: T, text: str, **extra: Any) -> T:
    """A config field with a default whose ``metadata`` makes its command-line option: the help ``text`` and
    ``extra`` (``choices``, ``min``, ``max``), read by cli/options.py."""
    return field(default=default, metadata={"help": text, **extra})


# The values of TrainConfig's choice fields; the three loss options are spelled as the losses' parameters.
ProjectionInit = Literal["procrustes", "ridge", "random"]
ProjectionKind = Literal["mlp", "none"]
MseReduction = Literal["vector", "element"]
InfoNceSpace = str  # "projected", "hybrid", "student", or several joined with "+" (infonce_spaces)
NegativesScope = Literal["batch", "own"]

# Training's MSE: squared distance per vector, so the loss weights mean what they say (torch's "element" mean over
# B·D makes the MSE ~1/D of the other terms; docs/DESIGN.md, "Losses"). The loss classes keep "element" as their
# own default (distill.train.losses.LOSS_MSE_REDUCTION); training always passes this one.
MSE_REDUCTION: MseReduction = "vector"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run. Defaults follow common distillation practice; each comment says why.

    Each field's ``metadata["help"]`` is its ``ddx train`` option's help (cli/train_cmd.py builds the options from
    these fields: one default per knob).
    """

    phase: int = field(metadata={"help": "1: MSE+cosine on texts; 2: InfoNCE+MSE.", "min": 1, "max": 2})
    store: str = field(metadata={"help": "Teacher store to read vectors from (never written)."})
    data: tuple[str, ...] = field(metadata={"help": "Source, repeatable (as for precompute-teacher)."})
    out: str = field(metadata={"help": "Run folder (student_base/, hybrid/, projection_layer.pt, ...)."})
    student: str | None = option(None, "Student sentence-transformer (hub id or folder).")
    init: str | None = option(None, "Start from this run folder (phase 2 starts from phase 1).")
    # Phase 1 leaves out queries judged only in other splits (no test leakage); None: every split.
    split: str | None = option("train", "Split(s) of examples to train on, comma-separated (e.g. train,dev).")
    hard_negatives: tuple[str, ...] = option((), "Extra example file(s), e.g. the ST MS MARCO hard-negatives jsonl.")
    mine_negatives: int = option(0, "Mine K negatives per query from stored teacher vectors (no teacher run).")
    mine_margin: float = option(
        0.95, "Skip mined candidates scoring >= margin × the weakest positive (likely unjudged positives)."
    )
    num_negatives: int = option(7, "Hard negatives per query per step.")
    epochs: float = 1.0
    max_steps: int | None = option(None, "Stop after this many optimizer steps (overrides --epochs).")
    # Phase 2 also uses every other query's positive as a negative.
    batch_size: int = option(32, "Examples per device per step.")
    lr: float = option(2e-5, "Student learning rate.")  # pretrained weights: keep it small
    projection_lr: float | None = option(  # see resolved_projection_lr
        None,
        "Projection learning rate (default 1e-4 after a warm start, 1e-3 from random, the student's --lr in phase 2).",
    )
    warmup: float = option(0.1, "< 1: fraction of steps; >= 1: steps.")
    weight_decay: float = 0.01
    # L2-SP (Li et al., 2018): decay toward the starting weights instead of toward zero, so the student keeps what
    # pretraining taught it out of the training domains (docs/benchmarks.md, "Out of domain").
    l2sp: float = option(
        0.0,
        "Pull the student's weights toward those the run starts from (L2-SP, applied after each step like AdamW's "
        "decoupled decay, which it replaces for the student's weights); 0: off.",
        min=0.0,
    )
    seed: int = 42
    bf16: bool = option(False, "bfloat16 mixed precision.")
    fp16: bool = option(False, "float16 mixed precision.")
    grad_accum: int = option(1, "Gradient accumulation steps.")
    max_seq_length: int | None = option(None, "Student tokens per text (default: the student's).")
    projection_hidden: int | None = option(None, "Projection hidden width (default 2 × student dim).")
    # "random" starts a new projection from random weights (distill/train/warm_start.py: why procrustes).
    projection_init: ProjectionInit = option(  # noqa: RUF009 - a Field, as from field()
        "procrustes",
        "New projections: fit the output layer to stored vectors first, orthogonally scaled (procrustes: keeps "
        "unseen domains apart) or by least squares (ridge); random: no fit.",
    )
    # "none" is the reference system's "MRL" mode (distill.model.teacher_dims): no projection; the student's own
    # output is trained into the teacher's first D dims, renormalised, and the hybrid searches those cut vectors.
    projection: ProjectionKind = option(  # noqa: RUF009 - a Field, as from field()
        "mlp",
        "mlp: a projection MLP maps the student into the teacher's space; none: no projection, the student is "
        "distilled straight into the teacher's first --teacher-dims dims (renormalised; 'MRL').",
    )
    teacher_dims: int | None = option(
        None,
        "With --projection none: D, the leading teacher dims the student is trained into (default and only value: "
        "the student's dimension).",
        min=1,
    )
    mse_weight: float | None = option(None, "MSE weight (default 0.4 in phase 1, 0.2 in phase 2).")
    mse_reduction: MseReduction = option(  # noqa: RUF009 - a Field, as from field()
        MSE_REDUCTION, "vector: squared distance per vector; element: torch's mean over elements (~1/dim as large)."
    )
    cos_weight: float = option(0.6, "Phase-1 cosine weight.")
    infonce_weight: float = option(0.8, "Phase-2 InfoNCE weight.")
    temperature: float = option(0.05, "InfoNCE temperature.")  # on cosine similarities
    # The default trains both the projected passages and the queries' alignment with a teacher index
    # (docs/DESIGN.md, "Losses").
    infonce_space: InfoNceSpace = option(  # noqa: RUF009 - a Field, as from field()
        "projected+hybrid",
        "Where InfoNCE runs: projected student on both sides (projected), projected queries vs teacher passages "
        "(hybrid), the student's own space (student), or several joined with '+' (e.g. projected+hybrid: terms "
        "averaged).",
    )
    # Hard negatives shared across the batch ("batch") or scored per query only ("own").
    negatives_scope: NegativesScope = "batch"
    # The cached (GradCache) step gives the full batch's gradient with the activations of this many sequences held
    # at a time, for one more forward without a graph. 8 keeps MiniLM at 256 tokens near 2.3 GB on CPU and mpnet at
    # 512 tokens near 7 GB (fp32) on a GPU, where up to ~100 fits and runs faster (docs/DESIGN.md, "Phase-2
    # memory"); None or 0: the plain step, all 288 sequences' activations at once.
    mini_batch_size: int | None = option(
        8,
        "Phase 2: sequences per forward of the cached (GradCache) loss: memory is set by this, not by batch × "
        "negatives × length; same gradient, ~1/3 more compute. 0: the plain step (all in one graph).",
        min=0,
    )
    gradient_checkpointing: bool = option(
        False, "Recompute the student's layer activations in backward: less memory, ~30 % more time."
    )
    length_grouping: bool = True  # batch similar lengths together (less padding)
    allow_missing: bool = option(False, "Drop examples lacking teacher vectors instead of stopping.")
    skip_bad: bool = option(False, "Drop unknown ids and queries without positives instead of stopping.")
    expect_teacher: str | None = option(None, "Refuse a store made by another teacher than this one.")  # id or path
    title_join: str = option("{title} {text}", "Must match the precompute run's.")
    resume: bool = option(
        False,
        "Continue from the newest complete checkpoint in OUT/checkpoints (damaged ones are skipped and set aside).",
    )
    num_workers: int = option(2, "DataLoader workers.")
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    token_cache: str | None = option(None, "Folder for token tables (default $DDX_CACHE_DIR or ~/.cache/ddx).")
    device: str | None = option(None, "Torch device (default: CUDA when available).")
    progress: bool = option(True, "Progress bar on stderr.")

    def __post_init__(self) -> None:
        if self.phase not in (1, 2):
            raise DdxError(f"TrainConfig.phase must be 1 or 2, got {self.phase!r}.")
        if not self.data and not self.hard_negatives:
            raise DdxError("TrainConfig.data is empty: pass at least one --data SOURCE.")
        if self.student is None and self.init is None:
            raise DdxError("Pass --student (a sentence-transformers model) or --init (a previous run folder).")
        if self.bf16 and self.fp16:
            raise DdxError("Choose one of --bf16 and --fp16.")
        if self.projection_init not in get_args(ProjectionInit):
            raise DdxError(
                f"projection_init must be one of {', '.join(get_args(ProjectionInit))}, got {self.projection_init!r}."
            )
        if self.negatives_scope not in get_args(NegativesScope):
            raise DdxError(f"negatives_scope must be 'batch' or 'own', got {self.negatives_scope!r}.")
        if self.mse_reduction not in get_args(MseReduction):
            raise DdxError(f"mse_reduction must be 'element' or 'vector', got {self.mse_reduction!r}.")
        infonce_spaces(self.infonce_space)  # DdxError naming the choices
        self._check_projection()
        for name in ("batch_size", "grad_accum", "num_negatives"):
            if getattr(self, name) < (0 if name == "num_negatives" else 1):
                raise DdxError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}.")
        if self.l2sp < 0:
            raise DdxError(f"TrainConfig.l2sp must be >= 0 (0: off), got {self.l2sp!r}.")
        size = self.mini_batch_size
        if size is not None and not (isinstance(size, int) and size >= 0):
            raise DdxError(
                f"TrainConfig.mini_batch_size must be a whole number >= 0 (0: the plain step), got "
                f"{self.mini_batch_size!r}."
            )

    def _check_projection(self) -> None:
        """``--projection`` and the options that only mean something with one kind of it."""
        if self.projection not in get_args(ProjectionKind):
            raise DdxError(f"projection must be 'mlp' or 'none', got {self.projection!r}.")
        dims = self.teacher_dims
        if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
            raise DdxError(f"--teacher-dims must be a whole number >= 1, got {dims!r}.")
        if dims is not None and self.projection == "mlp":
            raise DdxError(
                f"--teacher-dims {dims} applies to --projection none (the student trained into the teacher's first "
                "D dims); a projection MLP maps into the teacher's full vectors. Add --projection none, or drop "
                "--teacher-dims."
            )
        if self.projection == "none" and self.projection_hidden is not None:
            raise DdxError("--projection-hidden sizes the projection MLP, and --projection none has none: drop one.")

    @property
    def resolved_projection_lr(self) -> float:
        if self.projection_lr is not None:
            return self.projection_lr
        if self.phase == 2 or self.init:
            return self.lr
        return 1e-3 if self.projection_init == "random" else 1e-4

    @property
    def resolved_mse_weight(self) -> float:
        return self.mse_weight if self.mse_weight is not None else (0.4 if self.phase == 1 else 0.2)


INFONCE_SPACES = ("projected", "hybrid", "student")


def infonce_spaces(space: str) -> tuple[str, ...]:
    """``"projected+hybrid"`` → ``("projected", "hybrid")``; an unknown or repeated space is a DdxError."""
    spaces = tuple(part.strip() for part in str(space).split("+"))
    unknown = [part for part in spaces if part not in INFONCE_SPACES]
    if unknown or len(set(spaces)) != len(spaces):
        raise DdxError(
            f"InfoNCE space {space!r} is not valid: use one of {', '.join(INFONCE_SPACES)}, "
            "or several joined with '+' (e.g. 'projected+hybrid'), each at most once."
        )
    return spaces
