"""Errors about data sources: what every stage that reads sources (precompute, training, evaluation) raises.

They derive from :class:`storage.errors.DdxError`, the one root the CLI catches; the storage layer itself never
reads a source, so they live here rather than in ``storage.errors``.
"""

from __future__ import annotations

from storage.errors import DdxError

__all__ = ["BadSourceError"]


class BadSourceError(DdxError):
    """A data source is missing, unreadable or malformed; the message names file, line and field."""
