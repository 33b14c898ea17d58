"""uploader: moves spooled frames into object storage and announces them on frames.stored."""

from services.uploader.app import create_app
from services.uploader.settings import UploaderSettings

__all__ = ["UploaderSettings", "create_app"]
