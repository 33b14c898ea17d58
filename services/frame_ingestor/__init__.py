"""frame-ingestor: frames from a camera, stream, video, image folder or replay file into the
edge spool, announced on frames.captured."""

from services.frame_ingestor.app import create_app, run_capture
from services.frame_ingestor.settings import FrameIngestorSettings

__all__ = ["FrameIngestorSettings", "create_app", "run_capture"]
