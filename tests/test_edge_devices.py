"""The bin's hardware seams: the actuator's GPIO driver (with recorded pins instead of a Jetson)
and the TensorRT engine cache (keyed by GPU model and TensorRT version); and the systemd units
that run the bin's services, read as systemd would."""

from __future__ import annotations

import importlib.util
import re
import types
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from nats.js.client import JetStreamContext

from binloop.errors import ConfigError
from binloop.natsserver import NatsServer
from edge import tensorrt_engine
from edge.tensorrt_engine import EngineKey, detect_gpu_model, ensure_engine, slug
from schemas.events import ActuationCommand, ActuationDone
from schemas.routes import ACTUATION_COMMAND, ACTUATION_DONE
from schemas.taxonomy import Compartment
from services.actuator import ActuatorSettings, create_app
from services.actuator.app import make_driver
from services.actuator.core import ActuatorJamError
from services.actuator.gpio import FlapWiring, GpioDriver, JetsonPins, load_jetson_gpio
from tests.helpers import Collector

FLAPS = {
    Compartment.PLASTIC_METAL: 11,
    Compartment.PAPER_CARDBOARD: 13,
    Compartment.GLASS: 15,
    Compartment.TRASH: 16,
}
SENSORS = {Compartment.GLASS: 18, Compartment.TRASH: 22}
EDGE = Path(__file__).resolve().parent.parent / "edge"
UNITS = sorted((EDGE / "systemd").glob("*.service"))
EDGE_SERVICES = ("frame-ingestor", "edge-inferencer", "actuator", "uploader")


class RecordedPins:
    """GpioPins that remember every call; sensors read what the test says the flap did."""

    def __init__(self, stuck: set[int] | None = None) -> None:
        self.calls: list[tuple[str, int, bool | None]] = []
        self.high: set[int] = set()
        self.stuck = stuck or set()
        self.cleaned = False

    def setup_output(self, pin: int) -> None:
        self.calls.append(("out", pin, None))

    def setup_input(self, pin: int) -> None:
        self.calls.append(("in", pin, None))

    def write(self, pin: int, high: bool) -> None:
        self.calls.append(("write", pin, high))
        (self.high.add if high else self.high.discard)(pin)

    def read(self, pin: int) -> bool:
        # A sensor reads high while its flap is driven, unless the flap is stuck.
        flap = next(FLAPS[c] for c, sensor in SENSORS.items() if sensor == pin)
        return flap in self.high and pin not in self.stuck

    def cleanup(self) -> None:
        self.cleaned = True


def _wiring() -> FlapWiring:
    return FlapWiring(flap_pins=FLAPS, sensor_pins=SENSORS, pulse_ms=1)


async def test_gpio_driver_pulses_the_compartments_flap_and_confirms_it() -> None:
    pins = RecordedPins()
    driver = GpioDriver(pins, _wiring())
    await driver.actuate(Compartment.GLASS, "item-1")
    await driver.actuate(Compartment.PAPER_CARDBOARD, "item-2")
    setup = [call for call in pins.calls if call[0] in {"out", "in"}]
    assert sorted(setup) == sorted(
        [("out", pin, None) for pin in FLAPS.values()]
        + [("in", pin, None) for pin in SENSORS.values()]
    )
    writes = [call for call in pins.calls if call[0] == "write"]
    assert writes == [
        ("write", 15, True),
        ("write", 15, False),
        ("write", 13, True),
        ("write", 13, False),
    ]
    assert pins.high == set()
    driver.close()
    assert pins.cleaned


async def test_a_flap_whose_sensor_stays_low_is_a_jam_and_still_closes() -> None:
    pins = RecordedPins(stuck={SENSORS[Compartment.TRASH]})
    driver = GpioDriver(pins, _wiring())
    with pytest.raises(ActuatorJamError, match=r"trash \(pin 16\) did not open: sensor pin 22"):
        await driver.actuate(Compartment.TRASH, "item-9")
    assert pins.high == set()


def test_flap_wiring_is_validated() -> None:
    with pytest.raises(ConfigError, match="no pin for: glass"):
        FlapWiring(flap_pins={c: p for c, p in FLAPS.items() if c != Compartment.GLASS})
    with pytest.raises(ConfigError, match="uses a pin twice"):
        FlapWiring(flap_pins=FLAPS, sensor_pins={Compartment.GLASS: 11})
    with pytest.raises(ConfigError, match="pulse_ms"):
        FlapWiring(pulse_ms=0)


def test_jetson_pins_speak_jetson_gpio_in_board_numbering() -> None:
    calls: list[tuple[object, ...]] = []
    gpio = types.ModuleType("Jetson.GPIO")
    for name, value in {"BOARD": "board", "OUT": "out", "IN": "in", "HIGH": 1, "LOW": 0}.items():
        setattr(gpio, name, value)
    gpio.setwarnings = lambda flag: calls.append(("setwarnings", flag))  # type: ignore[attr-defined]
    gpio.setmode = lambda mode: calls.append(("setmode", mode))  # type: ignore[attr-defined]
    gpio.setup = lambda pin, d, **kw: calls.append(("setup", pin, d, kw))  # type: ignore[attr-defined]
    gpio.output = lambda pin, v: calls.append(("output", pin, v))  # type: ignore[attr-defined]
    gpio.input = lambda pin: 1  # type: ignore[attr-defined]
    pins = JetsonPins(gpio)
    pins.setup_output(29)
    pins.setup_input(31)
    pins.write(29, True)
    assert pins.read(31) is True
    assert calls == [
        ("setwarnings", False),
        ("setmode", "board"),
        ("setup", 29, "out", {"initial": 0}),
        ("setup", 31, "in", {}),
        ("output", 29, 1),
    ]


@pytest.mark.skipif(
    importlib.util.find_spec("Jetson") is not None, reason="runs where Jetson.GPIO is absent"
)
def test_the_gpio_driver_off_a_jetson_says_why() -> None:
    with pytest.raises(ConfigError, match=r"needs Jetson\.GPIO"):
        load_jetson_gpio()
    with pytest.raises(ConfigError, match="driver=simulated elsewhere"):
        make_driver(ActuatorSettings(driver="gpio"))


@pytest.mark.integration
async def test_the_actuator_service_reports_a_gpio_jam_in_actuation_done(
    js: JetStreamContext, nats_server: NatsServer
) -> None:
    pins = RecordedPins(stuck={SENSORS[Compartment.GLASS]})
    settings = ActuatorSettings(nats_url=nats_server.url, http_port=0, bin_id="gpio-bin")
    service = create_app(settings, driver=GpioDriver(pins, _wiring()))
    done = await Collector(ActuationDone).attach_stream(js, ACTUATION_DONE.subject("gpio-bin"))
    await service.start()
    try:
        for compartment in (Compartment.GLASS, Compartment.TRASH):
            command = ActuationCommand(
                producer="test",
                bin_id="gpio-bin",
                frame_sha256=uuid.uuid4().hex * 2,
                frame_event_id=str(uuid.uuid4()),
                captured_at=datetime.now(UTC),
                compartment=compartment,
                label="glass",
                confidence=0.9,
                abstained=False,
                model_version=1,
            )
            await js.publish(
                ACTUATION_COMMAND.subject("gpio-bin"),
                command.model_dump_json().encode(),
                headers={"Nats-Msg-Id": str(command.event_id)},
            )
        results = await done.wait_for(2)
    finally:
        await service.stop()
    by_compartment = {result.compartment: result for result in results}
    assert not by_compartment[Compartment.GLASS].ok
    assert "sensor pin 18" in (by_compartment[Compartment.GLASS].error or "")
    assert by_compartment[Compartment.TRASH].ok
    assert pins.cleaned  # the service released the pins when it stopped


# -- TensorRT engine cache -----------------------------------------------------------------


def _fake_tensorrt(version: str) -> types.ModuleType:
    # Only the version is read on a cache hit; building needs the real library.
    module = types.ModuleType("tensorrt")
    module.__version__ = version  # type: ignore[attr-defined]
    return module


def test_the_engine_cache_is_keyed_by_gpu_tensorrt_model_and_precision(tmp_path: Path) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx bytes")
    key = EngineKey(tensorrt_engine.sha256_file(onnx), "NVIDIA Jetson Orin Nano", "10.3.0", True, 1)
    cached = key.path(tmp_path / "cache")
    assert cached.relative_to(tmp_path / "cache").parts[:2] == (
        "nvidia-jetson-orin-nano",
        "trt-10.3.0",
    )
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"engine")

    path, built = ensure_engine(
        onnx,
        tmp_path / "cache",
        gpu_model="NVIDIA Jetson Orin Nano",
        tensorrt=_fake_tensorrt("10.3.0"),
    )
    assert (path, built) == (cached, False)

    other_keys = {
        EngineKey(key.onnx_sha256, "NVIDIA H100 80GB HBM3", "10.3.0", True, 1),
        EngineKey(key.onnx_sha256, key.gpu_model, "8.6.2", True, 1),
        EngineKey(key.onnx_sha256, key.gpu_model, "10.3.0", False, 1),
        EngineKey("0" * 64, key.gpu_model, "10.3.0", True, 1),
    }
    paths = {other.path(tmp_path / "cache") for other in other_keys}
    assert len(paths) == 4
    assert cached not in paths


def test_gpu_model_comes_from_the_jetson_device_tree(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.write_bytes(b"NVIDIA Jetson Orin Nano Developer Kit\0")
    assert detect_gpu_model(model) == "NVIDIA Jetson Orin Nano Developer Kit"
    assert slug("NVIDIA Jetson Orin Nano (8GB)") == "nvidia-jetson-orin-nano-8gb"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT present")
def test_without_tensorrt_the_build_step_exits_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx bytes")
    assert tensorrt_engine.main(["--onnx", str(onnx), "--cache-dir", str(tmp_path)]) == 1
    assert "TensorRT's Python API is not installed" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [onnx]


def test_auto_driver_falls_back_to_the_simulation_without_jetson_gpio() -> None:
    from services.actuator.app import make_driver
    from services.actuator.core import SimulatedDriver
    from services.actuator.settings import ActuatorSettings

    assert isinstance(make_driver(ActuatorSettings(driver="auto", http_port=0)), SimulatedDriver)


# -- systemd units -------------------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[str]]:
    """Each key of a unit file with its values in order, continuation lines joined."""
    values: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def _env_file(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key.strip(): value.strip() for key, value in pairs}


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_every_path_an_edge_unit_may_write_exists_when_it_starts(unit: Path) -> None:
    """Under ProtectSystem=strict, a ReadWritePaths= folder that does not exist fails the unit
    (226/NAMESPACE) unless prefixed with '-', and the service user could not create it on a
    read-only system anyway: a StateDirectory= makes it, owned by the unit's User. Without one,
    nats-leaf.service never starts on a new bin, and every binloop@ unit (Requires=) with it."""
    values = _unit(unit)
    if values.get("ProtectSystem") != ["strict"]:
        return
    created = {f"/var/lib/{d}" for value in values.get("StateDirectory", []) for d in value.split()}
    writable = [path for value in values.get("ReadWritePaths", []) for path in value.split()]
    for path in writable:
        if not path.startswith("-"):
            assert any(path == c or path.startswith(f"{c}/") for c in created), path


@pytest.mark.parametrize("unit", UNITS, ids=lambda path: path.name)
def test_every_variable_an_edge_unit_expands_comes_from_its_environment_files(
    unit: Path,
) -> None:
    """systemd expands an unset ${VAR} in a command line to nothing: the command then runs with
    an empty argument (as a TensorRT build given `--onnx ''` did, failing at every boot). The
    example env files in edge/env/ are what /etc/binloop/ starts from."""
    values = _unit(unit)
    instances = EDGE_SERVICES if unit.name.endswith("@.service") else ("",)
    for instance in instances:
        environment: dict[str, str] = {}
        for value in values.get("EnvironmentFile", []):
            name = Path(value.lstrip("-").replace("%i", instance)).name
            example = EDGE / "env" / name
            assert example.is_file(), f"{value} has no example in edge/env/"
            environment |= _env_file(example)
        commands = values.get("ExecStartPre", []) + values.get("ExecStart", [])
        for command in commands:
            for braced, bare in re.findall(r"\$\{(\w+)\}|\$(\w+)", command):
                variable = braced or bare
                if variable != "MAINPID":
                    assert environment.get(variable), f"{instance or unit.name}: ${variable}"
