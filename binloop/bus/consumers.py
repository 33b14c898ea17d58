"""The durable JetStream consumers a service declares, and keeping them as declared.

JetStream keeps a durable consumer's config from when it was first created, and subscribing
again does not change it: without this, a new `ack_wait` in the settings (or in a release)
would never reach a consumer that already exists. Before its consumers start, a service
updates the fields JetStream lets an existing consumer change."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from faststream.nats import NatsBroker
from nats.js.api import ConsumerConfig
from nats.js.client import JetStreamContext
from nats.js.errors import APIError, NotFoundError

log = logging.getLogger(__name__)

UPDATABLE_FIELDS = ("ack_wait", "max_deliver", "max_ack_pending")
"""What binloop declares and JetStream changes on an existing consumer; the rest (deliver
policy, filter) is fixed at creation. A consumer created before binloop set max_ack_pending
has JetStream's default (1000), which would cut a larger batch short."""


def edge_inferencer_durable(bin_id: str) -> str:
    """The edge-inferencer's frames consumer on a bin; the uploader's spool sweep asks it
    which frames are still to be read."""
    return f"edge-inferencer-{bin_id}"


@dataclass(frozen=True)
class DeclaredConsumer:
    stream: str
    durable: str
    config: ConsumerConfig | None


def declared_consumers(broker: NatsBroker) -> list[DeclaredConsumer]:
    """Every durable JetStream consumer registered on `broker`, sorted by (stream, durable)."""
    found = []
    for subscriber in broker.subscribers:
        stream = getattr(getattr(subscriber, "stream", None), "name", None)
        durable = getattr(subscriber, "extra_options", {}).get("durable")
        if stream and durable:
            config = getattr(subscriber, "config", None)
            found.append(
                DeclaredConsumer(
                    stream, durable, config if isinstance(config, ConsumerConfig) else None
                )
            )
    return sorted(found, key=lambda c: (c.stream, c.durable))


def changed_fields(existing: ConsumerConfig, wanted: ConsumerConfig) -> dict[str, Any]:
    """The updatable fields `wanted` sets to something other than what `existing` has.

    A shorter ack_wait is left out: a replica of the previous release may still be running
    (a rolling update), keeping its in-flight messages alive at a third of the old ack_wait,
    and a shorter one would have the server redeliver them under it. It is logged instead.
    A smaller max_ack_pending is left out too, silently: a larger one costs nothing (the
    consumer holds no more than it fetches), may be an operator's, and lowering it would cut
    the fetches of a previous release's replica with a larger batch."""
    changes = {}
    for name in UPDATABLE_FIELDS:
        value = getattr(wanted, name)
        current = getattr(existing, name)
        if value is None or value == current:
            continue
        if name == "max_ack_pending" and current is not None and (current < 0 or value < current):
            continue  # -1: no limit
        if name == "ack_wait" and current is not None and value < current:
            log.warning(
                "consumer %s keeps ack_wait %ss, not the shorter %ss it is now declared with "
                "(shortening it under running replicas would redeliver their work); change "
                "it with `nats consumer edit` once they are gone",
                existing.durable_name,
                current,
                value,
            )
            continue
        changes[name] = value
    return changes


async def update_declared_consumers(js: JetStreamContext, broker: NatsBroker) -> list[str]:
    """Brings each existing durable consumer of `broker` up to its declared config; one that
    does not exist yet is left for the subscriber to create. Returns the durables updated."""
    updated = []
    for declared in declared_consumers(broker):
        if declared.config is None:
            continue
        try:
            info = await js.consumer_info(declared.stream, declared.durable)
        except NotFoundError:
            continue
        changes = changed_fields(info.config, declared.config)
        if not changes:
            continue
        try:
            await js.add_consumer(declared.stream, info.config.evolve(**changes))
        except APIError as exc:  # the consumer still works with its old settings
            log.warning(
                "could not update consumer %s on %s: %s", declared.durable, declared.stream, exc
            )
            continue
        log.info(
            "updated consumer %s on %s: %s",
            declared.durable,
            declared.stream,
            ", ".join(f"{k} {getattr(info.config, k)} -> {v}" for k, v in changes.items()),
        )
        updated.append(declared.durable)
    return updated
