"""Creates (or updates) the JetStream streams the routes table names, and the bucket that
records handling attempts (binloop/bus/handling.py)."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from binloop.bus.handling import ensure_bucket
from schemas.routes import STREAMS, Stream


def stream_config(stream: Stream, replicas: int = 1) -> StreamConfig:
    """`replicas`: copies JetStream keeps, one per server (3 on the k8s hub, 1 on a single
    server: the embedded default, a bin, compose)."""
    return StreamConfig(
        name=stream.name,
        description=stream.description,
        subjects=list(stream.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=stream.max_age_s,
        discard=DiscardPolicy.OLD,
        duplicate_window=stream.duplicate_window_s,
        num_replicas=replicas,
    )


async def ensure_streams(js: JetStreamContext, replicas: int = 1) -> list[str]:
    """Idempotent: adds missing streams with `replicas` copies and updates changed ones.
    Returns the stream names. The bucket of handling attempts (binloop/bus/handling.py) is
    made or raised the same way.

    An existing stream keeps its replica count when it has more than `replicas`: an operator
    who raised it (`nats stream edit --replicas 3`), or a service that asks for fewer (a tool
    that passes none), must not have it scaled down by the next process that starts."""
    for stream in STREAMS.values():
        config = stream_config(stream, replicas)
        try:
            info = await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            # Sources and byte caps are the deployment's business (the hub sources each bin's
            # leaf streams, a bin caps its ENGINE: edge/streams.py): keep them, or a cloud
            # service starting would cut the bins off, and an edge one lift the bin's cap.
            config.sources = info.config.sources
            config.max_bytes = info.config.max_bytes
            config.num_replicas = max(info.config.num_replicas or 1, replicas)
            await js.update_stream(config)
    await ensure_bucket(js, replicas)
    return list(STREAMS)
