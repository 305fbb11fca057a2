"""The public planning API (``precompute.plan``): the texts still to encode as an Arrow table, keys exact.

Both engines plan with it: the local pipeline streams ``scan_keys`` + ``iter_todo``; the Ray engine ships
``plan_texts``' table. Keys holding NUL bytes (about 1 in 20 content keys) are the trap: ``pa.array`` of an ``S16``
array cuts them, and a prototype silently stored 18 of 350 keys wrong.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from precompute.config import PrecomputeConfig, TeacherConfig
from precompute.plan import PLAN_SCHEMA, open_sources, plan_texts, scan_keys
from storage import TeacherSpec, TeacherStore
from storage.keys import content_key, content_keys, key_slice, keys_from_arrow
from tests.precompute.test_pipeline import write_beir
from tests.storage.rows import vectors_for

SPEC = TeacherSpec(model="stub", weights_id="files:stub", pooling="mean", normalize=True, max_seq_length=8, dim=4)


def nul_texts() -> list[str]:
    """Passages whose keys hold a NUL byte first, last, and in the middle (found by trying texts in order)."""
    wanted = {"first": lambda k: k[0] == 0, "last": lambda k: k[-1] == 0, "middle": lambda k: 0 in k[1:-1]}
    found: dict[str, str] = {}
    i = 0
    while len(found) < len(wanted):
        text = f"passage number {i}"
        key = content_key("passage", text)
        for name, test in wanted.items():
            if name not in found and test(key):
                found[name] = text
        i += 1
    return list(found.values())


def config(store: Path, *folders: Path, **kw: object) -> PrecomputeConfig:
    return PrecomputeConfig(
        store=str(store), data=tuple(f"beir:{f}" for f in folders), teacher=TeacherConfig(model="stub"), **kw
    )  # type: ignore[arg-type]


def test_plan_texts_is_an_arrow_table_of_exact_keys(tmp_path: Path) -> None:
    special = nul_texts()
    passages = [*special, "the cat sat", "a dog ran", "the cat sat"]  # a repeated text is planned once
    folder = write_beir(tmp_path / "d", passages, ["who sat", "the cat sat"])  # same text as a query: its own key
    store = TeacherStore.create(tmp_path / "s", SPEC)
    plan = plan_texts(config(tmp_path / "s", folder), store)
    assert plan.table.schema == PLAN_SCHEMA and plan.table.schema.field("key").type == pa.binary(16)
    rows = plan.table.to_pylist()
    assert len(plan) == 7 and plan.counts.texts_read == 8 and plan.counts.unique_texts == 7
    expected = content_keys([r["role"] for r in rows], [r["text"] for r in rows])
    assert keys_from_arrow(plan.table["key"]).tobytes() == expected.tobytes()  # every byte, NULs included
    assert [r["key"] for r in rows[:3]] == [content_key("passage", t) for t in special]
    assert any(k[0] == 0 for k in (r["key"] for r in rows)) and any(k[-1] == 0 for k in (r["key"] for r in rows))
    assert {(r["role"], r["text"]) for r in rows} == {("passage", t) for t in passages} | {
        ("query", "who sat"),
        ("query", "the cat sat"),
    }


def test_stored_keys_limit_and_rank_slices(tmp_path: Path) -> None:
    texts = [f"text {i}" for i in range(40)]
    folder = write_beir(tmp_path / "d", texts)
    store = TeacherStore.create(tmp_path / "s", SPEC)
    stored = content_keys("passage", texts[:15])
    with store.writer() as w:
        w.append(stored, vectors_for(stored, 4), np.zeros(15, np.uint8), np.ones(15, np.int32))
    store.refresh()
    plan = plan_texts(config(tmp_path / "s", folder), store)
    assert len(plan) == 25 and plan.counts.already_stored == 15
    assert [r["text"] for r in plan.table.to_pylist()] == texts[15:]  # reading order
    assert len(plan_texts(config(tmp_path / "s", folder, limit=4), store)) == 4
    halves = [plan_texts(config(tmp_path / "s", folder), store, rank=r, world_size=2) for r in range(2)]
    keys = [keys_from_arrow(h.table["key"]) for h in halves]
    assert len(keys[0]) + len(keys[1]) == 25 and not set(keys[0].tolist()) & set(keys[1].tolist())
    assert key_slice(keys[1], 1, 2).all() and halves[1].counts.other_ranks == len(keys[0])


def test_scan_keys_and_plan_texts_agree(tmp_path: Path) -> None:
    """The local engine's pass 1 (sorted keys) and the Arrow plan are one plan."""
    folder = write_beir(tmp_path / "d", [f"p {i}" for i in range(30)], [f"q {i}" for i in range(5)])
    store = TeacherStore.create(tmp_path / "s", SPEC)
    cfg = config(tmp_path / "s", folder, roles=("passage",))
    scanned = scan_keys(open_sources(cfg), store, roles=cfg.roles)
    table = plan_texts(cfg, store).table
    assert np.sort(keys_from_arrow(table["key"])).tobytes() == scanned.keys.tobytes()
    assert set(table["role"].to_pylist()) == {"passage"}


def test_bad_input_stops_the_plan(tmp_path: Path) -> None:
    from precompute.sources.errors import BadSourceError

    folder = write_beir(tmp_path / "d", ["fine", "   "])
    store = TeacherStore.create(tmp_path / "s", SPEC)
    with pytest.raises(BadSourceError, match=r"corpus\.jsonl:2: empty text for id 'p1'"):
        plan_texts(config(tmp_path / "s", folder), store)
