"""The actuator service: actuation.command in, actuation.done out."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from nats.js.client import JetStreamContext

from binloop.bus import Delivery, Outgoing, subscribe
from binloop.errors import ConfigError
from binloop.observability import metrics
from binloop.runtime import ServiceApp, new_service
from schemas.base import utc_now
from schemas.events import ActuationCommand
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE
from services.actuator.core import Actuator, ActuatorDriver, SimulatedDriver
from services.actuator.gpio import GpioDriver, jetson_driver
from services.actuator.settings import ActuatorSettings

log = logging.getLogger(__name__)


def make_driver(settings: ActuatorSettings) -> ActuatorDriver:
    simulated = SimulatedDriver(settings.sim_actuation_ms, settings.sim_jam_rate, settings.sim_seed)
    if settings.driver == "simulated":
        return simulated
    if settings.driver == "auto":
        # Jetson.GPIO when this machine has it, the simulation everywhere else.
        try:
            return jetson_driver()
        except ConfigError as exc:
            log.warning("actuator: no GPIO here (%s); using the simulated driver", exc)
            return simulated
    return jetson_driver()  # "gpio": a bin whose GPIO is broken must not fake its flaps


def journal_path(settings: ActuatorSettings) -> Path:
    """The actuator's memory of handled items (see journal.py); its folder must be writable,
    checked here so that `--validate-config` catches a state_dir the service cannot use."""
    folder = settings.state_dir
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"actuator state_dir {folder} cannot be created: {exc}") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"actuator state_dir {folder} is not writable by this user")
    return folder / f"handled-{settings.bin_id}.journal"


def create_app(
    settings: ActuatorSettings,
    driver: ActuatorDriver | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> ServiceApp:
    service = new_service("actuator", settings)
    active_driver = driver or make_driver(settings)
    actuator = Actuator(
        active_driver,
        service.producer,
        max_command_age_s=settings.max_command_age_s,
        journal_path=journal_path(settings),
        clock=clock,
        on_journal_failure=metrics.ACTUATOR_JOURNAL_FAILURES.labels(settings.bin_id).inc,
    )

    async def load_journal(_: JetStreamContext) -> None:
        await actuator.open()

    async def close_journal() -> None:
        actuator.close()

    # Loaded at start (not in create_app, which --validate-config also runs next to a live
    # service): a damaged journal is reported before the first item; closed after the
    # consumer stopped.
    service.on_start.append(load_journal)
    service.on_stop.append(close_journal)
    service.declare_publishes(ACTUATION_DONE, bin_id=settings.bin_id)
    if isinstance(active_driver, GpioDriver):
        gpio_driver = active_driver

        async def release_pins() -> None:
            gpio_driver.close()

        service.on_stop.append(release_pins)

    async def on_command(delivery: Delivery[ActuationCommand]) -> list[Outgoing]:
        outcome = await actuator.handle(delivery.event)
        done = outcome.done
        bin_id = done.bin_id
        if outcome.kind == "repeated":
            log.info(
                "actuator: command for frame %s came again (attempt %d); answering as before, "
                "the flap stays put",
                done.frame_event_id,
                delivery.attempt,
            )
        elif outcome.kind == "stale":
            metrics.ACTUATOR_STALE_COMMANDS.labels(bin_id).inc()
            log.warning("actuator: frame %s not actuated: %s", done.frame_event_id, done.error)
        elif outcome.kind == "interrupted":
            metrics.ACTUATOR_ERRORS.labels(bin_id, "interrupted").inc()
            log.warning(
                "actuator: command for frame %s came again (attempt %d) after an attempt that "
                "set out to move the flap and never finished; the flap stays put",
                done.frame_event_id,
                delivery.attempt,
            )
        else:
            if not done.ok:
                metrics.ACTUATOR_ERRORS.labels(bin_id, "jam").inc()
            latency = (clock() - done.captured_at).total_seconds()
            metrics.FRAME_TO_ACTUATION_SECONDS.labels(bin_id).observe(max(latency, 0.0))
        return [Outgoing(ACTUATION_DONE, done, bin_id)]

    subscribe(
        service.broker,
        service.publisher,
        ACTUATION_COMMAND,
        on_command,
        durable=f"actuator-{settings.bin_id}",
        bin_id=settings.bin_id,
        policy=service.policy,
        description="Moves the item into the chosen compartment.",
    )
    return service
