"""The services binloop runs, by name: where each one's settings and create_app live."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from binloop.runtime import ServiceApp
from binloop.settings import ServiceSettings


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    settings_class: str
    runs_on: str

    def load(self) -> tuple[type[ServiceSettings], Callable[..., ServiceApp]]:
        module = importlib.import_module(self.module)
        settings_cls: type[ServiceSettings] = getattr(module, self.settings_class)
        factory: Callable[..., ServiceApp] = module.create_app
        return settings_cls, factory

    def create(self, **overrides: Any) -> ServiceApp:
        settings_cls, factory = self.load()
        return factory(settings_cls(**overrides))


SERVICES: dict[str, ServiceSpec] = {
    spec.name: spec
    for spec in (
        ServiceSpec("frame-ingestor", "services.frame_ingestor", "FrameIngestorSettings", "edge"),
        ServiceSpec(
            "edge-inferencer", "services.edge_inferencer", "EdgeInferencerSettings", "edge"
        ),
        ServiceSpec("actuator", "services.actuator", "ActuatorSettings", "edge"),
        ServiceSpec("uploader", "services.uploader", "UploaderSettings", "edge"),
        ServiceSpec("sampler", "services.sampler", "SamplerSettings", "cloud"),
        ServiceSpec(
            "labeling-bridge", "services.labeling_bridge", "LabelingBridgeSettings", "cloud"
        ),
        ServiceSpec("trainer", "services.trainer", "TrainerSettings", "cloud"),
        ServiceSpec("model-registry", "services.model_registry", "RegistrySettings", "cloud"),
    )
}
