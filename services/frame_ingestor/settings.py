"""Settings of the frame-ingestor service."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from binloop.settings import ServiceSettings


class FrameIngestorSettings(ServiceSettings):
    bin_id: str = Field(default="bin-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    source: str = Field(
        default="data/demo/stream",
        min_length=1,
        max_length=2048,
        description="An image folder, a video file, a camera index (0), an rtsp:// or http:// "
        "URL, or a replay file (*.jsonl) with embedded frames",
    )
    source_open_timeout_s: float = Field(
        default=30.0,
        ge=0,
        le=600,
        description="Camera or stream: how long start-up keeps retrying to open it and read a "
        "frame (a camera still booting) before it fails with a configuration error",
    )
    fps: float = Field(
        default=0.0, ge=0, le=1000, description="Frames per second; 0: as fast as the source"
    )
    loops: int = Field(
        default=1, ge=0, le=1_000_000, description="Passes over a finite source; 0: forever"
    )
    max_frames: int | None = Field(
        default=None, ge=1, description="Stop after this many frames; None: no limit"
    )
    labels_from_folders: bool = Field(
        default=True,
        description="Image folders: the folder an image is in is its ground-truth label",
    )
    spool_root: Path = Field(
        default=Path(".binloop/spool"), description="Edge spool the frames are written to"
    )
    jpeg_quality: int = Field(
        default=90, ge=1, le=100, description="Quality when a frame has to be (re-)encoded"
    )
