"""Child server processes (nats-server here, Label Studio in the tests): start one, keep the
tail of its output, wait for the line that says it is ready, stop it for sure."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from binloop.errors import ConfigError

LOG_LINES_KEPT = 400


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for servers that cannot pick their own)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """`start()` returns once a line of output contains `ready_line`; `on_line` sees every
    line (to read the port a server chose, say). `stop()` terminates, then kills."""

    def __init__(
        self,
        name: str,
        args: list[str],
        *,
        ready_line: str,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        startup_timeout_s: float = 20.0,
        stop_timeout_s: float = 10.0,
        on_line: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.name = name
        self.args = args
        self.ready_line = ready_line
        self.env = env
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.on_line = on_line
        self._process: subprocess.Popen[str] | None = None
        self._log: list[str] = []
        self._pump: threading.Thread | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,  # Ctrl-C reaches us; we stop the server after the services
        )
        ready = threading.Event()
        stream = self._process.stdout
        assert stream is not None

        def pump() -> None:
            try:
                for line in stream:
                    self._log.append(line.rstrip())
                    if len(self._log) > LOG_LINES_KEPT:
                        del self._log[: LOG_LINES_KEPT // 4]
                    self.on_line(line)
                    if self.ready_line in line:
                        ready.set()
            except ValueError:
                pass  # stop() closed the pipe before the last read returned: the server is gone

        self._pump = threading.Thread(target=pump, name=f"{self.name}-log", daemon=True)
        self._pump.start()
        deadline = time.monotonic() + self.startup_timeout_s
        while not ready.wait(0.05):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self._log[-30:])
                raise ConfigError(f"{self.name} did not start:\n{tail}")

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._pump is not None:
            # The server has exited, so the pump reads to EOF; closing the pipe under it
            # while it reads would raise in its thread.
            self._pump.join(timeout=self.stop_timeout_s)
            self._pump = None
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._process = None

    @property
    def log_tail(self) -> list[str]:
        return list(self._log[-50:])
