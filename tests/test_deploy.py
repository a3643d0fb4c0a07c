"""Deploy artifacts: Dockerfile, .dockerignore, docker-compose.yml, .env.example, charts/audiomesh.

No container engine, helm binary or cluster exists here, so:

* the chart is linted and rendered by the Helm library (helm-sdkpy in ``.venv-helm``, made by
  ``scripts/setup_helm.sh``; see tests/helpers/deploy.py), with its defaults and each
  ``ci/*-values.yaml``; every rendered object is validated against Kubernetes' schemas and the
  structure the deployment relies on is asserted on the rendered objects;
* docker-compose.yml is validated against the Compose specification's JSON schema (the copy
  that check-jsonschema ships as ``vendor.compose-spec``) and its wiring is checked;
* the Dockerfile is linted with hadolint, and its healthcheck script and the chart's
  ``helm test`` script run against a real local mesh;
* every environment variable the code reads is documented and set (or deliberately left
  to the code's default, with the reason below) in the chart, in compose and in .env.example.
"""

from __future__ import annotations

import ast
import base64
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from audiomesh.config import DEFAULT_PORTS, DRAIN_DEFAULTS, SERVICES, Settings, load_settings
from audiomesh.errors import ConfigError
from audiomesh.metrics import DEFAULT_METRICS_PORTS
from tests.helpers.deploy import (
    CHART,
    HELM_VENV,
    NAMESPACE,
    RELEASE,
    ROOT,
    configmap,
    container,
    deployment,
    helm,
    objects,
    one,
    rendered,
    require_helm_venv,
)

SCENARIOS = {p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
COMPONENTS = (*SERVICES, "gateway")
WORKERS = tuple(s for s in SERVICES if s != "orchestrator")
KUBERNETES_VERSIONS = ["1.27.0", "1.33.0"]  # the chart's kubeVersion floor, and a recent one
# How long each service drains on SIGTERM by default (the gateway: uvicorn's graceful shutdown);
# pods and containers must be given longer.
DRAIN_SECONDS = {**DRAIN_DEFAULTS, "gateway": 20.0}

# Values that break one cross-value rule each, and the message _validate.tpl must give.
INVALID = {
    "no-store": (
        {"store": {"bundled": {"enabled": False}}},
        "Set store.s3.endpoint (host:port of your S3/MinIO) or store.bundled.enabled=true",
    ),
    "two-stores": (
        {"store": {"s3": {"endpoint": "minio:9000"}}},
        "Set store.bundled.enabled=false to use minio:9000",
    ),
    "external-without-keys": (
        {"store": {"bundled": {"enabled": False}, "s3": {"endpoint": "minio:9000"}}},
        "Set secrets.s3AccessKey and secrets.s3SecretKey, or secrets.existingSecret",
    ),
    "rwo-cache-many-pods": (
        {"modelCache": {"persistence": {"enabled": True}}, "separation": {"replicaCount": 3}},
        "Set modelCache.persistence.accessModes=[ReadWriteMany]",
    ),
    "gpu-on-cpu": (
        {"separation": {"gpu": {"enabled": True}, "device": "cpu"}},
        "Set separation.device=cuda (or auto)",
    ),
    "cuda-without-gpu": ({"separation": {"device": "cuda"}}, "Set separation.gpu.enabled=true"),
    "hpa-min-above-max": (
        {"hpss": {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}},
        "hpss.autoscaling: minReplicas (5) is above maxReplicas (2)",
    ),
    "offline-without-volume": ({"modelCache": {"offline": True}}, "Set modelCache.persistence.enabled=true"),
    "grace-shorter-than-drain": (
        {"separation": {"drainSeconds": 900}},
        "Set separation.terminationGracePeriodSeconds=915 or more (or lower separation.drainSeconds)",
    ),
    "grace-shorter-than-prestop": (
        {"preStopSleepSeconds": 30},
        "Set orchestrator.terminationGracePeriodSeconds=70 or more",
    ),
    "gateway-grace": (
        {"gateway": {"terminationGracePeriodSeconds": 10}},
        "Set gateway.terminationGracePeriodSeconds=35",
    ),
}


def _values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="module")
def charts() -> dict:
    """Every scenario linted and rendered in one run of the helm venv (a few seconds)."""
    scenarios = {name: {"values": _values(path), "release": RELEASE} for name, path in SCENARIOS.items()}
    scenarios["long-release-name"] = {"values": {}, "release": "a-release-name-that-is-rather-long-for-k8s-xx"}
    scenarios["typo"] = {"values": {"separation": {"replicas": 2}}}
    scenarios["single-orchestrator"] = {"values": {"orchestrator": {"replicaCount": 1}}, "lint": False}
    scenarios["no-prestop"] = {"values": {"preStopSleepSeconds": 0}, "lint": False}
    for name, (values, _) in INVALID.items():
        scenarios[f"invalid-{name}"] = {"values": values, "lint": False}
    return helm(
        {
            "chart": str(CHART),
            "namespace": NAMESPACE,
            "scenarios": scenarios,
            "kubernetes_versions": KUBERNETES_VERSIONS,
        }
    )


def plain_env(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


# ---- Helm: lint, render, Kubernetes schemas ---------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_chart_lints_without_warnings(charts, scenario):
    problems = [m for m in charts[scenario]["lint"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not problems, f"helm lint with ci/{scenario}-values.yaml: {problems}"


def test_chart_lint_and_install_reject_an_unknown_value(charts):
    """values.schema.json has additionalProperties: false: a typo fails instead of being ignored."""
    result = charts["typo"]
    assert any(m["severity"] == 3 and m["path"] == "values.yaml" for m in result["lint"]), result["lint"]
    assert result["error"] and "replicas" in result["error"] and "not allowed" in result["error"]


@pytest.mark.parametrize("scenario", [*SCENARIOS, "long-release-name"])
def test_chart_renders_valid_kubernetes_objects(charts, scenario):
    result = rendered(charts, scenario)
    assert not result["k8s_errors"], "\n".join(result["k8s_errors"])
    docs = result["manifest"] + [d for h in result["hooks"] for d in h["manifest"]]
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"names collide: {sorted(k for k in keys if keys.count(k) > 1)}"
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "ServiceAccount", "PodDisruptionBudget", "Pod"} <= kinds
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
        assert doc["metadata"]["labels"]["app.kubernetes.io/name"] == "audiomesh", name


@pytest.mark.parametrize("name", INVALID)
def test_chart_refuses_inconsistent_values_with_a_message(charts, name):
    error = charts[f"invalid-{name}"]["error"]
    assert error, f"{name}: rendered although it should fail"
    assert INVALID[name][1] in error, error


# ---- Helm: what each service gets -------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_service_is_a_hardened_deployment_with_probes_and_resources(charts, scenario):
    values = _values(CHART / "values.yaml")
    sa = one(charts, scenario, "ServiceAccount", f"{RELEASE}-audiomesh")
    assert sa["automountServiceAccountToken"] is False
    for component in COMPONENTS:
        dep = deployment(charts, scenario, component)
        pod = dep["spec"]["template"]["spec"]
        c = container(dep)
        assert c["args"] == ["serve", component]
        port = c["ports"][0]  # the served port; the second, `metrics`, is /metrics
        assert [p["name"] for p in c["ports"][1:]] == ["metrics"]
        assert port["containerPort"] == values[component]["port"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = c[probe]
            if component == "gateway":
                assert check["httpGet"]["port"] == "http", probe
            else:  # native gRPC health on the service's own port
                assert check["grpc"] == {"port": port["containerPort"]}, (component, probe)
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, component
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), component
        assert "memory" in c["resources"]["limits"], component
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        psc = pod["securityContext"]
        assert (
            psc["runAsNonRoot"] is True and psc["runAsUser"] != 0 and psc["seccompProfile"]["type"] == "RuntimeDefault"
        )
        tmp = next(v for v in pod["volumes"] if v["name"] == "tmp")
        assert "emptyDir" in tmp and {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert pod["serviceAccountName"] == sa["metadata"]["name"]
        # The preStop sleep, then the service's drain, both inside the grace period.
        (sleep,) = [int(a) for a in c["lifecycle"]["preStop"]["exec"]["command"][1:]]
        assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep" and 0 < sleep <= 10
        drain = float(plain_env(c).get("AUDIOMESH_DRAIN_SECONDS", DRAIN_SECONDS[component]))
        assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 10, component
        assert c["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-audiomesh"}}]
        assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]


def _memory(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", quantity).groups()
    return float(number) * units.get(unit, 1)


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_separation_gets_the_largest_resources(charts):
    requests = {c: container(deployment(charts, "default", c))["resources"]["requests"] for c in COMPONENTS}
    for other in COMPONENTS:
        assert _memory(requests["separation"]["memory"]) >= _memory(requests[other]["memory"]), other
        assert _cpu(requests["separation"]["cpu"]) >= _cpu(requests[other]["cpu"]), other


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_addresses_name_the_rendered_services_and_ports(charts, scenario):
    """Each AUDIOMESH_<NAME>_ADDR dials a rendered Service on the service's port; workers
    through headless Services with dns:/// (round-robin over every ready pod)."""
    data = configmap(charts, scenario)
    services = {s["metadata"]["name"]: s for s in objects(charts, scenario, "Service")}
    suffix = f".{NAMESPACE}.svc.cluster.local"
    for component in COMPONENTS:
        addr = data[f"AUDIOMESH_{component.upper()}_ADDR"]
        target = addr.removeprefix("dns:///")
        host, _, port = target.rpartition(":")
        assert host.endswith(suffix), addr
        service = services[host.removesuffix(suffix)]
        assert service["spec"]["selector"]["app.kubernetes.io/component"] == component
        container_port = container(deployment(charts, scenario, component))["ports"][0]["containerPort"]
        assert int(port) == container_port
        if component in WORKERS:
            assert addr.startswith("dns:///") and service["spec"]["clusterIP"] == "None", component
            assert service["spec"]["ports"][0]["port"] == container_port
        elif component == "orchestrator":
            assert service["spec"]["type"] == "ClusterIP"
    assert data["AUDIOMESH_HOST"] == "0.0.0.0"


def _pdbs(charts: dict, scenario: str) -> dict[str, dict]:
    return {
        p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]: p["spec"]
        for p in objects(charts, scenario, "PodDisruptionBudget")
    }


def test_orchestrators_are_several_rolled_with_a_surge_and_a_budget(charts):
    """Equal orchestrators (leases in the store): a rolling upgrade starts a new pod before it
    stops an old one, and a node drain keeps one up."""
    for scenario in SCENARIOS:
        dep = deployment(charts, scenario, "orchestrator")
        assert dep["spec"]["replicas"] >= 2, scenario
        assert dep["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }
        assert _pdbs(charts, scenario)["orchestrator"] == {
            "minAvailable": 1,
            "selector": {"matchLabels": dep["spec"]["selector"]["matchLabels"]},
        }
        env = {e["name"]: e for e in container(dep)["env"]}  # each names itself in leases by its pod
        assert env["AUDIOMESH_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    one = deployment(charts, "single-orchestrator", "orchestrator")
    assert one["spec"]["replicas"] == 1 and "orchestrator" not in _pdbs(charts, "single-orchestrator")
    assert "orchestrator.replicaCount=2" in rendered(charts, "single-orchestrator")["notes"]
    # The bundled versitygw's conditional writes race (fixed upstream after v1.7.0): said where it matters.
    assert "non-atomically" in rendered(charts, "default")["notes"]
    assert "non-atomically" not in rendered(charts, "s3-external")["notes"]
    assert "non-atomically" not in rendered(charts, "single-orchestrator")["notes"]


def test_drain_settings_reach_each_service(charts):
    """AUDIOMESH_DRAIN_SECONDS per Deployment from <service>.drainSeconds: separation gets longer
    than a song, and its pod a grace period above it."""
    values = _values(CHART / "values.yaml")
    for component in WORKERS + ("orchestrator",):
        env = plain_env(container(deployment(charts, "default", component)))
        assert float(env["AUDIOMESH_DRAIN_SECONDS"]) == values[component]["drainSeconds"] == DRAIN_SECONDS[component]
    sep = deployment(charts, "default", "separation")["spec"]["template"]["spec"]
    assert float(plain_env(sep["containers"][0])["AUDIOMESH_DRAIN_SECONDS"]) >= 600
    assert sep["terminationGracePeriodSeconds"] >= 660
    assert "AUDIOMESH_DRAIN_SECONDS" not in plain_env(container(deployment(charts, "default", "gateway")))
    assert "lifecycle" not in container(deployment(charts, "no-prestop", "separation"))


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_settings_load_in_audiomesh(charts, scenario, monkeypatch, tmp_path):
    """The ConfigMap, the chart's Secret and each Deployment's own env make a valid configuration
    for the code (values parse: no 5.24288e+08 for an integer), equal to what the values asked for."""
    monkeypatch.chdir(tmp_path)  # no .env
    for key in list(os.environ):
        if key.startswith("AUDIOMESH_"):
            monkeypatch.delenv(key)
    values = _values(CHART / "values.yaml")
    config = {**values["config"], **_values(SCENARIOS[scenario]).get("config", {})}
    secrets = {s["metadata"]["name"]: s["data"] for s in objects(charts, scenario, "Secret")}
    for component in COMPONENTS:
        c = container(deployment(charts, scenario, component))
        env = {**configmap(charts, scenario), **plain_env(c)}
        for entry in c["env"]:
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["key"] in secrets.get(ref["name"], {}):
                env[entry["name"]] = base64.b64decode(secrets[ref["name"]][ref["key"]]).decode()
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            settings = load_settings()
        assert settings.max_upload_bytes == config["maxUploadBytes"]
        assert settings.target_db == config["targetDb"]
        assert settings.retention_hours == config["retentionHours"]
        assert settings.store_url.startswith("s3://")
        assert settings.log_format == config["logFormat"]
        assert len(settings.api_keys) == len(_values(SCENARIOS[scenario]).get("secrets", {}).get("apiKeys", []))
        if secrets:  # the chart's own Secret: credentials and the (generated) service token
            assert settings.s3_access_key.get_secret_value() and settings.service_token.get_secret_value()


def test_chart_defaults_equal_the_codes_defaults():
    """values.yaml's config repeats the code's defaults; a drift would silently change behaviour
    on Kubernetes only."""
    deliberate = {"logFormat": "json"}  # containers log JSON (stdout to a log pipeline), not "auto"
    config = _values(CHART / "values.yaml")["config"]
    fields = Settings.model_fields
    for key, value in config.items():
        field = re.sub(r"([A-Z])", r"_\1", key).lower()
        assert field in fields, f"config.{key}: no setting {field}"
        default = fields[field].default_factory() if fields[field].default_factory else fields[field].default
        if key in deliberate:
            assert value == deliberate[key]
        else:
            assert value == default, f"config.{key}={value!r}, code default {default!r}"


def test_autoscaling_and_disruption_budgets(charts):
    hpas = {h["metadata"]["name"]: h for h in objects(charts, "s3-external", "HorizontalPodAutoscaler")}
    assert set(hpas) == {f"{RELEASE}-audiomesh-separation", f"{RELEASE}-audiomesh-hpss"}
    for component in ("separation", "hpss"):
        hpa = hpas[f"{RELEASE}-audiomesh-{component}"]
        dep = deployment(charts, "s3-external", component)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": dep["metadata"]["name"],
        }
        assert "replicas" not in dep["spec"], "an HPA-managed Deployment must not set replicas"
    assert not objects(charts, "default", "HorizontalPodAutoscaler")
    for pdb in objects(charts, "default", "PodDisruptionBudget"):
        component = pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        labels = deployment(charts, "default", component)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Budgets only where there is more than one pod: one pod alone needs none (a node drain may
    # always evict it), replicaCount > 1 or an HPA get one.
    assert set(_pdbs(charts, "default")) == {"orchestrator", "gateway"}
    assert set(_pdbs(charts, "s3-external")) == set(COMPONENTS)
    assert _pdbs(charts, "s3-external")["separation"]["maxUnavailable"] == 1


def test_gpu_scenario_requests_gpus_and_cuda(charts):
    dep = deployment(charts, "gpu", "separation")
    c = container(dep)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert plain_env(c)["AUDIOMESH_DEVICE"] == "cuda"
    assert c["image"].endswith(":0.1.0-cu128")
    assert dep["spec"]["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    models = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "models")
    assert models["persistentVolumeClaim"] == {"claimName": "demucs-weights", "readOnly": True}
    assert configmap(charts, "gpu")["HF_HUB_OFFLINE"] == "1"
    assert "nvidia.com/gpu" not in container(deployment(charts, "default", "separation"))["resources"].get("limits", {})


def test_store_bundled_or_external_and_secrets(charts):
    # Defaults: the bundled store, generated credentials and service token in the chart's Secret.
    secret = one(charts, "default", "Secret", f"{RELEASE}-audiomesh-secrets")
    assert {"s3-access-key", "s3-secret-key", "service-token"} <= set(secret["data"])
    store = deployment(charts, "default", "s3")
    assert container(store)["image"] == "versity/versitygw:v1.7.0"
    assert (
        configmap(charts, "default")["AUDIOMESH_S3_ENDPOINT"]
        == f"{RELEASE}-audiomesh-s3.{NAMESPACE}.svc.cluster.local:7070"
    )
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(store)["env"] if "valueFrom" in e}
    assert env["ROOT_ACCESS_KEY_ID"] == {"name": secret["metadata"]["name"], "key": "s3-access-key"}
    # External S3 from an existing Secret: no store, no Secret of ours, every service reads theirs.
    names = {(d["kind"], d["metadata"]["name"]) for d in objects(charts, "s3-external")}
    assert ("Deployment", f"{RELEASE}-audiomesh-s3") not in names
    assert not objects(charts, "s3-external", "Secret")
    data = configmap(charts, "s3-external")
    assert data["AUDIOMESH_S3_ENDPOINT"] == "minio.storage.svc.cluster.local:9000"
    assert data["AUDIOMESH_STORE_URL"] == "s3://audiomesh-prod/mesh" and data["AUDIOMESH_S3_SECURE"] == "true"
    refs = [
        e["valueFrom"]["secretKeyRef"]
        for e in container(deployment(charts, "s3-external", "separation"))["env"]
        if "secretKeyRef" in e.get("valueFrom", {})
    ]
    assert refs and all(r["name"] == "audiomesh-credentials" and r["optional"] for r in refs)


def test_service_token_is_generated_and_reaches_every_service(charts):
    """With API keys on (the ingress scenario) and no serviceToken given, the chart's Secret holds a
    generated token and every gRPC service reads it: the services refuse to start without one."""
    secret = one(charts, "ingress", "Secret", f"{RELEASE}-audiomesh-secrets")
    assert base64.b64decode(secret["data"]["api-keys"]).startswith(b"alice=sha256:")
    assert len(base64.b64decode(secret["data"]["service-token"])) >= 32
    for name in SERVICES:
        refs = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in container(deployment(charts, "ingress", name))["env"]
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        assert refs["AUDIOMESH_SERVICE_TOKEN"] == {
            "name": secret["metadata"]["name"],
            "key": "service-token",
            "optional": True,
        }, name


def test_ingress_routes_to_the_gateway(charts):
    (ingress,) = objects(charts, "ingress", "Ingress")
    service = one(charts, "ingress", "Service", f"{RELEASE}-audiomesh-gateway")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": service["metadata"]["name"], "port": {"name": "http"}}
    assert service["spec"]["ports"][0]["name"] == "http"
    assert ingress["spec"]["tls"][0]["secretName"] == "audiomesh-tls"
    assert not objects(charts, "default", "Ingress")
    assert "api-keys" in one(charts, "ingress", "Secret", f"{RELEASE}-audiomesh-secrets")["data"]


def test_helm_test_hook_runs_the_mesh_check(charts):
    (hook,) = [h for h in rendered(charts, "default")["hooks"] if "test" in h["events"]]
    (pod,) = hook["manifest"]
    c = pod["spec"]["containers"][0]
    assert c["command"][:2] == ["python", "-c"]
    assert c["command"][2] == (CHART / "files" / "mesh_check.py").read_text()
    gateway = one(charts, "default", "Service", f"{RELEASE}-audiomesh-gateway")
    port = gateway["spec"]["ports"][0]["port"]
    assert c["command"][3] == f"http://{gateway['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
    assert c["command"][4:6] == ["--model", "demucs_unittest"]
    assert c["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-audiomesh"}}]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


# ---- the scripts that run inside the image, against a real mesh --------------------------------


def _mesh_env(mesh) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUDIOMESH_")}
    env.update({f"AUDIOMESH_{name.upper()}_ADDR": addr for name, addr in mesh.addresses.items()})
    env["AUDIOMESH_HOST"] = "127.0.0.1"
    return env


def test_helm_test_script_passes_against_a_live_mesh(file_mesh, tmp_path):
    script = CHART / "files" / "mesh_check.py"
    env = _mesh_env(file_mesh)
    proc = subprocess.run(
        [sys.executable, "-c", script.read_text(), file_mesh.url, "--seconds", "1.5", "--timeout", "120"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCEEDED" in proc.stdout and proc.stdout.rstrip().endswith("PASS")
    # ... and it fails when the gateway is not there.
    proc = subprocess.run(
        [sys.executable, "-c", script.read_text(), "http://127.0.0.1:9", "--timeout", "5"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "FAIL" in proc.stderr, proc.stdout + proc.stderr


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _heredoc(text: str, target: str) -> str:
    match = re.search(rf"COPY [^\n]*<<'?EOF'? {re.escape(target)}\n(.*?)\nEOF\n", text, re.S)
    assert match, f"no heredoc for {target}"
    return match.group(1) + "\n"


def test_container_healthcheck_reports_grpc_and_http_health(file_mesh, tmp_path):
    script = tmp_path / "audiomesh-healthcheck"
    script.write_text(_heredoc(_dockerfile(), "/usr/local/bin/audiomesh-healthcheck"))
    env = _mesh_env(file_mesh)

    def check(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(script), *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
        )

    for name in ("hpss", "orchestrator"):  # the port from AUDIOMESH_<NAME>_ADDR, as `serve` does
        proc = check(name)
        assert proc.returncode == 0 and "SERVING" in proc.stdout, proc.stdout + proc.stderr
    port = file_mesh.addresses["gateway"].rpartition(":")[2]
    proc = check("gateway", port)
    assert proc.returncode == 0 and ": 200" in proc.stdout, proc.stdout + proc.stderr
    proc = check("composite", "9")  # nothing listens on port 9
    assert proc.returncode != 0 and "unhealthy" in proc.stderr, proc.stdout + proc.stderr


# ---- Dockerfile and .dockerignore -------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    require_helm_venv()
    proc = subprocess.run(
        [str(HELM_VENV / "bin" / "hadolint"), "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _instructions(text: str) -> list[tuple[str, str]]:
    text = re.sub(r"<<'?EOF'?([^\n]*)\n.*?\nEOF\n", r"<<EOF\1\n", text, flags=re.S)  # drop heredoc bodies
    text = text.replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_builds_the_documented_image():
    text = _dockerfile()
    ins = _instructions(text)
    froms = [rest for word, rest in ins if word == "FROM"]
    names = [f.split()[-1] for f in froms]  # every stage is named (FROM ... AS name)
    # Each stage starts from the python image or from an earlier stage (runtime-base, build-base).
    assert len(froms) >= 2 and all(
        f.startswith("python:${PYTHON_VERSION}-slim") or f.split()[0] in names[:i] for i, f in enumerate(froms)
    )
    assert names[-1] == "runtime", "the full image stays the default (last) target"
    assert "ARG PYTHON_VERSION=3.11" in text
    pyproject = (ROOT / "pyproject.toml").read_text()
    torch_pin = re.search(r'"torch==([^"]+)"', pyproject).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text, "the image must install the torch that pyproject pins"
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M).group(1)
    assert f"ARG VERSION={version}" in text
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"] == version
    assert "ARG TORCH_VARIANT=cpu" in text and "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert re.search(r"apt-get install [^&]*libsndfile1", runs) and re.search(r"apt-get install [^&]*ffmpeg", runs)
    user = [rest for word, rest in ins if word == "USER"][-1]
    assert re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", user), "numeric, non-root (runAsNonRoot checks numbers)"
    uid, gid = (int(n) for n in user.split(":"))  # the chart and compose run as the same user
    pod = _values(CHART / "values.yaml")["podSecurityContext"]
    assert (pod["runAsUser"], pod["runAsGroup"], pod["fsGroup"]) == (uid, gid, gid)
    assert f"uid={uid},gid={gid}" in _compose()["x-audiomesh-service"]["tmpfs"][0]
    assert [rest for word, rest in ins if word == "ENTRYPOINT"] == ['["audiomesh"]']
    health = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and 'CMD ["audiomesh-healthcheck"]' in health[0]
    exposed = {int(p) for word, rest in ins if word == "EXPOSE" for p in rest.split()}
    gateway_port = int(Settings.model_fields["gateway_addr"].default.rpartition(":")[2])
    assert exposed == {*DEFAULT_PORTS.values(), gateway_port, *DEFAULT_METRICS_PORTS.values()}  # /metrics too
    env = " ".join(rest for word, rest in ins if word == "ENV")
    for setting in (
        "AUDIOMESH_HOST=0.0.0.0",
        "AUDIOMESH_MODEL_REPO=/models",
        "TORCH_HOME=/models/",
        "HF_HOME=/models/",
    ):
        assert setting in env, setting


def test_dockerignore_keeps_the_context_to_what_the_build_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "an allowlist: everything else (.git, .venv, .env, data) stays out"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    copied = set()
    for word, rest in _instructions(_dockerfile()):
        if word == "COPY" and "--from" not in rest and "<<" not in rest:
            copied.update(shlex.split(rest)[:-1])
    assert copied and copied <= allowed, f"COPY sources not in the build context: {copied - allowed}"
    assert all((ROOT / path).exists() for path in allowed), allowed
    assert not allowed & {".env", ".git", ".venv", "data", "tests"}


# ---- docker compose ---------------------------------------------------------------------------


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _default(value: str) -> str:
    """${VAR:-default} → default (what compose uses when .env does not set VAR)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def _check_compose_schema(path: Path) -> subprocess.CompletedProcess:
    require_helm_venv()
    return subprocess.run(
        [str(HELM_VENV / "bin" / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_file_follows_the_compose_specification(tmp_path):
    proc = _check_compose_schema(ROOT / "docker-compose.yml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        (ROOT / "docker-compose.yml").read_text().replace("restart: unless-stopped", "restrat: unless-stopped", 1)
    )
    proc = _check_compose_schema(broken)
    assert proc.returncode != 0 and "restrat" in proc.stdout, "the schema check must catch a misspelt key"


def test_compose_wires_the_mesh():
    services = _compose()["services"]
    assert set(services) == {"s3", "s3-init", "secrets-init", *COMPONENTS}
    for name in ("s3", "s3-init"):
        image = _default(services[name]["image"])
        assert re.fullmatch(r"[\w./-]+:v?\d+(\.\d+)+", image), f"{name}: pin the image tag ({image})"
    assert services["s3-init"]["depends_on"]["s3"]["condition"] == "service_healthy"
    assert services["s3-init"]["restart"] == "no"
    for name in COMPONENTS:
        service = services[name]
        assert service["command"] == ["serve", name]
        assert service["restart"] == "unless-stopped" and service["read_only"] is True
        assert service["healthcheck"]["test"] == ["CMD", "audiomesh-healthcheck"]
        assert any(t.startswith("/tmp") for t in service["tmpfs"])
        env = {k: _default(v) for k, v in service["environment"].items()}
        assert env["AUDIOMESH_HOST"] == "0.0.0.0"
        assert env["AUDIOMESH_STORE_URL"].startswith("s3://") and env["AUDIOMESH_S3_ENDPOINT"] == "s3:7070"
        for other in SERVICES:
            target = env[f"AUDIOMESH_{other.upper()}_ADDR"]
            assert target == (
                f"dns:///{other}:{DEFAULT_PORTS[other]}" if other in WORKERS else f"{other}:{DEFAULT_PORTS[other]}"
            )
        deps = service["depends_on"]
        if name == "gateway":
            assert deps == {"orchestrator": {"condition": "service_healthy"}}
        else:
            assert deps["s3-init"] == {"condition": "service_completed_successfully"}
            assert deps["secrets-init"] == {"condition": "service_completed_successfully"}
        assert "secrets:/var/lib/audiomesh/secrets:ro" in service["volumes"]
        assert env["AUDIOMESH_SECRETS_DIR"] == "/var/lib/audiomesh/secrets"
    orchestrator_deps = services["orchestrator"]["depends_on"]
    assert all(orchestrator_deps[w] == {"condition": "service_healthy"} for w in WORKERS)
    assert "models:/models" in services["separation"]["volumes"]
    assert _default(services["gateway"]["ports"][0]) == "127.0.0.1:8080:8080"
    assert set(_compose()["volumes"]) == {"s3-data", "models", "secrets"}
    for name in COMPONENTS:  # longer than the services' own drain on SIGTERM
        assert int(services[name]["stop_grace_period"].removesuffix("s")) > DRAIN_SECONDS[name]


def test_compose_generates_the_service_token_once(tmp_path, monkeypatch):
    """secrets-init's script, run as compose runs it (its volume here a temp folder): the services
    then read the token from AUDIOMESH_SECRETS_DIR; a second run keeps it; .env/environment win."""
    init = _compose()["services"]["secrets-init"]
    assert init["entrypoint"] == ["python", "-c"] and init["restart"] == "no"
    assert _default(init["image"]) == _default(_compose()["x-audiomesh-service"]["image"])
    assert init["volumes"] == ["secrets:/var/lib/audiomesh/secrets"]
    script = init["command"][0].replace("/var/lib/audiomesh/secrets", str(tmp_path))
    for _ in range(2):
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    token_file = tmp_path / "audiomesh_service_token"
    assert oct(token_file.stat().st_mode & 0o777) == "0o400"
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    monkeypatch.delenv("AUDIOMESH_SERVICE_TOKEN", raising=False)
    monkeypatch.setenv("AUDIOMESH_SECRETS_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no .env here
    assert load_settings().service_token.get_secret_value() == token
    monkeypatch.setenv("AUDIOMESH_SERVICE_TOKEN", "from-the-environment")
    assert load_settings().service_token.get_secret_value() == "from-the-environment"
    monkeypatch.setenv("AUDIOMESH_SECRETS_DIR", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="AUDIOMESH_SECRETS_DIR"):
        load_settings()


# ---- every environment variable: read, documented, set ----------------------------------------

# Read by the code and deliberately not set by the chart (the code's default applies), and why.
CHART_DEFAULTED = {
    "AUDIOMESH_TLS_CERT_FILE": "kubelet's gRPC probes speak plaintext; encrypt in-cluster traffic with a service mesh",
    "AUDIOMESH_TLS_KEY_FILE": "as AUDIOMESH_TLS_CERT_FILE",
    "AUDIOMESH_TLS_CA_FILE": "as AUDIOMESH_TLS_CERT_FILE (the clients' side of it)",
    "SSL_CERT_FILE": "the system CA bundle; a private CA is mounted with extraVolumes + extraEnv (docs/deploy.md)",
    "AUDIOMESH_THREAD_BUDGET": "only the local launcher (Mesh) splits one machine's cores; pods have CPU limits",
    "AUDIOMESH_HPSS_THREADS": "0 sizes HPSS's thread pool to the CPUs the pod may use",
    "AUDIOMESH_SECRETS_DIR": "the chart maps its Secret to environment variables (secretKeyRef)",
}
# Set in docker-compose.yml's environment only where containers need another value than the
# code's default; everything else reaches the services from .env through env_file, and why.
COMPOSE_FROM_ENV_FILE = {
    "AUDIOMESH_DEVICE": "auto finds a GPU when the container has one",
    "AUDIOMESH_DEFAULT_MODEL": "htdemucs, downloaded once into the models volume",
    "AUDIOMESH_TORCH_THREADS": "torch's default: the container's CPUs",
    "AUDIOMESH_METRICS_ENABLED": "on: /metrics in every container",
    "AUDIOMESH_METRICS_PORT": "-1: each service's own port (9450-9455) inside its container",
    "AUDIOMESH_COMPILE": "auto: compiled where the models volume's cache has the model (audiomesh warm); true in .env",
    "AUDIOMESH_COMPILE_BACKEND": "inductor",
    "AUDIOMESH_TLS_CERT_FILE": "plain gRPC on the compose network; set with mounted files to serve TLS",
    "AUDIOMESH_TLS_KEY_FILE": "as AUDIOMESH_TLS_CERT_FILE",
    "AUDIOMESH_TLS_CA_FILE": "as AUDIOMESH_TLS_CERT_FILE (what the clients trust)",
    "AUDIOMESH_API_KEYS": "open mode on a laptop; set hashed keys in .env for a shared machine",
    "AUDIOMESH_API_KEY": "client side (the CLI), not the services'",
    "AUDIOMESH_SERVICE_TOKEN": "generated once by secrets-init into the secrets volume (AUDIOMESH_SECRETS_DIR); .env wins",
    "AUDIOMESH_CORS_ORIGINS": "the web page is served by the gateway itself (same origin)",
    "AUDIOMESH_OTLP_ENDPOINT": "no collector in this file",
    "AUDIOMESH_LOG_LEVEL": "info",
    "HF_HUB_OFFLINE": "compose machines usually can download; set 1 in .env for offline weights",
    "SSL_CERT_FILE": "the system CA bundle",
}
# Limits and normalization defaults: the code's defaults suit compose and the chart alike.
COMPOSE_CODE_DEFAULTS = {
    "normalize_mode", "target_db", "true_peak_ceiling_db", "gain_linking", "output_encoding",
    "max_upload_bytes", "max_duration_seconds", "min_duration_seconds", "max_running_jobs",
    "max_parallel_nodes", "separation_split_max", "hpss_split_max", "node_attempts", "unavailable_budget_seconds", "stage_timeout_seconds",
    "retention_hours", "rate_limit_per_minute", "max_active_jobs_per_principal", "max_queued_jobs",
    "max_channels", "min_sample_rate", "max_sample_rate", "thread_budget", "hpss_threads",
    "drain_seconds",  # 0: each service's own default; stop_grace_period is longer for each
    "lease_ttl_seconds", "replica_id",  # compose runs one orchestrator; its name: hostname-pid
    "compile_nice",  # 19: a laptop's compile takes only idle CPU
}  # fmt: skip
COMPOSE_KNOBS = {"AUDIOMESH_IMAGE"}  # compose's own variables that share the prefix


def environ_reads() -> set[str]:
    """Names the code reads with os.environ[...] / os.environ.get(...) / os.getenv(...), or with .get(...)
    on any other environment mapping (``(os.environ if environ is None else environ).get(...)``)."""
    names = set()
    for folder in ("libs", "services", "gateway"):
        for path in (ROOT / folder).rglob("*.py"):
            if "audiomesh/v1" in path.as_posix():
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                target = None
                if isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
                    target = node.slice
                elif isinstance(node, ast.Call) and (
                    ast.unparse(node.func) == "os.getenv"
                    or (
                        isinstance(node.func, ast.Attribute)
                        and node.func.attr == "get"
                        and "environ" in ast.unparse(node.func.value)
                    )
                ):
                    target = node.args[0] if node.args else None
                if isinstance(target, ast.Constant) and isinstance(target.value, str):
                    names.add(target.value)
    return names


def code_variables() -> set[str]:
    return {f"AUDIOMESH_{f.upper()}" for f in Settings.model_fields} | environ_reads()


def readme_configuration_table() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    found = set()
    for row in section.splitlines():
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1] if row.startswith("|") else "")
        found.update(names)
        if "…" in row and len(names) == 2 and all(n.endswith("_ADDR") for n in names):
            # "`AUDIOMESH_ORCHESTRATOR_ADDR` … `AUDIOMESH_NORMALIZE_ADDR`": the services between
            first, last = (n.removeprefix("AUDIOMESH_").removesuffix("_ADDR").lower() for n in names)
            between = SERVICES[SERVICES.index(first) : SERVICES.index(last) + 1]
            found.update(f"AUDIOMESH_{s.upper()}_ADDR" for s in between)
    return found


def chart_variables() -> set[str]:
    text = "\n".join(p.read_text() for p in (CHART / "templates").rglob("*") if p.is_file())
    names = set(re.findall(r"^\s+(?:- name: )?([A-Z][A-Z0-9_]+):?", text, re.M))
    # range-built names in the ConfigMap and the Secret's env helper
    if "AUDIOMESH_{{ upper $component }}_ADDR" in text:
        names.update(f"AUDIOMESH_{c.upper()}_ADDR" for c in COMPONENTS)
    names.update(re.findall(r'"(AUDIOMESH_[A-Z0-9_]+)" "[a-z0-9-]+"', text))
    return {n for n in names if not n.endswith("_")}


def test_code_reads_no_variable_this_test_does_not_know():
    """The os.environ reads outside Settings, so a new one shows up here."""
    assert environ_reads() == {"HF_HUB_OFFLINE", "SSL_CERT_FILE", "AUDIOMESH_SECRETS_DIR"}


def test_every_variable_is_documented_in_readme():
    documented = readme_configuration_table()
    other_docs = (ROOT / "README.md").read_text() + (ROOT / "docs" / "deploy.md").read_text()
    missing = [
        v
        for v in sorted(code_variables())
        if (v not in documented if v.startswith("AUDIOMESH_") else v not in other_docs)
    ]
    assert not missing, f"not in README's configuration table (or, for non-AUDIOMESH variables, README/docs): {missing}"


def test_every_variable_is_set_by_the_chart_or_deliberately_defaulted():
    chart, read = chart_variables(), code_variables()
    missing = [v for v in sorted(read) if v not in chart and v not in CHART_DEFAULTED]
    assert not missing, f"the chart neither sets these nor lists them in CHART_DEFAULTED: {missing}"
    assert not (set(CHART_DEFAULTED) & chart), "CHART_DEFAULTED lists a variable the chart sets"
    unknown = sorted(v for v in chart if v.startswith("AUDIOMESH_") and v not in read)
    assert not unknown, f"the chart sets variables no code reads: {unknown}"


def test_every_variable_is_set_by_compose_or_deliberately_defaulted():
    compose = _compose()
    environment = set(compose["x-audiomesh-service"]["environment"])
    for name in COMPONENTS:
        environment |= set(compose["services"][name]["environment"])
    assert {"path": ".env", "required": False} in compose["x-audiomesh-service"]["env_file"]
    defaulted = set(COMPOSE_FROM_ENV_FILE) | {f"AUDIOMESH_{f.upper()}" for f in COMPOSE_CODE_DEFAULTS}
    read = code_variables()
    missing = [v for v in sorted(read) if v not in environment and v not in defaulted]
    assert not missing, f"docker-compose.yml neither sets these nor are they listed as defaulted: {missing}"
    assert not (defaulted & environment), f"listed as defaulted but set: {defaulted & environment}"
    text = (ROOT / "docker-compose.yml").read_text()
    unknown = sorted(set(re.findall(r"AUDIOMESH_[A-Z0-9_]+", text)) - read - COMPOSE_KNOBS)
    assert not unknown, f"docker-compose.yml names variables no code reads: {unknown}"


def test_env_example_lists_every_variable():
    text = (ROOT / ".env.example").read_text()
    listed, read = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]+)=", text, re.M)), code_variables()
    missing = sorted(read - listed)
    assert not missing, f".env.example does not list: {missing}"
    unknown = sorted(v for v in listed if v.startswith("AUDIOMESH_") and v not in read | COMPOSE_KNOBS)
    assert not unknown, f".env.example lists variables no code reads: {unknown}"
    shown = {}
    for line in text.splitlines():  # every value shown is one the code accepts
        match = re.match(r"^# (AUDIOMESH_[A-Z0-9_]+)=(\S+)", line)
        if match and match.group(1) not in COMPOSE_KNOBS:
            shown[match.group(1).removeprefix("AUDIOMESH_").lower()] = match.group(2)
    assert len(shown) > 30
    Settings(**shown)


# ---- docs --------------------------------------------------------------------------------------


def test_readme_has_a_deploy_section_before_configuration():
    readme = (ROOT / "README.md").read_text()
    assert "\n## Deploy\n" in readme and readme.index("\n## Deploy\n") < readme.index("\n## Configuration\n")
    deploy = readme.split("\n## Deploy\n", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "docker compose up",
        "helm install",
        "helm upgrade",
        "helm test",
        "separation.autoscaling",
        "gpu",
        "docs/deploy.md",
    ):
        assert needle in deploy, needle
    guide = (ROOT / "docs" / "deploy.md").read_text()
    assert "## Several orchestrators" in guide and "RollingUpdate" in guide and "drainSeconds" in guide
