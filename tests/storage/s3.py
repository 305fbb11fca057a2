"""A real S3 API for tests: moto's S3 server on 127.0.0.1, one bucket, a fresh prefix per store.

``s3_server`` (session) starts ``moto.server.ThreadedMotoServer`` on a free port of 127.0.0.1 (nothing
beyond it is reached), creates the bucket and stops the server at the end of the session; start-up is
bounded (``START_TIMEOUT_S``). ``s3`` (per test) is the same :class:`S3` with the AWS environment pointed at
the server (``AWS_ENDPOINT_URL``, key/secret "testing"), so code that takes no storage options (the
precompute pipeline, spawned worker processes) reaches it too. Tests pass :attr:`S3.storage_options`
where an API takes them.

Found while writing it: moto checks a conditional PUT (``If-None-Match: *``) and then stores the object,
two steps a second request can fall between (real S3 decides atomically). The fixture serializes moto's
PUT handler, so claim races measure ddx, not moto.

Example:
    >>> def test_round_trip(s3: S3) -> None:  # doctest: +SKIP
    ...     store = TeacherStore.create(s3.url("store"), spec, storage_options=s3.storage_options)
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

__all__ = ["S3", "s3", "s3_server"]

START_TIMEOUT_S = 30.0
BUCKET = "ddx-test"


@dataclass(frozen=True)
class S3:
    """The test S3 endpoint and its bucket."""

    endpoint_url: str
    bucket: str = BUCKET

    def url(self, name: str = "store") -> str:
        """A fresh ``s3://bucket/<name>-<uuid>`` URL (nothing there yet)."""
        return f"s3://{self.bucket}/{name}-{uuid.uuid4().hex[:12]}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options reaching the server: endpoint, credentials, short timeouts and few retries."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
            "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 3}},
        }

    @property
    def env(self) -> dict[str, str]:
        """Environment variables under which botocore (s3fs) reaches the server with no storage options."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self) -> Any:
        """A new s3fs filesystem of its own (no instance shared with ddx's, no listing shared either)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)


def _serialize_conditional_puts() -> None:
    """Make moto decide ``If-None-Match: *`` atomically, as S3 does (moto checks, then writes)."""
    from moto.s3.responses import S3Response

    if getattr(S3Response.put_object, "_ddx_serialized", False):
        return
    lock = threading.Lock()
    put = S3Response.put_object

    def put_object(self: Any) -> Any:
        with lock:
            return put(self)

    put_object._ddx_serialized = True  # type: ignore[attr-defined]
    S3Response.put_object = put_object  # type: ignore[method-assign]


def _wait_for_port(host: str, port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3]:
    """moto's S3 server on 127.0.0.1 (a free port) with one bucket, for the session; stopped at its end."""
    pytest.importorskip("s3fs", reason="s3fs not installed: pip install -e '.[test]'")
    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed: pip install -e '.[test]'")
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    _serialize_conditional_puts()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    deadline = time.monotonic() + START_TIMEOUT_S
    server.start()
    try:
        host, port = server.get_host_and_port()
        _wait_for_port(host, port, deadline)
        s3 = S3(f"http://{host}:{port}")
        client = boto3.client(
            "s3",
            endpoint_url=s3.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=s3.bucket)
        yield s3
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3, monkeypatch: pytest.MonkeyPatch) -> S3:
    """The session's S3 server, with the AWS environment pointed at it for this test (and processes it starts)."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    assert os.environ["AWS_ENDPOINT_URL"].startswith("http://127.0.0.1:")
    return s3_server
