"""The training config: one :class:`TrainConfig` per ``ddx train`` run (the leaf of ``distill.train``).

A phase is data: its loss, its dataset and its hyper-parameters. :func:`distill.train.run.train` resolves the
sources against the store, builds the dataset and batch sampler, hands them to
:class:`distill.train.trainer.DistillTrainer`, and writes the run folder (:mod:`distill.model.run_file`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from storage.errors import DdxError

__all__ = ["INFONCE_SPACES", "TrainConfig", "infonce_spaces"]

# The values of TrainConfig's choice fields; the three loss options are spelled as the losses' parameters.
ProjectionInit = Literal["ridge", "random"]
MseReduction = Literal["element", "vector"]
InfoNceSpace = str  # "projected", "hybrid", "student", or several joined with "+" (infonce_spaces)
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
