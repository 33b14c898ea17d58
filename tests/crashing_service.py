"""A service whose handler ends its own process for a marked message, as an out-of-memory kill,
a native crash or a Job's deadline would; tests/test_restart.py runs it and starts it again.

    python -m tests.crashing_service NATS_URL [--batch]

It reads training.requested (durable `crasher`, ack wait 1 s, max_deliveries 3); a request
named "poison" (in its batch, with --batch) ends the process with exit status 9 before any
outcome; every other request is answered by a copy on HANDLED. It runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

from binloop.bus import Delivery, Outgoing, subscribe, subscribe_batch
from binloop.runtime import new_service
from binloop.settings import ServiceSettings
from schemas import TrainingRequested
from schemas.routes import TRAINING_REQUESTED, Route

HANDLED = Route("crasher.handled", "models.crasher.handled.v1", "ENGINE", TrainingRequested)
"""Where the service answers what it handled (inside ENGINE; nothing consumes it)."""
POISON = "poison"
DIED = 9
DURABLE = "crasher"
MAX_DELIVERIES = 3
ACK_WAIT_S = 1.0


def _answer(delivery: Delivery[TrainingRequested]) -> Outgoing:
    name = delivery.event.dataset_name
    return Outgoing(HANDLED, TrainingRequested(producer="crasher", dataset_name=name))


async def main(nats_url: str, batch: bool) -> None:
    settings = ServiceSettings(
        nats_url=nats_url,
        http_port=0,
        http_host="127.0.0.1",
        max_deliveries=MAX_DELIVERIES,
        retry_delay_s=0.05,
    )
    service = new_service("crasher", settings)

    async def handle_one(delivery: Delivery[TrainingRequested]) -> list[Outgoing]:
        if delivery.event.dataset_name == POISON:
            os._exit(DIED)
        return [_answer(delivery)]

    async def handle_batch(deliveries: list[Delivery[TrainingRequested]]) -> list[Outgoing]:
        if any(d.event.dataset_name == POISON for d in deliveries):
            os._exit(DIED)
        return [_answer(d) for d in deliveries]

    if batch:
        subscribe_batch(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            handle_batch,
            durable=DURABLE,
            batch_size=10,
            max_wait_s=0.5,
            policy=service.policy,
            ack_wait_s=ACK_WAIT_S,
        )
    else:
        subscribe(
            service.broker,
            service.publisher,
            TRAINING_REQUESTED,
            handle_one,
            durable=DURABLE,
            policy=service.policy,
            ack_wait_s=ACK_WAIT_S,
        )
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await service.start()
    try:
        await stopping.wait()
    finally:
        await service.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("nats_url")
    parser.add_argument("--batch", action="store_true")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.nats_url, arguments.batch))
