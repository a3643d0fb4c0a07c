"""The chart's monitoring, autoscaling and hygiene options (issue 17), rendered by Helm itself.

Every scenario is rendered with Helm's install action against the fake Kubernetes API of
tests/helpers/deploy.py (which also serves the Prometheus Operator's and KEDA's API groups) and
validated strictly: Kubernetes' own kinds with kubernetes-validate, and ServiceMonitor, PodMonitor
and ScaledObject against the vendored minimal schemas there (``CRD_SPECS``: the part of each
upstream CRD the chart renders, with unknown fields refused). The structure is then checked on the
rendered objects: selectors against the labels of the pods actually rendered, the KEDA query and
the dashboard's expressions against the metric names the services export (``audiomesh.metrics``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import Counter, Histogram

from audiomesh import metrics
from tests.helpers.deploy import (
    CHART,
    NAMESPACE,
    RELEASE,
    configmap,
    container,
    crd_errors,
    deployment,
    helm,
    objects,
    one,
    rendered,
)

KUBERNETES_VERSIONS = ["1.27.0", "1.33.0"]
SERVICES = ("orchestrator", "separation", "hpss", "composite", "normalize", "gateway")
WORKERS = ("separation", "hpss", "composite", "normalize")
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"


def _values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


DEFAULTS = _values(CHART / "values.yaml")
MONITORING = _values(CHART / "ci" / "monitoring-values.yaml")
GPU = _values(CHART / "ci" / "gpu-values.yaml")
INGRESS_PEERS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}]
SCRAPERS = [
    {
        "namespaceSelector": {"matchLabels": {"team": "observability"}},
        "podSelector": {"matchLabels": {"app": "vmagent"}},
    }
]

VALID = {
    "defaults": {},
    "monitoring": MONITORING,
    # The other monitor, the gateway behind an ingress, custom KEDA settings, no `helm test` pod.
    "podmonitor": {
        "metrics": {"podMonitor": {"enabled": True, "namespace": "monitoring", "interval": "15s"}},
        "keda": {"serverAddress": PROMETHEUS, "authenticationRef": {"name": "prometheus-auth"}},
        "separation": {
            "autoscaling": {
                "keda": {"enabled": True, "minReplicas": 0, "threshold": 3, "query": "sum(audiomesh_nodes)"}
            },
            "workerConcurrency": 2,
        },
        "config": {"unavailableBudgetSeconds": 700},
        "ingress": {"enabled": True},
        "networkPolicy": {"enabled": True, "gateway": {"from": INGRESS_PEERS}, "metrics": {"from": SCRAPERS}},
        "tests": {"enabled": False},
    },
    "metrics-off": {"metrics": {"enabled": False}},
    "threads-explicit": {"separation": {"torchThreads": 3}},
    "threads-no-cpu-request": {"separation": {"resources": {"requests": {"cpu": None}}}},  # null removes a default
    # The GPU example (read-only model cache) with a compile cache of its own.
    "gpu-compile-cache": {**GPU, "separation": {**GPU["separation"], "compileCache": {"enabled": True, "existingClaim": "compiled-graphs"}}},
}  # fmt: skip

# Values that break one rule each, and the message the chart must give.
INVALID = {
    "hpa-and-keda": (
        {"keda": {"serverAddress": PROMETHEUS}, "separation": {"autoscaling": {"enabled": True, "keda": {"enabled": True}}}},
        "Set separation.autoscaling.enabled=false to scale on backlog with KEDA, or separation.autoscaling.keda.enabled=false",
    ),
    "keda-without-prometheus": (
        {"hpss": {"autoscaling": {"keda": {"enabled": True}}}},
        "Set keda.serverAddress",
    ),
    "keda-without-metrics": (
        {"metrics": {"enabled": False}, "keda": {"serverAddress": PROMETHEUS}, "hpss": {"autoscaling": {"keda": {"enabled": True}}}},
        "hpss.autoscaling.keda: KEDA reads the backlog from the services' metrics. Set metrics.enabled=true",
    ),
    "keda-min-above-max": (
        {"keda": {"serverAddress": PROMETHEUS}, "hpss": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}}},
        "hpss.autoscaling.keda: minReplicas (5) is above maxReplicas (2)",
    ),
    "keda-zero-with-a-short-budget": (  # 30 s polling + 10 s x 60 startup probe
        {"keda": {"serverAddress": PROMETHEUS}, "separation": {"autoscaling": {"keda": {"enabled": True, "minReplicas": 0}}}},
        "Set config.unavailableBudgetSeconds=630 or more",
    ),
    "both-monitors": (
        {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
        "Set metrics.serviceMonitor.enabled=false or metrics.podMonitor.enabled=false",
    ),
    "monitor-without-metrics": (
        {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
        "metrics.serviceMonitor.enabled=true needs the services' metrics. Set metrics.enabled=true",
    ),
    "metrics-port-clash": ({"metrics": {"port": 8080}}, "metrics.port=8080 is also gateway.port"),
    "ingress-with-an-open-gateway": (
        {"ingress": {"enabled": True}, "networkPolicy": {"enabled": True}},
        "Set networkPolicy.gateway.from to its pods",
    ),
    "rwo-compile-cache-many-pods": (
        {"separation": {"replicaCount": 2, "compileCache": {"enabled": True}}},
        "Set separation.compileCache.accessModes=[ReadWriteMany]",
    ),
    "schema-typo": ({"metrics": {"serviceMonitor": {"intervall": "30s"}}}, "intervall"),
}  # fmt: skip


@pytest.fixture(scope="module")
def charts() -> dict:
    scenarios = {
        name: {"values": values, "release": RELEASE, "lint": name == "monitoring"} for name, values in VALID.items()
    }
    for name, (values, _) in INVALID.items():
        scenarios[f"invalid-{name}"] = {"values": values, "release": RELEASE, "lint": False}
    return helm({"chart": str(CHART), "namespace": NAMESPACE, "scenarios": scenarios, "kubernetes_versions": KUBERNETES_VERSIONS})  # fmt: skip


def pod_labels(charts: dict, scenario: str) -> dict[str, dict[str, str]]:
    """Labels of every pod the release runs, by component: the Deployments' and the `helm test` pod's."""
    pods = {
        d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["labels"]
        for d in objects(charts, scenario, "Deployment")
    }  # fmt: skip
    for hook in rendered(charts, scenario)["hooks"]:
        for doc in hook["manifest"]:
            if doc["kind"] == "Pod":
                pods[doc["metadata"]["labels"]["app.kubernetes.io/component"]] = doc["metadata"]["labels"]
    return pods


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        present = key in labels
        if op == "In":
            ok = present and labels[key] in values
        elif op == "NotIn":
            ok = not present or labels[key] not in values
        else:
            ok = present == (op == "Exists")
        if not ok:
            return False
    return True


def selected(selector: dict, pods: dict[str, dict[str, str]]) -> set[str]:
    return {component for component, labels in pods.items() if selects(selector, labels)}


# ---- metric names in PromQL -------------------------------------------------------------------

_COUNTERS = {f.name for m in vars(metrics).values() if isinstance(m, Counter) for f in m.describe()}
_HISTOGRAMS = {f.name for m in vars(metrics).values() if isinstance(m, Histogram) for f in m.describe()}
_PROMQL_WORDS = {
    "sum", "max", "min", "avg", "count", "rate", "increase", "histogram_quantile", "vector", "label_values",
    "by", "without", "on", "ignoring", "group_left", "group_right", "or", "and", "unless", "bool", "offset",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings, e.g. "$namespace" or a regex
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges: [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,[^)]*\)", r"\1", expr)
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr)) - _PROMQL_WORDS


def unknown_metrics(names: set[str]) -> set[str]:
    """Sample names no service exports: counters read as NAME_total, histograms as NAME_bucket,
    _sum or _count, gauges as NAME (metrics.NAMES holds the family names)."""
    unknown = set()
    for name in names:
        base, _, suffix = name.rpartition("_")
        if suffix == "total" and base in _COUNTERS:
            continue
        if suffix in ("bucket", "sum", "count") and base in _HISTOGRAMS:
            continue
        if name in metrics.NAMES and name not in _COUNTERS | _HISTOGRAMS:
            continue
        unknown.add(name)
    return unknown


def test_promql_name_check_catches_names_the_services_do_not_export():
    expr = 'sum(rate(audiomesh_made_up_total{a="b"}[5m])) + sum(audiomesh_jobs_finished) + sum(audiomesh_jobs)'
    names = promql_metric_names(expr)
    assert names == {"audiomesh_made_up_total", "audiomesh_jobs_finished", "audiomesh_jobs"}
    # a counter must be read with _total, a histogram through its series, a gauge as it is
    assert unknown_metrics(names) == {"audiomesh_made_up_total", "audiomesh_jobs_finished"}
    assert unknown_metrics({"audiomesh_jobs_total", "audiomesh_job_duration_seconds"}) == {
        "audiomesh_jobs_total",
        "audiomesh_job_duration_seconds",
    }
    assert not unknown_metrics({"audiomesh_job_duration_seconds_bucket", "audiomesh_worker_refusals_total"})


# ---- render, validate, refuse -----------------------------------------------------------------


@pytest.mark.parametrize("scenario", VALID)
def test_scenario_renders_valid_objects(charts, scenario):
    result = rendered(charts, scenario)
    assert not result["k8s_errors"], "\n".join(result["k8s_errors"])
    docs = result["manifest"] + [d for h in result["hooks"] for d in h["manifest"]]
    keys = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), f"names collide: {sorted(k for k in keys if keys.count(k) > 1)}"
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name
    if scenario == "monitoring":
        problems = [m for m in result["lint"] if m["severity"] >= 2]
        assert not problems, problems
        kinds = {d["kind"] for d in docs}
        assert {"ServiceMonitor", "ScaledObject", "NetworkPolicy"} <= kinds


def test_crd_objects_are_checked_against_their_schemas(charts):
    """The CRD check refuses what the operators would: an unknown field, a wrong type, a missing one."""
    (monitor,) = objects(charts, "monitoring", "ServiceMonitor")
    (pod_monitor,) = objects(charts, "podmonitor", "PodMonitor")
    scaled = objects(charts, "monitoring", "ScaledObject")
    assert not crd_errors([monitor, pod_monitor, *scaled])
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["intervall"] = "30s"
    assert any("intervall" in e for e in crd_errors([broken]))
    broken = copy.deepcopy(scaled[0])
    broken["spec"]["triggers"][0]["metadata"]["threshold"] = 1  # KEDA's metadata values are strings
    assert crd_errors([broken])
    broken = copy.deepcopy(pod_monitor)
    del broken["spec"]["selector"]
    assert any("selector" in e for e in crd_errors([broken]))


@pytest.mark.parametrize("name", INVALID)
def test_chart_refuses_inconsistent_values_with_a_message(charts, name):
    error = charts[f"invalid-{name}"]["error"]
    assert error, f"{name}: rendered although it should fail"
    assert INVALID[name][1] in error, error


# ---- metrics ports, Service, monitors ---------------------------------------------------------


def test_every_service_pod_serves_metrics_on_its_own_port(charts):
    data = configmap(charts, "defaults")
    assert data["AUDIOMESH_METRICS_ENABLED"] == "true"
    assert data["AUDIOMESH_METRICS_PORT"] == str(DEFAULTS["metrics"]["port"]) == "9090"
    pods = pod_labels(charts, "defaults")
    for component in SERVICES:
        c = container(deployment(charts, "defaults", component))
        ports = {p["name"]: p for p in c["ports"]}
        assert ports["metrics"] == {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}, component
        assert c["ports"][0]["name"] in ("grpc", "http"), "the served port stays first"
        assert c["envFrom"] == [{"configMapRef": {"name": f"{RELEASE}-audiomesh"}}]  # where the two variables are
    # One headless Service over exactly the six service pods (not the store, not the test pod).
    service = one(charts, "defaults", "Service", f"{RELEASE}-audiomesh-metrics")
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP", "appProtocol": "http"}
    ]
    assert selected({"matchLabels": service["spec"]["selector"]}, pods) == set(SERVICES)
    assert {"s3", "test"} <= set(pods)
    # The Services clients dial carry only their own port (the gateway's may face the internet).
    for s in objects(charts, "defaults", "Service"):
        if s["metadata"]["name"] != service["metadata"]["name"]:
            assert "metrics" not in {p["name"] for p in s["spec"]["ports"]}, s["metadata"]["name"]
    assert not objects(charts, "defaults", "ServiceMonitor") and not objects(charts, "defaults", "PodMonitor")


def test_metrics_can_be_turned_off(charts):
    assert configmap(charts, "metrics-off")["AUDIOMESH_METRICS_ENABLED"] == "false"
    for component in SERVICES:
        c = container(deployment(charts, "metrics-off", component))
        assert [p["name"] for p in c["ports"]] == ["http" if component == "gateway" else "grpc"]
    names = {s["metadata"]["name"] for s in objects(charts, "metrics-off", "Service")}
    assert f"{RELEASE}-audiomesh-metrics" not in names


def test_service_monitor_scrapes_the_metrics_service(charts):
    (monitor,) = objects(charts, "monitoring", "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"  # the Prometheus' selector
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    services = [
        s for s in objects(charts, "monitoring", "Service") if selects(spec["selector"], s["metadata"]["labels"])
    ]
    assert [s["metadata"]["name"] for s in services] == [f"{RELEASE}-audiomesh-metrics"]
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] in {p["name"] for p in services[0]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "10s"
    # The worker gauges' own `service` label must win over the target's `service` (the Service name).
    assert endpoint["honorLabels"] is True
    assert spec["podTargetLabels"] == ["app.kubernetes.io/component", "app.kubernetes.io/instance"]


def test_pod_monitor_scrapes_the_service_pods(charts):
    (monitor,) = objects(charts, "podmonitor", "PodMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"  # the object elsewhere ...
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}  # ... watching the release's namespace
    pods = pod_labels(charts, "podmonitor")
    assert selected(spec["selector"], pods) == set(SERVICES)
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    assert spec["podTargetLabels"] == ["app.kubernetes.io/component", "app.kubernetes.io/instance"]
    for labels in pods.values():  # what the dashboard's service and release pickers read
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/component"]
    for component in SERVICES:
        assert "metrics" in {p["name"] for p in container(deployment(charts, "podmonitor", component))["ports"]}
    assert not objects(charts, "podmonitor", "ServiceMonitor")


# ---- autoscaling ------------------------------------------------------------------------------


def _orchestrator_series() -> str:
    return f'namespace="{NAMESPACE}",pod=~"{RELEASE}-audiomesh-orchestrator-.+"'


def test_keda_scales_separation_and_hpss_on_their_backlog(charts):
    objs = {o["metadata"]["name"]: o for o in objects(charts, "monitoring", "ScaledObject")}
    assert set(objs) == {f"{RELEASE}-audiomesh-separation", f"{RELEASE}-audiomesh-hpss"}
    assert not objects(charts, "monitoring", "HorizontalPodAutoscaler"), "KEDA makes its own HPA"
    series = _orchestrator_series()
    nodes = {
        stage: f'sum(audiomesh_nodes{{stage="{stage}",state!="held",{series}}})' for stage in ("separation", "hpss")
    }
    expected_query = {
        # queued jobs: each becomes a separation node once planned (which needs a separation pod)
        "separation": f'sum(audiomesh_jobs{{state="queued",{series}}}) + {nodes["separation"]}',
        "hpss": nodes["hpss"],
    }
    for component in ("separation", "hpss"):
        obj = objs[f"{RELEASE}-audiomesh-{component}"]["spec"]
        dep = deployment(charts, "monitoring", component)
        assert obj["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
        assert "replicas" not in dep["spec"], "KEDA owns the replica count"
        keda = MONITORING[component]["autoscaling"]["keda"]
        assert (obj["minReplicaCount"], obj["maxReplicaCount"]) == (keda["minReplicas"], keda["maxReplicas"])
        assert obj["pollingInterval"] == 30 and obj["cooldownPeriod"] == 300
        assert obj["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
            "stabilizationWindowSeconds": 600
        }
        (trigger,) = obj["triggers"]
        assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
        meta = trigger["metadata"]
        assert meta["serverAddress"] == PROMETHEUS
        assert meta["query"] == expected_query[component]
        assert not unknown_metrics(promql_metric_names(meta["query"]))
        # pods = ceil(backlog / threshold): one node per worker slot
        concurrency = DEFAULTS[component]["workerConcurrency"]
        assert meta["threshold"] == str(concurrency) and meta["activationThreshold"] == "0"
        assert meta["ignoreNullValues"] == "false", "no series must be an error, not a backlog of 0"
        # The query's pod regex selects this release's orchestrator pods, by the Deployment's name.
        pod = f"{deployment(charts, 'monitoring', 'orchestrator')['metadata']['name']}-6d9f7c8b4-x2x7q"
        regex = re.search(r'pod=~"([^"]+)"', meta["query"]).group(1)
        assert re.fullmatch(regex, pod) and not re.fullmatch(regex, pod.replace("orchestrator", "gateway"))
    assert objs[f"{RELEASE}-audiomesh-separation"]["spec"]["fallback"] == {"failureThreshold": 3, "replicas": 2}
    assert "fallback" not in objs[f"{RELEASE}-audiomesh-hpss"]["spec"]
    # KEDA-scaled services still get a disruption budget (they may run several pods).
    budgets = {p["metadata"]["name"] for p in objects(charts, "monitoring", "PodDisruptionBudget")}
    assert {f"{RELEASE}-audiomesh-separation", f"{RELEASE}-audiomesh-hpss"} <= budgets


def test_keda_options_threshold_query_and_authentication(charts):
    (obj,) = objects(charts, "podmonitor", "ScaledObject")
    spec = obj["spec"]
    assert spec["minReplicaCount"] == 0  # scale to zero (config.unavailableBudgetSeconds covers the start)
    (trigger,) = spec["triggers"]
    assert trigger["metadata"]["query"] == "sum(audiomesh_nodes)"
    assert trigger["metadata"]["threshold"] == "3"
    assert trigger["authenticationRef"] == {"name": "prometheus-auth"}
    assert "replicas" not in deployment(charts, "podmonitor", "separation")["spec"]
    assert deployment(charts, "podmonitor", "hpss")["spec"]["replicas"] == 1  # untouched: no autoscaler
    assert not objects(charts, "defaults", "ScaledObject")


# ---- NetworkPolicies --------------------------------------------------------------------------


def _policies(charts: dict, scenario: str) -> dict[str, dict]:
    """NetworkPolicies by the one component whose pods each selects (exactly one, checked)."""
    pods = pod_labels(charts, scenario)
    out = {}
    for policy in objects(charts, scenario, "NetworkPolicy"):
        targets = selected(policy["spec"]["podSelector"], pods)
        assert len(targets) == 1, f"{policy['metadata']['name']} selects {targets}"
        (component,) = targets
        assert component not in out, f"two policies select {component}"
        out[component] = policy["spec"]
    return out


def _rule_for(spec: dict, port: int) -> dict:
    (rule,) = [r for r in spec["ingress"] if [p["port"] for p in r["ports"]] == [port]]
    assert rule["ports"] == [{"port": port, "protocol": "TCP"}]
    return rule


def _sources(rule: dict, pods: dict[str, dict[str, str]]) -> set[str]:
    """The release's pods a rule admits (peers without a namespaceSelector are in the release's namespace)."""
    found = set()
    for peer in rule["from"]:
        if set(peer) == {"podSelector"}:
            found |= selected(peer["podSelector"], pods)
    return found


def test_network_policies_admit_only_the_callers_each_pod_needs(charts):
    pods = pod_labels(charts, "monitoring")
    policies = _policies(charts, "monitoring")
    assert set(policies) == {*SERVICES, "s3"}, "every pod of the release is isolated"
    metrics_from = DEFAULTS["networkPolicy"]["metrics"]["from"]
    for component in SERVICES:
        spec = policies[component]
        assert spec["policyTypes"] == ["Ingress"]
        ports = {p["name"]: p["containerPort"] for p in container(deployment(charts, "monitoring", component))["ports"]}
        served = _rule_for(spec, ports["http" if component == "gateway" else "grpc"])
        if component in WORKERS:
            # the orchestrators call; the gateway's /health and `helm test` ask gRPC health
            assert _sources(served, pods) == {"orchestrator", "gateway", "test"}, component
            assert len(served["from"]) == 3
        elif component == "orchestrator":
            extra = MONITORING["networkPolicy"]["orchestrator"]["from"]
            assert _sources(served, pods) == {"gateway", "test"}
            assert served["from"][-len(extra) :] == extra
        else:  # no ingress in this scenario: the gateway takes calls from anywhere
            assert "from" not in served
        assert _rule_for(spec, ports["metrics"])["from"] == metrics_from
        assert len(spec["ingress"]) == 2, f"{component}: nothing but its own port and /metrics"
    store = policies["s3"]
    (rule,) = store["ingress"]
    assert rule["ports"] == [{"port": DEFAULTS["store"]["bundled"]["port"], "protocol": "TCP"}]
    assert _sources(rule, pods) == {*SERVICES, "s3", "test"}, "the store takes this release's pods"
    assert not objects(charts, "defaults", "NetworkPolicy")


def test_network_policies_behind_an_ingress(charts):
    pods = pod_labels(charts, "podmonitor")
    assert "test" not in pods  # tests.enabled=false: no test pod, and no rule for it
    policies = _policies(charts, "podmonitor")
    gateway = policies["gateway"]
    served = _rule_for(gateway, DEFAULTS["gateway"]["port"])
    assert served["from"] == INGRESS_PEERS, "only the ingress controller calls the gateway"
    assert _rule_for(gateway, DEFAULTS["metrics"]["port"])["from"] == SCRAPERS
    assert _sources(_rule_for(policies["hpss"], DEFAULTS["hpss"]["port"]), pods) == {"orchestrator", "gateway"}


# ---- scheduling, threads, compile cache -------------------------------------------------------


def test_topology_spread_and_priority_classes(charts):
    zone = MONITORING["topologySpreadConstraints"][0]
    for component in SERVICES:
        pod = deployment(charts, "monitoring", component)["spec"]["template"]
        labels = {k: v for k, v in pod["metadata"]["labels"].items() if k.startswith("app.kubernetes.io/")}
        (constraint,) = pod["spec"]["topologySpreadConstraints"]
        own = MONITORING.get(component, {}).get("topologySpreadConstraints")
        assert constraint == {**(own[0] if own else zone), "labelSelector": {"matchLabels": labels}}, component
        assert selects(constraint["labelSelector"], pod["metadata"]["labels"])
        expected = MONITORING.get(component, {}).get("priorityClassName") or MONITORING["priorityClassName"]
        assert pod["spec"]["priorityClassName"] == expected, component
    store = deployment(charts, "monitoring", "s3")["spec"]["template"]["spec"]
    assert store["priorityClassName"] == MONITORING["priorityClassName"]
    for component in (*SERVICES, "s3"):
        spec = deployment(charts, "defaults", component)["spec"]["template"]["spec"]
        assert "topologySpreadConstraints" not in spec and "priorityClassName" not in spec


def _threads(charts: dict, scenario: str) -> dict:
    c = container(deployment(charts, scenario, "separation"))
    (env,) = [e for e in c["env"] if e["name"] == "AUDIOMESH_TORCH_THREADS"]
    return env


def test_torch_threads_follow_the_cpu_request(charts):
    """Downward API: requests.cpu with divisor 1 is the request in whole cores, rounded up (500m -> 1),
    so several separation pods on one node use the cores they asked for, not every core each."""
    c = container(deployment(charts, "monitoring", "separation"))
    assert c["resources"]["requests"]["cpu"] == "2"
    assert _threads(charts, "monitoring") == {
        "name": "AUDIOMESH_TORCH_THREADS",
        "valueFrom": {"resourceFieldRef": {"containerName": c["name"], "resource": "requests.cpu", "divisor": "1"}},
    }
    assert _threads(charts, "threads-explicit") == {"name": "AUDIOMESH_TORCH_THREADS", "value": "3"}
    # no CPU request: the downward API would give the node's allocatable CPUs; torch's default is no worse
    assert _threads(charts, "threads-no-cpu-request") == {"name": "AUDIOMESH_TORCH_THREADS", "value": "0"}


def test_compile_cache_is_a_writable_persistent_volume(charts):
    mount_path = DEFAULTS["separation"]["compileCache"]["mountPath"]
    for scenario, claim in (
        ("monitoring", f"{RELEASE}-audiomesh-compile-cache"),
        ("gpu-compile-cache", "compiled-graphs"),
    ):
        pod = deployment(charts, scenario, "separation")["spec"]["template"]["spec"]
        volume = next(v for v in pod["volumes"] if v["name"] == "compile-cache")
        assert volume == {"name": "compile-cache", "persistentVolumeClaim": {"claimName": claim}}
        mounts = {m["name"]: m for m in container(deployment(charts, scenario, "separation"))["volumeMounts"]}
        assert mounts["compile-cache"] == {"name": "compile-cache", "mountPath": mount_path}  # writable
        assert configmap(charts, scenario)["AUDIOMESH_COMPILE_CACHE_DIR"] == mount_path
        for other in SERVICES:
            if other != "separation":
                assert "compile-cache" not in {
                    v["name"] for v in deployment(charts, scenario, other)["spec"]["template"]["spec"]["volumes"]
                }
    pvc = one(charts, "monitoring", "PersistentVolumeClaim", f"{RELEASE}-audiomesh-compile-cache")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    # The GPU example: weights read-only, compiled graphs on their own volume instead of /tmp.
    gpu_mounts = {
        m["name"]: m for m in container(deployment(charts, "gpu-compile-cache", "separation"))["volumeMounts"]
    }
    assert gpu_mounts["models"]["readOnly"] is True and "readOnly" not in gpu_mounts["compile-cache"]
    assert not [
        p for p in objects(charts, "gpu-compile-cache", "PersistentVolumeClaim") if "compile" in p["metadata"]["name"]
    ]
    # Off: as before (beside the weights).
    assert configmap(charts, "defaults")["AUDIOMESH_COMPILE_CACHE_DIR"] == "/models/compile-cache"
    assert "compile-cache" not in {v["name"] for v in deployment(charts, "defaults", "separation")["spec"]["template"]["spec"]["volumes"]}  # fmt: skip


# ---- the Grafana dashboard --------------------------------------------------------------------


def _dashboard() -> dict:
    return json.loads((CHART / "files" / "dashboard.json").read_text())


def _expressions(dashboard: dict) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        exprs += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return exprs


def test_dashboard_is_shipped_for_grafanas_sidecar(charts):
    cm = one(charts, "monitoring", "ConfigMap", f"{RELEASE}-audiomesh-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["audiomesh.json"]) == _dashboard()
    assert not [c for c in objects(charts, "defaults", "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]


def test_dashboard_reads_only_metrics_the_services_export():
    dashboard = _dashboard()
    exprs = _expressions(dashboard)
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert not unknown_metrics(used), f"not exported by any service: {sorted(unknown_metrics(used))}"
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) if n not in metrics.NAMES else n for n in used}
    # What an operator looks at first: jobs, latency, backlog, saturation, refusals, retries, RPCs,
    # the store, model load and compile.
    wanted = {
        "audiomesh_jobs", "audiomesh_jobs_finished", "audiomesh_job_duration_seconds", "audiomesh_node_duration_seconds",
        "audiomesh_nodes", "audiomesh_worker_slots", "audiomesh_worker_slots_busy", "audiomesh_worker_refusals",
        "audiomesh_node_retries", "rpc_server_duration_seconds", "audiomesh_store_read_bytes",
        "audiomesh_store_written_bytes", "audiomesh_model_load_seconds", "audiomesh_model_compile_seconds",
    }  # fmt: skip
    assert wanted <= families, sorted(wanted - families)
    for expr in exprs:  # every panel follows the namespace and release pickers
        if "label_values" not in expr:
            assert expr.count("{") == expr.count('namespace=~"$namespace",app_kubernetes_io_instance=~"$release"'), expr
    pickers = {v["name"]: v for v in dashboard["templating"]["list"]}
    # The release picker reads the label the monitors copy from the pods (podTargetLabels).
    assert "app_kubernetes_io_instance" in pickers["release"]["definition"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


def test_helm_test_lets_a_service_scaled_to_zero_be_woken_by_its_job(charts):
    """hpss may be at zero pods (KEDA minReplicas 0 in ci/monitoring-values.yaml): the mesh check
    does not require it SERVING, and its job must bring a pod up; separation stays required."""

    def command(scenario: str) -> list[str]:
        (hook,) = [h for h in rendered(charts, scenario)["hooks"] if "test" in h["events"]]
        return hook["manifest"][0]["spec"]["containers"][0]["command"]

    assert MONITORING["hpss"]["autoscaling"]["keda"]["minReplicas"] == 0
    args = command("monitoring")
    zero = [args[i + 1] for i, a in enumerate(args) if a == "--may-be-at-zero"]
    assert zero == ["hpss"], args
    assert "--may-be-at-zero" not in command("defaults")
