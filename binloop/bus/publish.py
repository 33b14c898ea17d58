"""Publishing events: JSON on the route's subject, event_id as Nats-Msg-Id, acked by JetStream."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from faststream.nats import NatsBroker

from binloop.observability import metrics
from schemas.base import Event
from schemas.routes import Route

MSG_ID_HEADER = "Nats-Msg-Id"


@dataclass(frozen=True)
class Outgoing:
    """An event a handler wants published; the consumer publishes it before acking the input."""

    route: Route
    event: Event
    bin_id: str | None = None


class Publisher:
    """Publishes for one service. `service` names it on the bus (its dead-letter subject,
    metrics); `producer` (service plus instance) goes into the events it emits."""

    def __init__(self, broker: NatsBroker, service: str, producer: str | None = None) -> None:
        self._broker = broker
        self.service = service
        self.producer = producer or service

    async def publish(self, route: Route, event: Event, bin_id: str | None = None) -> None:
        if not isinstance(event, route.model):
            raise TypeError(f"{route.name} carries {route.model.__name__}, not {type(event)}")
        await self._broker.publish(
            event.model_dump_json().encode(),
            route.subject(bin_id),
            headers={MSG_ID_HEADER: str(event.event_id), "content-type": "application/json"},
            stream=route.stream,
        )
        metrics.EVENTS_PUBLISHED.labels(self.service, route.name).inc()

    async def publish_all(self, outgoing: list[Outgoing]) -> None:
        """Waits for JetStream's acks of different subjects together (one round trip instead
        of one per event), keeping the order of events on the same subject."""
        by_subject: dict[str, list[Outgoing]] = {}
        for item in outgoing:
            by_subject.setdefault(item.route.subject(item.bin_id), []).append(item)

        async def in_order(items: list[Outgoing]) -> None:
            for item in items:
                await self.publish(item.route, item.event, item.bin_id)

        await asyncio.gather(*(in_order(items) for items in by_subject.values()))
