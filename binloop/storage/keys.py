"""Every object-store key layout, in one place."""

from __future__ import annotations

from datetime import datetime


def frame_key(bin_id: str, captured_at: datetime, sha256: str) -> str:
    return f"frames/{bin_id}/{captured_at:%Y/%m/%d}/{sha256}.jpg"


def spool_key(bin_id: str, sha256: str) -> str:
    return f"{bin_id}/{sha256[:2]}/{sha256}.jpg"


SPOOL_ANNOUNCING_SUFFIX = ".announcing"
"""`<spool key>.announcing`: the frame-ingestor's outbox marker of a frame whose FrameCaptured
JetStream has not acked yet (services/frame_ingestor/outbox.py; the uploader keeps the frame)."""


def label_key(dataset: str, frame_sha256: str) -> str:
    return f"labels/{dataset}/{frame_sha256}.json"


def dataset_key(dataset: str, version: int, name: str = "manifest.json") -> str:
    return f"datasets/{dataset}/v{version:05d}/{name}"


def model_key(model: str, version: int, name: str) -> str:
    return f"models/{model}/v{version:05d}/{name}"


def training_run_key(model: str, cause_event_id: str) -> str:
    """The training.completed a trainer announced for one input event (its outbox)."""
    return f"training/{model}/runs/{cause_event_id}.json"


def reconcile_cursor_key(dataset: str) -> str:
    return f"labeling/{dataset}/reconcile-cursor.json"
