"""Object storage behind one small interface; keys are content-addressed and writes idempotent."""

from binloop.storage.blobstore import BlobStore, LocalBlobStore, open_store, sha256_hex
from binloop.storage.keys import dataset_key, frame_key, label_key, model_key, spool_key

__all__ = [
    "BlobStore",
    "LocalBlobStore",
    "dataset_key",
    "frame_key",
    "label_key",
    "model_key",
    "open_store",
    "sha256_hex",
    "spool_key",
]
