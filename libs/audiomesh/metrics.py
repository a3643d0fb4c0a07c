"""Prometheus metrics, defined in one place for every service.

Every service serves the Prometheus text format at ``/metrics`` on its own port
(``AUDIOMESH_METRICS_PORT``; :func:`start_metrics_server`), apart from its gRPC or HTTP port
so that a NetworkPolicy can open it to the monitoring namespace alone.

Why ``prometheus_client`` and not OpenTelemetry's metrics SDK with its Prometheus exporter:
the exporter (``opentelemetry-exporter-prometheus``) is still a pre-release that itself wraps
``prometheus_client``; scraping is the only way these metrics leave a process; and
``prometheus_client`` gives exact control of names, buckets and scrape-time collectors (the
gauges below are computed from the job records when scraped, so they cannot drift).
Traces stay on OpenTelemetry (:mod:`audiomesh.telemetry`).

Names follow Prometheus' conventions (base units, ``_total`` counters, ``_seconds`` and
``_bytes``). The RPC and HTTP latency histograms follow OpenTelemetry's semantic conventions
(``rpc.server.duration``, ``rpc.client.duration``, ``http.server.request.duration``, as their
Prometheus translations name them). Labels stay low-cardinality: a stage, a service, an RPC
method, an outcome, a status code, a model name — never a job id, key or user.

Every metric any service exports is defined here (the chart's dashboard and KEDA queries
are checked against :data:`NAMES`); a process exports the ones its code touches, plus the
process and Python collectors of ``prometheus_client``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: Default /metrics ports when AUDIOMESH_METRICS_PORT is -1 (one machine, every service).
DEFAULT_METRICS_PORTS = {
    "gateway": 9450,
    "orchestrator": 9451,
    "separation": 9452,
    "hpss": 9453,
    "composite": 9454,
    "normalize": 9455,
}

# Seconds: from a quick RPC to an hour-long separation.
_RPC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_WORK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)

# --- every gRPC service (rpc/server.py, rpc/client.py) ---------------------------------------
RPC_SERVER_DURATION = Histogram(
    "rpc_server_duration_seconds",
    "Duration of gRPC calls this service served (OpenTelemetry rpc.server.duration)",
    ["rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code"],
    buckets=_RPC_BUCKETS,
)
RPC_CLIENT_DURATION = Histogram(
    "rpc_client_duration_seconds",
    "Duration of gRPC calls this service made to others (OpenTelemetry rpc.client.duration)",
    ["rpc_system", "rpc_service", "rpc_method", "rpc_grpc_status_code"],
    buckets=_RPC_BUCKETS,
)
WORKER_SLOTS = Gauge(
    "audiomesh_worker_slots", "Requests this service runs at once (its concurrency bound)", ["service"]
)
WORKER_SLOTS_BUSY = Gauge("audiomesh_worker_slots_busy", "Requests this service is running now", ["service"])
WORKER_REFUSALS = Counter(
    "audiomesh_worker_refusals_total",
    "Requests refused with RESOURCE_EXHAUSTED because every slot was busy",
    ["service"],
)

# --- the object store (store/*.py), in every process that uses it -----------------------------
STORE_READ_BYTES = Counter("audiomesh_store_read_bytes_total", "Bytes read from the object store", ["backend"])
STORE_WRITTEN_BYTES = Counter("audiomesh_store_written_bytes_total", "Bytes written to the object store", ["backend"])

# --- the orchestrator ---------------------------------------------------------------------------
JOBS_CREATED = Counter("audiomesh_jobs_created_total", "Jobs accepted by this orchestrator")
JOBS_FINISHED = Counter(
    "audiomesh_jobs_finished_total",
    "Jobs that ended while this orchestrator held them, by outcome (succeeded, failed, cancelled)",
    ["outcome"],
)
JOB_DURATION = Histogram(
    "audiomesh_job_duration_seconds",
    "Job time from creation to its end, by outcome",
    ["outcome"],
    buckets=_WORK_BUCKETS,
)
JOB_QUEUE_WAIT = Histogram(
    "audiomesh_job_queue_wait_seconds",
    "Time a job waited QUEUED before it started running (creation or retry to RUNNING)",
    buckets=_WORK_BUCKETS,
)
NODE_DURATION = Histogram(
    "audiomesh_node_duration_seconds",
    "Duration of one stage-graph node, from its start to its end, by stage and outcome",
    ["stage", "outcome"],
    buckets=_WORK_BUCKETS,
)
NODE_RETRIES = Counter(
    "audiomesh_node_retries_total",
    "Node attempts that failed and were retried, by stage and status code",
    ["stage", "code"],
)
NODE_BUSY_WAITS = Counter(
    "audiomesh_node_busy_waits_total",
    "Worker answers of RESOURCE_EXHAUSTED (every slot busy) that made a node wait, by stage",
    ["stage"],
)
JOB_TAKEOVERS = Counter(
    "audiomesh_job_takeovers_total",
    "Jobs this orchestrator took over from another, by why (expired lease, released lease)",
    ["reason"],
)
LEASES_LOST = Counter("audiomesh_leases_lost_total", "Job leases this orchestrator lost (fenced off, or expired)")
#: Scrape-time gauges of the orchestrator (see :class:`JobsCollector`).
JOBS_GAUGE = "audiomesh_jobs"
NODES_GAUGE = "audiomesh_nodes"
LEASES_GAUGE = "audiomesh_leases_held"

# --- separation ---------------------------------------------------------------------------------
MODEL_LOAD = Histogram(
    "audiomesh_model_load_seconds", "Time to load a separation model's weights", ["model"], buckets=_WORK_BUCKETS
)
MODEL_COMPILE = Histogram(
    "audiomesh_model_compile_seconds",
    "Time to compile a separation model with torch.compile, by outcome (compiled, failed)",
    ["model", "outcome"],
    buckets=_WORK_BUCKETS,
)
SEPARATED_AUDIO = Counter("audiomesh_separated_audio_seconds_total", "Seconds of audio separated, by model", ["model"])

# --- the HTTP gateway ---------------------------------------------------------------------------
HTTP_SERVER_DURATION = Histogram(
    "http_server_request_duration_seconds",
    "Duration of HTTP requests (OpenTelemetry http.server.request.duration); the route is the template",
    ["http_request_method", "http_route", "http_response_status_code"],
    buckets=_RPC_BUCKETS,
)


#: What :class:`JobsCollector` reads: jobs by state, nodes by (stage, state), leases held.
JobsReading = tuple[dict[str, int], dict[tuple[str, str], int], int]


class JobsCollector(Collector):
    """The orchestrator's gauges, computed from its job records at each scrape (no drift):

    - ``audiomesh_jobs{state}``: jobs this replica holds, QUEUED or RUNNING;
    - ``audiomesh_nodes{stage,state}``: nodes of those jobs by stage: ``waiting`` (ready to
      run, held back by capacity: the backlog an autoscaler reads) or ``running``;
    - ``audiomesh_leases_held``: job leases this replica holds.

    ``read`` returns (jobs by state, nodes by (stage, state), leases held). It runs on the
    metrics server's thread at each scrape: it must be cheap and must not block on the event
    loop. If it raises, the last values read are reported (a scrape never fails on it).
    """

    def __init__(self, read: Callable[[], JobsReading]) -> None:
        self._read = read
        self._last: JobsReading = ({}, {}, 0)

    def read(self) -> JobsReading:
        try:
            self._last = self._read()
        except Exception:  # noqa: BLE001 - a scrape must not fail (nor a job) over a gauge
            from audiomesh.telemetry import logger  # here: telemetry is not needed to define metrics

            logger().exception("jobs gauges not read; reporting the last values")
        return self._last

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []  # collected lazily: registering must not call read()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        return _jobs_families(*self.read())


class _JobsTotal(Collector):
    """The one collector in the registry for every registered :class:`JobsCollector`: their
    sum (one family per name: several in-process replicas, as Prometheus sums pods)."""

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs: dict[str, int] = {}
        nodes: dict[tuple[str, str], int] = {}
        leases = 0
        for collector in list(_jobs_collectors):
            one_jobs, one_nodes, one_leases = collector.read()
            for state, count in one_jobs.items():
                jobs[state] = jobs.get(state, 0) + count
            for key, count in one_nodes.items():
                nodes[key] = nodes.get(key, 0) + count
            leases += one_leases
        return _jobs_families(jobs, nodes, leases)


def _jobs_families(jobs: dict[str, int], nodes: dict[tuple[str, str], int], leases: int) -> Iterator[GaugeMetricFamily]:
    family = GaugeMetricFamily(JOBS_GAUGE, "Jobs this orchestrator holds, by state (queued, running)", labels=["state"])
    for state in ("queued", "running"):
        family.add_metric([state], jobs.get(state, 0))
    yield family
    family = GaugeMetricFamily(
        NODES_GAUGE,
        "Nodes of held jobs by stage and state: running, waiting (every worker slot busy: the backlog), "
        "held (ready, held back by the job's own node limit)",
        labels=["stage", "state"],
    )
    for (stage, state), count in sorted(nodes.items()):
        family.add_metric([stage, state], count)
    yield family
    yield GaugeMetricFamily(LEASES_GAUGE, "Job leases this orchestrator holds", value=leases)


_collectors: list[Collector] = []
_jobs_collectors: list[JobsCollector] = []
_jobs_total = _JobsTotal()
_registering = threading.Lock()


def register_collector(collector: Collector) -> None:
    """Register a scrape-time collector once per process (in-process test replicas register
    theirs too: the process then reports their sum, as Prometheus would across pods)."""
    with _registering:
        if collector in _collectors or collector in _jobs_collectors:
            return
        if isinstance(collector, JobsCollector):
            if not _jobs_collectors:
                REGISTRY.register(_jobs_total)
            _jobs_collectors.append(collector)
        else:
            REGISTRY.register(collector)
            _collectors.append(collector)


def unregister_collector(collector: Collector) -> None:
    with _registering:
        if collector in _jobs_collectors:
            _jobs_collectors.remove(collector)
            if not _jobs_collectors:
                REGISTRY.unregister(_jobs_total)
        elif collector in _collectors:
            _collectors.remove(collector)
            REGISTRY.unregister(collector)


def metrics_port(service: str, configured: int) -> int:
    """AUDIOMESH_METRICS_PORT: -1 = the service's default port, 0 = any free port, N = N."""
    return DEFAULT_METRICS_PORTS.get(service, 9450) if configured < 0 else configured


def start_metrics_server(service: str, host: str, port: int) -> tuple[WSGIServer, int]:
    """Serve ``service``'s /metrics (:class:`ServiceView`) on ``host:port`` (port 0 picks one)
    in a daemon thread; (server, port)."""
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceView(service))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server, int(server.server_port)


def stop_metrics_server(server: WSGIServer) -> None:
    """Stop serving, then close the socket, in that order (closing first would leave
    serve_forever polling a closed descriptor); shutdown() blocks until serve_forever ends."""

    def stop() -> None:
        server.shutdown()
        server.server_close()

    threading.Thread(target=stop, daemon=True).start()


@contextmanager
def timed(histogram: Histogram, **labels: str) -> Iterator[None]:
    """Observe the block's wall time in seconds (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        target = histogram.labels(**labels) if labels else histogram
        target.observe(time.perf_counter() - start)


#: Every metric name a service may export, as Prometheus' metadata names it (counters without
#: ``_total``; samples add ``_total``, ``_bucket``, ``_sum``, ``_count``).
NAMES = frozenset(
    {
        family.name
        for metric in globals().copy().values()
        if isinstance(metric, (Counter, Gauge, Histogram))
        for family in metric.describe()
    }
    | {JOBS_GAUGE, NODES_GAUGE, LEASES_GAUGE}
)


#: Families only the orchestrator produces; other services leave them out of /metrics (their
#: unlabelled ones would otherwise read 0 on every worker and gateway).
ORCHESTRATOR_ONLY = frozenset(
    family.name
    for metric in (
        JOBS_CREATED,
        JOBS_FINISHED,
        JOB_DURATION,
        JOB_QUEUE_WAIT,
        NODE_DURATION,
        NODE_RETRIES,
        NODE_BUSY_WAITS,
        JOB_TAKEOVERS,
        LEASES_LOST,
    )
    for family in metric.describe()
)


class ServiceView(Collector):
    """What one service's /metrics shows: the process registry without the families of other
    services, and without prometheus_client's ``_created`` series (Prometheus ignores them)."""

    def __init__(self, service: str) -> None:
        self._skip = frozenset() if service == "orchestrator" else ORCHESTRATOR_ONLY

    def collect(self) -> Iterator[Any]:
        for family in REGISTRY.collect():
            if family.name not in self._skip:
                yield family
