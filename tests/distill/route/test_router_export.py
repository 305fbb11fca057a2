"""The exported routed model: loads in a fresh process, routes as the router says, refuses a wrong teacher."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill.route.routed_model import RouterExportConfig, export_routed
from storage.errors import DdxError, FingerprintMismatchError
from tests.distill.conftest import fit_tiny_router

ROOT = Path(__file__).resolve().parents[3]

LOAD_AND_ENCODE = """
import json, sys
import numpy as np
from sentence_transformers import SentenceTransformer

path, texts_file, out = sys.argv[1:4]
texts = json.loads(open(texts_file).read())
try:
    SentenceTransformer(path, device="cpu")
    refused = ""
except ValueError as exc:
    refused = str(exc)
model = SentenceTransformer(path, device="cpu", trust_remote_code=True)
routed = model[0]
planned = routed.route(texts["queries"])
queries = model.encode_query(texts["queries"], batch_size=len(texts["queries"]))
last = dict(zip(routed.last_texts, routed.last_decisions.tolist()))
passages = model.encode_document(texts["passages"])
np.save(out + "/queries.npy", queries)
np.save(out + "/passages.npy", passages)
json.dump(
    {
        "planned": planned.tolist(),
        "last": [last[t] for t in texts["queries"]],
        "threshold": routed.threshold,
        "usage": routed.teacher_usage,
        "dim": model.get_embedding_dimension(),
        "refused": refused,
    },
    open(out + "/result.json", "w"),
)
"""


@pytest.fixture(scope="module")
def router_dir(phase1_run, teacher_store, corpus, tmp_path_factory) -> str:
    return fit_tiny_router(phase1_run, teacher_store, corpus, tmp_path_factory, kinds=("encoder",))


def test_exported_model_loads_in_a_fresh_process_and_routes(phase1_run, router_dir, corpus, tiny_qwen2, tmp_path):
    from sentence_transformers import SentenceTransformer

    from precompute.teacher import TeacherConfig, load_teacher

    out = export_routed(
        RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), teacher_usage=0.5, out=str(tmp_path / "routed"))
    )
    queries, passages = list(corpus.queries.values()), list(corpus.passages.values())[:6]
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps({"queries": queries, "passages": passages}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_AND_ENCODE, out["out"], str(texts_file), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    got_q, got_p = np.load(tmp_path / "queries.npy"), np.load(tmp_path / "passages.npy")
    routed = np.array(result["planned"])
    assert result["last"] == result["planned"] and 0 < routed.sum() < len(queries)  # both kinds of query
    assert result["usage"] == 0.5 and result["dim"] == 48 and "trust_remote_code=True" in result["refused"]
    hybrid = SentenceTransformer(str(Path(phase1_run.out) / "hybrid"), device="cpu").encode(queries)
    teacher = load_teacher(TeacherConfig(model=str(tiny_qwen2), device="cpu"))
    assert np.allclose(got_q[~routed], hybrid[~routed], atol=1e-5)  # routed out: student + projection
    assert np.allclose(
        got_q[routed], teacher.encode([q for q, r in zip(queries, routed, strict=True) if r], "query"), atol=1e-5
    )
    assert np.allclose(got_p, teacher.encode(passages, "passage"), atol=1e-5)  # passages: always the teacher


def test_threshold_and_usage_change_after_loading(router_dir, corpus, tiny_qwen2, tmp_path):
    from sentence_transformers import SentenceTransformer

    path = export_routed(
        RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), threshold=1e9, out=str(tmp_path / "m"))
    )["out"]
    routed = SentenceTransformer(path, device="cpu", trust_remote_code=True)[0]
    queries = list(corpus.queries.values())
    assert routed.teacher_usage is None and routed.threshold == 1e9 and not routed.route(queries).any()
    routed.teacher_usage = 1.0
    assert routed.route(queries).all() and routed.threshold == float("-inf")
    routed.teacher_usage = 0.0
    assert not routed.route(queries).any()
    with pytest.raises(DdxError, match=r"Teacher usage must be a fraction in \[0, 1\]"):
        routed.teacher_usage = 1.2


def test_export_refuses_a_teacher_that_did_not_write_the_store(router_dir, tiny_bert, tiny_qwen2, tmp_path):
    with pytest.raises(FingerprintMismatchError, match=r"does not match the store the router was fitted on"):
        export_routed(RouterExportConfig(router=router_dir, teacher=str(tiny_bert), out=str(tmp_path / "m")))
    ok = RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), out=str(tmp_path / "ok"))
    path = export_routed(ok)["out"]
    config = json.loads((Path(path) / "routed_config.json").read_text())
    (Path(path) / "routed_config.json").write_text(json.dumps({**config, "teacher": str(tiny_bert)}))
    from sentence_transformers import SentenceTransformer

    with pytest.raises(FingerprintMismatchError, match="does not match the store"):  # checked again on load
        SentenceTransformer(path, device="cpu", trust_remote_code=True)


def test_export_bad_budget_and_another_run_are_refused(phase1_run, router_dir, tiny_qwen2, tmp_path):
    for usage in (1.5, -0.1):
        with pytest.raises(DdxError, match=r"Teacher usage must be a fraction in \[0, 1\]"):
            RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), teacher_usage=usage, out="x")
    with pytest.raises(DdxError, match="not both"):
        RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), teacher_usage=0.2, threshold=0.1, out="x")
    run = tmp_path / "other-run"
    shutil.copytree(phase1_run.out, run)
    (run / "projection_layer.pt").write_bytes((run / "projection_layer.pt").read_bytes() + b"\0")
    with pytest.raises(FingerprintMismatchError, match="is not the student router"):
        export_routed(
            RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), model=str(run), out=str(tmp_path / "m"))
        )


def test_a_folder_exported_before_the_split_of_distill_still_loads(router_dir, tiny_qwen2, tmp_path):
    """modules.json records the module's class path; folders exported before distill/ was split into rooms name
    ``distill.routed_model.RoutedEncoder``, which the alias module distill/routed_model.py keeps importable."""
    from sentence_transformers import SentenceTransformer

    from distill.route.routed_model import RoutedEncoder

    config = RouterExportConfig(router=router_dir, teacher=str(tiny_qwen2), threshold=1e9, out=str(tmp_path / "m"))
    path = Path(export_routed(config)["out"])
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["distill.route.routed_model.RoutedEncoder"]
    old = [{**m, "type": "distill.routed_model.RoutedEncoder"} for m in modules]
    (path / "modules.json").write_text(json.dumps(old))
    assert isinstance(SentenceTransformer(str(path), device="cpu", trust_remote_code=True)[0], RoutedEncoder)
