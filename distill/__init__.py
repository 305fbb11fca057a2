"""Student distillation from stored teacher vectors: models, training, evaluation, routing.

The rooms (docs/DESIGN.md, "Map"): ``model`` < ``search`` < ``train`` < ``evaluate`` < ``route``; each imports only
from earlier ones. This module is the public API over them: names are imported on first use (PEP 562), so
``import distill`` stays cheap until torch is needed.
"""

from __future__ import annotations

import importlib
from typing import Any

# Each public name → the module that defines it; with ``train`` (below), the API's ``__all__``.
_WHERE = {
    "ProjectionLayer": "distill.model.projection",
    "StudentModelWithProjection": "distill.model.model",
    "NoProjection": "distill.model.no_projection",
    "load_projection": "distill.model.no_projection",
    "truncate_teacher": "distill.model.teacher_dims",
    "Phase1Loss": "distill.train.losses",
    "Phase2Loss": "distill.train.losses",
    "Phase1Dataset": "distill.train.datasets",
    "Phase2Dataset": "distill.train.datasets",
    "phase1_collate_fn": "distill.train.datasets",
    "phase2_collate_fn": "distill.train.datasets",
    "TokenTable": "distill.train.tokens",
    "TrainConfig": "distill.train.config",
    "train_phase1": "distill.train.run",
    "train_phase2": "distill.train.run",
    "EvalConfig": "distill.evaluate.config",
    "evaluate_retrieval": "distill.evaluate.evaluate",
    "Router": "distill.route.router",
    "RouterConfig": "distill.route.config",
    "fit_router": "distill.route.fit",
    "RoutedEncoder": "distill.route.routed_model",
    "RouterExportConfig": "distill.route.routed_model",
    "export_routed": "distill.route.routed_model",
}
__all__ = sorted([*_WHERE, "train"])


def __getattr__(name: str) -> Any:
    if name == "train":  # the subpackage distill.train, callable as the function (see its docstring)
        return importlib.import_module("distill.train")
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
