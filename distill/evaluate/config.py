"""The evaluation config: one :class:`EvalConfig` per ``ddx evaluate`` run (the leaf of ``distill.evaluate``).

Light on purpose (no numpy, no torch): ``ddx evaluate --help`` builds its options from these fields, whose
``metadata["help"]`` is each option's help.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from storage.errors import DdxError

__all__ = ["MODES", "SEARCHES", "EvalConfig"]

MODES = ("teacher", "student", "hybrid", "projected")
SEARCHES = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation: a model (run folder or plain sentence-transformer) on the data sets' split."""

    model: str = field(metadata={"help": "Run folder of 'ddx train' (or any sentence-transformer: student only)."})
    data: tuple[str, ...] = field(metadata={"help": "Source with qrels, repeatable."})  # beir:, msmarco:, ...
    store: str | None = field(
        default=None, metadata={"help": "Teacher store (teacher and hybrid modes read their vectors from it)."}
    )
    split: str = "test"
    # Those that the model and store allow are run.
    modes: tuple[str, ...] = field(default=MODES, metadata={"help": "Comma-separated modes to run."})
    k_values: tuple[int, ...] = field(default=(10, 100, 1000), metadata={"help": "Cut-offs (comma-separated)."})
    batch_size: int = field(default=64, metadata={"help": "Student encode batch."})
    chunk_size: int = field(default=50_000, metadata={"help": "Passages per search step."})  # bounds memory
    # faiss-* need the extra: pip install "ddx[faiss]".
    search: str = field(default="exact", metadata={"choices": SEARCHES})
    device: str | None = field(default=None, metadata={"help": "Torch device (default: CUDA when available)."})
    strict: bool = field(default=False, metadata={"help": "Fail when qrels name documents absent from the corpus."})
    teacher: str | None = field(
        default=None,
        metadata={"help": "Encode texts the store lacks with this teacher (writing them into the store)."},
    )
    save_run: str | None = field(
        default=None, metadata={"help": "Folder for TREC run files."}
    )  # one per data set and mode
    out: str | None = field(
        default=None, metadata={"help": "Folder for results JSON/CSV (default: MODEL/eval for runs)."}
    )
    title_join: str = "{title} {text}"
    progress: bool = field(default=True, metadata={"help": "Encode progress bars on stderr."})

    def __post_init__(self) -> None:
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise DdxError(f"EvalConfig.modes must be among {MODES}, got {self.modes}.")
        if self.search not in SEARCHES:
            raise DdxError(f"EvalConfig.search must be one of {SEARCHES}, got {self.search!r}.")
        if not self.data:
            raise DdxError("EvalConfig.data is empty: pass at least one --data SOURCE with qrels.")
