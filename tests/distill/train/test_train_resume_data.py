"""``--resume`` continues only onto the data, and the batch order, its checkpoint was trained on.

The Trainer resumes by skipping ``global_step`` batches of the sampler's epoch, rebuilt over the examples as they
resolve now. If those changed (an edited source, ``--allow-missing`` while precompute fills the store, another
``--seed`` or ``--batch-size``), the skipped batches are not the trained ones. Each checkpoint records the data it
was trained on (``ddx_data.json``) and ``--resume`` refuses another in one line, before the student loads.

Phase 1 on a copy of the fixture corpus (130 training texts, batches of 8): stopped once ``checkpoint-4`` and its
manifest are saved, then resumed.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from distill.model.model import StudentModelWithProjection
from distill.model.run_file import read_run
from distill.train.checkpoint_data import DATA_FILE, data_fingerprint, fingerprint_changes
from distill.train.checkpoints import MANIFEST, write_manifest
from distill.train.data import parse_sources, resolve_data
from distill.train.run import train
from storage.errors import DdxError
from storage.store import TeacherStore
from tests.distill.conftest import Corpus
from tests.distill.train.test_train_resume import _interrupted

MAX_STEPS = 8
STOP_AT = 4


@pytest.fixture
def corpus_copy(corpus: Corpus, tmp_path: Path) -> Path:
    """A copy of the fixture corpus that a test may edit."""
    return Path(shutil.copytree(corpus.folder, tmp_path / "beir"))


@pytest.fixture
def make(config, corpus_copy: Path) -> Callable[..., Any]:
    def build(**overrides: Any) -> Any:
        base: dict[str, Any] = dict(
            phase=1, data=(f"beir:{corpus_copy}",), max_steps=MAX_STEPS, batch_size=8, save_steps=2
        )
        return config(**{**base, **overrides})

    return build


def _drop_passage(folder: Path, pid: str = "d99") -> None:
    """Remove one passage from the corpus (a source edited between the crash and the resume)."""
    lines = (folder / "corpus.jsonl").read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line)["_id"] != pid]
    assert len(kept) == len(lines) - 1
    (folder / "corpus.jsonl").write_text("".join(kept))


@pytest.mark.parametrize(
    ("change", "overrides", "differs"),
    [
        pytest.param(_drop_passage, {}, r"examples 130 → 129, texts differ", id="source-edited"),
        pytest.param(None, {"seed": 8}, r"--seed 7 → 8", id="seed"),
        pytest.param(None, {"batch_size": 16}, r"--batch-size 8 → 16", id="batch-size"),
    ],
)
def test_resume_onto_other_data_is_refused_in_one_line(
    make, corpus_copy: Path, tmp_path: Path, change: Callable[[Path], None] | None, overrides: dict, differs: str
) -> None:
    out = tmp_path / "run"
    checkpoints = _interrupted(make, out, stop_at=STOP_AT)
    if change is not None:
        change(corpus_copy)
    loads: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(StudentModelWithProjection, "load", lambda *a, **k: loads.append("load"))
        mp.setattr(StudentModelWithProjection, "from_pretrained", lambda *a, **k: loads.append("from_pretrained"))
        with pytest.raises(DdxError) as caught:
            train(make(out=str(out), resume=True, **overrides))
    message = str(caught.value)
    assert "\n" not in message and not loads, "refused in one line, before the student loads"
    checkpoint = re.escape(str(checkpoints / f"checkpoint-{STOP_AT}"))
    assert re.fullmatch(
        rf"Checkpoint '{checkpoint}' was trained on other data or batch order than this run has: {differs}\. "
        r"Resuming skips the trained batches by position, so some examples would be trained twice and others never\. "
        r"Restore what it trained on \(.*\), or start a new run: rerun without --resume into a new --out "
        rf"\(or after deleting '{re.escape(str(checkpoints))}'\)\.",
        message,
    ), message


def test_resume_onto_the_same_data_records_and_checks_the_fingerprint(make, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    checkpoints = _interrupted(make, out, stop_at=STOP_AT)
    recorded = json.loads((checkpoints / f"checkpoint-{STOP_AT}" / DATA_FILE).read_text())
    assert recorded["examples"] == 130 and recorded["seed"] == 7 and recorded["batch_size"] == 8
    assert DATA_FILE in json.loads((checkpoints / f"checkpoint-{STOP_AT}" / MANIFEST).read_text())["files"]
    capsys.readouterr()
    resumed = train(make(out=str(out), resume=True))
    assert resumed.steps == MAX_STEPS and Path(resumed.report["resumed_from"]).name == f"checkpoint-{STOP_AT}"
    assert "fingerprint" not in capsys.readouterr().err
    assert read_run(out)["data"] == recorded, "ddx_run.json records the data too"


def test_checkpoint_without_fingerprint_resumes_with_a_warning(make, tmp_path: Path, capsys) -> None:
    """A checkpoint of an older ddx (a manifest, no ``ddx_data.json``) resumes as before, saying it cannot check."""
    out = tmp_path / "run"
    checkpoints = _interrupted(make, out, stop_at=STOP_AT)
    for folder in checkpoints.glob("checkpoint-*"):
        (folder / DATA_FILE).unlink()
        write_manifest(folder, int(folder.name.split("-")[1]))
    capsys.readouterr()
    resumed = train(make(out=str(out), resume=True))
    assert resumed.steps == MAX_STEPS and Path(resumed.report["resumed_from"]).name == f"checkpoint-{STOP_AT}"
    lines = [line for line in capsys.readouterr().err.splitlines() if "fingerprint" in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ddx train: warning: checkpoint-{STOP_AT} records no training-data fingerprint"), lines


# -- the fingerprint itself, on resolved data (no training) ----------------------------------------------------------


def _hard_negatives_without_one(folder: Path) -> None:
    """Drop one hard negative of the first query that has two or more: same examples, other negatives."""
    path = folder / "hard_negatives.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    row = next(r for r in rows if len(r["neg"]) >= 2)
    row["neg"] = row["neg"][1:]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_phase2_fingerprint_sees_a_changed_negative(config, teacher_store: Path, corpus_copy: Path) -> None:
    cfg = config(phase=2, data=(f"beir:{corpus_copy}",))  # resolving needs no student
    store = TeacherStore.open(str(teacher_store))

    def fingerprint() -> dict[str, Any]:
        sources = parse_sources(cfg.data, (), skip_bad=False, title_join=cfg.title_join)
        return data_fingerprint(cfg, resolve_data(sources, store, phase=2), world_size=1)

    before = fingerprint()
    assert fingerprint() == before, "the fingerprint is a function of the data"
    _hard_negatives_without_one(corpus_copy)
    assert fingerprint_changes(before, fingerprint()) == ["negatives differ"]
    assert fingerprint_changes(before, {**before, "world_size": 2}) == ["processes (world size) 1 → 2"]
