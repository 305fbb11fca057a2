"""Keys into and out of Arrow: ``fixed_size_binary(16)`` both ways, exact for keys holding NUL bytes anywhere.

``pa.array`` of an ``S16`` array is variable-length binary cut at the first NUL: a Ray Data prototype wrote 18 of
350 keys wrong that way and ``cache verify`` said OK. :func:`storage.keys.keys_to_arrow` / ``keys_from_arrow`` are
the one conversion (the store's index files and the precompute plan use them), and refuse a cut column.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage.keys import KEY_DTYPE, content_keys, keys_from_arrow, keys_to_arrow
from storage.segment_format import IndexColumns

NUL_KEYS = [
    b"\x00" * 16,  # all zero
    b"\x00" + bytes(range(1, 16)),  # leading NUL
    bytes(range(1, 16)) + b"\x00",  # trailing NUL (numpy's S16 scalar drops it)
    b"ab\x00\x00cd" + b"\x07" * 10,  # NULs in the middle
    b"\x00\x00\x00" + b"\xff" * 10 + b"\x00\x00\x00",  # both ends
]


def nul_keys() -> np.ndarray:
    keys = np.frombuffer(b"".join(NUL_KEYS), dtype=KEY_DTYPE)
    return np.concatenate([keys, content_keys("passage", [f"text {i}" for i in range(200)])])


def test_keys_with_nul_bytes_round_trip_exactly() -> None:
    keys = nul_keys()
    column = keys_to_arrow(keys)
    assert column.type == pa.binary(16) and len(column) == len(keys)
    assert [column[i].as_py() for i in range(len(NUL_KEYS))] == NUL_KEYS  # each value is its 16 bytes
    back = keys_from_arrow(column)
    assert back.dtype == KEY_DTYPE and back.tobytes() == keys.tobytes()


def test_round_trip_through_slices_chunks_ipc_and_parquet(tmp_path: Path) -> None:
    keys = nul_keys()
    column = keys_to_arrow(keys)
    chunked = pa.chunked_array([column.slice(0, 3), column.slice(3, 50), column.slice(53)])
    assert keys_from_arrow(chunked).tobytes() == keys.tobytes()
    assert keys_from_arrow(column.slice(2, 7)).tobytes() == keys[2:9].tobytes()  # an offset into the buffer
    table = pa.table({"key": chunked})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:  # what Ray's object store carries
        writer.write_table(table)
    ipc = pa.ipc.open_stream(sink.getvalue()).read_all()
    assert keys_from_arrow(ipc["key"]).tobytes() == keys.tobytes()
    pq.write_table(table, tmp_path / "k.parquet")
    assert keys_from_arrow(pq.read_table(tmp_path / "k.parquet")["key"]).tobytes() == keys.tobytes()
    as_list = pa.ListArray.from_arrays(pa.array([0, 5, len(keys)], pa.int32()), column)  # Ray's unit columns
    assert keys_from_arrow(as_list[1].values).tobytes() == keys[5:].tobytes()


def test_index_files_keep_nul_keys() -> None:
    keys = nul_keys()
    n = len(keys)
    cols = IndexColumns(keys, np.arange(n), np.zeros(n, np.uint8), np.ones(n, np.int32), np.arange(n, dtype=np.uint32))
    table = cols.to_table()
    assert table.schema.field("key").type == pa.binary(16)
    assert IndexColumns.from_table(table).keys.tobytes() == keys.tobytes()


def test_a_column_cut_by_pa_array_is_refused() -> None:
    keys = nul_keys()
    cut = pa.array(keys)  # the trap: variable-length binary, each key cut at its first NUL
    assert cut.type == pa.binary() and cut[0].as_py() == b""
    with pytest.raises(ValueError, match=r"not 16: was it built with pa\.array\(\) .*keys_to_arrow"):
        keys_from_arrow(cut)
    whole = pa.array([bytes(k).ljust(16, b"\x00") for k in NUL_KEYS], pa.binary())  # binary, every value 16 bytes
    assert keys_from_arrow(whole).tobytes() == b"".join(NUL_KEYS)
    with pytest.raises(ValueError, match="nulls"):
        keys_from_arrow(pa.array([NUL_KEYS[1], None], pa.binary(16)))
    with pytest.raises(ValueError, match=r"type int64; expected fixed_size_binary\(16\)"):
        keys_from_arrow(pa.array([1, 2]))
