"""The cached (GradCache) phase-2 step gives the plain step's gradients: spaces, DDP, checkpointing, autocast, trainer.

Gradients are compared in float64 with dropout off (a mini-batch draws other dropout masks than the whole batch, so
only the cached step's own two passes can agree with dropout on: tested apart, as the replay of each mini-batch).
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from transformers import TrainerCallback

import distill.train.trainer
from distill.model.model import StudentModelWithProjection
from distill.train.cached_loss import cached_step, plan_mini_batches
from distill.train.losses import Phase2Loss
from distill.train.trainer import DistillModule, DistillTrainer
from storage.errors import DdxError
from tests.tiny_models import tiny_corpus

TEACHER_DIM = 16


def make_model(tiny_bert: Path, *, dropout: bool = False, dtype: torch.dtype = torch.float64) -> Any:
    torch.manual_seed(0)
    model = StudentModelWithProjection.from_pretrained(str(tiny_bert), TEACHER_DIM, device="cpu")
    if not dropout:
        no_dropout(model)
    return model.to(dtype).train()


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def make_batch(model: Any, counts: list[int], *, seed: int = 0, dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    """A collated phase-2 batch of texts of 3-60 words; query ``i`` has ``counts[i]`` negatives."""
    texts = iter(tiny_corpus(2 * len(counts) + sum(counts), seed=seed))
    b, k = len(counts), max(counts)
    mask = torch.arange(k)[None, :] < torch.tensor(counts)[:, None]
    g = torch.Generator().manual_seed(seed)
    batch: dict[str, Any] = {"neg_mask": mask}
    for name, n in (("query", b), ("pos", b), ("neg", sum(counts))):
        if n == 0:  # what phase2_collate_fn holds when no query has a negative
            batch["neg_input_ids"] = batch["neg_attention_mask"] = torch.zeros(0, 1, dtype=torch.long)
            continue
        features = model.tokenize([next(texts) for _ in range(n)])
        batch[f"{name}_input_ids"], batch[f"{name}_attention_mask"] = features["input_ids"], features["attention_mask"]
    for name, shape in (("teacher_query", (b, TEACHER_DIM)), ("teacher_pos", (b, TEACHER_DIM))):
        batch[name] = torch.randn(*shape, generator=g, dtype=dtype)
    batch["teacher_neg"] = torch.randn(b, k, TEACHER_DIM, generator=g, dtype=dtype) * mask[..., None]
    return batch


def step_grads(
    module: DistillModule, batch: dict[str, Any], mini_batch_size: int | None, **kw: Any
) -> tuple[float, dict[str, Tensor]]:
    """Loss and parameter gradients of one step of ``module`` (plain when ``mini_batch_size`` is None)."""
    module.mini_batch_size = mini_batch_size
    module.zero_grad(set_to_none=True)
    loss = float(module.forward_backward(batch, **kw)["loss"].detach())
    return loss, {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, Tensor], want: dict[str, Tensor], *, rtol: float, atol: float) -> None:
    assert sorted(got) == sorted(want)
    assert any(n.startswith("model.projection.") for n in want) and any(n.startswith("model.student.") for n in want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------- the plan


def test_plan_sorts_by_length_cuts_padding_and_skips_empty_negatives(tiny_bert: Path) -> None:
    model = make_model(tiny_bert)
    batch = make_batch(model, [2, 0, 3, 1])
    plan = plan_mini_batches(batch, 3)
    expected = [("query", 3), ("query", 1), ("pos", 3), ("pos", 1), ("neg", 3), ("neg", 3)]
    assert [(m.group, len(m.rows)) for m in plan] == expected
    for group in ("query", "pos", "neg"):
        minis = [m for m in plan if m.group == group]
        assert sorted(torch.cat([m.rows for m in minis]).tolist()) == list(range(len(batch[f"{group}_input_ids"])))
        lengths = [int(n) for m in minis for n in m.features["attention_mask"].sum(1)]
        assert lengths == sorted(lengths, reverse=True)
        for m in minis:  # each mini-batch is as wide as its longest sequence, and holds its rows' tokens
            width = m.features["attention_mask"].shape[1]
            assert int(m.features["attention_mask"].sum(1).max()) == width
            assert torch.equal(m.features["input_ids"], batch[f"{group}_input_ids"][m.rows, :width])
    no_negatives = make_batch(model, [0, 0])
    assert {m.group for m in plan_mini_batches(no_negatives, 8)} == {"query", "pos"}


@pytest.mark.parametrize("size", [0, -1, 2.5, None])
def test_plan_rejects_a_bad_mini_batch_size(size: Any, tiny_bert: Path) -> None:
    batch = make_batch(make_model(tiny_bert), [1])
    with pytest.raises(DdxError, match="mini_batch_size must be a positive integer"):
        plan_mini_batches(batch, size)


# ---------------------------------------------------------------- single process: the plain step's gradients


@pytest.mark.parametrize("space", ["projected", "hybrid", "projected+hybrid", "student"])
@pytest.mark.parametrize("mini_batch_size", [1, 4])
def test_cached_gradients_equal_plain(space: str, mini_batch_size: int, tiny_bert: Path) -> None:
    model = make_model(tiny_bert)
    batch = make_batch(model, [2, 0, 3, 1, 3])
    module = DistillModule(model, Phase2Loss(space=space, mse_reduction="vector"), 2)
    plain_loss, plain = step_grads(module, batch, None)
    cached_loss, cached = step_grads(module, batch, mini_batch_size)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-12)
    assert_same_grads(cached, plain, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("counts", [[0, 0, 0], [1, 2, 0]])
def test_cached_gradients_equal_plain_own_negatives_and_none(counts: list[int], tiny_bert: Path) -> None:
    model = make_model(tiny_bert)
    batch = make_batch(model, counts, seed=3)
    module = DistillModule(model, Phase2Loss(space="projected+hybrid", negatives="own"), 2)
    _, plain = step_grads(module, batch, None)
    _, cached = step_grads(module, batch, 2)
    assert_same_grads(cached, plain, rtol=1e-9, atol=1e-12)


def test_bf16_autocast_gradients_match_plain(tiny_bert: Path) -> None:
    """Under bf16 autocast both steps round differently; the gradients still agree to bf16's precision."""
    model = make_model(tiny_bert, dtype=torch.float32)
    batch = make_batch(model, [2, 0, 3, 1], dtype=torch.float32)
    module = DistillModule(model, Phase2Loss(space="projected+hybrid", mse_reduction="vector"), 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = step_grads(module, batch, None)
        _, cached = step_grads(module, batch, 2)
    assert sorted(cached) == sorted(plain) and all(g.dtype == torch.float32 for g in cached.values())
    # Whole-model relative error (a single tensor can be pure rounding: a key bias's true gradient is 0, softmax
    # being invariant to it), then every projection tensor on its own.
    got, want = (torch.cat([g[n].flatten() for n in sorted(plain)]) for g in (cached, plain))
    assert float((got - want).norm() / want.norm()) < 0.02
    for name in (n for n in plain if n.startswith("model.projection.")):
        assert float((cached[name] - plain[name]).norm() / plain[name].norm()) < 0.02, name


def test_each_mini_batch_is_replayed_with_its_own_dropout_masks(tiny_bert: Path) -> None:
    """Dropout on: the graph pass re-embeds every mini-batch exactly as the no-graph pass did (same RNG state)."""
    model = make_model(tiny_bert, dropout=True, dtype=torch.float32)
    batch = make_batch(model, [2, 1, 3], dtype=torch.float32)
    module = DistillModule(model, Phase2Loss(), 2)
    calls: list[Tensor] = []
    states: list[Tensor] = []

    def embed(features: dict[str, Tensor]) -> dict[str, Tensor]:
        out = module(embed=features)
        calls.append(out["projected"].detach().clone())
        states.append(torch.get_rng_state())
        return out

    torch.manual_seed(5)
    cached_step(
        batch,
        mini_batch_size=2,
        embed=embed,
        loss_from_embeddings=lambda q, p, n: module.phase2_loss(batch, q, p, n),
        backward=Tensor.backward,
    )
    half = len(calls) // 2
    assert half == len(plan_mini_batches(batch, 2)) == 7  # 2 + 2 + 3
    for first, again in zip(calls[:half], calls[half:], strict=True):
        assert torch.equal(first, again)
    assert not torch.equal(states[0], states[1])  # dropout drew from the generator...
    assert torch.equal(torch.get_rng_state(), states[half - 1])  # ...and the step leaves it where one pass would
    with torch.no_grad():
        first_query = module.eval()(embed=plan_mini_batches(batch, 2)[0].features)["projected"]
    assert not torch.allclose(first_query, calls[0])  # dropout was really on


# ---------------------------------------------------------------- gradient checkpointing


def _saved_tensor_count(model: Any, batch: dict[str, Any]) -> int:
    count = 0

    def pack(tensor: Tensor) -> Tensor:
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model({"input_ids": batch["pos_input_ids"], "attention_mask": batch["pos_attention_mask"]})
    return count


def test_gradient_checkpointing_keeps_fewer_activations(tiny_bert: Path) -> None:
    model = make_model(tiny_bert)
    batch = make_batch(model, [1, 1])
    before = _saved_tensor_count(model, batch)
    model.enable_gradient_checkpointing()
    after = _saved_tensor_count(model, batch)
    assert after < before / 2, (before, after)


@pytest.mark.parametrize("mini_batch_size", [None, 2])
def test_gradient_checkpointing_gives_the_same_gradients(mini_batch_size: int | None, tiny_bert: Path) -> None:
    reference = DistillModule(make_model(tiny_bert), Phase2Loss(space="projected+hybrid"), 2)
    batch = make_batch(reference.model, [2, 0, 3])
    _, want = step_grads(reference, batch, None)
    checkpointed = DistillModule(
        make_model(tiny_bert), Phase2Loss(space="projected+hybrid"), 2, gradient_checkpointing=True
    )
    _, got = step_grads(checkpointed, batch, mini_batch_size)
    assert_same_grads(got, want, rtol=1e-9, atol=1e-12)


def test_gradient_checkpointing_needs_a_checkpointable_student(
    tiny_bert: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model(tiny_bert)
    monkeypatch.setattr(model.student, "activation_checkpointing_enable", lambda *a, **k: None)
    with pytest.raises(DdxError, match="Gradient checkpointing is not available for this student"):
        model.enable_gradient_checkpointing()


# ---------------------------------------------------------------- DDP (2 ranks, gloo)

# Per rank: the negatives of each query. Uneven batch sizes give the ranks different numbers of mini-batches; in the
# second layout (run with gradient checkpointing) rank 1 has no negative at all (its gather still joins the collective).
DDP_LAYOUTS = ([[2, 0, 3], [1, 1]], [[1, 2], [0, 0, 0]])


def _ddp_worker(rank: int, world: int, init_file: str, tiny_bert: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        torch.set_num_threads(1)
        for layout, checkpointing in zip(DDP_LAYOUTS, (False, True), strict=True):
            _check_ddp_rank(rank, layout, Path(tiny_bert), checkpointing)
        dist.barrier()  # no rank tears the group down while a peer still has gloo work in flight
    finally:
        dist.destroy_process_group()


def _check_ddp_rank(rank: int, layout: list[list[int]], tiny_bert: Path, checkpointing: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    module = DistillModule(
        make_model(tiny_bert), Phase2Loss(space="projected+hybrid"), 2, gradient_checkpointing=checkpointing
    )
    wrapped = DistributedDataParallel(module, find_unused_parameters=True)  # as the HF Trainer wraps DistillModule
    batch = make_batch(module.model, layout[rank], seed=10 + rank)
    _, plain = step_grads(module, batch, None, synced=wrapped)
    _, cached = step_grads(module, batch, 2, synced=wrapped)
    assert_same_grads(cached, plain, rtol=1e-9, atol=1e-12)
    # The plain step's gradients are DDP's average, equal on every rank: the cached ones were synced too.
    flat = torch.cat([g.flatten() for _, g in sorted(cached.items())])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    torch.testing.assert_close(gathered[0], gathered[1], rtol=0, atol=1e-12)


def test_ddp_cached_gradients_equal_plain(tiny_bert: Path, tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(tiny_bert)), nprocs=2, join=True)


# ---------------------------------------------------------------- through the trainer (ddx train)


class GradRecorder(TrainerCallback):
    """Keeps every optimizer step's gradients (after clipping, before the step)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Tensor]] = []
        self.cached_steps = 0  # batches that went through distill.train.cached_loss.cached_step

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def run_recorded(config: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, GradRecorder]:
    """``train_keeping_model(config)`` with dropout off in the loaded model and every step's gradients recorded."""
    from tests.distill.conftest import train_keeping_model

    recorder = GradRecorder()
    load, init = StudentModelWithProjection.load, DistillTrainer.__init__

    def load_without_dropout(*a: Any, **k: Any) -> Any:
        return no_dropout(load(*a, **k))

    def init_recording(self: Any, *a: Any, **k: Any) -> None:
        init(self, *a, **k)
        self.add_callback(recorder)

    def counted(*a: Any, **k: Any) -> Any:
        recorder.cached_steps += 1
        return cached_step(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(StudentModelWithProjection, "load", load_without_dropout)
        m.setattr(DistillTrainer, "__init__", init_recording)
        m.setattr(distill.train.trainer, "cached_step", counted)
        run = train_keeping_model(config)
    return run, recorder


PHASE2 = dict(phase=2, student=None, batch_size=8, num_negatives=3, mine_negatives=2, mine_margin=0.999)


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_trainer_cached_step_equals_plain(
    grad_accum: int, config: Any, phase1_run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = {}
    for size in (0, 3):
        runs[size] = run_recorded(
            config(
                **PHASE2,
                init=phase1_run.out,
                out=str(tmp_path / f"m{size}"),
                mini_batch_size=size,
                grad_accum=grad_accum,
                max_steps=2,
            ),
            monkeypatch,
        )
    (plain, plain_grads), (cached, cached_grads) = runs[0], runs[3]
    assert len(plain_grads.steps) == len(cached_grads.steps) == 2
    assert (plain_grads.cached_steps, cached_grads.cached_steps) == (0, 2 * grad_accum)
    for got, want in zip(cached_grads.steps, plain_grads.steps, strict=True):
        assert_same_grads(got, want, rtol=1e-4, atol=1e-6)
    want_state, got_state = plain.model.state_dict(), cached.model.state_dict()
    for name in want_state:
        # AdamW divides by sqrt(v): a gradient near its eps (1e-8) carries float32 rounding into the update at up to
        # the learning rate's scale (3e-3 here). Measured: 1.4e-5 at most, on weights whose gradient is ~1e-8.
        torch.testing.assert_close(got_state[name], want_state[name], rtol=0, atol=5e-5, msg=name)
    records = [json.loads(line) for line in Path(cached.out, "train_log.jsonl").read_text().splitlines()]
    step_records = [r for r in records if "loss" in r]
    assert step_records and {"loss_infonce", "loss_mse", "grad_norm"} <= set(step_records[0])
    plain_records = [json.loads(line) for line in Path(plain.out, "train_log.jsonl").read_text().splitlines()]
    for got_record, want_record in zip(step_records, [r for r in plain_records if "loss" in r], strict=True):
        assert got_record["loss"] == pytest.approx(want_record["loss"], rel=1e-5)
        assert got_record["grad_norm"] == pytest.approx(want_record["grad_norm"], rel=1e-4)


def test_trainer_cached_bf16_with_checkpointing_trains(config: Any, phase1_run: Any, tmp_path: Path) -> None:
    from tests.distill.conftest import log_losses, train_keeping_model

    run = train_keeping_model(
        config(
            **PHASE2,
            init=phase1_run.out,
            out=str(tmp_path / "bf16"),
            mini_batch_size=3,
            gradient_checkpointing=True,
            bf16=True,
            max_steps=3,
        )
    )
    losses = log_losses(run.out)
    assert run.result.steps == 3 and len(losses) == 3 and all(0 < x < float("inf") for x in losses)
    saved = json.loads(Path(run.out, "ddx_run.json").read_text())["config"]
    assert saved["mini_batch_size"] == 3 and saved["gradient_checkpointing"] is True


@pytest.mark.parametrize("size", [-1, 1.5])
def test_train_config_checks_the_mini_batch_size(size: Any) -> None:
    from distill.train.config import TrainConfig

    base = dict(phase=2, store="s", data=("beir:x",), out="o", student="m")
    assert TrainConfig(**base, mini_batch_size=0).mini_batch_size == 0
    with pytest.raises(DdxError, match="mini_batch_size must be a whole number >= 0"):
        TrainConfig(**base, mini_batch_size=size)


def test_cli_passes_the_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import distill.train.run
    from cli.main import cli

    seen: dict[str, Any] = {}

    def fake_train(config: Any) -> Any:
        seen["config"] = config
        raise DdxError("stop here")

    monkeypatch.setattr(distill.train.run, "train", fake_train)
    args = ["train", "--phase", "2", "--store", "s", "--data", "beir:x", "--out", str(tmp_path), "--student", "m"]
    CliRunner().invoke(cli, [*args, "--mini-batch-size", "4", "--gradient-checkpointing"])
    assert seen["config"].mini_batch_size == 4 and seen["config"].gradient_checkpointing is True
    CliRunner().invoke(cli, args)
    assert seen["config"].mini_batch_size == 8 and seen["config"].gradient_checkpointing is False
