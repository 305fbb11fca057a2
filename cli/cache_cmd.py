"""``ddx cache``: list, describe, verify, clean and compact teacher stores."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import click

from cli.options import echo_json, library_errors, store_access_options

STORE = click.argument("store")
AS_JSON = click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
DUPLICATES = click.option(
    "--duplicates",
    is_flag=True,
    help="Also count distinct keys and rows repeated across segments (loads every key; else only COMMITs are read).",
)


@click.group("cache")
def cache() -> None:
    """Inspect, verify, clean and compact a teacher store.

    \b
    Example:
        ddx cache ls stores/gte7b
        ddx cache verify stores/gte7b
    """


def _open(store: str):  # -> TeacherStore
    from storage.store import TeacherStore

    return TeacherStore.open(store)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


@cache.command("ls")
@STORE
@store_access_options
@AS_JSON
@DUPLICATES
@library_errors
def ls(store: str, as_json: bool, duplicates: bool) -> None:
    """List a store's segments: rows per role, size, when committed; and its teacher.

    \b
    Example:
        ddx cache ls stores/gte7b
    """
    from storage.maintenance import store_info

    info = store_info(_open(store), duplicates=duplicates)
    if as_json:
        echo_json(info)
        return
    spec = info["teacher_spec"]
    click.echo(
        f"{info['store']}: {spec['model']} ({info['dim']}-d, {spec['pooling']} pooling, "
        f"{info['storage_dtype']}), fingerprint {info['fingerprint']}"
    )
    click.echo(f"{'segment':<48} {'passages':>10} {'queries':>9} {'size':>11}  committed")
    for s in info["segments"]:
        when = datetime.fromtimestamp(s["committed_at"], tz=UTC).strftime("%Y-%m-%d %H:%M")
        flag = " (resumed)" if s["salvaged"] else ""
        click.echo(
            f"{s['id']:<48} {s['roles']['passage']:>10,} {s['roles']['query']:>9,} {_size(s['bytes']):>11}  "
            f"{when}{flag}"
        )
    for u in info["uncommitted"]:
        click.echo(f"{u['id']:<48} {'(uncommitted: ' + u['state'] + ')':>32}")
    for r in info["replaced"]:
        click.echo(f"{r:<48} (replaced by a compaction, not read; 'ddx cache gc' removes it)")
    click.echo(
        f"total: {info['roles']['passage']:,} passages, {info['roles']['query']:,} queries, {_size(info['bytes'])}"
    )


@cache.command("info")
@STORE
@store_access_options
@AS_JSON
@DUPLICATES
@library_errors
def info(store: str, as_json: bool, duplicates: bool) -> None:
    """Show a store's teacher spec, fingerprint, totals and format.

    \b
    Example:
        ddx cache info stores/gte7b --json
    """
    from storage.maintenance import store_info

    data = store_info(_open(store), duplicates=duplicates)
    if as_json:
        echo_json(data)
        return
    click.echo(f"store:        {data['store']}")
    click.echo(f"format:       {data['format_version']}   vectors: {data['dim']}-d {data['storage_dtype']}")
    click.echo(f"fingerprint:  {data['fingerprint']}")
    for key, value in data["teacher_spec"].items():
        click.echo(f"  {key + ':':<16}{value!r}")
    click.echo(
        f"rows:         {data['rows']:,} ({data['roles']['passage']:,} passages, {data['roles']['query']:,} "
        f"queries) in {len(data['segments'])} segments, {_size(data['bytes'])}"
    )
    if data["keys"] is not None:
        click.echo(f"keys:         {data['keys']:,} distinct")
    if data["duplicate_rows"]:
        click.echo(f"duplicates:   {data['duplicate_rows']:,} rows repeat an earlier segment's key (harmless)")


@cache.command("verify")
@STORE
@store_access_options
@AS_JSON
@library_errors
def verify(store: str, as_json: bool) -> None:
    """Check every file readers trust (metadata, index, chunks, row checksums); exit status 1 on damage.

    Each problem names the damaged file below the store. It works on a store too damaged to open.

    \b
    Example:
        ddx cache verify stores/gte7b || echo "store damaged"
    """
    from storage.maintenance import verify_store

    report = verify_store(store)
    if as_json:
        echo_json(report.to_dict())
    else:
        for note in report.notes:
            click.echo(f"note: {note}", err=True)
        for problem in report.problems:
            click.echo(f"DAMAGED: {problem}", err=True)
        state = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(f"{state}: {report.segments} segments, {report.rows:,} rows, {report.chunks} chunks checked")
    if not report.ok:
        sys.exit(1)


@cache.command("gc")
@STORE
@store_access_options
@click.option("--dry-run", is_flag=True, help="Only list what would be salvaged or removed.")
@click.option(
    "--force",
    "force",
    multiple=True,
    metavar="[SEGMENT]",
    is_flag=False,
    flag_value="*",
    help="Treat these segments' writers (no value: every uncommitted segment's) as dead though a remote "
    "heartbeat is recent: for a writer known killed. A local writer's lock is still obeyed.",
)
@AS_JSON
@library_errors
def gc(store: str, dry_run: bool, force: tuple[str, ...], as_json: bool) -> None:
    """Salvage crashed runs' rows, remove their empty leftovers (running writers and committed data are kept).

    \b
    Example:
        ddx cache gc stores/gte7b --dry-run
        ddx cache gc s3://bucket/gte7b --force          # the job that wrote it was killed a minute ago
    """
    from storage.maintenance import gc_store

    forced: bool | set[str] = True if "*" in force else set(force)
    done = gc_store(_open(store), dry_run=dry_run, force=forced or False)
    removed = [d for d in done if d["action"] == "removed"]
    salvaged = [d for d in done if d["action"] == "salvaged"]
    damaged = [d for d in done if d["action"] == "damaged"]
    if as_json:
        echo_json({"dry_run": dry_run, "removed": removed, "salvaged": salvaged, "damaged": damaged})
        return
    rm, sv = ("would remove", "would salvage") if dry_run else ("removed", "salvaged")
    for d in removed:
        click.echo(f"{rm} {d['id']} ({_size(d['bytes'])})")
    for d in salvaged:
        click.echo(f"{sv} {d['id']}: {d['rows']:,} rows kept")
    for d in damaged:
        click.echo(f"DAMAGED {d['id']}: {d.get('detail') or 'its index is unreadable'} (left in place)", err=True)
    tail = f", {len(damaged)} damaged left in place" if damaged else ""
    click.echo(
        f"{rm} {len(removed)} empty segment(s), {sv} {len(salvaged)} ({sum(d['rows'] for d in salvaged):,} rows){tail}"
    )


@cache.command("compact")
@STORE
@store_access_options
@click.option(
    "--target-rows",
    type=click.IntRange(min=1),
    default=None,
    help="Most rows of a merged segment; segments this large or larger are left as they are "
    "[default: ~2 GiB of vectors, in whole chunks].",
)
@click.option("--dry-run", is_flag=True, help="Only list the segments that would be merged.")
@AS_JSON
@library_errors
def compact(store: str, target_rows: int | None, dry_run: bool, as_json: bool) -> None:
    """Merge many small committed segments into fewer large ones (open cost grows with segments).

    Crash-safe: the merged segment is committed before its sources are removed, readers never see a
    row twice, and a killed compaction is finished by the next one (or 'ddx cache gc'). Run it between
    jobs: a reader that opened the store before must reopen it once the old segments are gone.

    \b
    Example:
        ddx cache compact stores/gte7b --dry-run
        ddx cache compact s3://bucket/gte7b
    """
    from storage.compact import compact_store

    report = compact_store(_open(store), target_rows=target_rows, dry_run=dry_run)
    if as_json:
        echo_json(report.to_dict())
        return
    verb = "would merge" if dry_run else "merged"
    for m in report.merged:
        into = "" if m["segment"] is None else f" into {m['segment']}"
        click.echo(f"{verb} {len(m['sources'])} segments ({m['rows']:,} rows){into}")
    if report.skipped:
        click.echo(f"skipped {len(report.skipped)} segment(s) held by another process (rerun later)", err=True)
    click.echo(
        f"{report.segments_before} segment(s) -> {report.segments_after}"
        + (f"; removed {len(report.removed)} merged or replaced segment(s)" if report.removed else "")
    )
