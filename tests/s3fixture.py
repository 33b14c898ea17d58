"""A real HTTP S3 endpoint for tests: moto's server on a free loopback port.

Use it from any test module by loading this module as a plugin:

    pytest_plugins = ["tests.s3fixture"]

`s3_overrides` are settings fields (blob_backend, s3_endpoint, keys, a fresh bucket per test)
to pass to any ServiceSettings subclass. A test that needs an outage takes `own_moto_s3`, a
server of its own, calls `stop()` (clients now get "connection refused") and `start()` again on
the same port; the objects survive, because moto keeps them in this process.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

ACCESS_KEY = "binloop-test"
SECRET_KEY = "binloop-test-secret"


class MotoS3:
    """moto's S3 over real HTTP on 127.0.0.1. The port is picked by the OS on the first start
    and kept across restarts."""

    def __init__(self) -> None:
        self.port = 0
        self._server: ThreadedMotoServer | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> MotoS3:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        server.start()
        self.port = server.get_host_and_port()[1]
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        # moto's stop() shuts the accept loop but leaves the listening socket open, so clients
        # would hang until their timeout instead of being refused like by a server that is down.
        werkzeug_server = self._server._server
        if werkzeug_server is not None:
            werkzeug_server.server_close()
        self._server = None

    def overrides(self, bucket: str | None = None) -> dict[str, Any]:
        """Settings fields that point a service at this endpoint and a bucket of its own."""
        return {
            "blob_backend": "s3",
            "s3_endpoint": self.endpoint,
            "s3_bucket": bucket or f"binloop-{uuid.uuid4().hex[:12]}",
            "s3_access_key": ACCESS_KEY,
            "s3_secret_key": SECRET_KEY,
            "s3_secure": False,
            "s3_region": "us-east-1",
        }

    def __enter__(self) -> MotoS3:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """One S3 endpoint for the whole session; tests stay apart by using their own bucket."""
    with MotoS3() as server:
        yield server


@pytest.fixture
def s3_overrides(moto_s3: MotoS3) -> dict[str, Any]:
    return moto_s3.overrides()


@pytest.fixture
def own_moto_s3() -> Iterator[MotoS3]:
    """An endpoint this test alone uses, so it may stop and restart it."""
    with MotoS3() as server:
        yield server
