"""Makes every pull-consumer fetch timeout a `nats.errors.TimeoutError`.

nats-py 2.16's `PullSubscription.fetch` raises a bare `asyncio.TimeoutError` when its deadline
runs out between its no-wait probe and its lingering pull request (nats.py PR #934), while
FastStream 0.7.8's pull loop catches only `nats.errors.TimeoutError` (a subclass of it). The bare
one escapes, the consuming task dies, and FastStream's supervisor logs a traceback and restarts
it: nothing is lost (unfetched messages stay on the server), but every service may print that
traceback under load. Re-raising it as the nats subclass keeps `except asyncio.TimeoutError`
working everywhere and lets FastStream treat it as the empty fetch it is."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats.errors
from nats.js.client import JetStreamContext

T = TypeVar("T")
_MARK = "_binloop_nats_timeouts"


def as_nats_timeouts(fetch: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Wraps a fetch coroutine function so a bare asyncio timeout leaves it as nats's own."""

    @functools.wraps(fetch)
    async def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return await fetch(*args, **kwargs)
        except nats.errors.TimeoutError:
            raise
        except TimeoutError as exc:
            raise nats.errors.TimeoutError from exc

    setattr(wrapped, _MARK, True)
    return wrapped


def install() -> None:
    """Idempotent: wraps `PullSubscription.fetch` once per process."""
    subscription = JetStreamContext.PullSubscription
    if not getattr(subscription.fetch, _MARK, False):
        subscription.fetch = as_nats_timeouts(subscription.fetch)  # type: ignore[method-assign,assignment]
