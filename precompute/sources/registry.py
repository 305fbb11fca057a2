"""Source specs (``KIND:LOCATION[?k=v&...]``) to :class:`Source` objects.

=============  =============================================  ==========================================
kind           location                                       reads
=============  =============================================  ==========================================
``beir``       folder                                         corpus.jsonl, queries.jsonl, qrels/*.tsv
``msmarco``    folder or file                                 collection, queries, qrels, triples, ...
``hotpotqa``   file or folder                                 IRCoT / hotpot_qa questions + paragraphs
``nq``         file or folder                                 DPR-style NQ (positive/hard negative ctxs)
``hf``         ``NAME[:CONFIG][:SPLIT]`` or a local path      Hugging Face datasets
``jsonl``      file                                           one table, named or default columns
``parquet``    file                                           one table
``csv``        file                                           one table (quoted CSV)
``tsv``        file                                           one table (no quoting; header line)
=============  =============================================  ==========================================

The ``?k=v&k=v`` suffix sets, for this source only: column fields (``query=question``; table kinds
``hf``/``jsonl``/``parquet``/``csv``/``tsv``), merged over ``SourceOptions.columns``; ``layout`` and,
for files, ``split``; and for any kind ``skip_bad=1`` and ``title_join=...``.

A location may be a URL of any fsspec filesystem (``beir:s3://bucket/scifact``, ``jsonl:gs://b/pairs.jsonl``,
``msmarco:https://host/collection.tsv``): it is read from a local copy kept up to date in ``$DDX_CACHE_DIR/sources``
(:mod:`.remote`), with the storage options of ``--storage-options`` and, for that source only, any
``?storage.KEY=VALUE`` parameters (``?storage.anon=true``, ``?storage.client_kwargs.region_name=eu-west-1``).
Secrets belong in ``--storage-options`` or the provider's environment, not in a spec: specs are recorded in
summaries and stores.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qsl

from .base import Source, SourceOptions
from .beir import BeirSource
from .errors import BadSourceError
from .hf import HFSource
from .hotpotqa import HotpotQASource
from .layout import FIELDS
from .msmarco import MsMarcoSource
from .nq import NQSource
from .remote import STORAGE_PARAM, is_remote, local_path, mirror, storage_overrides
from .table import TableSource
from .tabular import CsvSource, JsonlSource, ParquetSource, TsvSource

__all__ = ["SOURCE_KINDS", "parse_source", "split_spec"]

SOURCE_KINDS: Mapping[str, type[Source]] = MappingProxyType(
    {
        cls.kind: cls
        for cls in (
            BeirSource,
            MsMarcoSource,
            HotpotQASource,
            NQSource,
            HFSource,
            JsonlSource,
            ParquetSource,
            CsvSource,
            TsvSource,
        )
    }
)
COMMON_PARAMS = ("skip_bad", "title_join")
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def split_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """(kind, location, params) of ``KIND:LOCATION[?k=v&...]``.

    A ``?`` starts parameters only when what follows it holds an ``=`` (a path may contain ``?``).

    Raises:
        BadSourceError: no ``KIND:``, an unknown kind, an empty location or malformed parameters.

    Example:
        >>> split_spec("jsonl:my.jsonl?query=question&positive=answer")
        ('jsonl', 'my.jsonl', {'query': 'question', 'positive': 'answer'})
    """
    kind, sep, rest = spec.partition(":")
    kinds = ", ".join(SOURCE_KINDS)
    if not sep or kind not in SOURCE_KINDS:
        raise BadSourceError(
            f"Unknown source kind {kind if sep else ''!r} in {spec!r}; kinds are {kinds}. "
            "Write KIND:LOCATION, e.g. beir:data/scifact or jsonl:pairs.jsonl?query=question."
        )
    location, query = rest, ""
    head, q, tail = rest.rpartition("?")
    if q and "=" in tail:
        location, query = head, tail
    if not location.strip():
        raise BadSourceError(f"Source {spec!r} names no location; write {kind}:PATH.")
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as e:
        raise BadSourceError(f"Malformed parameters {query!r} in {spec!r}: {e}. Write ?key=value&key=value.") from e
    return kind, location, params


def parse_source(spec: str, options: SourceOptions | None = None) -> Source:
    """The source a spec names, with its ``?`` parameters applied over ``options``.

    Args:
        spec: ``KIND:LOCATION[?k=v&...]``, e.g. ``beir:data/scifact`` or ``hf:BeIR/scifact:corpus``.
        options: options shared by the run's sources (defaults when None).

    Returns:
        The opened source; its files are checked (exist, right kind, recognisable layout) now. A remote location
        is copied (or its copy brought up to date) first, and ``source.mirror`` names the copy.

    Raises:
        BadSourceError: unknown kind or parameter, missing path, file vs folder mix-up, unknown layout; for a
            remote location also a network or credential failure, or no fsspec backend for its protocol.

    Example:
        >>> src = parse_source("jsonl:pairs.jsonl?query=question&positive=answer")
        >>> src.layouts["train"].kind
        'pairs'
    """
    kind, location, params = split_spec(spec)
    storage = storage_overrides(params)
    params = {k: v for k, v in params.items() if not k.startswith(STORAGE_PARAM)}
    cls = SOURCE_KINDS[kind]
    is_table = issubclass(cls, TableSource)
    extra = getattr(cls, "PARAMS", ()) if is_table else ()
    allowed = (*COMMON_PARAMS, *extra, *(FIELDS if is_table else ()))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise BadSourceError(
            f"{kind}: does not take parameter(s) {unknown} (in {spec!r}); it takes {list(allowed)} "
            "and, for a remote location, storage.KEY=VALUE."
        )
    options = _apply(options or SourceOptions(), params, spec)
    remote = is_remote(location)
    local = str(mirror(location, storage, wanted=cls.reads_file, kind=kind)) if remote else local_path(location)
    if storage and not remote:
        raise BadSourceError(f"{spec!r}: ?storage.* parameters are for remote locations (s3://, gs://, ...) only.")
    if issubclass(cls, TableSource):
        source: Source = cls(spec, local, options, params={k: v for k, v in params.items() if k in extra})
    else:
        source = cls(spec, local, options)
    if remote:  # named by its URL; read from its copy
        source.location, source.mirror = location, Path(local)
    return source


def _apply(options: SourceOptions, params: Mapping[str, str], spec: str) -> SourceOptions:
    changes: dict[str, Any] = {}
    columns = {k: v for k, v in params.items() if k in FIELDS}
    if columns:
        changes["columns"] = {**options.columns, **columns}
    if "title_join" in params:
        changes["title_join"] = params["title_join"]
    if "skip_bad" in params:
        flag = params["skip_bad"].lower()
        if flag not in TRUE + FALSE:
            raise BadSourceError(f"skip_bad={params['skip_bad']!r} in {spec!r}; write skip_bad=1 or skip_bad=0.")
        changes["skip_bad"] = flag in TRUE
    try:
        return dataclasses.replace(options, **changes) if changes else options
    except ValueError as e:
        raise BadSourceError(f"{e} (in {spec!r})") from e
