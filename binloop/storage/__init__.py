"""Object storage behind one small interface; keys are content-addressed and writes idempotent."""

from binloop.storage.blobstore import open_store, read_verified
from binloop.storage.keys import (
    SPOOL_ANNOUNCING_SUFFIX,
    dataset_key,
    frame_key,
    label_key,
    model_key,
    reconcile_cursor_key,
    spool_key,
    training_run_key,
)
from binloop.storage.local import LocalBlobStore
from binloop.storage.protocol import BlobExistsError, BlobStore, PresigningStore, sha256_hex
from binloop.storage.s3 import S3BlobStore

__all__ = [
    "SPOOL_ANNOUNCING_SUFFIX",
    "BlobExistsError",
    "BlobStore",
    "LocalBlobStore",
    "PresigningStore",
    "S3BlobStore",
    "dataset_key",
    "frame_key",
    "label_key",
    "model_key",
    "open_store",
    "read_verified",
    "reconcile_cursor_key",
    "sha256_hex",
    "spool_key",
    "training_run_key",
]
