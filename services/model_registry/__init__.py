"""model-registry: records every trained model version, promotes a candidate only when it
beats the champion on the same evaluation set, and rolls the champion back on request."""

from services.model_registry.app import create_app
from services.model_registry.core import RegistryError, RollbackNotAnnouncedError
from services.model_registry.operations import RollbackOutcome, rollback
from services.model_registry.settings import RegistrySettings

__all__ = [
    "RegistryError",
    "RegistrySettings",
    "RollbackNotAnnouncedError",
    "RollbackOutcome",
    "create_app",
    "rollback",
]
