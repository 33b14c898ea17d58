"""Creates (or updates) the JetStream streams the routes table names."""

from __future__ import annotations

from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError

from schemas.routes import STREAMS, Stream


def stream_config(stream: Stream) -> StreamConfig:
    return StreamConfig(
        name=stream.name,
        description=stream.description,
        subjects=list(stream.subjects),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=stream.max_age_s,
        discard=DiscardPolicy.OLD,
        duplicate_window=stream.duplicate_window_s,
    )


async def ensure_streams(js: JetStreamContext) -> list[str]:
    """Idempotent: adds missing streams and updates changed ones. Returns the stream names."""
    for stream in STREAMS.values():
        config = stream_config(stream)
        try:
            info = await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(config)
        else:
            # Sources are the deployment's business (the hub sources each bin's leaf streams,
            # see edge/streams.py): keep them, or a cloud service starting would cut the bins off.
            config.sources = info.config.sources
            await js.update_stream(config)
    return list(STREAMS)
