"""Helm for the deploy tests: lint and render charts/audiomesh with the Helm library itself.

There is no helm binary or cluster here. ``.venv-helm`` (``scripts/setup_helm.sh``, Python
>= 3.12) holds helm-sdkpy, whose Lint takes no values and which has no ``template`` action.
So this file is also a script that runs in that venv (``python tests/helpers/deploy.py`` with a
JSON request on stdin) and, per scenario:

* lints a copy of the chart whose values.yaml has the scenario's values merged in;
* renders it with Helm's real install action against a fake Kubernetes API on 127.0.0.1
  that answers discovery, finds no existing objects and accepts every create: the release
  that Install returns holds the rendered manifest and hooks (`fail` in templates works
  here, unlike in lint mode);
* validates every rendered object against Kubernetes' OpenAPI schemas (kubernetes-validate,
  strict: unknown fields are errors) for each requested Kubernetes version.

The top of this file needs only the standard library; pytest is imported where it is used.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "audiomesh"
HELM_VENV = ROOT / ".venv-helm"
HELM_PYTHON = HELM_VENV / "bin" / "python"


def require_helm_venv() -> Path:
    """The helm venv's python; skip without it locally, fail without it in CI."""
    import pytest

    if HELM_PYTHON.exists():
        return HELM_PYTHON
    message = f"{HELM_VENV.name}/ is missing: run `bash scripts/setup_helm.sh` (helm-sdkpy needs Python >= 3.12)"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(message + " (CI is set: these checks must run)")
    pytest.skip(message)


def helm(request: dict, timeout: float = 120.0) -> dict:
    """Run this file in the helm venv with ``request``; return its JSON answer."""
    python = require_helm_venv()
    proc = subprocess.run(
        [str(python), __file__],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"helm harness failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---- below: runs inside .venv-helm ------------------------------------------------------------

_CORE = [
    ("configmaps", "ConfigMap"),
    ("secrets", "Secret"),
    ("services", "Service"),
    ("serviceaccounts", "ServiceAccount"),
    ("persistentvolumeclaims", "PersistentVolumeClaim"),
    ("pods", "Pod"),
]
_GROUPS = {
    "apps/v1": [("deployments", "Deployment"), ("statefulsets", "StatefulSet")],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("ingresses", "Ingress"), ("networkpolicies", "NetworkPolicy")],
    "batch/v1": [("jobs", "Job")],
}


def _resource_list(group_version: str, items: list[tuple[str, str]]) -> dict:
    verbs = ["create", "delete", "get", "list", "patch", "update", "watch"]
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind, "verbs": verbs}
            for name, kind in items
        ],
    }


def _fake_api(kube_version: str):
    """A Kubernetes API that answers discovery, knows no objects and accepts every write."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    major, minor = kube_version.split(".")[:2]
    groups = {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": gv.split("/")[0],
                "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}],
                "preferredVersion": {"groupVersion": gv, "version": gv.split("/")[1]},
            }
            for gv in _GROUPS
        ],
    }
    answers = {
        "/version": {"major": major, "minor": minor, "gitVersion": f"v{kube_version}", "platform": "linux/amd64"},
        "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
        "/api/v1": _resource_list("v1", _CORE),
        "/apis": groups,
        **{f"/apis/{gv}": _resource_list(gv, items) for gv, items in _GROUPS.items()},
    }

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            if path in answers:
                return self._send(200, json.dumps(answers[path]).encode())
            if path.endswith(("/secrets", "/configmaps")):  # Helm's release storage: no releases
                return self._send(200, json.dumps({"kind": "List", "apiVersion": "v1", "items": []}).encode())
            status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404}
            return self._send(404, json.dumps(status).encode())

        def _echo(self, code: int) -> None:  # creates and updates: the object as sent
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(code, body, self.headers.get("Content-Type", "application/json"))

        def do_POST(self) -> None:
            self._echo(201)

        def do_PUT(self) -> None:
            self._echo(200)

        def do_PATCH(self) -> None:
            self._echo(200)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _kubeconfig(folder: Path, port: int, namespace: str) -> Path:
    path = folder / "kubeconfig.yaml"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
                "current-context": "fake",
            }
        )
    )
    return path


def _documents(text: str) -> list[dict]:
    import yaml

    return [doc for doc in yaml.safe_load_all(text) if doc]


def _lint(chart: Path, values: dict, folder: Path) -> list[dict]:
    import asyncio
    import shutil

    import yaml
    from helm_sdkpy import Configuration, Lint

    copy = folder / "lint" / chart.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(chart, copy)
    merged = deep_merge(yaml.safe_load((chart / "values.yaml").read_text()) or {}, values)
    (copy / "values.yaml").write_text(yaml.safe_dump(merged, sort_keys=False))
    result = asyncio.run(Lint(Configuration()).run(str(copy)))
    return [
        {"severity": m["Severity"], "path": m["Path"], "error": str(m.get("Err") or "")} for m in result["Messages"]
    ]


def _render(chart: Path, release: str, namespace: str, values: dict, kubeconfig: Path) -> dict:
    import asyncio

    from helm_sdkpy import Configuration, Install

    config = Configuration(namespace=namespace, kubeconfig=str(kubeconfig))
    try:
        rel = asyncio.run(Install(config).run(release, str(chart), values=values or None, wait=False, timeout=60))
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return {"error": f"{type(exc).__name__}: {exc}"}
    hooks = [{"events": h.get("events", []), "manifest": _documents(h["manifest"])} for h in rel.get("hooks") or []]
    return {
        "error": None,
        "manifest": _documents(rel["manifest"]),
        "hooks": hooks,
        "notes": rel["info"].get("notes", ""),
    }


def _k8s_errors(docs: list[dict], versions: list[str]) -> list[str]:
    import kubernetes_validate

    errors = []
    for doc in docs:
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as exc:  # noqa: BLE001 - collected, reported by the test
                name = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
                errors.append(f"{name} (Kubernetes {version}): {getattr(exc, 'message', exc)}")
    return errors


def main() -> int:
    import tempfile

    request = json.load(sys.stdin)
    chart = Path(request.get("chart", CHART))
    namespace = request.get("namespace", "audiomesh")
    versions = request.get("kubernetes_versions", [])
    out: dict[str, dict] = {}
    server = _fake_api(request.get("server_version", "1.33.0"))
    with tempfile.TemporaryDirectory(prefix="audiomesh-helm-") as tmp:
        folder = Path(tmp)
        kubeconfig = _kubeconfig(folder, server.server_address[1], namespace)
        for name, scenario in request["scenarios"].items():
            values = scenario.get("values", {})
            result: dict = {}
            if scenario.get("lint", True):
                result["lint"] = _lint(chart, values, folder)
            result.update(_render(chart, scenario.get("release", "am"), namespace, values, kubeconfig))
            if result.get("error") is None and versions:
                docs = result["manifest"] + [d for h in result["hooks"] for d in h["manifest"]]
                result["k8s_errors"] = _k8s_errors(docs, versions)
            out[name] = result
    server.shutdown()
    json.dump(out, sys.stdout)
    return 0


# ---- CRDs the chart may render: ServiceMonitor, PodMonitor (Prometheus Operator), ScaledObject (KEDA)
#
# The fake API serves their groups too, like a cluster with both operators installed (Helm refuses
# kinds the API does not know), and since kubernetes-validate knows only Kubernetes' own kinds, their
# objects are checked strictly against these schemas instead: the part of each upstream CRD's
# openAPIV3Schema the chart renders, copied with additionalProperties: false (from prometheus-operator
# example/prometheus-operator-crd at 6adcebc, v0.93+; KEDA config/crd/bases at 8b4f083, v2.20+).

_STRING = {"type": "string"}
_STRINGS = {"type": "array", "items": _STRING}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_INT32 = {"type": "integer", "format": "int32"}


def _strict(properties: dict, required: tuple[str, ...] = ()) -> dict:
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return {**schema, "required": list(required)} if required else schema


_RELABELINGS = {
    "type": "array",
    "items": _strict(
        {
            "action": {"type": "string", "enum": [
                "replace", "Replace", "keep", "Keep", "drop", "Drop", "hashmod", "HashMod", "labelmap", "LabelMap",
                "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "lowercase", "Lowercase", "uppercase", "Uppercase",
                "keepequal", "KeepEqual", "dropequal", "DropEqual",
            ]},
            "modulus": {"type": "integer", "format": "int64", "minimum": 0},
            "regex": _STRING, "replacement": _STRING, "separator": _STRING,
            "sourceLabels": _STRINGS, "targetLabel": _STRING,
        }
    ),
}  # fmt: skip
_LABEL_SELECTOR = _strict(
    {
        "matchExpressions": {
            "type": "array",
            "items": _strict({"key": _STRING, "operator": _STRING, "values": _STRINGS}, ("key", "operator")),
        },
        "matchLabels": {"type": "object", "additionalProperties": _STRING},
    }
)


def _monitor_spec(endpoints: str) -> dict:
    endpoint = _strict(
        {
            "port": _STRING,
            "path": _STRING,
            "interval": _DURATION,
            "scrapeTimeout": _DURATION,
            "honorLabels": {"type": "boolean"},
            "relabelings": _RELABELINGS,
            "metricRelabelings": _RELABELINGS,
        }
    )
    return _strict(
        {
            "namespaceSelector": _strict({"any": {"type": "boolean"}, "matchNames": _STRINGS}),
            "selector": _LABEL_SELECTOR,
            "podTargetLabels": _STRINGS,
            endpoints: {"type": "array", "items": endpoint},
        },
        ("selector", endpoints) if endpoints == "endpoints" else ("selector",),
    )


_SCALING_RULES = _strict(
    {
        "policies": {
            "type": "array",
            "items": _strict(
                {"periodSeconds": _INT32, "type": _STRING, "value": _INT32}, ("periodSeconds", "type", "value")
            ),
        },
        "selectPolicy": _STRING,
        "stabilizationWindowSeconds": _INT32,
    }
)
_SCALED_OBJECT_SPEC = _strict(
    {
        "scaleTargetRef": _strict(
            {"apiVersion": _STRING, "envSourceContainerName": _STRING, "kind": _STRING, "name": {**_STRING, "minLength": 1}},
            ("name",),
        ),
        "minReplicaCount": {**_INT32, "minimum": 0},
        "maxReplicaCount": {**_INT32, "minimum": 1},
        "pollingInterval": {**_INT32, "minimum": 1},
        "cooldownPeriod": {**_INT32, "minimum": 0},
        "fallback": _strict(
            {
                "behavior": {"type": "string", "enum": ["static", "currentReplicas", "currentReplicasIfHigher",
                                                        "currentReplicasIfLower", "scalingModifiers"]},
                "failureThreshold": {**_INT32, "minimum": 0},
                "replicas": {**_INT32, "minimum": 0},
            },
            ("failureThreshold", "replicas"),
        ),
        "advanced": _strict(
            {
                "horizontalPodAutoscalerConfig": _strict(
                    {"behavior": _strict({"scaleDown": _SCALING_RULES, "scaleUp": _SCALING_RULES}), "name": _STRING}
                ),
                "restoreToOriginalReplicaCount": {"type": "boolean"},
            }
        ),
        "triggers": {
            "type": "array",
            "minItems": 1,
            "items": _strict(
                {
                    "authenticationRef": _strict(
                        {"kind": {"type": "string", "enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]},
                         "name": _STRING},
                        ("name",),
                    ),
                    "metadata": {"type": "object", "additionalProperties": _STRING},
                    "metricType": _STRING,
                    "name": _STRING,
                    "type": {**_STRING, "minLength": 1},
                    "useCachedMetrics": {"type": "boolean"},
                },
                ("metadata", "type"),
            ),
        },
    },
    ("scaleTargetRef", "triggers"),
)  # fmt: skip

#: (apiVersion, kind) -> JSON schema of the object's spec.
CRD_SPECS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor_spec("endpoints"),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor_spec("podMetricsEndpoints"),
    ("keda.sh/v1alpha1", "ScaledObject"): _SCALED_OBJECT_SPEC,
}
_GROUPS.update(
    {
        "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor"), ("podmonitors", "PodMonitor")],
        "keda.sh/v1alpha1": [("scaledobjects", "ScaledObject")],
    }
)


def crd_errors(docs: list[dict]) -> list[str]:
    """Errors of the CRD objects among ``docs`` against :data:`CRD_SPECS` (others are ignored)."""
    import jsonschema

    errors = []
    for doc in docs:
        spec_schema = CRD_SPECS.get((doc.get("apiVersion"), doc.get("kind")))
        if spec_schema is None:
            continue
        schema = _strict(
            {
                "apiVersion": _STRING,
                "kind": _STRING,
                "metadata": _strict(
                    {
                        "name": {**_STRING, "minLength": 1},
                        "namespace": _STRING,
                        "labels": {"type": "object", "additionalProperties": _STRING},
                        "annotations": {"type": "object", "additionalProperties": _STRING},
                    },
                    ("name",),
                ),
                "spec": spec_schema,
            },
            ("apiVersion", "kind", "metadata", "spec"),
        )
        for error in jsonschema.Draft7Validator(schema).iter_errors(doc):
            where = ".".join(str(p) for p in error.absolute_path)
            errors.append(f"{doc['kind']}/{doc['metadata'].get('name')} (CRD schema) {where}: {error.message}")
    return errors


_kubernetes_errors = _k8s_errors


def _k8s_errors(docs: list[dict], versions: list[str]) -> list[str]:  # noqa: F811 - CRDs join the check
    """kubernetes-validate for Kubernetes' kinds, :func:`crd_errors` for the CRDs above."""
    core = [d for d in docs if (d.get("apiVersion"), d.get("kind")) not in CRD_SPECS]
    return _kubernetes_errors(core, versions) + crd_errors(docs)


if __name__ == "__main__":
    sys.exit(main())


# ---- reading rendered scenarios (test_deploy, test_chart_monitoring) ---------------------------

#: The namespace and release every scenario renders into.
NAMESPACE = "audiomesh"
RELEASE = "am"


def rendered(charts: dict, scenario: str) -> dict:
    """A scenario's render result; it must have rendered without an error."""
    result = charts[scenario]
    assert result["error"] is None, f"{scenario}: {result['error']}"
    return result


def objects(charts: dict, scenario: str, kind: str | None = None) -> list[dict]:
    docs = rendered(charts, scenario)["manifest"]
    return [d for d in docs if kind is None or d["kind"] == kind]


def one(charts: dict, scenario: str, kind: str, name: str) -> dict:
    found = [d for d in objects(charts, scenario, kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{scenario}: {kind}/{name} rendered {len(found)} times"
    return found[0]


def deployment(charts: dict, scenario: str, component: str) -> dict:
    return one(charts, scenario, "Deployment", f"{RELEASE}-audiomesh-{component}")


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def configmap(charts: dict, scenario: str) -> dict[str, str]:
    return one(charts, scenario, "ConfigMap", f"{RELEASE}-audiomesh")["data"]
