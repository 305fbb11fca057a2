"""Hugging Face datasets: ``hf:NAME[:CONFIG][:SPLIT]``, from the hub, the local cache, or a local path.

NAME is a hub id (``sentence-transformers/natural-questions``) or a local path: a folder written by
``save_to_disk``, a folder of data files, or one ``.parquet``/``.jsonl``/``.json``/``.csv`` file.
With two parts, the second is a split when it looks like one (train, validation, test, dev, eval,
or a slice such as ``train[:1000]``) and a config otherwise. Each split is one table read through
:mod:`.layout`: sentence-transformers pairs/triplets, BEIR corpus/queries/qrels configs, or
columns named with ``?field=column``.

Offline (``HF_HUB_OFFLINE=1`` or ``HF_DATASETS_OFFLINE=1``) ``datasets`` reads its local cache only;
a dataset missing there is a BadSourceError that says how to make it available.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .base import SourceOptions
from .errors import BadSourceError
from .table import Row, TableSource

__all__ = ["HFSource", "parse_hf_location"]

SPLIT_LIKE = re.compile(r"^(train|validation|valid|val|test|dev|eval)\b|\[", re.IGNORECASE)
BATCH_ROWS = 1024
FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def parse_hf_location(location: str) -> tuple[str, str | None, str | None]:
    """(name, config, split) of ``NAME[:CONFIG][:SPLIT]``; a location that exists on disk is all name.

    Example:
        >>> parse_hf_location("BeIR/scifact:corpus")
        ('BeIR/scifact', 'corpus', None)
        >>> parse_hf_location("sentence-transformers/natural-questions:train")
        ('sentence-transformers/natural-questions', None, 'train')
        >>> parse_hf_location("sentence-transformers/all-nli:triplet:train[:100]")
        ('sentence-transformers/all-nli', 'triplet', 'train[:100]')
    """
    if Path(location).exists():
        return location, None, None
    name, _, rest = location.partition(":")
    if not rest:
        return name, None, None
    config, sep, split = rest.partition(":")
    if sep:
        return name, config or None, split or None
    return (name, None, rest) if SPLIT_LIKE.search(rest) else (name, rest, None)


def _offline() -> bool:
    """Whether ``datasets`` runs offline: its config (read once, at its import) or the environment now."""
    import datasets.config

    flags = (os.environ.get(v, "").upper() for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return bool(datasets.config.HF_HUB_OFFLINE) or any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def load_hf(name: str, config: str | None, split: str | None) -> dict[str, Any]:
    """Split name → ``datasets.Dataset`` for a hub id, a cached dataset or a local path.

    Raises:
        BadSourceError: the dataset, config or split cannot be loaded (offline: not in the local cache).
    """
    import datasets

    path = Path(name)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if split is not None and isinstance(loaded, datasets.DatasetDict):
                loaded = loaded[split]
        elif path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise BadSourceError(f"hf: cannot read '{path}'; it reads {sorted(FILE_BUILDERS)} files or folders.")
            loaded = datasets.load_dataset(builder, data_files=str(path), split=split)
        else:
            loaded = datasets.load_dataset(name, config, split=split)
    except (FileNotFoundError, ConnectionError, ValueError, KeyError, OSError) as e:
        if isinstance(e, BadSourceError):
            raise
        raise BadSourceError(_load_error(name, config, split, e)) from e
    if isinstance(loaded, datasets.Dataset):
        return {split or "train": loaded}
    return dict(loaded)


def _load_error(name: str, config: str | None, split: str | None, error: Exception) -> str:
    what = f"HF dataset {name!r}" + (f" (config {config!r})" if config else "") + (f" split {split!r}" if split else "")
    if _offline() and not Path(name).exists():
        return (
            f"{what} is not in the local cache and the hub is offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set): "
            f"{error}. Download it once with network access (datasets.load_dataset({name!r}) with the same HF_HOME), "
            "or save it with Dataset.save_to_disk and pass hf:/path/to/folder."
        )
    return f"Cannot load {what}: {error}. Check the name, config and split, or pass a local path (hf:/path/to/data)."


class HFSource(TableSource):
    """A Hugging Face dataset (``hf:NAME[:CONFIG][:SPLIT]``), one table per split.

    Example:
        >>> src = HFSource("hf:sentence-transformers/natural-questions", "sentence-transformers/natural-questions",
        ...                SourceOptions())
        >>> src.layouts["train"].kind
        'pairs'
    """

    kind = "hf"
    PARAMS = ("layout",)

    def __init__(
        self, spec: str, location: str, options: SourceOptions, params: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(spec, location, options, params)
        self.dataset, self.config, split = parse_hf_location(location)
        self.name = Path(self.dataset.rstrip("/")).name or self.dataset
        self.data = load_hf(self.dataset, self.config, split)
        for name, table in self.data.items():
            self._add_table(name, list(table.column_names), hint=f"{self.dataset} {self.config or ''} {name}")

    def _rows(self, split: str, columns: list[str]) -> Iterator[tuple[str, Row]]:
        table = self.data[split].select_columns(columns)
        row = 0
        for batch in table.iter(batch_size=BATCH_ROWS):
            for values in zip(*(batch[c] for c in columns), strict=True):
                yield f"{self.dataset}[{split}]:{row}", dict(zip(columns, values, strict=True))
                row += 1
