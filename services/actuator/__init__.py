"""actuator: drops each item into the compartment the edge inferencer chose."""

from services.actuator.app import create_app
from services.actuator.settings import ActuatorSettings

__all__ = ["ActuatorSettings", "create_app"]
