"""The one training path for both phases: a ``transformers.Trainer`` fed from the store.

Why ``transformers.Trainer`` rather than ``SentenceTransformerTrainer``: the sentence-transformers
trainer collates *text* columns and tokenizes them per step, and runs losses that own modules (a
projection inside a loss is neither checkpointed nor all-reduced). ddx's batches are pre-tokenized
ids plus teacher vectors gathered from the store, and the projection is part of the model. One level
down, the HF Trainer still gives bf16/fp16, gradient accumulation, warmup and schedules, checkpoints
with optimizer/scheduler/RNG state, exact resume (batch skipping) and DDP via torchrun — with our
own DataLoader (batch sampler + ``__getitems__``) plugged in through ``get_train_dataloader``.

Phases differ only in the loss and the batch layout handled by :class:`DistillModule`. A phase-2 module with a
``mini_batch_size`` runs the cached step (:mod:`distill.train.cached_loss`), which does its own two-pass backward:
:meth:`DistillTrainer.training_step` hands it the Trainer's scaled backward instead of calling it on one loss.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from distill.model.model import StudentModelWithProjection
from distill.train.cached_loss import EMBEDDING_KEYS, cached_step
from distill.train.losses import Phase1Loss, Phase2Loss

__all__ = ["DistillModule", "DistillTrainer", "JsonLogCallback", "SamplerEpochCallback", "StderrProgressCallback"]


class DistillModule(nn.Module):
    """Student + projection + the phase's loss; ``forward(**batch)`` returns the loss and its parts.

    ``forward(embed=features)`` embeds one set of token tensors instead (``{"student", "projected"}``): the cached
    phase-2 step calls it per mini-batch, through the DDP wrapper for the mini-batch whose backward syncs gradients.

    Args:
        model: The student with its projection.
        loss: The phase's loss.
        phase: 1 or 2.
        mini_batch_size: Phase 2: run :meth:`forward_backward` as the cached step (:mod:`distill.train.cached_loss`)
            with this many sequences per forward; ``None`` or 0: the plain step (every sequence of the batch in one
            graph). Ignored in phase 1, whose loss is per row (there, gradient accumulation bounds memory exactly).
        gradient_checkpointing: Recompute the student's layer activations in backward instead of keeping them.
    """

    def __init__(
        self,
        model: StudentModelWithProjection,
        loss: Phase1Loss | Phase2Loss,
        phase: int,
        *,
        mini_batch_size: int | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.model, self.loss, self.phase = model, loss, phase
        self.mini_batch_size = mini_batch_size if phase == 2 and mini_batch_size else None
        if gradient_checkpointing:
            model.enable_gradient_checkpointing()

    def forward(self, embed: Mapping[str, Tensor] | None = None, **batch: Tensor) -> dict[str, Tensor]:
        if embed is not None:
            return self.model(embed)
        if self.phase == 1:
            out = self.model({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
            loss, parts = self.loss(out["projected"], batch["teacher"])
        else:
            loss, parts = self._phase2(batch)
        return _named(loss, parts)

    def forward_backward(
        self,
        batch: dict[str, Tensor],
        *,
        backward: Callable[[Tensor], None] = Tensor.backward,
        synced: nn.Module | None = None,
    ) -> dict[str, Tensor]:
        """The loss of one batch, with its gradient accumulated into the parameters' ``.grad``: plain or cached.

        Args:
            batch: A collated batch of this module's phase.
            backward: Backpropagates a loss (the trainer passes one that scales for accumulation and fp16).
            synced: The module as wrapped for DDP (``None``: this one); the plain step runs through it, the cached
                step runs its last mini-batch through it.

        Returns:
            ``forward``'s dict: the loss (detached when cached) and its parts.
        """
        wrapped = synced if synced is not None else self
        if self.mini_batch_size is None:
            out = wrapped(**batch)
            backward(out["loss"])
            return out
        loss, parts = cached_step(
            batch,
            mini_batch_size=self.mini_batch_size,
            embed=lambda features: self(embed=features),
            embed_synced=lambda features: wrapped(embed=features),
            loss_from_embeddings=lambda q, p, n: self.phase2_loss(batch, q, p, n),
            backward=backward,
        )
        return _named(loss, parts)

    def _encode(self, batch: dict[str, Tensor], name: str) -> dict[str, Tensor]:
        return self.model({"input_ids": batch[f"{name}_input_ids"], "attention_mask": batch[f"{name}_attention_mask"]})

    def _phase2(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        q, p = self._encode(batch, "query"), self._encode(batch, "pos")
        n = self._encode(batch, "neg") if int(batch["neg_mask"].sum()) > 0 else None
        return self.phase2_loss(batch, q, p, n)

    def phase2_loss(
        self,
        batch: Mapping[str, Tensor],
        q: Mapping[str, Tensor],
        p: Mapping[str, Tensor],
        n: Mapping[str, Tensor] | None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Phase2Loss of the batch from its embeddings (``n``: the valid negatives' rows in ``neg_mask`` order)."""
        mask = batch["neg_mask"]
        negs = {key: self._scatter(n[key] if n is not None else None, mask, q[key]) for key in EMBEDDING_KEYS}
        return self.loss(
            query_projected=q["projected"],
            positive_projected=p["projected"],
            negatives_projected=negs["projected"],
            neg_mask=mask,
            teacher_query=batch["teacher_query"],
            teacher_positive=batch["teacher_pos"],
            teacher_negatives=batch["teacher_neg"],
            query=q["student"],
            positive=p["student"],
            negatives=negs["student"],
        )

    @staticmethod
    def _scatter(values: Tensor | None, mask: Tensor, like: Tensor) -> Tensor:
        """[N, d] valid-negative rows into a [B, K, d] tensor at the mask's True slots (zeros elsewhere)."""
        out = like.new_zeros((*mask.shape, like.shape[-1]))
        if values is None:  # no negatives in this batch (DDP: the loss's gather still joins the collective)
            return out
        b, k = mask.nonzero(as_tuple=True)
        return out.index_put((b, k), values.to(out.dtype))


@torch.no_grad()
def _pull_to_start(optimizer: torch.optim.Optimizer, anchors: Mapping[nn.Parameter, Tensor]) -> None:
    """L2-SP's decoupled step: each anchored weight moves ``lr·l2sp`` of the way back to its starting value."""
    for group in optimizer.param_groups:
        if group.get("l2sp"):
            for p in group["params"]:
                p.sub_(p - anchors[p], alpha=group["lr"] * group["l2sp"])


def _named(loss: Tensor, parts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``{"loss": loss, "loss_<part>": ...}``: what the trainer logs."""
    return {"loss": loss, **{f"loss_{k}": v for k, v in parts.items() if k != "loss"}}


class DistillTrainer(Trainer):
    """HF Trainer with ddx's batch sampler and collate, and per-component loss logging."""

    def __init__(
        self,
        *args: Any,
        batch_sampler: Any,
        collate_fn: Any,
        projection_lr: float | None = None,
        l2sp: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._batch_sampler, self._collate_fn = batch_sampler, collate_fn
        self._projection_lr = projection_lr
        self._l2sp = l2sp
        if hasattr(batch_sampler, "set_epoch"):
            self.add_callback(SamplerEpochCallback(batch_sampler))
        self._parts: dict[str, Tensor] = {}  # running sums on the loss's device: no host sync until logged
        self._parts_n = 0

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")  # HF's own message for this case
        workers = self.args.dataloader_num_workers
        loader = torch.utils.data.DataLoader(
            self.train_dataset,
            batch_sampler=self._batch_sampler,
            collate_fn=self._collate_fn,
            num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )
        return self.accelerator.prepare(loader)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW with the projection on its own learning rate: a new one starts from the warm start (or from
        random weights, ``projection_init="random"``), not pretrained like the student.

        With ``l2sp`` > 0 the student's weights decay toward their values at this point (the run's start) instead of
        toward zero: after each step ``θ ← θ − lr·l2sp·(θ − θ₀)``, AdamW's decoupled form of the L2-SP penalty.
        """
        if self.optimizer is not None or (self._projection_lr is None and not self._l2sp):
            return super().create_optimizer(model)
        target = model or self.model
        if target is None:
            raise ValueError("DistillTrainer.create_optimizer: no model to optimize.")
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, param in target.named_parameters():
            if param.requires_grad:
                no_decay = param.ndim < 2 or "norm" in name.lower()
                groups.setdefault((name.startswith("model.projection."), no_decay), []).append(param)
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": params,
                    "lr": self._projection_lr if proj and self._projection_lr is not None else self.args.learning_rate,
                    "weight_decay": 0.0 if no_decay or (self._l2sp and not proj) else self.args.weight_decay,
                    "l2sp": 0.0 if proj else self._l2sp,
                }
                for (proj, no_decay), params in groups.items()
            ],
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
        )
        if self._l2sp:
            anchors = {p: p.detach().clone() for g in self.optimizer.param_groups if g["l2sp"] for p in g["params"]}
            self.optimizer.register_step_post_hook(lambda opt, *_: _pull_to_start(opt, anchors))
        return self.optimizer

    def compute_loss(
        self, model: nn.Module, inputs: dict[str, Tensor], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Tensor | tuple[Tensor, Any]:
        out = model(**inputs)
        self._record_parts(out)
        return (out["loss"], out) if return_outputs else out["loss"]

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Tensor:
        """HF's step, or, when the module has a ``mini_batch_size``, the cached phase-2 step with its own backward.

        The cached step backpropagates twice (loss → embeddings, then embeddings → parameters per mini-batch), so it
        cannot hand one loss to HF's ``accelerator.backward``. It scales as HF's step does: the loss is divided by
        the number of accumulated batches (ddx's batches have no ``labels``, so HF never counts items instead) and
        goes through ``accelerator.backward`` (fp16's loss scaler); the scale then reaches the parameters through the
        cached gradients. Under DDP the last mini-batch runs through the wrapper ``model``, so HF's ``no_sync`` for
        the non-final accumulated batches still applies.
        """
        module = self.accelerator.unwrap_model(model)
        if not getattr(module, "mini_batch_size", None):
            return super().training_step(model, inputs, num_items_in_batch)
        model.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            out = module.forward_backward(
                inputs, backward=lambda loss: self.accelerator.backward(loss * scale), synced=model
            )
        self._record_parts(out)
        return out["loss"].detach() * scale

    def _record_parts(self, out: dict[str, Tensor]) -> None:
        """Add the step's loss parts to running float64 sums on their device; :meth:`log` reads them back.

        float64 sums of the parts' exact values equal the Python-float sums once kept here, without a ``float()``
        (a device-to-host sync) per part per step.
        """
        for key, value in out.items():
            if key.startswith("loss_"):
                part = value.detach().to(torch.float32 if value.device.type == "mps" else torch.float64)  # mps: no f64
                total = self._parts.get(key)
                self._parts[key] = part if total is None else total + part
        self._parts_n += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._parts_n and "loss" in logs:
            sums = torch.stack(list(self._parts.values())).tolist()  # one device-to-host copy per log
            logs.update({k: round(v / self._parts_n, 6) for k, v in zip(self._parts, sums, strict=True)})
            self._parts, self._parts_n = {}, 0
        super().log(logs, start_time)


class SamplerEpochCallback(TrainerCallback):
    """Hands the epoch to the batch sampler (and through it to the dataset) at the start of every epoch.

    The Trainer forwards ``set_epoch`` through accelerate's loader wrappers, but not through all of them: resuming
    mid-epoch under DDP, the sampler sits in ``SkipBatchSampler(BatchSamplerShard(sampler))`` and neither wrapper
    forwards it, so the resumed epoch replayed epoch 0's batch order (seen as weights differing by ~1e-2 from an
    uninterrupted run). ``int(state.epoch)`` is the epoch being started: the checkpoint's fractional epoch on
    resume, ``e + 1.0`` exactly after epoch ``e``'s last step.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.sampler.set_epoch(int(state.epoch or 0))


class JsonLogCallback(TrainerCallback):
    """Appends every log record to ``train_log.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if state.is_world_process_zero and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StderrProgressCallback(TrainerCallback):
    """A progress bar on stderr (rank 0 only), showing the latest loss parts; stdout stays for --json."""

    def __init__(self, desc: str, enabled: bool = True) -> None:
        self.desc, self.enabled, self.bar = desc, enabled, None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.enabled and state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=state.max_steps,
                initial=state.global_step,
                desc=self.desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kw: Any) -> None:
        if self.bar is not None and logs:
            shown = {k.removeprefix("loss_"): f"{v:.4f}" for k, v in logs.items() if k.startswith("loss")}
            self.bar.set_postfix(shown, refresh=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
