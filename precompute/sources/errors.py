"""Errors about data sources: what every stage that reads sources (precompute, training, evaluation) raises.

They derive from :class:`storage.errors.DdxError`, the one root the CLI catches; the storage layer itself never
reads a source, so they live here rather than in ``storage.errors``.

A source on an object store is read from a local mirror (:mod:`.remote`); :func:`shown` puts the remote URL back
wherever a message would name a mirrored file (``s3://bucket/scifact/corpus.jsonl:7``, not the cache path).
"""

from __future__ import annotations

from storage.errors import DdxError

__all__ = ["BadSourceError", "register_mirror", "shown"]

_MIRRORS: dict[str, str] = {}  # local mirror root -> the URL it mirrors (this process)


def register_mirror(local_root: str, url: str) -> None:
    """From now on, :func:`shown` writes ``url`` where a text names ``local_root``."""
    _MIRRORS[local_root.rstrip("/")] = url.rstrip("/")


def shown(text: str) -> str:
    """``text`` with every local mirror path replaced by the URL it mirrors (unchanged when nothing is mirrored).

    Example:
        >>> register_mirror("/cache/sources/3fa2/data/x/scifact", "s3://bucket/x/scifact")
        >>> shown("/cache/sources/3fa2/data/x/scifact/corpus.jsonl:7: missing '_id'")
        "s3://bucket/x/scifact/corpus.jsonl:7: missing '_id'"
    """
    for local, url in _MIRRORS.items():
        if local in text:
            text = text.replace(local, url)
    return text


class BadSourceError(DdxError):
    """A data source is missing, unreadable or malformed; the message names file, line and field.

    A file read from a local mirror of a remote source is named by its URL (:func:`shown`).
    """

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(shown(str(message)), *args)
