"""``precompute_ray`` / ``--engine ray`` on a real local Ray (``ray.init(num_cpus=2)``), CPU actors, the tiny model.

A Ray precompute stores what a single-process run stores (same keys, vectors within fp16 tolerance, token counts,
``verify`` clean, every key once); encoder actors SIGKILLed mid-unit and right after a unit's commit (Ray restarts
them and retries the unit) still leave every key exactly once; a rerun encodes nothing and starts no actor; keys
holding NUL bytes come back exact. Without Ray installed, ``--engine ray`` is a one-line error, and neither
``import precompute`` nor ``ddx --help`` imports Ray.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from cli.main import cli
from precompute.config import PrecomputeConfig, RayConfig, TeacherConfig
from precompute.teacher import load_teacher
from storage import TeacherStore, verify_store
from storage.errors import DdxError
from storage.keys import content_keys
from tests.precompute.ray_faults import kill_once
from tests.precompute.test_pipeline import ATOL, run, write_beir
from tests.precompute.test_plan import nul_texts
from tests.tiny_models import tiny_corpus

REPO = Path(__file__).resolve().parents[2]
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",  # offline: no usage report
    "RAY_AUTH_MODE": "disabled",  # a local test cluster: no token written to ~/.ray
    "RAY_DEDUP_LOGS": "0",
    "OMP_NUM_THREADS": "1",  # the actors share 2 cores with the test process
    "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),  # tests.*: the hook
}


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A local Ray of 2 CPUs and no GPU for the session: no dashboard, no usage stats, shut down at the end."""
    ray = pytest.importorskip("ray", reason="Ray is the test extra's (pip install -e '.[test]')")
    mp = pytest.MonkeyPatch()
    for name, value in RAY_ENV.items():
        mp.setenv(name, value)  # before ray.init: its workers inherit this environment
    ray.init(
        num_cpus=2,
        num_gpus=0,
        include_dashboard=False,
        log_to_driver=False,
        object_store_memory=128 << 20,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()
    mp.undo()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """90 passages (3 whose keys hold NUL bytes) and 10 queries."""
    passages = [*nul_texts(), *tiny_corpus(87, seed=5)]
    queries = [f"what is the {w} of the study" for w in ("dose", "risk", "effect", "trial", "gene")]
    return write_beir(tmp_path_factory.mktemp("ray") / "beir", passages, queries + [q.upper() for q in queries])


@pytest.fixture(scope="module")
def reference(corpus: Path, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> TeacherStore:
    """The single-process run of the same data: what a Ray run must equal."""
    store = tmp_path_factory.mktemp("reference") / "store"
    encoder = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))
    assert run(store, corpus, encoder).encoded == 100
    return TeacherStore.open(store)


def ray_config(store: Path, corpus: Path, tiny_bert: Path) -> PrecomputeConfig:
    return PrecomputeConfig(
        store=str(store),
        data=(f"beir:{corpus}",),
        teacher=TeacherConfig(model=str(tiny_bert)),
        progress=False,
        flush_rows=4,  # small chunks: a unit flushes chunks and index parts as it goes
        max_batch_size=4,  # several batches a unit: a kill can land mid-unit
    )


def assert_same_store(got: TeacherStore, want: TeacherStore) -> None:
    """Same fingerprint, same keys (each once), vectors within fp16 tolerance, same roles and token counts."""
    assert got.fingerprint == want.fingerprint
    assert got.rows == len(got) == len(want) and got.index.duplicates == 0
    np.testing.assert_array_equal(got.index.keys, want.index.keys)  # sorted unique keys, byte for byte
    np.testing.assert_allclose(got.get(want.index.keys), want.get(want.index.keys), atol=ATOL, rtol=0)
    np.testing.assert_array_equal(got.index.roles, want.index.roles)
    np.testing.assert_array_equal(got.index.n_tokens, want.index.n_tokens)
    report = verify_store(got)
    assert report.ok and not report.notes, (report.problems, report.notes)


@pytest.mark.timeout(180)
def test_ray_store_equals_a_single_process_run_and_a_rerun_encodes_nothing(
    ray_local: Any, corpus: Path, reference: TeacherStore, tiny_bert: Path, tmp_path: Path
) -> None:
    from precompute.ray_engine import precompute_ray

    config = ray_config(tmp_path / "store", corpus, tiny_bert)
    summary = precompute_ray(config, RayConfig(unit_rows=30, actors=1, actor_gpus=0))
    assert (summary.engine, summary.to_encode, summary.encoded, summary.texts_read) == ("ray", 100, 100, 100)
    assert len(summary.segments) == 4 and all("-ray" in s and s.endswith("-a0") for s in summary.segments)
    assert summary.tokens > 0 and summary.padded_tokens >= summary.tokens and summary.forward_calls >= 25
    store = TeacherStore.open(tmp_path / "store")
    assert_same_store(store, reference)
    nul = content_keys("passage", nul_texts())
    assert (nul.view(np.uint8).reshape(-1, 16) == 0).any(axis=1).all()  # each holds a NUL byte
    np.testing.assert_allclose(store.get(nul), reference.get(nul), atol=ATOL, rtol=0)  # NUL keys: stored exact

    again = precompute_ray(config, RayConfig(unit_rows=30, actors=1, actor_gpus=0))
    assert (again.to_encode, again.encoded, again.forward_calls, again.segments) == (0, 0, 0, [])
    assert again.already_stored == 100 and again.seconds < 10  # planned on the driver: no actor started
    assert TeacherStore.open(tmp_path / "store").rows == 100


@pytest.mark.timeout(300)
def test_killed_actors_lose_nothing_and_store_nothing_twice(
    ray_local: Any, corpus: Path, reference: TeacherStore, tiny_bert: Path, tmp_path: Path
) -> None:
    """An actor SIGKILLed in unit 1 once rows are flushed, another right after unit 2's commit: Ray restarts them
    and retries the units; unit 1's flushed rows are salvaged, unit 2's commit is reused, nothing is encoded into
    the store twice."""
    from precompute.ray_engine import precompute_ray

    markers = tmp_path / "kills"
    markers.mkdir()
    config = ray_config(tmp_path / "store", corpus, tiny_bert)
    hook = functools.partial(kill_once, str(markers))
    summary = precompute_ray(config, RayConfig(unit_rows=30, actors=1, actor_gpus=0), fault_hook=hook)
    assert sorted(p.name for p in markers.iterdir()) == ["appended-u1", "committed-u2"]  # both kills happened
    store = TeacherStore.open(tmp_path / "store")
    assert_same_store(store, reference)
    unit1 = sorted(s.seg_id for s in store.segments if "-u000001-" in s.seg_id)
    assert [s[-3:] for s in unit1] == ["-a0", "-a1"]  # the killed attempt's flushed rows, then the rest
    first = next(s for s in store.segments if s.seg_id == unit1[0])
    assert first.commit["salvaged"] and 0 < first.rows < 30
    unit2 = [s.seg_id for s in store.segments if "-u000002-" in s.seg_id]
    assert len(unit2) == 1 and unit2[0].endswith("-a0")  # committed before the kill: the retry reused it
    assert summary.encoded == 100 - first.rows - 30  # what the final attempts encoded; the rest was kept
    assert sorted(summary.segments) == sorted(s.seg_id for s in store.segments)


def test_cli_engine_ray(ray_local: Any, corpus: Path, reference: TeacherStore, tiny_bert: Path) -> None:
    """``ddx precompute-teacher --engine ray`` joins the running Ray; everything stored, it says so and exits."""
    args = ["precompute-teacher", "--engine", "ray", "--ray-unit-rows", "30", "--ray-actor-gpus", "0", "--no-progress"]
    args += ["--teacher", str(tiny_bert), "--store", reference.url, "--data", f"beir:{corpus}"]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    assert "read 100 texts, 100 distinct; 100 already stored; encoded 0" in out.output
    assert "nothing to encode: every text is already in the store" in out.output


def test_a_unit_in_process_retried_and_refused(corpus: Path, tiny_bert: Path, tmp_path: Path) -> None:
    """The actors' code without Ray (it imports none): a unit is one committed segment, a retry of it reuses that
    segment, and a teacher that loads with another spec than the store's is refused in one line, not a traceback."""
    from precompute.pipeline import PrecomputeSummary
    from precompute.plan import plan_texts
    from precompute.ray_engine import _add, _units
    from precompute.ray_workers import REPORT_SCHEMA, Job, TokenCounter, UnitEncoder
    from precompute.teacher import spec_from_files

    teacher = TeacherConfig(model=str(tiny_bert), device="cpu", dtype="float32")
    store = TeacherStore.create(tmp_path / "s", spec_from_files(teacher))
    plan = plan_texts(ray_config(tmp_path / "s", corpus, tiny_bert), store)
    job = Job("test", store.url, {}, 60.0, teacher, store.spec.to_dict(), "float16", 4, 60.0, None, 4)
    unit = TokenCounter(job)(_units(plan.table, 7)[2])
    first = UnitEncoder(job)(unit).to_pylist()
    assert [(r["unit"], r["encoded"], r["reused"], r["error"]) for r in first] == [(2, 7, 0, None)]
    retry = UnitEncoder(job)(unit).to_pylist()  # the same unit again, as Ray retries it
    assert [(r["encoded"], r["reused"], r["segments"]) for r in retry] == [(0, 7, first[0]["segments"])]
    assert first[0]["segments"][0].endswith("-ray" + "test-u000002-a0") and TeacherStore.open(store.url).rows == 7

    wrong = Job(**{**job.__dict__, "spec": {**job.spec, "padding_side": "left"}})
    (refused,) = UnitEncoder(wrong)(unit).to_pylist()
    assert re.fullmatch(
        r"Teacher '.*' loaded with fingerprint \w+, but its files gave \w+ \(the store's\): "
        r"padding_side 'right' != 'left'\. Pass the differing fields as options .*",
        refused["error"],
    )
    with pytest.raises(DdxError, match=r"padding_side 'right' != 'left'.* \(Ray unit 2; units finished so far"):
        _add(PrecomputeSummary(store.url, store.fingerprint, 0, 1), refused)
    assert REPORT_SCHEMA.field("error").type == pa.string()


def test_engine_ray_without_ray_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: "import ray" raises ImportError
    folder = write_beir(tmp_path / "d", ["a passage"])
    args = ["precompute-teacher", "--engine", "ray", "--teacher", "x", "--store", str(tmp_path / "s")]
    out = CliRunner().invoke(cli, [*args, "--data", f"beir:{folder}"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert out.output == "Error: --engine ray needs Ray Data (ray is not installed): pip install 'ddx[ray]'\n"


def test_engine_ray_refuses_a_rank_slice(tmp_path: Path) -> None:
    pytest.importorskip("ray")
    from precompute.ray_engine import precompute_ray

    folder = write_beir(tmp_path / "d", ["a passage"])
    config = PrecomputeConfig(
        store=str(tmp_path / "s"), data=(f"beir:{folder}",), teacher=TeacherConfig(model="x"), rank=0, world_size=2
    )
    with pytest.raises(Exception, match=r"--rank/--world-size pick one slice for the local engine"):
        precompute_ray(config)


def test_ray_stays_an_optional_import() -> None:
    """``import precompute`` (every module of it, the Ray engine's included) and ``ddx --help`` load no Ray."""
    code = (
        "import sys, pkgutil, importlib, precompute\n"
        "for m in pkgutil.walk_packages(precompute.__path__, 'precompute.'): importlib.import_module(m.name)\n"
        "from click.testing import CliRunner\n"
        "from cli.main import cli\n"
        "assert CliRunner().invoke(cli, ['--help']).exit_code == 0\n"
        "assert CliRunner().invoke(cli, ['precompute-teacher', '--help']).exit_code == 0\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
