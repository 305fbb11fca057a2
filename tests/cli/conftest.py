"""Fixtures of the CLI tests that train or route: a tiny BEIR corpus and a store of the tiny Qwen2 teacher's vectors.

Module-scoped: each test module gets its own corpus and store (a module may override either by name).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.distill.conftest import Corpus, make_corpus


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while a module runs (the shared 2-core machine; bit-identical floats across processes)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("cli-data") / "beir")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, corpus: Corpus, tiny_qwen2: Path) -> Path:
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig

    path = tmp_path_factory.mktemp("cli-store") / "store"
    teacher = TeacherConfig(model=str(tiny_qwen2), device="cpu")
    precompute(PrecomputeConfig(store=str(path), data=(corpus.spec,), progress=False, teacher=teacher))
    return path
