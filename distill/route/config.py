"""Router configuration: the ``ddx router fit`` and ``ddx router export`` options, light to import.

Kept apart from the modules that do the work (they import torch and sentence-transformers) so that
``ddx router ... --help``, whose options are built from these fields, starts in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from distill.train.config import option
from storage.errors import DdxError

__all__ = ["KINDS", "ROUTER_DIR", "TARGETS", "MLPSettings", "RouterConfig", "RouterExportConfig", "check_usage"]

KINDS = ("encoder", "retrieval")
TARGETS = ("ndcg10", "rr10", "logp")


@dataclass(frozen=True, kw_only=True)
class MLPSettings:
    """How a router MLP is trained (``RouterConfig`` carries the same fields, defaults taken from here)."""

    hidden: int = 256
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 256
    val_fraction: float = 0.1
    patience: int = 30
    seed: int = 42


ROUTER_DIR = "router"


@dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """One router fit. Data options mean what they mean for ``ddx train --phase 2``."""

    # Each field's metadata is its ``ddx router fit`` option's help and choices (cli/router_cmd.py).
    store: str = field(metadata={"help": "Teacher store the run was trained against (read only)."})
    model: str = field(metadata={"help": "Run folder of 'ddx train' (student + projection)."})
    data: tuple[str, ...] = field(metadata={"help": "Source with training examples, repeatable (as for train)."})
    out: str | None = option(None, "Router folder (default: MODEL/router).")
    split: str | None = option("train", "Split(s) of examples; one the student did not train on gives truer targets.")
    hard_negatives: tuple[str, ...] = option((), "Extra example file(s), as for train.")
    mine_negatives: int = option(0, "Mine K negatives per query (stored).")
    mine_margin: float = 0.95
    pool_size: int = option(
        50_000, "Shared candidate passages every fit query is ranked against, besides its own positives and negatives."
    )
    target: str = option(
        "ndcg10",
        "The teacher's gain over the hybrid per query: nDCG@10, reciprocal rank@10, or InfoNCE log-likelihood.",
        choices=TARGETS,
    )
    kinds: tuple[str, ...] = option(
        KINDS, "Routers to fit: encoder (student embedding), retrieval (+ the hybrid search's top scores)."
    )
    temperature: float = 0.05  # τ of the logp target and of the retrieval router's score entropy
    # Router MLP width: the input is a few hundred numbers, the data a few thousand queries.
    hidden: int = option(MLPSettings.hidden, "Router MLP width.")
    epochs: int = option(MLPSettings.epochs, "Upper bound; a held-out 10 % stops it.")
    lr: float = MLPSettings.lr
    weight_decay: float = MLPSettings.weight_decay
    train_batch_size: int = MLPSettings.batch_size
    val_fraction: float = MLPSettings.val_fraction  # held-out queries that pick the epoch (lift over random)
    patience: int = MLPSettings.patience
    seed: int = MLPSettings.seed
    batch_size: int = option(64, "Student encode batch.")
    allow_missing: bool = option(False, "Drop examples lacking teacher vectors instead of stopping.")
    skip_bad: bool = option(False, "Drop unknown ids and queries without positives instead of stopping.")
    title_join: str = option("{title} {text}", "Must match the precompute run's.")
    device: str | None = option(None, "Torch device (default: CUDA when available).")
    progress: bool = option(True, "Encode progress bars on stderr.")

    def __post_init__(self) -> None:
        if not self.data and not self.hard_negatives:
            raise DdxError("RouterConfig.data is empty: pass at least one --data SOURCE with training examples.")
        if self.target not in TARGETS:
            raise DdxError(f"RouterConfig.target must be one of {TARGETS}, got {self.target!r}.")
        if not self.kinds or set(self.kinds) - set(KINDS):
            raise DdxError(f"RouterConfig.kinds must be among {KINDS}, got {self.kinds!r}.")
        for name in ("pool_size", "hidden", "epochs", "train_batch_size", "batch_size"):
            if getattr(self, name) < 1:
                raise DdxError(f"RouterConfig.{name} must be positive, got {getattr(self, name)}.")
        if not 0.0 <= self.val_fraction < 1.0:
            raise DdxError(f"RouterConfig.val_fraction must be in [0, 1), got {self.val_fraction}.")

    @property
    def resolved_out(self) -> str:
        return self.out or str(Path(self.model) / ROUTER_DIR)

    def mlp_settings(self) -> MLPSettings:
        """This fit's :class:`MLPSettings` (the same fields; the MLP's ``batch_size`` is ``train_batch_size``)."""
        names = [f.name for f in fields(MLPSettings)]
        return MLPSettings(**{n: getattr(self, "train_batch_size" if n == "batch_size" else n) for n in names})


@dataclass(frozen=True, kw_only=True)
class RouterExportConfig:
    """One export of a fitted router as a routed SentenceTransformer folder."""

    # Each field's metadata is its ``ddx router export`` option's help (cli/router_cmd.py).
    router: str  # router folder of 'ddx router fit' (the command's argument)
    teacher: str = field(metadata={"help": "The teacher that wrote the store (hub id or folder); checked."})
    out: str = field(metadata={"help": "Folder for the routed SentenceTransformer."})  # replaced atomically
    teacher_usage: float | None = option(None, "Fraction of the fit queries sent to the teacher [default: 0.2].")
    threshold: float | None = option(None, "Or a raw router-score threshold (score above: teacher).")
    model: str | None = option(None, "Run folder (default: the run the router was fitted on).")
    revision: str | None = option(None, "Teacher hub revision.")
    trust_remote_code: bool | None = option(None, "For the teacher's own code.")  # gte-Qwen2 needs it

    def __post_init__(self) -> None:
        if self.teacher_usage is not None and self.threshold is not None:
            raise DdxError("Pass --teacher-usage or --threshold, not both.")
        if self.teacher_usage is not None:
            check_usage(self.teacher_usage)


def check_usage(usage: float) -> None:
    """Raise unless ``usage`` (a teacher-usage budget) is a number in [0, 1]."""
    if isinstance(usage, bool) or not isinstance(usage, int | float) or not 0.0 <= float(usage) <= 1.0:
        raise DdxError(f"Teacher usage must be a fraction in [0, 1] (0.2 = 20 % of queries), got {usage!r}.")
