"""Token tables: student token ids of every text, tokenized once and keyed like the teacher store.

A table lives in ``<cache>/tokens/<fingerprint>/`` where the fingerprint covers the tokenizer's full
definition and the max length, so a table is reused by every run with the same student tokenizer
and thrown away by none. A run that meets new texts appends Arrow IPC parts of at most ``PART_ROWS``
rows, each committed by its rename; parts are memory-mapped record batch by record batch, and ``gather``
returns id arrays without copying the table.

Filling is linear in the texts: ``add_blocks`` streams any number of blocks into the parts and maps the
new parts, rebuilding the key index, once at the end. Adding block by block with ``add`` re-mapped every
part and re-sorted every key after each block: 1.6 M texts in blocks of 8,192 took 40 s and 196 parts,
10 M extrapolated to ~27 min and ~1,220 parts (stub tokenizer, so the table's own work alone).

Example:
    >>> table = TokenTable.for_tokenizer(tokenizer, max_length=256)      # doctest: +SKIP
    >>> table.add_blocks((keys, texts) for keys, texts in blocks)       # doctest: +SKIP
    >>> ids = table.gather(table.locate(keys))                           # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa

from storage.fs import atomic_path, default_cache_dir
from storage.index import KeyIndex
from storage.keys import as_key_array, keys_from_arrow, keys_to_arrow

__all__ = ["TokenTable", "default_cache_dir", "tokenizer_fingerprint"]

TOKENIZE_BATCH = 4096
PART_ROWS = 1 << 20  # rows a part holds at most: 10 M texts make ~10 parts
BATCH_ROWS = 1 << 16  # rows buffered into one record batch (~64 MB of ids at 256 tokens), however small the blocks
SCHEMA = pa.schema([("key", pa.binary(16)), ("input_ids", pa.list_(pa.int32()))])


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
        """Map every part on disk (parts another run added since are picked up) and index all their keys.

        Each record batch of a part is one chunk of handles: ``_starts[c]`` is chunk ``c``'s first handle.
        """
        index_parts, self._values, self._offsets, starts, start = [], [], [], [], 0
        for path in sorted(self.directory.glob("part-*.arrow")):
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                ids_col, keys = batch.column("input_ids"), keys_from_arrow(batch.column("key"))
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
        chunk = np.searchsorted(self._starts, handles, side="right") - 1
        out = []
        for c, h in zip(chunk.tolist(), np.asarray(handles).tolist(), strict=True):
            r = h - int(self._starts[c])
            offs = self._offsets[c]
            out.append(self._values[c][offs[r] : offs[r + 1]])
        return out

    def add(self, keys: np.ndarray, texts: Sequence[str]) -> int:
        """Tokenize the texts whose keys are missing and append them; returns how many.

        One call, one index rebuild: to add many blocks, pass them all to :meth:`add_blocks`.
        """
        return self.add_blocks([(keys, texts)])

    def add_blocks(self, blocks: Iterable[tuple[np.ndarray, Sequence[str]]]) -> int:
        """Tokenize the texts of every ``(keys, texts)`` block whose keys are missing; returns how many.

        A key already in the table, or met earlier in this call, is skipped. Rows stream into parts of at most
        ``PART_ROWS``, each committed whole by its rename, and the table maps the new parts once, when the
        blocks end: linear in the texts however many blocks. If a block raises, the parts already full stay
        committed (and mapped), the one being filled is dropped, and the error propagates.
        """
        met = _KeyRuns()
        added = 0
        with _PartWriter(self.directory) as parts:
            try:
                for keys, texts in blocks:
                    keys = as_key_array(keys)
                    todo = np.flatnonzero((self.locate(keys) < 0) & ~met.contains(keys))
                    _, first = np.unique(keys[todo], return_index=True)
                    todo = todo[np.sort(first)]
                    if len(todo):
                        parts.write(keys[todo], self._tokenize([texts[i] for i in todo.tolist()]))
                        met.add(keys[todo])
                        added += len(todo)
            except BaseException:
                if parts.committed:
                    self.reload()
                raise
        if added:
            self.reload()
        return added

    def _tokenize(self, texts: list[str]) -> pa.Array:
        """The texts' ids (truncated at ``max_length``) as an Arrow list<int32> array."""
        ids: list[list[int]] = []
        for s in range(0, len(texts), TOKENIZE_BATCH):
            enc = self.tokenizer(
                texts[s : s + TOKENIZE_BATCH],
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )
            ids.extend(enc["input_ids"])
        return pa.array(ids, type=pa.list_(pa.int32()))

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


class _PartWriter:
    """Rows into ``part-<uuid>.arrow`` files of at most ``PART_ROWS`` rows, in record batches of ~``BATCH_ROWS``.

    A part is written to a temp name and renamed when full or when the writer closes cleanly; when the block
    raises, the part being filled is removed (readers never see a part without its footer, or half a block).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.committed = 0  # parts renamed into place so far
        self._stack: ExitStack | None = None
        self._ipc: Any = None
        self._rows = 0  # rows in the open part, written or buffered
        self._keys: list[pa.Array] = []
        self._ids: list[pa.Array] = []
        self._buffered = 0

    def __enter__(self) -> _PartWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self._commit()
        elif self._stack is not None:
            self._stack.__exit__(exc_type, exc, tb)  # closes the file, then atomic_path removes it: nothing renamed

    def write(self, keys: np.ndarray, ids: pa.Array) -> None:
        """Append rows (``keys[i]`` → ``ids[i]``), starting a new part whenever the open one is full."""
        done = 0
        while done < len(keys):
            take = min(len(keys) - done, PART_ROWS - self._rows)
            self._keys.append(keys_to_arrow(keys[done : done + take]))
            self._ids.append(ids.slice(done, take))
            self._buffered += take
            self._rows += take
            done += take
            if self._buffered >= BATCH_ROWS:
                self._flush()
            if self._rows >= PART_ROWS:
                self._commit()

    def _flush(self) -> None:
        """Write the buffered rows as one record batch of the open part (opening one when none is)."""
        if not self._buffered:
            return
        if self._stack is None:
            self._stack = ExitStack()
            tmp = self._stack.enter_context(atomic_path(self.directory / f"part-{uuid.uuid4().hex}.arrow"))
            sink = self._stack.enter_context(pa.OSFile(str(tmp), "wb"))
            self._ipc = self._stack.enter_context(pa.ipc.new_file(sink, SCHEMA))
        batch = pa.record_batch([pa.concat_arrays(self._keys), pa.concat_arrays(self._ids)], schema=SCHEMA)
        self._ipc.write_batch(batch)
        self._keys, self._ids, self._buffered = [], [], 0

    def _commit(self) -> None:
        """Write what is buffered, then close and rename the open part."""
        self._flush()
        if self._stack is not None:
            self._stack.close()  # the IPC footer, the file, then atomic_path's rename, in that order
            self.committed += 1
        self._stack, self._ipc, self._rows = None, None, 0


class _KeyRuns:
    """Keys met during one ``add_blocks`` call, as sorted runs merged like a binary counter.

    A run merges with the one before it while that one is no longer, so n keys live in at most log2(n) runs and
    each is merged O(log n) times; one sorted array grown block by block would copy O(n²/block) keys. Runs are
    sorted by the key's first 8 bytes as a uint64 (keys are hashes): searching ``S16`` directly was 2.5× slower.
    A key is met only if its whole 16 bytes match; two keys sharing 8 bytes (odds ~n²/2⁶⁵) can at worst make
    one be tokenized twice, which the index resolves (first part wins).
    """

    def __init__(self) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray]] = []  # (uint64 prefixes, sorted; their keys)

    def add(self, keys: np.ndarray) -> None:
        prefix, keys = _prefix(keys), np.asarray(keys)
        while self._runs and len(self._runs[-1][0]) <= len(prefix):
            last_prefix, last_keys = self._runs.pop()
            prefix, keys = np.concatenate([last_prefix, prefix]), np.concatenate([last_keys, keys])
        order = np.argsort(prefix, kind="stable")  # timsort: merging sorted runs is ~linear
        self._runs.append((prefix[order], keys[order]))

    def contains(self, keys: np.ndarray) -> np.ndarray:
        prefix = _prefix(keys)
        order = np.argsort(prefix)  # sorted needles walk each run forward: 2.5x faster at 1.6 M keys
        prefix, keys = prefix[order], np.asarray(keys)[order]
        found = np.zeros(len(keys), dtype=bool)
        for run_prefix, run_keys in self._runs:
            pos = np.minimum(np.searchsorted(run_prefix, prefix), len(run_prefix) - 1)
            found |= (run_prefix[pos] == prefix) & (run_keys[pos] == keys)
        out = np.empty_like(found)
        out[order] = found
        return out


def _prefix(keys: np.ndarray) -> np.ndarray:
    """Each ``S16`` key's first 8 bytes as a uint64."""
    return np.ascontiguousarray(keys).view(np.uint64)[::2].copy()
