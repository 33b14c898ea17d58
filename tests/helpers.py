"""Test helpers: collect events from a subject until a condition holds (never sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeVar

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.client import JetStreamContext
from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)


class Collector(Generic[M]):
    """Subscribes (core NATS) to a subject and parses each message as `model`."""

    def __init__(self, model: type[M]) -> None:
        self.model = model
        self.items: list[M] = []
        self.subjects: list[str] = []
        self._changed = asyncio.Event()

    async def attach(self, client: Client, subject: str) -> Collector[M]:
        async def on_msg(msg: Msg) -> None:
            self.items.append(self.model.model_validate_json(msg.data))
            self.subjects.append(msg.subject)
            self._changed.set()

        await client.subscribe(subject, cb=on_msg)
        await client.flush()
        return self

    async def attach_stream(self, js: JetStreamContext, subject: str) -> Collector[M]:
        """Reads what JetStream stored (an ordered consumer), so duplicates that JetStream
        dropped by Nats-Msg-Id are not counted: this is what downstream consumers see."""

        async def on_msg(msg: Msg) -> None:
            self.items.append(self.model.model_validate_json(msg.data))
            self.subjects.append(msg.subject)
            self._changed.set()

        await js.subscribe(subject, cb=on_msg, ordered_consumer=True)
        return self

    async def wait_for(
        self, condition: Callable[[list[M]], bool] | int, timeout: float = 20.0
    ) -> list[M]:
        def check() -> bool:
            if isinstance(condition, int):
                return len(self.items) >= condition
            return condition(self.items)

        async def loop() -> None:
            while not check():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)
        return self.items


async def eventually(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Waits until `condition()` holds. For what has nothing to wait on (a metric set inside
    a service): it is polled."""

    async def poll() -> None:
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)
