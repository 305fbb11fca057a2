"""What ``ddx precompute-teacher`` is asked to do: the teacher's and the run's configuration (a leaf module).

Kept apart from the modules that do the work (numpy, fsspec, polars, the store) so that the command's options,
built from these fields, cost nothing to list: ``ddx precompute-teacher --help`` went from 0.59 s to ~0.1 s.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

from storage.errors import DdxError
from storage.spec import POOLING_MODES, TeacherSpec

__all__ = ["GTE_QWEN2_QUERY_PROMPT", "JOB_ID", "PRESETS", "PrecomputeConfig", "RayConfig", "TeacherConfig"]

JOB_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # a folder name under <store>/runs/

GTE_QWEN2_QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "

# Named settings for well-known teachers (flags still override each field).
PRESETS: dict[str, dict[str, Any]] = {
    "gte-qwen2": {
        "query_prompt": GTE_QWEN2_QUERY_PROMPT,
        "passage_prompt": "",
        "pooling": "lasttoken",
        "padding_side": "left",
        "normalize": True,
        "trust_remote_code": True,
    },
    "e5": {"query_prompt": "query: ", "passage_prompt": "passage: ", "pooling": "mean", "normalize": True},
    "bge": {
        "query_prompt": "Represent this sentence for searching relevant passages: ",
        "passage_prompt": "",
        "pooling": "cls",
        "normalize": True,
    },
    "none": {"query_prompt": "", "passage_prompt": ""},
}


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    """How to load and run the teacher. ``None`` means: read it from the model (or the preset)."""

    # Each field's metadata is its ``ddx precompute-teacher`` option's help and choices (cli/precompute_cmd.py).
    model: str = field(metadata={"help": "Teacher: hub id or local sentence-transformers folder."})
    preset: str | None = field(  # "gte-qwen2" is picked automatically for gte-Qwen2 models
        default=None,
        metadata={
            "help": "Named prompts/pooling for a known teacher (gte-Qwen2 models get 'gte-qwen2' automatically).",
            "choices": tuple(PRESETS),
        },
    )
    query_prompt: str | None = field(
        default=None, metadata={"help": "Prompt prepended to queries (default: the model's 'query' prompt)."}
    )
    passage_prompt: str | None = field(
        default=None, metadata={"help": "Prompt prepended to passages (default: the model's 'document' prompt)."}
    )
    pooling: str | None = field(  # replaces the model's pooling when set
        default=None, metadata={"help": "Override the model's pooling.", "choices": POOLING_MODES}
    )
    normalize: bool | None = field(  # adds/removes L2 normalization when set
        default=None, metadata={"help": "Force L2 normalization on or off."}
    )
    max_seq_length: int | None = field(default=None, metadata={"help": "Tokens kept per text (prompt included)."})
    padding_side: str | None = field(
        default=None, metadata={"help": "Override the tokenizer's padding side.", "choices": ("left", "right")}
    )
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Compute dtype (default bfloat16 on GPU, float32 on CPU).",
            "choices": ("float32", "bfloat16", "float16"),
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Torch device (default cuda:LOCAL_RANK or SLURM_LOCALID, else cpu)."}
    )
    revision: str | None = field(  # branch, tag or commit
        default=None, metadata={"help": "Hub revision of the teacher."}
    )
    trust_remote_code: bool | None = field(default=None, metadata={"help": "Allow the model's own code."})
    compile: bool = field(  # does not change vectors beyond float noise, so not part of the spec
        default=False,
        metadata={
            "help": "Compile the teacher's transformer blocks with torch.compile (fuses the norm, rotary and "
            "activation work between the matrix products; about a minute of compiling at start, for long GPU runs)."
        },
    )

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise DdxError(f"Unknown teacher preset {self.preset!r}; choose one of {sorted(PRESETS)}.")
        if self.pooling is not None and self.pooling not in POOLING_MODES:
            raise DdxError(f"Unknown pooling {self.pooling!r}; choose one of {POOLING_MODES}.")

    @classmethod
    def for_spec(cls, model: str, spec: TeacherSpec, **run: Any) -> TeacherConfig:
        """A config that applies every vector-changing field of a store's ``spec`` to ``model``.

        ``run`` takes the fields that do not change vectors (device, revision, trust_remote_code).
        """
        return cls(
            model=model,
            pooling=spec.pooling,
            normalize=spec.normalize,
            max_seq_length=spec.max_seq_length,
            padding_side=spec.padding_side,
            dtype=spec.dtype,
            query_prompt=spec.query_prompt,
            passage_prompt=spec.passage_prompt,
            **run,
        )

    def resolved(self) -> TeacherConfig:
        """This config with the preset's values filled in where the user gave none."""
        preset = self.preset or ("gte-qwen2" if "gte-qwen2" in self.model.lower() else None)
        if preset is None:
            return self
        values = {k: v for k, v in PRESETS[preset].items() if getattr(self, k) is None}
        return replace(self, preset=preset, **values)


@dataclass(frozen=True, kw_only=True)
class PrecomputeConfig:
    """Everything ``ddx precompute-teacher`` needs besides the teacher itself."""

    # Each field's metadata is its ``ddx precompute-teacher`` option's help and choices (cli/precompute_cmd.py).
    store: str = field(metadata={"help": "Store path or fsspec URL (created on first use)."})
    data: tuple[str, ...] = field(
        metadata={
            "help": "Source, repeatable: beir:PATH, msmarco:PATH, hotpotqa:PATH, nq:PATH, hf:NAME[:CONFIG][:SPLIT], "
            "jsonl:/parquet:/csv:/tsv:PATH[?column=name...]."
        }
    )
    teacher: TeacherConfig
    # float32 doubles the size for ~1e-3 relative error saved.
    storage_dtype: str = field(
        default="float16",
        metadata={"help": "Dtype of stored vectors (new stores only).", "choices": ("float16", "float32")},
    )
    roles: tuple[str, ...] = field(
        default=("query", "passage"), metadata={"help": "Which texts to encode.", "choices": ("query", "passage")}
    )
    token_budget: int | None = field(
        default=None, metadata={"help": "Padded tokens per batch (default 65,536 on GPU, 8,192 on CPU)."}
    )
    max_batch_size: int = field(default=512, metadata={"help": "Texts per batch at most."})  # however short
    window: int = field(  # larger = less padding, more RAM
        default=65_536, metadata={"help": "Texts sorted together by length."}
    )
    flush_rows: int | None = field(  # 32 MiB chunks: 4,096 rows at 3584-d fp16
        default=None, metadata={"help": "Rows per stored chunk (default: 32 MiB chunks)."}
    )
    flush_seconds: float = field(
        default=60.0, metadata={"help": "Flush at least this often; a crash loses at most this much work."}
    )
    limit: int | None = field(default=None, metadata={"help": "Encode at most this many texts (dry run)."})
    rank: int | None = field(  # else 0
        default=None, metadata={"help": "This process's slice (default from torchrun/SLURM env)."}
    )
    world_size: int | None = field(
        default=None, metadata={"help": "Number of slices (default from torchrun/SLURM env)."}
    )
    skip_bad: bool = field(default=False, metadata={"help": "Skip and count malformed records instead of stopping."})
    title_join: str = field(
        default="{title} {text}", metadata={"help": "How passage titles join their text (part of the key)."}
    )
    progress: bool = field(default=True, metadata={"help": "Progress bar on stderr."})  # rank 0 only
    job_id: str | None = field(
        default=None,
        metadata={"help": "Id under which ranks report to <store>/runs/ (default: torchrun's or SLURM's job id)."},
    )
    report_wait: float = field(
        default=600.0, metadata={"help": "Seconds rank 0 waits for the other ranks' reports to total the job."}
    )

    def __post_init__(self) -> None:
        if not self.data:
            raise DdxError("PrecomputeConfig.data is empty: pass at least one --data SOURCE.")
        bad_roles = set(self.roles) - {"query", "passage"}
        if bad_roles or not self.roles:
            raise DdxError(f"PrecomputeConfig.roles must be 'query' and/or 'passage', got {self.roles}.")
        if self.limit is not None and self.limit < 0:
            raise DdxError(f"--limit must be >= 0, got {self.limit}.")
        if self.window <= 0 or self.max_batch_size <= 0:
            raise DdxError("window and max_batch_size must be positive.")
        if not self.report_wait >= 0:
            raise DdxError(f"--report-wait must be >= 0 seconds, got {self.report_wait}.")
        if self.job_id is not None and not JOB_ID.fullmatch(self.job_id):
            raise DdxError(
                f"--job-id {self.job_id!r}: use letters, digits, '.', '_' or '-' (not starting with '.'); it names "
                "the folder <store>/runs/<job>/ the ranks report to."
            )


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """How ``ddx precompute-teacher --engine ray`` spreads the work over a Ray cluster (:mod:`precompute.ray_engine`).

    The plan is cut into units of ``unit_rows`` texts; each unit is one Ray task and one committed segment, so a
    killed actor loses at most its unit in flight (Ray retries it; nothing is stored twice).
    """

    # Each field's metadata is its ``--ray-*`` option's help (cli/precompute_cmd.py).
    address: str | None = field(
        default=None,
        metadata={"help": "Ray cluster to join ('auto', 'ray://HOST:10001'); default: $RAY_ADDRESS, else a local Ray."},
    )
    actors: int | None = field(
        default=None, metadata={"help": "Encoder actors (default: one per GPU of the cluster, else 1).", "min": 1}
    )
    actor_gpus: float | None = field(  # 0: CPU actors (tests, a CPU-only cluster)
        default=None,
        metadata={"help": "GPUs per encoder actor (default: 1 when the cluster has GPUs, else 0).", "min": 0.0},
    )
    actor_cpus: float = field(default=1.0, metadata={"help": "CPUs reserved per encoder actor.", "min": 0.0})
    unit_rows: int = field(  # 16,384 texts: ~1 min of a 7B teacher on one GPU, a 112 MiB segment at 3584-d fp16
        default=16_384, metadata={"help": "Texts per unit of work (one Ray task, one committed segment).", "min": 1}
    )
    max_restarts: int = field(
        default=-1,
        metadata={"help": "Restarts of a dead encoder actor (-1: unlimited, Ray Data's default).", "min": -1},
    )
    max_task_retries: int = field(
        default=-1, metadata={"help": "Retries of a unit whose actor died (-1: unlimited).", "min": -1}
    )
