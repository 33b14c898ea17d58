"""The bridge's HTTP side, for Label Studio: the annotation webhook, the frames tasks show, and
the ML backend endpoints (/health, /setup, /predict).

Webhook answers: 401 without the shared secret (counted); 400 for a body that is not an
annotation payload and 422 for an annotation that can never become a label (both
dead-lettered with the reason); 503 when the label (or the dead letter) could not be stored or
published now, whatever the store or NATS answered (reconciliation brings it later); 200
otherwise.

/predict answers 400 for a body that is not {"tasks": [task, ...]}, 413 for more than
MAX_PREDICT_TASKS tasks, and 503 while there is no champion or the store does not answer; a
task whose frame is gone (also one deleted while the request runs), damaged or under a key the
store refuses gets an empty prediction.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from aiohttp import web
from nats.errors import Error as NatsError

from binloop.errors import MissingBlobError, PermanentError, TransientError
from binloop.observability import metrics
from binloop.storage import BlobStore
from schemas.base import BlobRef
from services.labeling_bridge.intake import parse_webhook
from services.labeling_bridge.link import DeadLetterSink, LabelStudioLink
from services.labeling_bridge.ml_backend import Champion

log = logging.getLogger(__name__)

WEBHOOK_PATH = "/label-studio/webhook"
FRAMES_PATH = "/frames/"
SECRET_HEADER = "X-Binloop-Webhook-Secret"
MAX_BODY_BYTES = 8 * 1024 * 1024
"""Label Studio sends the whole project (label config included) with each annotation."""
NOT_NOW = (TransientError, NatsError, TimeoutError)
"""A store or bus that does not answer, or refuses now (NATS: no stream, connection closed, a
full buffer while reconnecting): the webhook answers 503, reconciliation brings the label."""
MAX_PREDICT_TASKS = 256
"""Tasks one /predict may ask about: each is a frame read, decoded and held in memory for the
batch. Label Studio sends one task as an annotator opens it; its "Retrieve Predictions" action
sends every selected task in one request."""


class FrameSigner:
    """Signs frame URLs so only tasks the bridge made can fetch frames: the browser's <img>
    cannot send a header, so the signature travels in the query, like a presigned URL."""

    def __init__(self, secret: str, base_url: Callable[[], str]) -> None:
        self._secret = secret.encode()
        self._base_url = base_url
        """Where browsers reach this bridge's frames (frames_url, else public_url)."""

    def signature(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:32]

    def valid(self, key: str, signature: str) -> bool:
        return hmac.compare_digest(self.signature(key), signature)

    def url(self, frame: BlobRef) -> str:
        path = quote(frame.key, safe="/")
        return f"{self._base_url()}{FRAMES_PATH}{path}?sig={self.signature(frame.key)}"


@dataclass
class WebParts:
    secret: str
    link: LabelStudioLink
    store: BlobStore
    signer: FrameSigner
    champion: Champion
    dead_letter: DeadLetterSink


def _json(status: int, **body: Any) -> web.Response:
    return web.json_response(body, status=status)


def make_web_app(parts: WebParts) -> web.Application:
    secret = parts.secret.encode()

    async def webhook(request: web.Request) -> web.Response:
        offered = request.headers.get(SECRET_HEADER, "").encode()
        if not hmac.compare_digest(offered, secret):
            metrics.LABEL_STUDIO_WEBHOOKS.labels("unauthenticated").inc()
            return _json(401, error=f"missing or wrong {SECRET_HEADER}")
        body = await request.read()
        try:
            annotation = parse_webhook(body)
        except PermanentError as exc:
            return await _reject(parts, 400, body, exc)
        if annotation is None:
            metrics.LABEL_STUDIO_WEBHOOKS.labels("ignored").inc()
            return _json(200, published=False)
        try:
            taken = await parts.link.take(annotation, "webhook")
        except PermanentError as exc:
            return await _reject(parts, 422, body, exc)
        except NOT_NOW as exc:
            return _failed(exc)
        metrics.LABEL_STUDIO_WEBHOOKS.labels("published" if taken.published else "unchanged").inc()
        return _json(200, published=taken.published)

    async def frame(request: web.Request) -> web.StreamResponse:
        key = request.match_info["key"]
        if not parts.signer.valid(key, request.query.get("sig", "")):
            return _json(403, error="bad or missing frame signature")
        try:
            data = await asyncio.to_thread(parts.store.get, key)
        except MissingBlobError:
            return _json(404, error=f"no frame {key}")
        except TransientError as exc:
            return _json(503, error=str(exc))
        return web.Response(body=data, content_type="image/jpeg")

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "UP", "model_version": parts.champion.model_version})

    async def setup(_: web.Request) -> web.Response:
        return _json(200, model_version=parts.champion.model_version)

    async def predict(request: web.Request) -> web.Response:
        try:
            payload = await request.json()
        except ValueError:
            return _json(400, error="the body is not JSON")
        tasks = payload.get("tasks") if isinstance(payload, dict) else None
        if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
            return _json(400, error="expected {'tasks': [task, ...]}")
        if len(tasks) > MAX_PREDICT_TASKS:
            return _json(
                413,
                error=f"{len(tasks)} tasks in one request, at most {MAX_PREDICT_TASKS}: "
                "ask for predictions of fewer tasks at a time",
            )
        try:
            results = await asyncio.to_thread(parts.champion.predict, parts.store, tasks)
        except TransientError as exc:  # no champion yet, or the store did not answer
            return _json(503, error=str(exc))
        return _json(200, results=results, model_version=parts.champion.model_version)

    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post(WEBHOOK_PATH, webhook)
    app.router.add_get(FRAMES_PATH + "{key:.+}", frame)
    app.router.add_get("/health", health)
    app.router.add_post("/setup", setup)
    app.router.add_post("/predict", predict)
    return app


async def _reject(parts: WebParts, status: int, body: bytes, error: PermanentError) -> web.Response:
    try:
        await parts.dead_letter(f"http:POST {WEBHOOK_PATH}", body, error)
    except NOT_NOW as exc:  # reconciliation dead-letters it later
        return _failed(exc)
    metrics.LABEL_STUDIO_WEBHOOKS.labels("rejected").inc()
    return _json(status, error=str(error))


def _failed(error: BaseException) -> web.Response:
    metrics.LABEL_STUDIO_WEBHOOKS.labels("failed").inc()
    return _json(503, error=str(error) or type(error).__name__)


class WebServer:
    """Runs an aiohttp app on (host, port); port 0 picks a free one, known after start."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    async def start(self, app: web.Application) -> None:
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else self.requested_port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
