"""Test helpers: a real Label Studio server (the `label-studio` package in its own venv, see
tools/install_label_studio.sh) on a free loopback port with its own data folder, and a proxy in
front of it that can play down or broken on demand."""

from __future__ import annotations

import asyncio
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import aiohttp
from aiohttp import web

from binloop.process import ServerProcess, free_port

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / ".venv-label-studio" / "bin" / "label-studio"
READY_LINE = "Starting development server at"
STARTUP_TIMEOUT_S = 300.0
"""A cold start (migrations on a new database) takes about a minute on two cores."""


def label_studio_bin() -> Path:
    return Path(os.environ.get("LABEL_STUDIO_BIN", DEFAULT_BIN))


class LabelStudioServer:
    """`with LabelStudioServer(data_dir) as server: server.url, server.token`."""

    def __init__(self, data_dir: Path, binary: Path | None = None) -> None:
        self.data_dir = data_dir
        self.binary = binary or label_studio_bin()
        self.port = free_port()
        self.token = secrets.token_hex(20)
        self.username = "annotator@binloop.test"
        self._server: ServerProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _environment(self) -> dict[str, str]:
        home = self.data_dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            # Its output is a pipe here: unbuffered, so the ready line arrives when printed.
            "PYTHONUNBUFFERED": "1",
            "HOME": str(home),
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir / "data"),
            "LABEL_STUDIO_USERNAME": self.username,
            "LABEL_STUDIO_PASSWORD": secrets.token_urlsafe(16),
            "LABEL_STUDIO_USER_TOKEN": self.token,
            # Without these: the token gets 401, and webhooks or ML backends on 127.0.0.1 get 403.
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "SSRF_PROTECTION_ENABLED": "false",
            "ML_BLOCK_LOCAL_IP": "false",
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            # Its settings carry a Sentry DSN of their own: nothing may leave this machine.
            "SENTRY_DSN": "",
            "FRONTEND_SENTRY_DSN": "",
        }

    def start(self) -> LabelStudioServer:
        if not self.binary.exists():
            raise FileNotFoundError(
                f"{self.binary} is missing: run tools/install_label_studio.sh "
                "(`make test` does), or point LABEL_STUDIO_BIN at a label-studio binary"
            )
        args = [
            str(self.binary),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._server = ServerProcess(
            "label-studio",
            args,
            ready_line=READY_LINE,
            env=self._environment(),
            cwd=self.data_dir,
            startup_timeout_s=STARTUP_TIMEOUT_S,
            stop_timeout_s=20.0,
        )
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "content-encoding"}


@dataclass
class FaultyProxy:
    """Forwards to `upstream`, or answers `failing_status` while `failing` is set (a Label
    Studio that is down or broken). `refused` is set once it has refused `refusals_wanted`."""

    upstream: str
    failing_status: int = 503
    refusals_wanted: int = 2
    failing: bool = False
    refused_count: int = 0
    refused: asyncio.Event | None = None
    port: int | None = None
    _runner: web.AppRunner | None = None
    _session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultyProxy:
        self.refused = asyncio.Event()
        self._session = aiohttp.ClientSession()
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{path:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.failing:
            self.refused_count += 1
            if self.refused_count >= self.refusals_wanted and self.refused is not None:
                self.refused.set()
            return web.json_response({"detail": "injected failure"}, status=self.failing_status)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with self._session.request(
            request.method,
            self.upstream + request.rel_url.path_qs,
            headers=headers,
            data=await request.read(),
            allow_redirects=False,
        ) as upstream:
            body = await upstream.read()
            kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
            return web.Response(status=upstream.status, body=body, headers=kept)
