"""labeling-bridge: turns selected samples into labels (a labeling backend) and labels into
versioned dataset snapshots."""

from services.labeling_bridge.app import create_app
from services.labeling_bridge.settings import LabelingBridgeSettings

__all__ = ["LabelingBridgeSettings", "create_app"]
