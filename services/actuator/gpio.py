"""The actuator driver on the bin: one GPIO output per compartment flap, optionally one input per
flap that confirms it opened (a reed switch), through Jetson.GPIO. No bus here.

The pins sit behind a small `GpioPins` seam so the driver logic is tested without a Jetson.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Protocol

from binloop.errors import ConfigError
from schemas.taxonomy import Compartment
from services.actuator.core import ActuatorJamError


class GpioPins(Protocol):
    """What the driver needs from a GPIO library (Jetson.GPIO's calls, BOARD numbering)."""

    def setup_output(self, pin: int) -> None: ...

    def setup_input(self, pin: int) -> None: ...

    def write(self, pin: int, high: bool) -> None: ...

    def read(self, pin: int) -> bool: ...

    def cleanup(self) -> None: ...


@dataclass(frozen=True)
class FlapWiring:
    """Which header pin moves (and, optionally, confirms) each compartment's flap."""

    flap_pins: Mapping[Compartment, int] = field(
        default_factory=lambda: {
            Compartment.PLASTIC_METAL: 29,
            Compartment.PAPER_CARDBOARD: 31,
            Compartment.GLASS: 33,
            Compartment.TRASH: 35,
        }
    )
    sensor_pins: Mapping[Compartment, int] = field(default_factory=dict)
    """Inputs that read high once the flap is open; a compartment without one is not checked."""
    pulse_ms: float = 250.0
    """How long the solenoid is driven: long enough for the item to drop."""

    def __post_init__(self) -> None:
        missing = set(Compartment) - set(self.flap_pins)
        if missing:
            names = ", ".join(sorted(c.value for c in missing))
            raise ConfigError(f"flap wiring has no pin for: {names}")
        pins = [*self.flap_pins.values(), *self.sensor_pins.values()]
        if len(pins) != len(set(pins)):
            raise ConfigError(f"flap wiring uses a pin twice: {sorted(pins)}")
        if not 1 <= self.pulse_ms <= 10_000:
            raise ConfigError(f"pulse_ms must be within 1..10000, got {self.pulse_ms}")


def load_jetson_gpio() -> ModuleType:
    """Jetson.GPIO, or a ConfigError that says why it cannot drive this machine."""
    try:
        return importlib.import_module("Jetson.GPIO")
    except ImportError as exc:
        raise ConfigError(
            "driver=gpio needs Jetson.GPIO (`pip install Jetson.GPIO` on the bin); "
            "use driver=simulated elsewhere"
        ) from exc
    except Exception as exc:
        # Jetson.GPIO raises a bare Exception on import when it does not know the board.
        raise ConfigError(f"Jetson.GPIO cannot drive this board: {exc}") from exc


class JetsonPins:
    """GpioPins over the Jetson.GPIO module, in BOARD (header pin) numbering."""

    def __init__(self, gpio: ModuleType) -> None:
        self._gpio = gpio
        gpio.setwarnings(False)
        gpio.setmode(gpio.BOARD)

    def setup_output(self, pin: int) -> None:
        self._gpio.setup(pin, self._gpio.OUT, initial=self._gpio.LOW)

    def setup_input(self, pin: int) -> None:
        self._gpio.setup(pin, self._gpio.IN)

    def write(self, pin: int, high: bool) -> None:
        self._gpio.output(pin, self._gpio.HIGH if high else self._gpio.LOW)

    def read(self, pin: int) -> bool:
        return bool(self._gpio.input(pin) == self._gpio.HIGH)

    def cleanup(self) -> None:
        self._gpio.cleanup()


class GpioDriver:
    """Drives a flap for `pulse_ms`, checks its sensor while open, and always closes it."""

    def __init__(self, pins: GpioPins, wiring: FlapWiring | None = None) -> None:
        self.pins = pins
        self.wiring = wiring or FlapWiring()
        # One item at a time: two flaps open together would drop an item in the wrong bin.
        self._lock = asyncio.Lock()
        self._pins_ready = False

    def _setup(self) -> None:
        for pin in self.wiring.flap_pins.values():
            self.pins.setup_output(pin)
        for pin in self.wiring.sensor_pins.values():
            self.pins.setup_input(pin)
        self._pins_ready = True

    async def actuate(self, compartment: Compartment, item_key: str) -> None:
        async with self._lock:
            if not self._pins_ready:
                self._setup()
            pin = self.wiring.flap_pins[compartment]
            sensor = self.wiring.sensor_pins.get(compartment)
            self.pins.write(pin, True)
            try:
                await asyncio.sleep(self.wiring.pulse_ms / 1000)
                opened = self.pins.read(sensor) if sensor is not None else True
            finally:
                self.pins.write(pin, False)
            if not opened:
                raise ActuatorJamError(
                    f"flap for {compartment.value} (pin {pin}) did not open: "
                    f"sensor pin {sensor} stayed low for item {item_key}"
                )

    def close(self) -> None:
        """Releases the pins (all outputs low) when the service stops."""
        if self._pins_ready:
            self.pins.cleanup()
            self._pins_ready = False


def jetson_driver(wiring: FlapWiring | None = None) -> GpioDriver:
    return GpioDriver(JetsonPins(load_jetson_gpio()), wiring)
