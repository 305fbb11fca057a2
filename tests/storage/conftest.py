"""Storage fixtures: a small spec and a factory of empty stores under tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from storage import TeacherSpec, TeacherStore
from tests.storage.rows import make_spec


@pytest.fixture
def spec() -> TeacherSpec:
    return make_spec()


@pytest.fixture
def new_store(tmp_path: Path) -> Callable[..., TeacherStore]:
    """Factory: a fresh empty store under tmp_path."""
    counter = iter(range(1000))

    def make(dim: int = 16, dtype: str = "float16", **spec_overrides: object) -> TeacherStore:
        return TeacherStore.create(tmp_path / f"store{next(counter)}", make_spec(dim, **spec_overrides), dtype=dtype)

    return make
