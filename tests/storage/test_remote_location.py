"""Location for remote URLs without a server: storage options, fresh listings, one-line network errors, forks."""

from __future__ import annotations

import os

import pytest

from storage.errors import DdxError, RemoteStoreError
from storage.fs import Location, parse_storage_options, remote_error


def test_parse_storage_options() -> None:
    assert parse_storage_options(None) == {}
    assert parse_storage_options({"anon": True}) == {"anon": True}
    assert parse_storage_options('{"endpoint_url": "http://h:9000", "key": "k"}') == {
        "endpoint_url": "http://h:9000",
        "key": "k",
    }
    assert parse_storage_options(["key=k,secret=s=x", "config_kwargs.retries.max_attempts=3", "anon=false"]) == {
        "key": "k",
        "secret": "s=x",
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "anon": False,
    }
    for bad in ("endpoint_url", "[1, 2]", "{oops", "a=1,a.b=2"):
        with pytest.raises(DdxError, match="--storage-options"):
            parse_storage_options(bad)


def test_remote_locations_list_without_a_cache() -> None:
    loc = Location("memory://ddx-loc-test", {"skip_instance_cache": True})
    assert loc.fs.dircache.use_listings_cache is False
    assert Location("s3://bucket/x").storage_options == {}  # the caller's options are not changed
    assert Location("s3://bucket/x")._fs_options() == {"use_listings_cache": False}
    assert Location("s3://bucket/x", {"use_listings_cache": True})._fs_options() == {"use_listings_cache": True}
    assert Location("/tmp/x")._fs_options() == {}


def test_the_filesystem_is_opened_again_after_a_fork() -> None:
    loc = Location("memory://ddx-fork-test")
    first = loc.fs
    assert loc.fs is first
    loc._fs_pid = -1  # as a forked child sees it
    assert loc.fs is not None and loc._fs_pid == os.getpid()


@pytest.mark.parametrize(
    ("exc", "start"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "cannot reach the endpoint (ConnectionRefusedError"),
        (TimeoutError("timed out"), "cannot reach the endpoint (TimeoutError"),
        (PermissionError("Access Denied"), "access denied (PermissionError: Access Denied)"),
        (type("NoCredentialsError", (Exception,), {})("Unable to locate credentials"), "no valid credentials ("),
        (type("EndpointConnectionError", (Exception,), {})('Could not connect to "http://x"'), "cannot reach"),
    ],
)
def test_network_and_credential_errors_are_one_line(exc: Exception, start: str) -> None:
    wrapped = OSError("while writing")
    wrapped.__cause__ = exc
    error = remote_error("s3://b/x", wrapped)
    assert isinstance(error, RemoteStoreError) and isinstance(error, DdxError)
    assert str(error).startswith(f"s3://b/x: {start}") and "\n" not in str(error)


def test_other_errors_pass_through() -> None:
    assert remote_error("s3://b/x", FileNotFoundError("x")) is None
    assert remote_error("s3://b/x", ValueError("bad JSON")) is None
    loc = Location("memory://ddx-errors-test")
    with pytest.raises(FileNotFoundError):
        loc.read_bytes("nothing-here")
    with pytest.raises(RemoteStoreError, match=r"^memory://ddx-errors-test: cannot reach the endpoint"), loc.errors():
        raise ConnectionResetError("reset")
