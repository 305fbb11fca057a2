"""Durable, content-addressed storage of teacher vectors (no torch here).

Names are imported on first use (PEP 562): ``from storage.errors import DdxError`` — which every config
module and so every ``ddx <command> --help`` does — must not load zarr, pyarrow and the store.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.compact import CompactReport, compact_store
    from storage.errors import (
        DdxError,
        DimensionMismatchError,
        DiskFullError,
        FingerprintMismatchError,
        FormatVersionError,
        IntegrityError,
        MissingVectorsError,
        RemoteStoreError,
        StoreExistsError,
        StoreNotFoundError,
    )
    from storage.keys import (
        ROLES,
        KeySet,
        content_key,
        content_keys,
        key_hex,
        keys_from_arrow,
        keys_to_arrow,
        role_code,
    )
    from storage.maintenance import VerifyReport, gc_store, store_info, verify_store
    from storage.spec import TeacherSpec
    from storage.store import FORMAT_VERSION, TeacherStore, default_chunk_rows

_WHERE = {
    **dict.fromkeys(
        (
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
        ),
        "storage.errors",
    ),
    **dict.fromkeys(
        ("ROLES", "KeySet", "content_key", "content_keys", "key_hex", "keys_from_arrow", "keys_to_arrow", "role_code"),
        "storage.keys",
    ),
    **dict.fromkeys(("CompactReport", "compact_store"), "storage.compact"),
    **dict.fromkeys(("VerifyReport", "gc_store", "store_info", "verify_store"), "storage.maintenance"),
    "TeacherSpec": "storage.spec",
    **dict.fromkeys(("FORMAT_VERSION", "TeacherStore", "default_chunk_rows"), "storage.store"),
}

__all__ = [
    "FORMAT_VERSION",
    "ROLES",
    "CompactReport",
    "DdxError",
    "DimensionMismatchError",
    "DiskFullError",
    "FingerprintMismatchError",
    "FormatVersionError",
    "IntegrityError",
    "KeySet",
    "MissingVectorsError",
    "RemoteStoreError",
    "StoreExistsError",
    "StoreNotFoundError",
    "TeacherSpec",
    "TeacherStore",
    "VerifyReport",
    "compact_store",
    "content_key",
    "content_keys",
    "default_chunk_rows",
    "gc_store",
    "key_hex",
    "keys_from_arrow",
    "keys_to_arrow",
    "role_code",
    "store_info",
    "verify_store",
]
assert set(__all__) == set(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
