"""JetStream sourcing between the hub and a bin's leaf node (each with its own domain).

Edge events (frames, inference, actuation, the edge services' dead letters, heartbeats) are
stored first in the bin's own streams, so a bin keeps sorting and buffering while offline; the
hub's streams *source* them across the leaf link and catch up, in order and exactly once, when
the link returns. Models flow the other way: the bin's ENGINE stream sources `models.>` from
the hub. The leaf's remote (edge/nats/leaf.conf) denies those subjects as plain messages, so
the sourcing is the one path they take (a second path would store them twice).

The bin's ENGINE stream has the hub's subjects (the routes table) but keeps only what the bin
reads: promotions and rollbacks (sourced) and the fleet's samples.selected (the uploader's);
the leaf does not import the cloud's other events, and `bound_bin_engine` caps its size.

    python -m edge.streams hub --hub nats://hub:4222 bin-1 bin-2   # on the cloud side
    python -m edge.streams bin --leaf nats://127.0.0.1:4222          # on each bin
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

import nats
from nats.js.api import ExternalStream, StreamSource
from nats.js.client import JetStreamContext

from binloop.bus import ensure_streams

HUB_DOMAIN = "hub"
EDGE_STREAMS = ("FRAMES", "INFERENCE", "ACTUATION", "DLQ", "FLEET")
"""Streams a bin writes and the hub sources from every bin."""
EDGE_SUBJECTS = ("frames.>", "inference.>", "actuation.>", "dlq.>", "fleet.>")
HUB_TO_BIN_SUBJECT = "models.>"
"""What the bin sources from the hub's ENGINE stream: promotions and rollbacks."""
CLOUD_ONLY_SUBJECTS = ("labels.>", "datasets.>", "training.>")
"""Cloud events no service on a bin reads: its leaf node does not import them."""
BIN_ENGINE_MAX_BYTES = 256 * 2**20
"""The most the bin's ENGINE stream keeps (oldest out first) of the bin's 8 GB store.

What it holds is the fleet's samples.selected (the subject names no bin) beside the rare
promotions and rollbacks, so its size follows the fleet's selection rate: without a cap its
365-day age (the hub's) would let it fill the store the bin's own streams need. A promotion
that ages out of it is still what the edge-inferencer's model cache recalls."""


def api_prefix(domain: str) -> str:
    """The JetStream API of another domain, as seen across a leaf link."""
    return f"$JS.{domain}.API"


async def _add_source(js: JetStreamContext, stream: str, source: StreamSource) -> bool:
    """Adds `source` to `stream` unless an equal one is there. True when it was added."""
    info = await js.stream_info(stream)
    config = info.config
    current = list(config.sources or [])
    key = (source.name, source.external.api if source.external else None)
    if any((s.name, s.external.api if s.external else None) == key for s in current):
        return False
    config.sources = [*current, source]
    await js.update_stream(config)
    return True


async def source_bin_into_hub(
    hub: JetStreamContext, bin_domain: str, streams: Sequence[str] = EDGE_STREAMS
) -> list[str]:
    """The hub's edge streams source the same-named streams of the bin's domain.

    Idempotent; returns the streams that gained a source."""
    added = []
    for stream in streams:
        source = StreamSource(name=stream, external=ExternalStream(api=api_prefix(bin_domain)))
        if await _add_source(hub, stream, source):
            added.append(stream)
    return added


async def source_models_into_bin(leaf: JetStreamContext, hub_domain: str = HUB_DOMAIN) -> bool:
    """The bin's ENGINE stream sources promotions from the hub's ENGINE stream."""
    source = StreamSource(
        name="ENGINE",
        filter_subject=HUB_TO_BIN_SUBJECT,
        external=ExternalStream(api=api_prefix(hub_domain)),
    )
    return await _add_source(leaf, "ENGINE", source)


async def bound_bin_engine(leaf: JetStreamContext, max_bytes: int = BIN_ENGINE_MAX_BYTES) -> bool:
    """Caps the bin's ENGINE stream at `max_bytes`. `ensure_streams` keeps a stream's byte cap,
    so the services' starts leave it. True when it changed."""
    config = (await leaf.stream_info("ENGINE")).config
    if config.max_bytes == max_bytes:
        return False
    config.max_bytes = max_bytes
    await leaf.update_stream(config)
    return True


async def _main(args: argparse.Namespace) -> int:
    client = await nats.connect(args.url)
    try:
        js = client.jetstream()
        await ensure_streams(js)
        if args.side == "hub":
            for bin_domain in args.bins:
                added = await source_bin_into_hub(js, bin_domain)
                print(f"{bin_domain}: sources added to {', '.join(added) or 'nothing (present)'}")
        else:
            added_models = await source_models_into_bin(js, args.hub_domain)
            print("ENGINE sources models.> from the hub" if added_models else "already sourced")
            await bound_bin_engine(js)
            print(f"ENGINE keeps at most {BIN_ENGINE_MAX_BYTES // 2**20} MiB")
    finally:
        await client.drain()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sides = parser.add_subparsers(dest="side", required=True)
    hub = sides.add_parser("hub", help="make the hub source these bins' streams")
    hub.add_argument("--hub", dest="url", default="nats://127.0.0.1:4222")
    hub.add_argument("bins", nargs="+", help="JetStream domain of each bin (its bin id)")
    bin_side = sides.add_parser(
        "bin", help="make this bin source promotions from the hub and cap its ENGINE stream"
    )
    bin_side.add_argument("--leaf", dest="url", default="nats://127.0.0.1:4222")
    bin_side.add_argument("--hub-domain", default=HUB_DOMAIN)
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
