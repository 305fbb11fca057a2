"""One rank of a DDP training run, for tests/distill/train/test_train_ddp.py (``python -m torch.distributed.run``).

Trains with :func:`distill.train.run.train` exactly as ``ddx train`` under torchrun does, and leaves evidence per rank
in ``--dump``:

* ``rank<R>.pt``: the rank's final DistillModule state_dict (student + projection), taken from the live trainer;
* ``rank<R>.json``: how many rows each InfoNCE gather held (local vs gathered), the example indices of every batch
  the rank trained on, and how often this rank wrote the run folder (``StudentModelWithProjection.save``).

``--stop-at K`` raises after the checkpoint of step K is written (a crash right after a save), so a second call
with ``--resume`` continues from it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any


class Stop(Exception):
    """Simulated crash after a checkpoint."""


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("store", "data", "out", "dump", "token-cache"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--student")
    parser.add_argument("--init")
    parser.add_argument("--phase", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--save-steps", type=int, default=10_000)
    parser.add_argument("--stop-at", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)  # two ranks share two cores

    import distill.model.model as model_module
    import distill.train.losses as losses
    import distill.train.trainer as trainer_module
    from distill.train.config import TrainConfig
    from distill.train.datasets import Phase1Dataset, Phase2Dataset
    from distill.train.run import end_distributed, train

    rank = int(os.environ["RANK"])
    dump = Path(args.dump)
    dump.mkdir(parents=True, exist_ok=True)
    evidence: dict[str, Any] = {"gathers": [], "batches": [], "saves": 0}

    original_gather = losses.Phase2Loss._gather

    def gather(self: Any, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        out, offset = original_gather(self, rows)
        evidence["gathers"].append([int(rows.shape[0]), int(out.shape[0]), int(offset)])
        return out, offset

    losses.Phase2Loss._gather = gather  # type: ignore[method-assign]

    for dataset_cls in (Phase1Dataset, Phase2Dataset):
        original_items = dataset_cls.__getitems__

        def getitems(self: Any, indices: list[int], _orig: Any = original_items) -> dict[str, Any]:
            evidence["batches"].append([int(i) for i in indices])
            return _orig(self, indices)

        dataset_cls.__getitems__ = getitems  # type: ignore[method-assign]

    original_save = model_module.StudentModelWithProjection.save

    def save(self: Any, *a: Any, **kw: Any) -> Any:
        evidence["saves"] += 1
        return original_save(self, *a, **kw)

    model_module.StudentModelWithProjection.save = save  # type: ignore[method-assign]

    original_train = trainer_module.DistillTrainer.train
    original_checkpoint = trainer_module.DistillTrainer._save_checkpoint

    def train_and_dump(self: Any, *a: Any, **kw: Any) -> Any:
        result = original_train(self, *a, **kw)
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        torch.save(state, dump / f"rank{rank}.pt")
        return result

    def checkpoint_then_stop(self: Any, *a: Any, **kw: Any) -> None:
        original_checkpoint(self, *a, **kw)
        if args.stop_at is not None and self.state.global_step == args.stop_at:
            raise Stop(f"stopped after the checkpoint of step {args.stop_at}")

    trainer_module.DistillTrainer.train = train_and_dump  # type: ignore[method-assign]
    trainer_module.DistillTrainer._save_checkpoint = checkpoint_then_stop  # type: ignore[method-assign]

    config = TrainConfig(
        phase=args.phase,
        store=args.store,
        data=(args.data,),
        out=args.out,
        student=args.student,
        init=args.init,
        token_cache=args.token_cache,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        num_negatives=2,
        device="cpu",
        num_workers=0,
        progress=False,
        logging_steps=1,
        warmup=0,
        lr=1e-3,
        projection_lr=1e-2,
        seed=7,
        save_steps=args.save_steps,
        resume=args.resume,
        length_grouping=False,
    )
    try:
        result = train(config)
        evidence["steps"] = result.steps
    except Stop as exc:
        evidence["stopped"] = str(exc)
    (dump / f"rank{rank}.json").write_text(json.dumps(evidence))
    end_distributed()


if __name__ == "__main__":
    main()
