"""Pass 1 and the MS MARCO reader at N and 2N texts: the work (slots probed in the hash tables) doubles, no more.

Operation counts, not wall clock: the machine running the suite is shared. The sorted-array KeySet this
replaced re-sorted every key seen for each block, so its work grew ~4× from N to 2N.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from precompute import plan
from precompute.pipeline import PrecomputeConfig, precompute
from precompute.sources import LineOrigins, SourceOptions, TextBlock, parse_source
from precompute.sources import ledger as ledger_module
from precompute.sources.errors import BadSourceError
from precompute.sources.ledger import IdLedger
from precompute.teacher import TeacherConfig
from storage import TeacherSpec
from storage.keys import KeySet, KeyTable


def _collection(folder: Path, n: int) -> Path:
    """``n`` passages, each text twice (ids differ): raw quotes and non-ASCII words as MS MARCO has them."""
    folder.mkdir()
    lines = [f'{i}\tpassage {i % (n // 2)}: a "quoted" 6" pipe, café, 東京\n' for i in range(n)]
    (folder / "collection.tsv").write_text("".join(lines), encoding="utf-8")
    return folder


class Counted:
    """Replaces a hash-table class in a module and sums the slots every instance probed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, module: object, name: str, base: type) -> None:
        self.tables: list[KeySet] = []
        outer = self

        class Recording(base):  # type: ignore[misc, valid-type]
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)
                outer.tables.append(self)

        monkeypatch.setattr(module, name, Recording)

    def probed(self) -> int:
        return sum(t.slots_probed for t in self.tables)


def _scan_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int) -> tuple[int, int, int]:
    with monkeypatch.context() as m:
        seen = Counted(m, plan, "KeySet", KeySet)
        ids = Counted(m, ledger_module, "KeyTable", KeyTable)
        spec = TeacherSpec(
            model="stub", weights_id="files:stub", pooling="mean", normalize=True, max_seq_length=8, dim=4
        )
        folder = _collection(tmp_path / f"marco-{n}", n)
        config = PrecomputeConfig(
            store=str(tmp_path / f"store-{n}"),
            data=(f"msmarco:{folder}",),
            teacher=TeacherConfig(model="stub"),
            limit=0,
            progress=False,
        )
        summary = precompute(config, encoder=SimpleNamespace(spec=spec, forward_calls=0))  # type: ignore[arg-type]
    return summary.unique_texts, seen.probed(), ids.probed()


def test_pass1_work_is_linear_in_the_texts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    unique_n, seen_n, ids_n = _scan_work(tmp_path, monkeypatch, 20_000)
    unique_2n, seen_2n, ids_2n = _scan_work(tmp_path, monkeypatch, 40_000)
    assert (unique_n, unique_2n) == (10_000, 20_000)
    assert 1.5 < seen_2n / seen_n < 3.0  # dedup of the keys (quadratic before: ~4)
    assert 1.5 < ids_2n / ids_n < 3.0  # the reader's once-per-id ledger


def _block(ids: list[str], texts: list[str]) -> TextBlock:
    return TextBlock("passage", ids, texts, LineOrigins("c.tsv", np.arange(1, len(ids) + 1)))


class Sink:
    def __init__(self, skip_bad: bool) -> None:
        self.options, self.bad = SourceOptions(skip_bad=skip_bad), []
        self.spec = "sink"

    def reject(self, origin: str, reason: str, fix: str = "") -> None:
        if not self.options.skip_bad:
            raise BadSourceError(f"{origin}: {reason}.")
        self.bad.append(f"{origin}: {reason}")


def test_admit_block_yields_rows_before_a_reject_then_raises() -> None:
    block = _block(["1", "2", "1", "3"], ["a", "b", "other", "c"])
    out = IdLedger().admit_block(block, Sink(skip_bad=False))  # type: ignore[arg-type]
    assert next(out).ids == ["1", "2"]  # the rows before the conflict on line 3
    with pytest.raises(
        BadSourceError, match=r"c\.tsv:3: duplicate id '1' with different texts at c\.tsv:1 and c\.tsv:3"
    ):
        next(out)


def test_admit_block_merges_line_rejects_and_conflicts_in_file_order() -> None:
    sink = Sink(skip_bad=True)
    block = _block(["1", "2", "1", "2", "3"], ["a", "b", "other", "b", "c"])  # lines 1-5; a bad line sits before row 1
    bad = [(1, "c.tsv:1.5", "a bad line", "")]
    kept = list(IdLedger().admit_block(block, sink, bad))  # type: ignore[arg-type]
    assert [i for b in kept for i in b.ids] == ["1", "2", "3"]  # row 3 (id 2, same text) is a silent repeat
    assert sink.bad[0] == "c.tsv:1.5: a bad line" and sink.bad[1].startswith("c.tsv:3: duplicate id '1'")


def test_blocks_of_any_source_group_its_records(shared_data: Path) -> None:
    source = parse_source(f"beir:{shared_data / 'scifact'}", SourceOptions())
    blocks = list(source.iter_text_blocks())
    assert [r for b in blocks for r in b.records() if r.role == "passage"] == list(source.iter_texts("passage"))
    assert all(len({b.role}) == 1 and 0 < len(b) <= 8192 for b in blocks)
