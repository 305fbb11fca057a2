"""Token tables: student token ids of every text, tokenized once and keyed like the teacher store.

A table lives in ``<cache>/tokens/<fingerprint>/`` where the fingerprint covers the tokenizer's full
definition and the max length, so a table is reused by every run with the same student tokenizer
and thrown away by none. Each run that meets new texts appends one Arrow IPC part; parts are
memory-mapped, and ``gather`` returns id arrays without copying the table.

Example:
    >>> table = TokenTable.for_tokenizer(tokenizer, max_length=256)      # doctest: +SKIP
    >>> table.add(keys, texts)                                           # doctest: +SKIP
    >>> ids = table.gather(table.locate(keys))                           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from storage.fs import atomic_path, default_cache_dir
from storage.index import KeyIndex
from storage.keys import as_key_array, keys_from_arrow, keys_to_arrow

__all__ = ["TokenTable", "default_cache_dir", "tokenizer_fingerprint"]

TOKENIZE_BATCH = 4096


def tokenizer_fingerprint(tokenizer: Any, max_length: int) -> str:
    """Hash of everything that changes token ids: the tokenizer's definition and the max length."""
    h = hashlib.sha256(f"{type(tokenizer).__name__}|{max_length}|".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(_definition(backend).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())).encode())
    return h.hexdigest()[:24]


def _definition(backend: Any) -> str:
    """The backend tokenizer's serialization without its truncation/padding *state*.

    transformers leaves the last call's settings on the backend (``tok(x, truncation=True, max_length=16)``
    turns backend truncation on until a later call changes it), so hashing ``to_str()`` as is gave one
    tokenizer different fingerprints depending on what it had tokenized before. Token ids do not depend on
    that state here: ``add`` passes truncation and ``max_length`` explicitly, and padding happens in ``pad``.
    A fresh tokenizer (no state) serializes exactly as before, so existing tables keep their fingerprint.
    """
    from tokenizers import Tokenizer

    clean = Tokenizer.from_str(backend.to_str())
    clean.no_truncation()
    clean.no_padding()
    return clean.to_str()


class TokenTable:
    """Append-only, content-keyed token ids of one tokenizer at one max length."""

    def __init__(self, directory: Path, tokenizer: Any, max_length: int) -> None:
        self.directory = Path(directory)
        self.tokenizer, self.max_length = tokenizer, max_length
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.padding_side = getattr(tokenizer, "padding_side", "right")
        self._values: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self.reload()

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, max_length: int, cache_dir: str | Path | None = None) -> TokenTable:
        """The table of ``tokenizer`` at ``max_length`` below ``cache_dir`` (default: the ddx cache)."""
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        directory = root / "tokens" / tokenizer_fingerprint(tokenizer, max_length)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, tokenizer, max_length)

    def reload(self) -> None:
        """Map every part on disk (parts another run added since are picked up)."""
        parts = sorted(self.directory.glob("part-*.arrow"))
        index_parts, self._values, self._offsets, start = [], [], [], 0
        starts = []
        for path in parts:
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            ids_col = table.column("input_ids").combine_chunks()
            keys = keys_from_arrow(table.column("key"))
            self._values.append(ids_col.values.to_numpy(zero_copy_only=True))
            self._offsets.append(ids_col.offsets.to_numpy())
            n = len(keys)
            lengths = np.diff(self._offsets[-1]).astype(np.int32)
            index_parts.append((keys, np.arange(start, start + n, dtype=np.int64), np.zeros(n, np.uint8), lengths))
            starts.append(start)
            start += n
        self._starts = np.array([*starts, start], dtype=np.int64)
        self._lengths = np.concatenate([p[3] for p in index_parts]) if index_parts else np.empty(0, np.int32)
        self._index = KeyIndex.build(index_parts)

    def __len__(self) -> int:
        return len(self._index)

    def locate(self, keys: np.ndarray) -> np.ndarray:
        """Handle of each key's ids (-1 when not tokenized yet)."""
        return self._index.locate(as_key_array(keys))

    def lengths(self, handles: np.ndarray) -> np.ndarray:
        """Token count per handle."""
        return self._lengths[np.asarray(handles, dtype=np.int64)]

    def gather(self, handles: np.ndarray) -> list[np.ndarray]:
        """Token id arrays (int32 views into the memory-mapped parts), one per handle."""
        part = np.searchsorted(self._starts, handles, side="right") - 1
        out = []
        for p, h in zip(part.tolist(), np.asarray(handles).tolist(), strict=True):
            r = h - int(self._starts[p])
            offs = self._offsets[p]
            out.append(self._values[p][offs[r] : offs[r + 1]])
        return out

    def add(self, keys: np.ndarray, texts: list[str]) -> int:
        """Tokenize the texts whose keys are missing and append them as one part; returns how many."""
        keys = as_key_array(keys)
        todo = np.flatnonzero(self.locate(keys) < 0)
        if len(todo) == 0:
            return 0
        _, first = np.unique(keys[todo], return_index=True)
        todo = todo[np.sort(first)]
        ids: list[list[int]] = []
        for s in range(0, len(todo), TOKENIZE_BATCH):
            batch = [texts[i] for i in todo[s : s + TOKENIZE_BATCH]]
            enc = self.tokenizer(
                batch,
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            ids.extend(enc["input_ids"])
        self._write_part(keys[todo], ids)
        self.reload()
        return len(todo)

    def _write_part(self, keys: np.ndarray, ids: list[list[int]]) -> None:
        table = pa.table({"key": keys_to_arrow(keys), "input_ids": pa.array(ids, type=pa.list_(pa.int32()))})
        final = self.directory / f"part-{uuid.uuid4().hex}.arrow"
        with atomic_path(final) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)

    def pad(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int64 arrays padded to the longest sequence on the tokenizer's side."""
        width = max((len(s) for s in seqs), default=1)
        ids = np.full((len(seqs), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(seqs), width), dtype=np.int64)
        for i, s in enumerate(seqs):
            if self.padding_side == "left":
                ids[i, width - len(s) :], mask[i, width - len(s) :] = s, 1
            else:
                ids[i, : len(s)], mask[i, : len(s)] = s, 1
        return ids, mask
