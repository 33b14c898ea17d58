"""Builds a FastStream NatsBroker the way every binloop service wants it."""

from __future__ import annotations

import logging

from faststream.nats import NatsBroker

GRACEFUL_STOP_S = 20.0
"""How long a stopping service lets the handlers in flight finish before it cancels them (their
messages are naked and redelivered). Every subscriber waits in the same window, so this bounds
the whole wait, and it stays 10 s under the pods' terminationGracePeriodSeconds (30 s,
deploy/k8s/base/services/*.yaml; tests/test_k8s.py checks it) for what a stop does after it:
acking outputs already sent, ending background tasks and hooks, closing the connection."""


def make_broker(nats_url: str, service: str) -> NatsBroker:
    # FastStream logs every message at INFO by default, which alone cut throughput ~3x in our
    # measurements; consumers here log only what goes wrong.
    return NatsBroker(
        nats_url,
        name=f"binloop-{service}",
        logger=logging.getLogger(f"binloop.faststream.{service}"),
        log_level=logging.DEBUG,
        graceful_timeout=GRACEFUL_STOP_S,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
    )
