"""Consumer throughput on a real nats-server: binloop's batch and per-message consumers
against a raw nats-py pull consumer, on the same pre-filled stream.

    .venv/bin/python tools/bench_bus.py --messages 20000

Prints a table of messages/s. Every consumer does the same work per message: validate the
payload as an InferenceResult and ack it.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import nats
from rich.console import Console
from rich.table import Table

from binloop.bus import Delivery, Outgoing, ensure_streams, subscribe, subscribe_batch
from binloop.natsserver import NatsServer
from binloop.runtime import new_service
from binloop.settings import ServiceSettings
from schemas import ClassScore, InferenceResult, StageLatency
from schemas.routes import INFERENCE_RESULT
from schemas.taxonomy import Compartment


def _result(i: int) -> bytes:
    return (
        InferenceResult(
            producer="bench",
            bin_id=f"bin-{i % 8}",
            frame_sha256=f"{i:064x}",
            frame_event_id=f"frame-{i}",
            captured_at=datetime.now(UTC),
            model_name="m",
            model_version=1,
            label="glass",
            confidence=0.8,
            margin=0.6,
            entropy=0.5,
            top_k=[
                ClassScore(label="glass", probability=0.8),
                ClassScore(label="paper", probability=0.2),
            ],
            compartment=Compartment.GLASS,
            abstained=False,
            latency=StageLatency(
                read_ms=0.1, decode_ms=1, preprocess_ms=0.3, infer_ms=3, postprocess_ms=0.1
            ),
        )
        .model_dump_json()
        .encode()
    )


async def _fill(url: str, count: int) -> None:
    client = await nats.connect(url)
    js = client.jetstream()
    await ensure_streams(js)
    for i in range(count):
        await js.publish(INFERENCE_RESULT.subject(f"bin-{i % 8}"), _result(i))
    await client.drain()


async def _binloop_consumer(url: str, count: int, batch: bool) -> float:
    service = new_service("bench", ServiceSettings(nats_url=url, http_port=0))
    seen = 0
    done = asyncio.Event()

    async def on_batch(items: list[Delivery[InferenceResult]]) -> list[Outgoing]:
        nonlocal seen
        seen += len(items)
        if seen >= count:
            done.set()
        return []

    async def on_one(item: Delivery[InferenceResult]) -> list[Outgoing]:
        return await on_batch([item])

    name = f"bench-{'batch' if batch else 'single'}"
    if batch:
        subscribe_batch(
            service.broker,
            service.publisher,
            INFERENCE_RESULT,
            on_batch,
            durable=name,
            batch_size=500,
            max_wait_s=0.05,
        )
    else:
        subscribe(service.broker, service.publisher, INFERENCE_RESULT, on_one, durable=name)
    started = time.perf_counter()
    await service.start()
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - started
    await service.stop()
    return count / elapsed


async def _raw_consumer(url: str, count: int) -> float:
    client = await nats.connect(url)
    js = client.jetstream()
    sub = await js.pull_subscribe(
        INFERENCE_RESULT.wildcard, durable="bench-raw", stream=INFERENCE_RESULT.stream
    )
    seen = 0
    started = time.perf_counter()
    while seen < count:
        msgs = await sub.fetch(500, timeout=5)
        for msg in msgs:
            InferenceResult.model_validate_json(msg.data)
            await msg.ack()
        seen += len(msgs)
    elapsed = time.perf_counter() - started
    await client.drain()
    return count / elapsed


async def main(count: int) -> None:
    runs: list[tuple[str, Callable[[str], Awaitable[float]]]] = [
        ("raw nats-py pull (fetch 500, validate, ack)", lambda u: _raw_consumer(u, count)),
        ("binloop subscribe_batch (500 / 50 ms)", lambda u: _binloop_consumer(u, count, True)),
        ("binloop subscribe (one at a time)", lambda u: _binloop_consumer(u, count, False)),
    ]
    table = Table(title=f"JetStream consumer throughput, {count} InferenceResult messages")
    table.add_column("consumer")
    table.add_column("messages/s", justify="right")
    with tempfile.TemporaryDirectory() as tmp, NatsServer(Path(tmp) / "js") as server:
        await _fill(server.url, count)
        for name, run in runs:
            table.add_row(name, f"{await run(server.url):,.0f}")
    Console().print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    asyncio.run(main(parser.parse_args().messages))
