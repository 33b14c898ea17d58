"""sampler: picks the frames worth labeling (active learning) from the edge's inference results."""

from services.sampler.app import create_app
from services.sampler.settings import SamplerSettings

__all__ = ["SamplerSettings", "create_app"]
