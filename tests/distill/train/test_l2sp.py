"""L2-SP: the student's weights decay toward the run's starting weights, the projection's do not."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

from distill.train.config import TrainConfig
from distill.train.trainer import DistillTrainer
from storage.errors import DdxError


class _Pair(nn.Module):
    """Named like DistillModule's wrapped model: ``model.student.*`` and ``model.projection.*``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.student = nn.Linear(4, 4)
        self.model.projection = nn.Linear(4, 4)


def _step(l2sp: float, tmp_path: Path, lr: float = 0.1) -> tuple[_Pair, _Pair, _Pair]:
    """(start, after one DistillTrainer step, after one plain AdamW step without any decay) from the same grads."""
    torch.manual_seed(0)
    start = _Pair()
    model, plain = copy.deepcopy(start), copy.deepcopy(start)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=lr, weight_decay=0.0, report_to=[], use_cpu=True)
    trainer = DistillTrainer(model=model, args=args, batch_sampler=[], collate_fn=None, projection_lr=lr, l2sp=l2sp)
    opt = trainer.create_optimizer()
    ref = torch.optim.AdamW(plain.parameters(), lr=lr, weight_decay=0.0)
    for m in (model, plain):
        for p in m.parameters():
            p.grad = torch.ones_like(p)
    opt.step()
    ref.step()
    return start, model, plain


def test_l2sp_pulls_the_student_back_toward_its_start(tmp_path: Path) -> None:
    start, model, plain = _step(l2sp=5.0, tmp_path=tmp_path)  # lr · l2sp = 0.5: half way back
    for name in ("weight", "bias"):
        s0 = getattr(start.model.student, name)
        moved = getattr(plain.model.student, name)
        want = moved - 0.5 * (moved - s0)
        torch.testing.assert_close(getattr(model.model.student, name), want)
        # the projection is not anchored: it takes AdamW's plain step
        torch.testing.assert_close(getattr(model.model.projection, name), getattr(plain.model.projection, name))


def test_l2sp_off_is_adamw(tmp_path: Path) -> None:
    _, model, plain = _step(l2sp=0.0, tmp_path=tmp_path)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_negative_l2sp_is_refused() -> None:
    with pytest.raises(DdxError, match="l2sp must be >= 0"):
        TrainConfig(phase=1, store="s", data=("beir:x",), out="o", student="m", l2sp=-1.0)
