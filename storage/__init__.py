"""Durable, content-addressed storage of teacher vectors (no torch here)."""

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
from storage.keys import ROLES, KeySet, content_key, content_keys, key_hex, role_code
from storage.maintenance import VerifyReport, gc_store, store_info, verify_store
from storage.spec import TeacherSpec
from storage.store import FORMAT_VERSION, TeacherStore, default_chunk_rows

__all__ = [
    "FORMAT_VERSION",
    "ROLES",
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
    "content_key",
    "content_keys",
    "default_chunk_rows",
    "gc_store",
    "key_hex",
    "role_code",
    "store_info",
    "verify_store",
]
