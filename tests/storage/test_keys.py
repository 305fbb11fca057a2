"""Content keys: determinism, role separation, S16 arrays with trailing NULs, KeySet, rank slices."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from storage import KeySet, content_key, content_keys, key_hex
from storage.keys import (
    KEY_DTYPE,
    KeyTable,
    _spread,
    as_key_array,
    first_occurrence,
    key_slice,
    role_code,
)


def test_content_key_is_deterministic_and_16_bytes() -> None:
    a = content_key("passage", "The quick brown fox")
    assert a == content_key("passage", "The quick brown fox")
    assert len(a) == 16
    assert a == hashlib.blake2b(b"passage\x00The quick brown fox", digest_size=16).digest()
    assert a != content_key("passage", "The quick brown fox ")  # exact text, no normalization


def test_same_text_as_query_and_passage_gives_different_keys() -> None:
    assert content_key("query", "what is zarr") != content_key("passage", "what is zarr")
    both = content_keys(["query", "passage"], ["what is zarr", "what is zarr"])
    assert both[0] != both[1]


def test_content_keys_matches_content_key_and_checks_roles() -> None:
    texts = ["a", "b", "ü ñ 漢字", ""]
    keys = content_keys("query", texts)
    assert keys.dtype == KEY_DTYPE
    assert [bytes(k).ljust(16, b"\x00") for k in keys] == [content_key("query", t) for t in texts]
    assert len(content_keys("passage", [])) == 0
    with pytest.raises(ValueError, match="Unknown role 'doc'"):
        content_keys("doc", ["x"])
    with pytest.raises(ValueError, match="Got 1 roles for 2 texts"):
        content_keys(["query"], ["x", "y"])
    assert role_code("passage") == 0 and role_code("query") == 1


def test_keys_ending_in_nul_bytes_survive_s16() -> None:
    raw = [b"\x01" * 15 + b"\x00", b"\x01" * 14 + b"\x00\x00", b"\x01" * 16, b"\x00" * 16, b"\x00" * 15 + b"\x01"]
    arr = as_key_array(raw)
    assert arr.dtype == KEY_DTYPE and len(arr) == 5
    assert arr.tobytes() == b"".join(raw)  # the NULs are still there in the buffer
    assert len(np.unique(arr)) == 5  # no two distinct keys fold together
    assert [key_hex(k) for k in arr] == [r.hex() for r in raw]
    assert [bytes.fromhex(key_hex(k)) for k in arr] == raw
    # S16 scalars drop their trailing NULs, so an array rebuilt from them is S15; as_key_array restores S16
    rebuilt = np.array(list(arr[:2]))
    assert rebuilt.dtype == np.dtype("S15")
    assert as_key_array(rebuilt).tobytes() == raw[0] + raw[1]


def test_keyset_add_contains_array() -> None:
    keys = content_keys("passage", [f"p{i}" for i in range(300)])
    nul_key = b"\x07" * 8 + b"\x00" * 8
    ks = KeySet(keys[:100])
    assert len(ks) == 100
    ks.add(keys[50:200])  # overlapping add
    ks.add(as_key_array([nul_key]))
    assert len(ks) == 201
    mask = ks.contains(np.concatenate([keys, as_key_array([nul_key, b"\x07" * 8 + b"\x00" * 7 + b"\x01"])]))
    assert mask[:200].all() and not mask[200:300].any()
    assert mask[300] and not mask[301]
    arr = ks.array()
    assert arr.dtype == KEY_DTYPE and (arr[:-1] < arr[1:]).all()  # sorted and unique
    assert arr.tobytes() == b"".join(sorted({bytes(k).ljust(16, b"\x00") for k in [*keys[:200], nul_key]}))
    assert not KeySet().contains(keys).any()
    many = content_keys("query", [f"q{i}" for i in range(70_000)])  # grows the table several times
    ks.add(many)
    assert np.array_equal(ks.array(), KeySet(np.concatenate([keys[:200], as_key_array([nul_key]), many])).array())
    assert ks.contains(many).all() and len(ks) == 70_201


def test_keyset_add_new_marks_first_occurrences_of_new_keys() -> None:
    keys = content_keys("passage", ["a", "b", "a", "c", "b"])
    ks = KeySet(keys[3:4])  # "c" is already in
    assert ks.add_new(keys).tolist() == [True, True, False, False, False]
    assert ks.add_new(keys).tolist() == [False] * 5
    assert first_occurrence(keys).tolist() == [True, True, False, True, False]
    assert len(KeySet().add_new(np.empty(0, KEY_DTYPE))) == 0


def test_keyset_agrees_with_a_python_set_under_collisions() -> None:
    """Random batches over a small universe (repeats within and across batches), plus keys sharing a home slot."""
    rng = np.random.default_rng(0)
    universe = np.concatenate(
        [
            rng.integers(0, 256, (3000, 16), dtype=np.uint8).view(KEY_DTYPE).ravel(),
            as_key_array([b"\x00" * 16, b"\x00" * 15 + b"\x01"]),
            # equal second halves: one home slot in every table size, probe runs 2,000 slots long
            np.stack([np.arange(2000, dtype=np.uint64), np.full(2000, 2**64 - 1, np.uint64)], 1)
            .view(KEY_DTYPE)
            .ravel(),
        ]
    )
    ks, ref = KeySet(), set()
    for _ in range(40):
        batch = universe[rng.integers(0, len(universe), rng.integers(0, 2000))]
        raw = [bytes(k).ljust(16, b"\x00") for k in batch]
        assert ks.contains(batch).tolist() == [k in ref for k in raw]
        expected = []
        for k in raw:
            expected.append(k not in ref)
            ref.add(k)
        assert ks.add_new(batch).tolist() == expected
        assert len(ks) == len(ref)
    assert ks.array().tobytes() == b"".join(sorted(ref))


def test_probe_runs_wrap_around_the_tables_end() -> None:
    ks = KeySet(capacity=1000)  # 2,001 slots, no growth below 1,500 keys
    last = next(h for h in range(1 << 20) if int(_spread(np.array([h], np.uint64))[0]) % 2001 == 2000)
    keys = np.stack([np.arange(50, dtype=np.uint64), np.full(50, last, np.uint64)], 1).view(KEY_DTYPE).ravel()
    assert ks.add_new(keys).all() and ks.contains(keys).all() and not ks.add_new(keys).any()
    assert ks._used[:49].all() and ks._used[2000]  # one key at the end, 49 wrapped to the start


def test_keyset_work_is_linear_in_the_keys() -> None:
    """Slots probed (growth included) for 2N keys added block by block stay ~2× those for N: no re-sorting."""

    def probed(n: int) -> int:
        keys = content_keys("passage", [f"t{i}" for i in range(n)])
        ks = KeySet()
        for s in range(0, n, 8192):
            block = keys[s : s + 8192]
            ks.add(block[~ks.contains(block)])
        return ks.slots_probed

    small, large = probed(50_000), probed(100_000)
    assert 1.5 < large / small < 3.0  # growth steps fall differently at each size; quadratic work would be ~4


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_key_slice_partitions_disjointly_and_completely(world_size: int) -> None:
    keys = np.concatenate(
        [
            content_keys("passage", [f"d{i}" for i in range(500)]),
            as_key_array([b"\x00" * 16, b"\x05" * 8 + b"\x00" * 8]),
        ]
    )
    masks = np.stack([key_slice(keys, r, world_size) for r in range(world_size)])
    assert (masks.sum(axis=0) == 1).all()  # every key in exactly one rank's slice
    if world_size > 1:
        assert all(0 < m.sum() < len(keys) for m in masks)  # and the split is not degenerate
    # depends on the key alone: shuffled input gives every key the same owner
    perm = np.random.default_rng(0).permutation(len(keys))
    for r in range(world_size):
        assert np.array_equal(key_slice(keys[perm], r, world_size), masks[r][perm])


def test_key_slice_of_keys_ending_in_nul_in_any_form() -> None:
    raw = [b"\x01" * 15 + b"\x00", b"\x02" * 14 + b"\x00\x00", b"\x03" * 12 + b"\x00" * 4]
    keys = as_key_array(raw)
    rebuilt = np.array(list(keys))  # from S16 scalars, which drop trailing NULs: dtype S15
    assert rebuilt.dtype == np.dtype("S15")
    for world_size in (2, 3, 4):
        for rank in range(world_size):
            assert np.array_equal(key_slice(rebuilt, rank, world_size), key_slice(keys, rank, world_size))
            assert np.array_equal(key_slice(raw, rank, world_size), key_slice(keys, rank, world_size))


@pytest.mark.parametrize("halves", [1, 2])
def test_keytable_keeps_the_first_values_through_growth(halves: int) -> None:
    rng = np.random.default_rng(halves)
    table, expected = KeyTable(width=2, halves=halves), {}
    universe = np.concatenate([rng.integers(0, 2**63, (15_000, halves)), rng.integers(0, 5_000, (5_000, halves))])
    for _ in range(20):  # 20 × 3,000 keys from a universe of 20,000: repeats within and across batches; grows
        words = universe[rng.integers(0, len(universe), 3000)].astype(np.uint64)
        values = rng.integers(0, 2**40, (3000, 2))
        new, stored = table.insert(words if halves == 2 else words[:, 0], values)
        for w, v, is_new, got in zip(map(tuple, words.tolist()), values.tolist(), new, stored.tolist(), strict=True):
            assert is_new == (w not in expected)
            expected.setdefault(w, v)
            assert got == expected[w]
    assert len(table) == len(expected)
    with pytest.raises(ValueError, match="1 or 2 uint64 words"):
        KeyTable(width=1, halves=3)


def test_repeated_counts_exactly_even_when_first_halves_collide() -> None:
    from storage.keys import repeated

    keys = np.frombuffer(np.random.default_rng(0).bytes(16 * 1000), dtype="S16").copy()
    assert repeated(keys) == 0 and repeated(keys[:1]) == 0
    assert repeated(np.concatenate([keys, keys[:10], keys[:3]])) == 13
    halves = keys.view(np.uint64).reshape(-1, 2).copy()
    halves[1, 0] = halves[0, 0]  # same first 8 bytes, different key
    assert repeated(halves.view("S16").ravel()) == 0
    halves[1, 1] = halves[0, 1]
    assert repeated(halves.view("S16").ravel()) == 1
