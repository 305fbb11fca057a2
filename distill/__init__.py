"""Student distillation from stored teacher vectors: models, losses, data, training, evaluation.

Names are imported on first use (PEP 562), so ``import distill`` stays cheap until torch is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "EvalConfig",
    "Phase1Dataset",
    "Phase1Loss",
    "Phase2Dataset",
    "Phase2Loss",
    "ProjectionLayer",
    "RoutedEncoder",
    "Router",
    "RouterConfig",
    "RouterExportConfig",
    "StudentModelWithProjection",
    "TokenTable",
    "TrainConfig",
    "evaluate_retrieval",
    "export_routed",
    "fit_router",
    "phase1_collate_fn",
    "phase2_collate_fn",
    "train",
    "train_phase1",
    "train_phase2",
]

_WHERE = {
    "ProjectionLayer": "distill.projection",
    "StudentModelWithProjection": "distill.model",
    "Phase1Loss": "distill.losses",
    "Phase2Loss": "distill.losses",
    "Phase1Dataset": "distill.datasets",
    "Phase2Dataset": "distill.datasets",
    "phase1_collate_fn": "distill.datasets",
    "phase2_collate_fn": "distill.datasets",
    "TokenTable": "distill.tokens",
    "TrainConfig": "distill.train",
    "train": "distill.train",
    "train_phase1": "distill.train",
    "train_phase2": "distill.train",
    "EvalConfig": "distill.evaluate",
    "evaluate_retrieval": "distill.evaluate",
    "Router": "distill.router",
    "RouterConfig": "distill.router_fit",
    "fit_router": "distill.router_fit",
    "RoutedEncoder": "distill.routed_model",
    "RouterExportConfig": "distill.routed_model",
    "export_routed": "distill.routed_model",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
