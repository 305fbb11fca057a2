"""One error root for ddx, so callers (and the CLI) can catch every library error at once.

Each class also inherits the builtin that fits, so ``except FileNotFoundError`` keeps working
(the zarr-python pattern). Messages say what, where, expected vs got, and the fix.
"""

from __future__ import annotations

__all__ = [
    "DdxError",
    "DimensionMismatchError",
    "DiskFullError",
    "FingerprintMismatchError",
    "FormatVersionError",
    "IntegrityError",
    "MissingVectorsError",
    "RemoteStoreError",
    "StoreExistsError",
    "StoreNotFoundError",
]


class DdxError(ValueError):
    """Root of every error ddx raises on purpose; the CLI turns it into a clean message."""


class StoreNotFoundError(DdxError, FileNotFoundError):
    """No teacher store where one was expected (or the path is a file)."""


class StoreExistsError(DdxError, FileExistsError):
    """A store (or something else) already occupies a path that must be new."""


class FingerprintMismatchError(DdxError):
    """The store was made by another teacher spec; the message names the differing field."""


class DimensionMismatchError(DdxError):
    """Vector or model dimension disagrees with the store's or the model's."""


class FormatVersionError(DdxError):
    """The store was written by a newer ddx format than this one reads."""


class IntegrityError(DdxError):
    """Stored bytes do not match their checksums or counts.

    ``damage`` (a :class:`storage.metadata.Damage`, when the raiser knows it) names the file and what is
    wrong, so ``verify`` can report it without parsing the message.
    """

    def __init__(self, message: str, damage: object | None = None) -> None:
        super().__init__(message)
        self.damage = damage


class MissingVectorsError(DdxError, KeyError):
    """Texts asked for have no teacher vector in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class DiskFullError(DdxError, OSError):
    """The disk filled while writing; committed segments stay readable and a rerun resumes."""


class RemoteStoreError(DdxError, OSError):
    """An object store (S3, GCS, ...) could not be reached, or refused the credentials: one line naming the URL and
    the fix, raised from :class:`storage.fs.Location` instead of the client library's traceback (kept as its cause).
    """
