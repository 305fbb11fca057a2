"""``ddx train``: phase 1 (MSE + cosine) and phase 2 (InfoNCE + MSE) through one training path.

:func:`train` checks the store, then :func:`run_training` assembles one run: data resolved against the store (every
teacher vector must already be there: the teacher never runs), model, dataset and batch sampler, loss,
:class:`distill.train.trainer.DistillTrainer`; then it writes the run folder (:mod:`distill.model.run_file`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from distill.model.run_file import check_run_store, read_run, write_run
from distill.model.teacher_dims import check_teacher_dims
from distill.train.config import TrainConfig
from distill.train.data import PreparedData, parse_sources, resolve_data
from distill.train.loss_plot import LOSS_PLOT, write_loss_plot
from distill.train.mining import hard_negative_miner
from distill.train.tokens import TokenTable
from precompute.sources import Source
from storage.errors import DdxError, DimensionMismatchError, FingerprintMismatchError
from storage.store import TeacherStore

if TYPE_CHECKING:  # torch and transformers load when a run starts, after the data checks (see run_training)
    from transformers import TrainingArguments

    from distill.model.model import StudentModelWithProjection
    from distill.train.datasets import Collate, Phase1Dataset, Phase2Dataset
    from distill.train.losses import Phase1Loss, Phase2Loss
    from distill.train.sampling import DistillBatchSampler

__all__ = ["TrainResult", "end_distributed", "run_training", "train", "train_phase1", "train_phase2"]


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


def _check_teacher(store: TeacherStore, expected: str | None) -> None:
    """Refuse a store of another teacher than ``expected`` (the model as typed, or part of its weights id)."""
    if expected and expected != store.spec.model and expected not in store.spec.weights_id:
        raise FingerprintMismatchError(
            f"Store {store.url!r} holds vectors of teacher {store.spec.model!r}, but this run expects {expected!r}. "
            "Point --store at that teacher's store, or drop --expect-teacher."
        )


def train(config: TrainConfig) -> TrainResult:
    """Run one phase end to end and write the run folder (:mod:`distill.model.run_file`).

    Raises:
        StoreNotFoundError, FingerprintMismatchError: the store is missing or another teacher's.
        MissingVectorsError: needed texts have no teacher vector (message has the command to add them).
        BadSourceError: unknown ids, queries without positives, malformed data.
        DimensionMismatchError: the student and projection (or --init run) disagree on dims; ``--teacher-dims`` is
            more than the store's dim or (``--projection none``) not the student's.
        DdxError: ``resume`` is set and every checkpoint in ``out/checkpoints`` is incomplete; ``--init`` names a run
            of the other ``--projection``.

    Every error above is raised before the student's weights load (only the dimension checks against the student
    need them).
    """
    store = TeacherStore.open(config.store)
    _check_teacher(store, config.expect_teacher)
    if config.teacher_dims is not None:
        check_teacher_dims(config.teacher_dims, store.dim)
    if config.init:
        run = read_run(config.init)
        check_run_store(run, config.init, store)
        _check_init_projection(config, run)
    return run_training(config, store)


def _check_init_projection(config: TrainConfig, run: dict[str, Any]) -> None:
    """Refuse to continue a run of the other ``--projection`` (a run written before the option existed has an MLP)."""
    kind = run.get("config", {}).get("projection", "mlp")
    dims = run.get("teacher_dims")
    if kind == config.projection == "none" and config.teacher_dims not in (None, dims):
        raise DimensionMismatchError(
            f"--teacher-dims {config.teacher_dims} does not match --init {config.init!r}, trained into the teacher's "
            f"first {dims} dims. Pass --teacher-dims {dims} or leave it out."
        )
    if kind == config.projection:
        return
    if kind == "none":
        raise DdxError(
            f"--init {config.init!r} was trained with --projection none --teacher-dims {dims} (no projection): pass "
            "--projection none to continue it."
        )
    from distill.model.model import STUDENT_DIR  # imports torch: only on the way to this error

    raise DdxError(
        f"--init {config.init!r} has a projection (--projection mlp); --projection none trains a student without "
        f"one. Start from its student instead: --student {str(Path(str(config.init)) / STUDENT_DIR)!r}, or drop "
        "--projection none."
    )


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


def _load_model(config: TrainConfig, store: TeacherStore) -> StudentModelWithProjection:
    from distill.model.model import StudentModelWithProjection

    if config.init:
        model = StudentModelWithProjection.load(config.init, device=config.device)
        if config.max_seq_length:
            model.student.max_seq_length = config.max_seq_length
    else:
        assert config.student is not None  # TrainConfig requires --student when there is no --init
        model = StudentModelWithProjection.from_pretrained(
            config.student,
            store.dim,
            hidden_dim=config.projection_hidden,
            max_seq_length=config.max_seq_length,
            device=config.device,
            projection=config.projection,
            teacher_dims=config.teacher_dims,
        )
    if model.teacher_dims is not None:  # --projection none: the student's own output, D of the store's dims
        if config.teacher_dims not in (None, model.teacher_dims):
            raise DimensionMismatchError(
                f"--teacher-dims {config.teacher_dims} does not match --init {config.init!r}, trained into the "
                f"teacher's first {model.teacher_dims} dims. Pass --teacher-dims {model.teacher_dims} or leave it out."
            )
        check_teacher_dims(model.teacher_dims, store.dim)
    elif model.teacher_dim != store.dim:
        raise DimensionMismatchError(
            f"The projection of {config.init or config.student!r} outputs {model.teacher_dim}-d vectors but store "
            f"{store.url!r} holds {store.dim}-d teacher vectors. Start from a run trained on this store, or from "
            "--student alone (a new projection is built to the store's dim)."
        )
    return model


def _resolve(config: TrainConfig, store: TeacherStore) -> tuple[list[Source], PreparedData]:
    """The run's sources and its data resolved against the store: bad data and missing vectors raise here, with
    no student loaded (its tokens are added later, by ``PreparedData.add_tokens``)."""
    sources = parse_sources(config.data, config.hard_negatives, skip_bad=config.skip_bad, title_join=config.title_join)
    data = resolve_data(
        sources,
        store,
        phase=config.phase,
        split=config.split,
        allow_missing=config.allow_missing,
        skip_bad=config.skip_bad,
        mine=hard_negative_miner(config.mine_negatives, config.mine_margin),
    )
    return sources, data


def _loss(config: TrainConfig) -> Phase1Loss | Phase2Loss:
    from distill.train.losses import Phase1Loss, Phase2Loss

    if config.phase == 1:
        return Phase1Loss(
            mse_weight=config.resolved_mse_weight, cos_weight=config.cos_weight, mse_reduction=config.mse_reduction
        )
    return Phase2Loss(
        infonce_weight=config.infonce_weight,
        mse_weight=config.resolved_mse_weight,
        temperature=config.temperature,
        negatives=config.negatives_scope,
        space=config.infonce_space,
        mse_reduction=config.mse_reduction,
    )


def _dataset(
    config: TrainConfig, data: PreparedData, store: TeacherStore, tokens: TokenTable, teacher_dims: int | None
) -> tuple[Phase1Dataset | Phase2Dataset, DistillBatchSampler, Collate]:
    """The phase's dataset (teacher vectors cut to ``teacher_dims`` and renormalised, if set), sampler, collate."""
    from distill.train.datasets import Phase1Dataset, Phase2Dataset, phase1_collate_fn, phase2_collate_fn
    from distill.train.sampling import DistillBatchSampler

    dataset: Phase1Dataset | Phase2Dataset
    if config.phase == 1:
        assert data.phase1 is not None  # prepare_data(phase=1) fills phase1
        dataset = Phase1Dataset(data.phase1, data.texts, store, tokens, teacher_dims=teacher_dims)
        collate = phase1_collate_fn(tokens)
    else:
        assert data.phase2 is not None  # prepare_data(phase=2) fills phase2
        dataset = Phase2Dataset(
            data.phase2,
            data.texts,
            store,
            tokens,
            num_negatives=config.num_negatives,
            seed=config.seed,
            teacher_dims=teacher_dims,
        )
        collate = phase2_collate_fn(tokens)
    sampler = DistillBatchSampler.for_dataset(
        dataset, config.batch_size, seed=config.seed, length_grouping=config.length_grouping
    )
    return dataset, sampler, collate


def _training_args(config: TrainConfig, out: Path) -> TrainingArguments:
    import torch
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available() and not (config.device or "").startswith("cpu")
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=config.num_workers,
        remove_unused_columns=False,
        use_cpu=not cuda,
        ddp_backend="gloo" if distributed and not cuda else None,
    )


def _warm_start(
    model: StudentModelWithProjection, dataset: Phase1Dataset | Phase2Dataset, method: str, seed: int
) -> dict[str, Any] | str:
    """The warm start of a new projection's output layer; skipped, with a line on stderr, without one."""
    from distill.train.datasets import Phase1Dataset
    from distill.train.warm_start import warm_start_projection

    if model.teacher_dims is not None:
        note = "skipped: --projection none has no projection to fit"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ddx train: projection warm start {note}.", file=sys.stderr, flush=True)
        return note
    assert isinstance(dataset, Phase1Dataset)  # phase 1
    return warm_start_projection(model, dataset, method=method, seed=seed)


def run_training(config: TrainConfig, store: TeacherStore) -> TrainResult:
    """Build everything for ``config`` and train; returns where the outputs went.

    Everything that can fail from files alone (the checkpoint to resume from, the data and its stored vectors)
    is checked before the student's weights load: a mistake costs seconds, not the minutes a large student takes.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from distill.train.checkpoint_data import add_lengths, check_resume_data, data_fingerprint
    from distill.train.checkpoints import ManifestCallback, find_resume
    from distill.train.trainer import DistillModule, DistillTrainer, JsonLogCallback, StderrProgressCallback

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    resume = find_resume(out / "checkpoints") if config.resume else None
    sources, data = _resolve(config, store)
    fingerprint = data_fingerprint(config, data, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    resumed = resume.checkpoint if resume is not None else None
    if resumed is not None:  # before the student loads; the token lengths are checked once they are known
        check_resume_data(resumed, fingerprint, announce=int(os.environ.get("RANK", "0")) == 0)
    set_seed(config.seed)
    model = _load_model(config, store)
    max_length = int(cast(int, model.student.max_seq_length))  # typed int | None by sentence-transformers
    tokens = TokenTable.for_tokenizer(model.student.tokenizer, max_length, config.token_cache)
    data.add_tokens(sources, tokens)
    dataset, sampler, collate = _dataset(config, data, store, tokens, model.teacher_dims)
    fingerprint = add_lengths(fingerprint, sampler.lengths)
    if resumed is not None:
        check_resume_data(resumed, fingerprint, announce=False)
    if config.phase == 1 and not config.init and config.projection_init != "random":
        data.report["warm_start"] = _warm_start(model, dataset, config.projection_init, config.seed)
    trainer = DistillTrainer(
        model=DistillModule(
            model,
            _loss(config),
            config.phase,
            mini_batch_size=config.mini_batch_size,
            gradient_checkpointing=config.gradient_checkpointing,
        ),
        args=_training_args(config, out),
        train_dataset=dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        projection_lr=config.resolved_projection_lr,
        l2sp=config.l2sp,
    )
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(JsonLogCallback(out / "train_log.jsonl"))
    trainer.add_callback(StderrProgressCallback(f"phase {config.phase}", enabled=config.progress))
    trainer.add_callback(ManifestCallback(data=fingerprint))
    if resume is not None and trainer.is_world_process_zero():
        resume.announce()
    checkpoint = str(resumed) if resumed is not None else None
    trainer.train(resume_from_checkpoint=checkpoint)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = TrainResult(
        out=str(out),
        student_base=str(out / "student_base"),
        hybrid=str(out / "hybrid"),
        projection=str(out / "projection_layer.pt"),
        steps=trainer.state.global_step,
        first_loss=losses[0] if losses else None,
        final_loss=losses[-1] if losses else None,
        report={**data.report, "examples": len(dataset), "seconds": 0.0, "resumed_from": checkpoint},
    )
    if model.teacher_dims is not None:
        result.report["teacher_dims"] = model.teacher_dims
    if resume is not None and resume.skipped:
        result.report["skipped_checkpoints"] = {p.name: why for p, why in resume.skipped}
    result.report["seconds"] = round(time.perf_counter() - started, 2)
    if trainer.is_world_process_zero():
        model.save(out, teacher_normalize=store.spec.normalize)
        note = write_loss_plot(out / "train_log.jsonl", out / LOSS_PLOT)
        result.report["loss_plot"] = note or str(out / LOSS_PLOT)
        run = {
            "format": 1,
            "phase": config.phase,
            "config": asdict(config),
            "store": store.url,
            "store_fingerprint": store.fingerprint,
            "teacher_spec": store.spec.to_dict(),
            "projection": config.projection,
            "teacher_dims": model.teacher_dims,  # D of --projection none (resolved); null: the full vectors
            "token_table": tokens.directory.name,
            "data": fingerprint,  # what it trained on (distill.train.checkpoint_data), as its checkpoints record
            "result": result.to_dict(),
        }
        write_run(out, run)
    return result
