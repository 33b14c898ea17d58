"""Settings of the actuator service."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from binloop.settings import ServiceSettings


class ActuatorSettings(ServiceSettings):
    bin_id: str = Field(default="bin-1", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    driver: Literal["simulated", "gpio", "auto"] = Field(
        default="simulated",
        description=(
            "gpio: Jetson.GPIO, refusing to start without it (a bin); auto: Jetson.GPIO when "
            "present, the simulated driver otherwise; simulated: never touches pins"
        ),
    )
    max_command_age_s: float = Field(
        default=5.0,
        gt=0,
        le=600,
        description=(
            "A command whose item was captured longer ago than this is refused, the flap left "
            "alone (the item is gone): actuation.done says ok=false, stale"
        ),
    )
    state_dir: Path = Field(
        default=Path(".binloop/actuator"),
        description=(
            "Folder of the actuator's journal of handled items (handled-<bin_id>.journal, a "
            "few MB at most), so that a command redelivered after a restart does not move a "
            "flap twice; on the bin's own disk, kept across restarts and upgrades"
        ),
    )
    sim_actuation_ms: float = Field(default=5.0, ge=0, le=10_000)
    sim_jam_rate: float = Field(default=0.0, ge=0, le=1, description="Fraction of jams")
    sim_seed: int = 0
