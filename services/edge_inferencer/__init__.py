"""edge-inferencer: classifies each frame on the bin and tells the actuator where it goes."""

from services.edge_inferencer.app import create_app
from services.edge_inferencer.models import ModelSlot
from services.edge_inferencer.settings import EdgeInferencerSettings

__all__ = ["EdgeInferencerSettings", "ModelSlot", "create_app"]
