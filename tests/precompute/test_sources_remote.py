"""Sources on S3 (moto's real S3 API on 127.0.0.1): the same records as the local copy, downloaded once, fetched again
when the remote changes, one-line errors naming the URL; and a precompute from ``beir:s3://...``."""

from __future__ import annotations

import gzip
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from precompute.sources import Source, SourceOptions, parse_source
from precompute.sources import remote as remote_module
from precompute.sources.errors import BadSourceError
from precompute.sources.remote import is_remote, local_path, storage_overrides
from tests.storage.s3 import S3

PASSAGES = [
    {"_id": "d1", "title": "Pipes", "text": 'A 6" pipe carries "water".'},
    {"_id": "d2", "title": "", "text": "Tabs\tand unicode: café, 東京."},
    {"_id": "d3", "title": "Hello", "text": "World."},
]
QUERIES = [{"_id": "q1", "text": "what is a pipe"}, {"_id": "q2", "text": "where is Tokyo"}]


def write_beir_folder(folder: Path) -> Path:
    """A BEIR folder with every file the kind reads (two qrels splits, gzipped hard negatives) and one it does not."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PASSAGES), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUERIES), encoding="utf-8")
    (folder / "qrels" / "test.tsv").write_bytes(b"query-id\tcorpus-id\tscore\r\nq1\td1\t2\r\n")
    (folder / "qrels" / "train.tsv").write_bytes(b"q2\td2\t1\nq2\td3\t0\n")
    with gzip.open(folder / "hard_negatives.jsonl.gz", "wt") as f:
        f.write(json.dumps({"query-id": "q2", "pos": ["d2"], "neg": ["d3", "d1"]}) + "\n")
    (folder / "notes.md").write_text("not read by beir:\n")
    return folder


def write_marco_folder(root: Path) -> Path:
    """An MS MARCO folder: collection, queries, qrels, id triples (gzipped), text triples in a subfolder, a README."""
    (root / "triplets").mkdir(parents=True)
    (root / "collection.tsv").write_text('0\t"Hello," he said.\n1\tA carriage\rreturn.\n2\tPlain.\n', newline="")
    (root / "queries.train.tsv").write_text("10\twhat is a pipe\n11\twho said hello\n")
    (root / "qrels.train.tsv").write_text("10\t0\t1\t1\n11\t0\t0\t1\n")
    with gzip.open(root / "qidpidtriples.train.full.tsv.gz", "wt") as f:
        f.write("10\t1\t2\n10\t1\t0\n11\t0\t2\n")
    (root / "triplets" / "raw.tsv").write_text("a query\ta positive\ta negative\n")
    (root / "README.txt").write_text("not a data file\n")
    return root


def upload(s3: S3, local: Path, url: str) -> None:
    """``local`` (a file, or a folder's files) to ``url`` on the test bucket."""
    fs, base = s3.filesystem(), url.removeprefix("s3://")
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:
        fs.pipe_file(base if p == local else f"{base}/{p.relative_to(local).as_posix()}", p.read_bytes())


def contents(src: Source) -> dict[str, Any]:
    """Everything a source gives: texts (records and blocks), splits, qrels and examples of each split."""
    splits = src.splits()
    blocks = [(b.role, b.ids, b.texts) for b in src.iter_text_blocks()]
    return {
        "texts": [(r.role, r.id, r.text) for r in src.iter_texts()],
        "blocks": blocks,
        "splits": splits,
        "qrels": {s: src.qrels(s) for s in splits},
        "examples": {s: list(src.training_examples(s)) for s in [None, *splits]},
    }


@pytest.fixture
def fetches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Remote paths downloaded (each call of the mirror's one download function)."""
    seen: list[str] = []
    fetch = remote_module._fetch

    def counting(fs: Any, rpath: str, lpath: Path, bar: Any) -> None:
        seen.append(rpath.rsplit("/", 1)[-1])
        fetch(fs, rpath, lpath, bar)

    monkeypatch.setattr(remote_module, "_fetch", counting)
    return seen


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# -- same records as the local copy -----------------------------------------------------------------------------


def test_beir_on_s3_gives_what_the_local_folder_gives(s3: S3, tmp_path: Path, fetches: list[str]) -> None:
    local = write_beir_folder(tmp_path / "scifact")
    url = s3.url("beir") + "/scifact"
    upload(s3, local, url)
    src = parse_source(f"beir:{url}")
    expected = contents(parse_source(f"beir:{local}"))
    assert contents(src) == expected
    assert expected["examples"]["train"][0].negative_ids == ("d3", "d1")  # the gzipped hard negatives were read
    assert (src.location, src.name, src.spec) == (url, "scifact", f"beir:{url}")
    assert src.mirror is not None and src.mirror.name == "scifact" and not (src.mirror / "notes.md").exists()
    assert sorted(fetches) == ["corpus.jsonl", "hard_negatives.jsonl.gz", "queries.jsonl", "test.tsv", "train.tsv"]


def test_msmarco_on_s3_gives_what_the_local_folder_gives(s3: S3, tmp_path: Path) -> None:
    local = write_marco_folder(tmp_path / "marco")
    url = s3.url("marco")
    upload(s3, local, url)
    src = parse_source(f"msmarco:{url}")
    assert contents(src) == contents(parse_source(f"msmarco:{local}"))
    assert [(f.role, f.path.name) for f in src.files][-1] == ("triples", "raw.tsv")  # folder names kept
    assert src.mirror is not None and not (src.mirror / "README.txt").exists()
    one = parse_source(f"msmarco:{url}/triplets/raw.tsv")  # a file whose role its folder's name says
    assert contents(one) == contents(parse_source(f"msmarco:{local / 'triplets' / 'raw.tsv'}"))


def test_jsonl_file_on_s3_with_column_parameters(s3: S3, tmp_path: Path) -> None:
    rows = [{"question": "q one", "answer": "a one", "neg": "n one"}, {"question": "q two", "answer": "a two"}]
    local = tmp_path / "pairs.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    url = s3.url("tables") + "/pairs.jsonl"
    upload(s3, local, url)
    params = "?query=question&positive=answer&negative=neg"
    src = parse_source(f"jsonl:{url}{params}")
    assert contents(src) == contents(parse_source(f"jsonl:{local}{params}"))
    assert src.layouts["train"].kind == "pairs" and src.mirror is not None and src.mirror.is_file()


def test_another_fsspec_filesystem_works_the_same(tmp_path: Path) -> None:
    """Nothing here is S3-specific: the in-memory filesystem stands for gs://, az://, ..."""
    import fsspec

    local = write_beir_folder(tmp_path / "scifact")
    fs = fsspec.filesystem("memory")
    for p in (p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"/ddx-remote-test/scifact/{p.relative_to(local).as_posix()}", p.read_bytes())
    try:
        got = contents(parse_source("beir:memory://ddx-remote-test/scifact"))
    finally:
        fs.rm("/ddx-remote-test", recursive=True)
    assert got == contents(parse_source(f"beir:{local}"))


def test_a_file_on_a_web_server(tmp_path: Path, fetches: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP gives no ETag here: size and Last-Modified sign the file. Also runs the download bar's path."""
    import functools
    import http.server

    local = tmp_path / "site" / "pairs.jsonl"
    local.parent.mkdir()
    local.write_text(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n", encoding="utf-8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(local.parent))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(remote_module, "PROGRESS_BYTES", 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/pairs.jsonl"
        assert contents(parse_source(f"jsonl:{url}")) == contents(parse_source(f"jsonl:{local}"))
        parse_source(f"jsonl:{url}")
        assert fetches == ["pairs.jsonl"]
    finally:
        server.shutdown()
        server.server_close()


# -- downloaded once, again when changed ------------------------------------------------------------------------


def test_second_parse_downloads_nothing_and_a_change_is_fetched_again(
    s3: S3, tmp_path: Path, fetches: list[str]
) -> None:
    local = write_beir_folder(tmp_path / "scifact")
    url = s3.url("beir")
    upload(s3, local, url)
    first = parse_source(f"beir:{url}")
    assert first.mirror is not None
    before, n = mtimes(first.mirror), len(fetches)
    assert n == 5
    second = parse_source(f"beir:{url}")
    assert (second.mirror, len(fetches), mtimes(first.mirror)) == (first.mirror, n, before)

    # the corpus changes (same size: the ETag tells), queries go, a split comes
    fs = s3.filesystem()
    corpus = (local / "corpus.jsonl").read_text(encoding="utf-8")
    fs.pipe_file(f"{url[5:]}/corpus.jsonl", corpus.replace("World.", "Earth.").encode())
    fs.rm_file(f"{url[5:]}/queries.jsonl")
    fs.pipe_file(f"{url[5:]}/qrels/dev.tsv", b"q1\td3\t1\n")
    third = parse_source(f"beir:{url}")
    assert sorted(fetches[n:]) == ["corpus.jsonl", "dev.tsv"]
    assert {r.text for r in third.iter_texts("passage")} >= {"Hello Earth."}
    assert list(third.iter_texts("query")) == [] and not (first.mirror / "queries.jsonl").exists()
    assert third.splits() == ["dev", "test", "train"]


def test_a_damaged_or_half_written_local_copy_is_fetched_again(s3: S3, tmp_path: Path, fetches: list[str]) -> None:
    local = write_beir_folder(tmp_path / "scifact")
    url = s3.url("beir")
    upload(s3, local, url)
    mirror = parse_source(f"beir:{url}").mirror
    assert mirror is not None
    expected, n = contents(parse_source(f"beir:{local}")), len(fetches)
    with open(mirror / "corpus.jsonl", "r+b") as f:  # cut short, as a crash mid-copy would have left it
        f.truncate(10)
    (mirror.parents[2] / "tmp" / "dead").mkdir(parents=True)  # a crashed download's leftovers
    (mirror.parents[2] / "tmp" / "dead" / "0.part").write_bytes(b"half")
    assert contents(parse_source(f"beir:{url}")) == expected
    assert fetches[n:] == ["corpus.jsonl"] and not (mirror.parents[2] / "tmp").exists()


def test_ranks_mirroring_at_once_download_each_file_once(s3: S3, tmp_path: Path, fetches: list[str]) -> None:
    local = write_beir_folder(tmp_path / "scifact")
    url = s3.url("beir")
    upload(s3, local, url)
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(contents(parse_source(f"beir:{url}")))) for _ in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r == results[0] for r in results)
    assert len(fetches) == 5


# -- errors: one line, naming the URL ---------------------------------------------------------------------------


def test_a_missing_remote_path_is_one_line_naming_the_url(s3: S3) -> None:
    url = s3.url("absent") + "/scifact"
    with pytest.raises(BadSourceError) as info:
        parse_source(f"beir:{url}")
    message = str(info.value)
    assert message.startswith(f"No such file or folder '{url}' (beir: expects a BEIR folder") and "\n" not in message
    with pytest.raises(BadSourceError, match=r"'s3://.*/corpus.jsonl' is a file, but beir: expects a BEIR folder"):
        local = s3.url("file") + "/corpus.jsonl"
        s3.filesystem().pipe_file(local[5:], b"{}\n")
        parse_source(f"beir:{local}")


def test_a_bad_line_is_named_by_its_url(s3: S3, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "corpus.jsonl").write_text('{"_id": "1", "text": "fine"}\n{"text": "no id"}\n')
    url = s3.url("bad")
    upload(s3, folder, url)
    with pytest.raises(BadSourceError, match=rf"^{url}/corpus\.jsonl:2: missing '_id'"):
        list(parse_source(f"beir:{url}").iter_texts())
    lenient = parse_source(f"beir:{url}", SourceOptions(skip_bad=True))
    assert [r.id for r in lenient.iter_texts()] == ["1"]
    assert lenient.bad == [f"{url}/corpus.jsonl:2: missing '_id'"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_endpoint_is_one_line_and_spec_options_override(
    s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = write_beir_folder(tmp_path / "scifact")
    url = s3.url("beir")
    upload(s3, local, url)
    dead = f"http://127.0.0.1:{_closed_port()}"
    fail_fast = "storage.config_kwargs.retries.max_attempts=1&storage.config_kwargs.connect_timeout=2"
    with pytest.raises(BadSourceError) as info:
        parse_source(f"beir:{url}?storage.endpoint_url={dead}&{fail_fast}")
    message = str(info.value)
    assert message.startswith(f"beir: {url}: cannot reach the endpoint") and "\n" not in message
    assert "--storage-options" in message

    # without the environment's endpoint, the spec's own storage options reach the server
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    src = parse_source(f"beir:{url}?storage.endpoint_url={s3.endpoint_url}")
    assert contents(src) == contents(parse_source(f"beir:{local}"))


def test_missing_backend_and_misplaced_storage_options_are_clear(tmp_path: Path) -> None:
    with pytest.raises(BadSourceError, match=r"unknown protocol 'nosuchfs' in nosuchfs://x/y"):
        parse_source("beir:nosuchfs://x/y")
    with pytest.raises(BadSourceError, match=r"\?storage\.\* parameters are for remote locations"):
        parse_source(f"beir:{tmp_path}?storage.anon=true")


def test_location_helpers() -> None:
    assert [is_remote(x) for x in ("s3://b/x", "memory://x", "simplecache::s3://b/x", "data/x", "file:///tmp/x")] == [
        True,
        True,
        True,
        False,
        False,
    ]
    assert not is_remote("BeIR/scifact:corpus") and not is_remote("sentence-transformers/all-nli::train")
    assert local_path("file:///tmp/x") == "/tmp/x" and local_path("data/x") == "data/x"
    assert storage_overrides({"storage.anon": "true", "storage.client_kwargs.region_name": "eu", "query": "q"}) == {
        "anon": True,
        "client_kwargs": {"region_name": "eu"},
    }


def test_file_urls_are_local_paths(tmp_path: Path) -> None:
    local = write_beir_folder(tmp_path / "scifact")
    src = parse_source(f"beir:file://{local}")
    assert src.mirror is None and contents(src) == contents(parse_source(f"beir:{local}"))


# -- end to end -------------------------------------------------------------------------------------------------


def test_precompute_from_s3_encodes_the_keys_of_the_local_folder(s3: S3, tmp_path: Path, tiny_bert: Path) -> None:
    from precompute.pipeline import PrecomputeConfig, precompute
    from precompute.teacher import TeacherConfig, load_teacher
    from storage.store import TeacherStore

    local = write_beir_folder(tmp_path / "scifact")
    url = s3.url("beir") + "/scifact"
    upload(s3, local, url)
    encoder = load_teacher(TeacherConfig(model=str(tiny_bert), device="cpu"))
    keys = []
    for name, spec in (("local", f"beir:{local}"), ("remote", f"beir:{url}")):
        config = PrecomputeConfig(
            store=str(tmp_path / name), data=(spec,), teacher=TeacherConfig(model=str(tiny_bert)), progress=False
        )
        summary = precompute(config, encoder=encoder)
        assert summary.encoded == len(PASSAGES) + len(QUERIES)
        keys.append(TeacherStore.open(tmp_path / name).index.keys.tobytes())
    assert keys[0] == keys[1]
