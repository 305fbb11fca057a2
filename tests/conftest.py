"""Session fixtures: tiny offline models, the shared real data, and caches pointed at temp folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.storage.s3 import s3, s3_server  # noqa: F401 - the moto S3 fixtures, for every test folder
from tests.tiny_models import build_tiny_bert, build_tiny_qwen2

# Offline before any test module imports datasets / huggingface_hub (they read these flags once, at import).
for _flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_flag, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDX_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


@pytest.fixture(autouse=True, scope="session")
def _offline_and_isolated(tmp_path_factory: pytest.TempPathFactory) -> None:
    """No hub access, and every cache (HF, ddx) in a temp folder (the datasets-library pattern)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_DATASETS_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    mp.setenv("HF_HOME", str(cache / "hf"))
    mp.setenv("DDX_CACHE_DIR", str(cache / "ddx"))
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    mp.undo()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer BERT sentence-transformer, mean pooling, normalized, 32-d."""
    return build_tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2-layer Qwen2 sentence-transformer: last-token pooling, left padding, query prompt, 48-d."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("models") / "tiny-qwen2")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (or $DDX_SHARED_DATA): real BEIR SciFact, MS MARCO, HotpotQA samples."""
    if not SHARED_DATA.is_dir():  # visible in the summary (-rs); .ci/run warns up front
        pytest.skip(f"real data not found at {SHARED_DATA}: set DDX_SHARED_DATA to the shared data folder")
    return SHARED_DATA
