"""The public API of ``distill`` (its ``__all__``, imported lazily) resolves after the split into rooms."""

from __future__ import annotations

from typing import Any

import pytest


def test_every_public_name_resolves() -> None:
    import distill

    for name in distill.__all__:
        assert getattr(distill, name) is not None, name
    from distill import (  # noqa: F401  the names the README's users import
        Phase1Dataset,
        Phase1Loss,
        Phase2Dataset,
        Phase2Loss,
        ProjectionLayer,
        StudentModelWithProjection,
        evaluate_retrieval,
        phase2_collate_fn,
        train_phase1,
        train_phase2,
    )


def test_train_is_the_callable_training_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """``distill.train`` is both the subpackage and the API's ``train``: calling it runs distill.train.run.train."""
    import distill.train.run
    from distill import train

    seen: list[Any] = []
    monkeypatch.setattr(distill.train.run, "train", lambda config: seen.append(config) or "result")
    assert train is distill.train and train("config") == "result" and seen == ["config"]
