"""DistillTrainer's per-part loss logging: the same numbers as Python-float sums, without a host sync per step."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer

from distill.train.trainer import DistillTrainer


def test_loss_parts_are_summed_on_device_and_logged_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = DistillTrainer.__new__(DistillTrainer)  # only the logging state: no model, no arguments
    trainer._parts, trainer._parts_n = {}, 0
    logged: list[dict[str, float]] = []
    monkeypatch.setattr(Trainer, "log", lambda self, logs, start_time=None: logged.append(dict(logs)))
    gen = torch.Generator().manual_seed(0)
    steps = [
        {
            "loss": torch.rand((), generator=gen, requires_grad=True),
            "loss_mse": torch.rand((), generator=gen) * 1e-3,
            "loss_cos_distance": torch.rand((), generator=gen, dtype=torch.float32),
            "loss_infonce": torch.rand((), generator=gen).to(torch.bfloat16),
        }
        for _ in range(7)
    ]
    want: dict[str, float] = {}  # the arithmetic the trainer used to do: float() of every part, every step
    for out in steps:
        for key, value in out.items():
            if key.startswith("loss_"):
                want[key] = want.get(key, 0.0) + float(value)

    syncs = 0
    to_float = torch.Tensor.__float__

    def counted(self: torch.Tensor) -> float:
        nonlocal syncs
        syncs += 1
        return to_float(self)

    monkeypatch.setattr(torch.Tensor, "__float__", counted)
    for out in steps:
        trainer._record_parts(out)
    assert syncs == 0, "a step must not read its loss parts back to the host"
    monkeypatch.undo()
    monkeypatch.setattr(Trainer, "log", lambda self, logs, start_time=None: logged.append(dict(logs)))

    trainer.log({"loss": 1.0})
    assert logged == [{"loss": 1.0, **{k: round(v / len(steps), 6) for k, v in want.items()}}]
    assert trainer._parts == {} and trainer._parts_n == 0
    trainer.log({"learning_rate": 1e-4})  # a log without "loss" adds no parts
    assert logged[-1] == {"learning_rate": 1e-4}
