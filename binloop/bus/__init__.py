"""The bus: JetStream streams from the routes table, deduplicated publishing, and consumers
that ack explicitly, retry transient failures and dead-letter what cannot be processed."""

from binloop.bus import fetch_timeouts, outages
from binloop.bus.broker import make_broker
from binloop.bus.consume import Delivery, subscribe, subscribe_batch
from binloop.bus.publish import Outgoing, PendingAcks, Publisher
from binloop.bus.streams import ensure_streams

__all__ = [
    "Delivery",
    "Outgoing",
    "PendingAcks",
    "Publisher",
    "ensure_streams",
    "make_broker",
    "subscribe",
    "subscribe_batch",
]

outages.install()
fetch_timeouts.install()
