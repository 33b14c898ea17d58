"""Pull consumers that JetStream cannot serve: back off, fail readiness, re-create a lost one.

A fetch answered with 503 (`ServiceUnavailableError`, no responders) means nothing serves the
consumer: it was deleted (`nats consumer rm`), its stream is gone, or the server holding its
only replica is down. FastStream 0.7.8's pull loops swallow that error and fetch again at once,
thousands of times a second, for as long as it lasts. This wraps `PullSubscription.fetch`
(as fetch_timeouts does) so that, for each subscription:
- every 503 in a row waits longer before it is raised: 0.1 s, doubling, at most 5 s;
- an outage is logged when it begins and when it ends, not at each fetch;
- from UNREADY_AFTER 503s in a row until a fetch is answered, `unavailable_consumers` names
  the consumer, so its service is not ready (ServiceApp.is_ready) and /readyz fails;
- when JetStream says the consumer does not exist, it is created again from the config its
  subscriber declared (`declare`), as the service's next start would create it (so the
  declared deliver policy decides where it starts again), and fetching resumes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from faststream.nats import NatsBroker
from nats.errors import Error as NatsError
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError, ServiceUnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")
_MARK = "_binloop_consumer_outages"

FIRST_BACKOFF_S = 0.1
MAX_BACKOFF_S = 5.0
UNREADY_AFTER = 3
"""503s in a row before the service reports not ready: one is a leader election's blip."""
CHECK_TIMEOUT_S = 2.0
"""For the JetStream API requests that look for (and re-create) a missing consumer."""

PullSubscription = JetStreamContext.PullSubscription


@dataclass
class _Outage:
    unavailable: int = 0
    """503s in a row."""
    recreate_failure_logged: bool = False

    def backoff_s(self) -> float:
        return float(min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** min(self.unavailable - 1, 16)))


_outages: weakref.WeakKeyDictionary[PullSubscription, _Outage] = weakref.WeakKeyDictionary()
_declared: dict[tuple[str, str], ConsumerConfig] = {}
"""(stream, durable) -> the config a subscriber creates it with. Process-wide: durable names
are unique per service, and a later declaration of the same one replaces the earlier."""


def declare(stream: str, durable: str, filter_subject: str, config: ConsumerConfig) -> None:
    """Records how `durable` on `stream` is created, so it can be created again if it goes.
    `config` as the subscriber passes it (FastStream has set the durable name and deliver
    policy); the name and filter that nats-py adds when it creates the consumer are added."""
    _declared[(stream, durable)] = config.evolve(
        name=durable, durable_name=durable, filter_subject=filter_subject
    )


def unavailable_consumers(broker: NatsBroker) -> list[str]:
    """The consumers of `broker` whose fetches have had UNREADY_AFTER 503s in a row."""
    names = []
    for subscriber in broker.subscribers:
        subscription = getattr(subscriber, "subscription", None)
        if not isinstance(subscription, PullSubscription):
            continue
        outage = _outages.get(subscription)
        if outage is not None and outage.unavailable >= UNREADY_AFTER:
            names.append(_name(subscription))
    return names


def _name(subscription: PullSubscription) -> str:
    # nats-py 2.16 keeps the names only in these attributes.
    return f"{subscription._consumer} on {subscription._stream}"


async def _recreate_if_gone(subscription: PullSubscription, outage: _Outage) -> bool:
    """Whether the consumer was gone and has been created again."""
    stream, durable = subscription._stream, subscription._consumer
    config = _declared.get((stream, durable))
    if config is None:
        return False
    js = subscription._js
    try:
        await js.consumer_info(stream, durable, timeout=CHECK_TIMEOUT_S)
    except NotFoundError:
        pass
    except (NatsError, TimeoutError):
        return False  # JetStream does not answer for it: a server is down, wait for it
    else:
        return False  # it exists; what serves it does not answer yet
    try:
        await js.add_consumer(stream, config, timeout=CHECK_TIMEOUT_S)
    except (NatsError, TimeoutError) as exc:
        if not outage.recreate_failure_logged:
            outage.recreate_failure_logged = True
            log.warning(
                "consumer %s is gone and cannot be created again yet: %s", _name(subscription), exc
            )
        return False
    log.warning("consumer %s was gone: created it again as declared", _name(subscription))
    return True


async def _on_unavailable(subscription: PullSubscription) -> None:
    outage = _outages.setdefault(subscription, _Outage())
    outage.unavailable += 1
    if outage.unavailable == 1:
        log.warning(
            "consumer %s is unavailable (JetStream answers 503); fetching again with back-off "
            "up to %.0fs, the service not ready from %d in a row",
            _name(subscription),
            MAX_BACKOFF_S,
            UNREADY_AFTER,
        )
    if await _recreate_if_gone(subscription, outage):
        return
    await asyncio.sleep(outage.backoff_s())


def _on_answered(subscription: PullSubscription) -> None:
    outage = _outages.pop(subscription, None)
    if outage is not None:
        log.info(
            "consumer %s answers again after %d unavailable fetches",
            _name(subscription),
            outage.unavailable,
        )


def with_backoff_when_unavailable(
    fetch: Callable[..., Awaitable[T]],
) -> Callable[..., Awaitable[T]]:
    """Wraps `PullSubscription.fetch` with the behaviour the module describes."""

    # updated=(): the wrapped function's attributes (another wrapper's mark) stay its own.
    @functools.wraps(fetch, updated=())
    async def wrapped(self: PullSubscription, *args: Any, **kwargs: Any) -> T:
        try:
            result = await fetch(self, *args, **kwargs)
        except ServiceUnavailableError:
            await _on_unavailable(self)
            raise
        except TimeoutError:  # JetStream answered "nothing now" (or nothing yet)
            _on_answered(self)
            raise
        _on_answered(self)
        return result

    setattr(wrapped, _MARK, True)
    return wrapped


def _installed(function: object) -> bool:
    while function is not None:
        if getattr(function, _MARK, False):
            return True
        function = getattr(function, "__wrapped__", None)
    return False


def install() -> None:
    """Idempotent: wraps `PullSubscription.fetch` once per process."""
    if not _installed(PullSubscription.fetch):
        wrapped = with_backoff_when_unavailable(PullSubscription.fetch)
        PullSubscription.fetch = wrapped  # type: ignore[method-assign,assignment]
