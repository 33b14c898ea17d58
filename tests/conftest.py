"""Fixtures: a real nats-server per test (port 0, temporary JetStream store), a JetStream
client on it, and a local blob store. Environment variables that change behaviour are cleared."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js.client import JetStreamContext

from binloop.bus import ensure_streams
from binloop.natsserver import NatsServer
from binloop.storage import LocalBlobStore


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(os.environ):
        if key.startswith("BINLOOP_"):
            monkeypatch.delenv(key)
    # The actuator's journal outlives a process on purpose; each test starts with none, not
    # with what an earlier test (or run) left in the working directory.
    monkeypatch.setenv("BINLOOP_STATE_DIR", str(tmp_path / "actuator-state"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    with NatsServer(tmp_path / "jetstream") as server:
        yield server


@pytest.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    yield client
    await client.drain()


@pytest.fixture
async def js(nats_client: Client) -> JetStreamContext:
    context = nats_client.jetstream()
    await ensure_streams(context)
    return context


@pytest.fixture
def blob_store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")
