"""Running services: one in this process (``serve``), or the whole mesh as child processes.

``Mesh`` starts every worker (port 0 unless ports are given), waits for each to report
SERVING through a ready file, then starts the orchestrator pointed at them. Used by
``audiomesh up``, by ``audiomesh process`` when no mesh is running, and by the tests.

Settings are read once, in the launcher, as the children will read them (environment >
``.env`` > secrets folder > defaults); what the launcher decides for a child (its thread
budget, the workers' addresses, a service token) is derived from that object and handed to
the child in its environment, so it never hides a value the user gave in ``.env``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

from audiomesh import scratch
from audiomesh.auth import RateLimiter
from audiomesh.config import ENV_PREFIX, SERVICES, Settings, load_settings
from audiomesh.errors import ConfigError, Unavailable
from audiomesh.memory import preload_env
from audiomesh.metrics import metrics_port, start_metrics_server, stop_metrics_server
from audiomesh.parallel import usable_cores
from audiomesh.rpc.server import USER_KEEPALIVE_MS, WORKER_KEEPALIVE_MS, AuthPolicy, start_server
from audiomesh.telemetry import configure_logging, configure_tracing, logger, shutdown_tracing

WORKERS = ("separation", "hpss", "composite", "normalize")


async def serve(name: str, settings: Settings, *, port: int | None = None, ready_file: Path | None = None) -> None:
    """Run one service until SIGTERM; write ``ready_file`` (JSON with the port) once SERVING."""
    if name not in (*SERVICES, "gateway"):
        raise SystemExit(f"unknown service {name!r}; choose one of: {', '.join(SERVICES)}, gateway")
    configure_logging(name, level=settings.log_level, fmt=settings.log_format)
    # What this process runs with, whatever the source (env, .env, secrets, the launcher's choice).
    logger().info("settings", settings=settings.public_dict())
    configure_tracing(name, otlp_endpoint=settings.otlp_endpoint)
    swept = scratch.sweep()
    if swept:
        logger().info("removed scratch folders of stopped processes", folders=len(swept))
    metrics_server, announced = start_metrics(name, settings)
    try:
        await _serve(name, settings, port=port, ready_file=ready_file, announced=announced)
    finally:
        if metrics_server is not None:
            stop_metrics_server(metrics_server)
        shutdown_tracing()


def start_metrics(name: str, settings: Settings) -> tuple[WSGIServer | None, dict[str, int]]:
    """Serve /metrics for this process (AUDIOMESH_METRICS_*); what the ready file announces."""
    if not settings.metrics_enabled:
        return None, {}
    wanted = metrics_port(name, settings.metrics_port)
    try:
        server, port = start_metrics_server(name, settings.host, wanted)
    except OSError as exc:
        raise ConfigError(
            f"{name}: cannot serve metrics on {settings.host}:{wanted} ({exc.strerror or exc}); set "
            "AUDIOMESH_METRICS_PORT to a free port (0 = any) or AUDIOMESH_METRICS_ENABLED=false"
        ) from None
    logger().info("metrics", url=f"http://{settings.host}:{port}/metrics")
    return server, {"metrics_port": port}


async def _serve(
    name: str, settings: Settings, *, port: int | None, ready_file: Path | None, announced: dict[str, int]
) -> None:
    if name == "gateway":
        from audiomesh.gateway.server import serve_gateway

        await serve_gateway(settings, port=port, ready_file=ready_file, announce=announced)
        return
    auth = auth_policy(settings, name)  # before building: a refused configuration loads nothing
    if port is None:
        port = int(settings.address_of(name).rpartition(":")[2])
    try:
        module = importlib.import_module(f"audiomesh.services.{name}.server")
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] in ("torch", "demucs"):
            raise ConfigError(
                f"{name} needs {exc.name}, which this installation lacks (the worker-dsp image runs hpss, "
                "composite and normalize only): run it from the full audiomesh image"
            ) from None
        raise
    spec = module.build(settings)
    tls = None
    if settings.tls_cert_file and settings.tls_key_file:
        tls = (settings.tls_cert_file.read_bytes(), settings.tls_key_file.read_bytes())
    running = await start_server(
        spec.registrations,
        service=name,
        bind=f"{settings.host}:{port}",
        warmup=spec.warmup,
        concurrency=spec.concurrency,
        light_methods=spec.light_methods,
        tls=tls,
        auth=auth,
        keepalive_ms=USER_KEEPALIVE_MS if name == "orchestrator" else WORKER_KEEPALIVE_MS,
    )
    if ready_file is not None:

        async def announce() -> None:
            await running.ready.wait()
            tmp = ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"service": name, "port": running.port, "pid": os.getpid(), **announced}))
            tmp.replace(ready_file)

        asyncio.ensure_future(announce())
    await running.serve_until_signal(grace=settings.drain_seconds_of(name), before_stop=spec.on_stop)
    scratch.remove_own()
    logger().info("stopped")


def auth_policy(settings: Settings, name: str) -> AuthPolicy | None:
    """The orchestrator faces users (API keys, rate limit); workers face the orchestrator
    (the service token, when one is configured).

    With API keys on, every service needs the service token: a worker without one would answer
    anyone who reaches its port (read any owner's input, overwrite tracks and manifests), so it
    refuses to start (ConfigError) instead.
    """
    token = settings.service_token.get_secret_value()
    if settings.api_keys and not token:
        raise ConfigError(
            f"{name}: AUDIOMESH_API_KEYS is set but AUDIOMESH_SERVICE_TOKEN is empty, so the workers would "
            "answer anyone who reaches their ports. Set AUDIOMESH_SERVICE_TOKEN to one secret shared by every "
            "service (e.g. the output of `openssl rand -hex 32`); `audiomesh up`, docker compose and the Helm chart generate one"
        )
    if name == "orchestrator":
        ring = settings.key_ring()
        if ring.open_mode:
            logger().warning("no API keys configured: open mode, every caller can see and change every job")
        limiter = RateLimiter(settings.rate_limit_per_minute) if settings.rate_limit_per_minute else None
        return AuthPolicy(key_ring=None if ring.open_mode else ring, rate_limiter=limiter)
    return AuthPolicy(service_token=token) if token else None


def budget_settings(name: str, settings: Settings, *, cores: int) -> dict[str, Any]:
    """The settings the thread budget (``settings.thread_budget``) picks for worker ``name``:
    only those no source gave (environment, ``.env``, secrets: ``settings.model_fields_set``).

    Separation and HPSS run at the same time in a job (HPSS of the mix beside separation, then
    the stem fan-out), so only torch gets every core; HPSS runs one thread per request and gets
    its parallelism from concurrent requests.
    """
    if not settings.thread_budget:
        return {}
    budget: dict[str, Any] = {}
    if name == "separation":
        budget["torch_threads"] = cores
    elif name == "hpss":  # one thread per request: run a job's stem fan-out (and the mix) at once
        budget = {"hpss_threads": 1, "worker_concurrency": max(4, 2 * cores)}
    return {field: value for field, value in budget.items() if field not in settings.model_fields_set}


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")


def thread_env(name: str, settings: Settings, env: Mapping[str, str], *, cores: int | None = None) -> dict[str, str]:
    """The environment worker ``name`` starts with: ``env`` plus its thread budget.

    The AUDIOMESH_ settings of :func:`budget_settings` travel as variables (the child reads them
    back into its Settings). The native thread pools (OMP/MKL/OpenBLAS/numba) and separation's
    allocator (LD_PRELOAD jemalloc or mimalloc) are process-level, not settings: the libraries and the
    dynamic loader read them once when they load, before any Settings exist in the child, so
    they stay plain environment, set unless ``env`` has them (:func:`audiomesh.memory.preload_env`
    picks the allocator). ``cores``: default the usable CPUs.
    """
    out = dict(env)
    if not settings.thread_budget:
        return out
    cores = usable_cores() if cores is None else cores
    for field, value in budget_settings(name, settings, cores=cores).items():
        out[f"{ENV_PREFIX}{field.upper()}"] = str(value)
    for var in _THREAD_VARS:
        out.setdefault(var, str(cores if name == "separation" else 1))
    if name == "separation" and "LD_PRELOAD" not in out:
        # jemalloc (or mimalloc from its wheel) keeping its pages within a request: a CPU chunk
        # 1.26x faster than on glibc malloc and a flat peak RSS (instead of 1.6-1.9 GB creeping
        # up chunk by chunk); see BENCHMARKS.md.
        for var, value in preload_env().items():
            out.setdefault(var, value)
    return out


class Mesh:
    """The five services as child processes, each binding AUDIOMESH_HOST (127.0.0.1 unless set);
    they reach each other at that host, or at 127.0.0.1 when it is a wildcard (0.0.0.0, ::).

    ``env``: variables added to this process's environment for the children. ``settings``: the
    children's settings when the caller has read them already (``audiomesh up`` reads them
    once, from this environment); by default read here, with a ConfigError before any child
    starts when one is invalid.

    ``replicas``: processes per service (default 1 each; ``audiomesh up --replicas``). A service
    with one process is one instance named after it (``orchestrator``, log ``orchestrator.log``);
    with several, ``orchestrator-1`` … ``orchestrator-N``, each with its own port, log file,
    supervision and restart on its port, and orchestrators with their own AUDIOMESH_REPLICA_ID.
    ``addresses[service]`` is the one gRPC target clients use: the instance's ``host:port``, or
    every instance as ``ipv4:a:p,b:p`` (round-robin, see audiomesh.rpc.client); each instance's
    own address is ``addresses[instance]``. Per-instance control for tests and ``up``:
    :meth:`instances`, :meth:`kill`, :meth:`terminate`, :meth:`restart`, :meth:`pause`,
    :meth:`resume`, :meth:`pid` (a service name stands for its instance when it has one).
    """

    def __init__(
        self,
        *,
        env: dict[str, str] | None = None,
        settings: Settings | None = None,
        ports: dict[str, int] | None = None,
        log_dir: Path | None = None,
        inherit_output: bool = False,
        gateway: bool = False,
        replicas: Mapping[str, int] | None = None,
        metrics_ports: Mapping[str, int] | None = None,
        pin: Collection[str] = (),
    ) -> None:
        """``ports`` / ``metrics_ports``: the gRPC (HTTP) and /metrics port of each service's
        first instance; 0 or missing = any free port. ``pin``: workers whose instances each get
        their own cores (see :func:`pin_cores`), as if each were a pod; the others run unpinned."""
        self.env = {**os.environ, **(env or {})}
        self.settings = settings if settings is not None else load_settings(environ=self.env)
        counts = check_replicas(replicas or {})
        self.gateway = gateway
        # Instance names per service, in start order; ``_service_of`` maps them back.
        self._instances: dict[str, list[str]] = {}
        for service in (*SERVICES, "gateway"):
            n = counts.get(service, 1)
            self._instances[service] = [service] if n == 1 else [f"{service}-{i}" for i in range(1, n + 1)]
        self._service_of = {inst: service for service, insts in self._instances.items() for inst in insts}
        #: Instance → the CPUs it is pinned to (pinned workers only); kept across restarts.
        self.affinity: dict[str, list[int]] = {}
        for service in pin:
            if service not in WORKERS:
                raise ConfigError(f"pin: {service!r} is not a worker; choose from {', '.join(WORKERS)}")
            insts = self._instances[service]
            self.affinity.update(zip(insts, pin_cores(service, len(insts)), strict=True))
        # A port per instance: the service's (0 = any free one) for the first, any free one for
        # the others (a fixed port + i would collide with the next service's default port).
        given = dict(ports or {})
        self.ports = {
            inst: given.get(service, 0) if i == 0 else 0
            for service, insts in self._instances.items()
            for i, inst in enumerate(insts)
        }
        # /metrics ports likewise; the launcher always sets each child's (they cannot share one).
        self.metrics_ports = {
            inst: (metrics_ports or {}).get(service, 0) if i == 0 else 0
            for service, insts in self._instances.items()
            for i, inst in enumerate(insts)
        }
        self._paused: set[str] = set()
        self._run_dir = Path(tempfile.mkdtemp(prefix="audiomesh-mesh-"))
        self.log_dir = Path(log_dir) if log_dir else self._run_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.inherit_output = inherit_output
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        #: Each instance's /metrics as host:port (when metrics are enabled).
        self.metrics: dict[str, str] = {}
        # Each child's environment as it was started, so a restart gets the same one.
        self.envs: dict[str, dict[str, str]] = {}
        self.restarts: list[dict] = []  # one entry per child that supervise() started again
        self._log = logger(component="mesh")
        self._stopping = threading.Event()  # set by stop(): supervise() restarts nothing after it

    @property
    def client_host(self) -> str:
        """Where the children are reached: the host they bind (a wildcard: loopback)."""
        host = self.settings.host.strip("[]")
        if host in ("", "0.0.0.0", "::"):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    def instances(self, service: str) -> list[str]:
        """The instance names of ``service`` (``["orchestrator"]``, or ``orchestrator-1`` …)."""
        if service not in self._instances:
            raise KeyError(f"no service {service!r} in this mesh; services: {', '.join(self._instances)}")
        return list(self._instances[service])

    def _instance(self, name: str) -> str:
        """``name`` as an instance: itself, or a service's only instance."""
        if name in self._service_of:
            return name
        insts = self.instances(name)
        if len(insts) > 1:
            raise KeyError(f"{name} runs {len(insts)} instances here: name one of {', '.join(insts)}")
        return insts[0]

    def _target(self, service: str) -> str:
        """The gRPC target of every instance of ``service`` (one ``host:port`` for one)."""
        addrs = [self.addresses[inst] for inst in self._instances[service]]
        return addrs[0] if len(addrs) == 1 else multi_target(addrs)

    def _spawn(self, name: str, env: dict[str, str]) -> Path:
        self._run_dir.mkdir(parents=True, exist_ok=True)
        ready = self._run_dir / f"{name}.ready"
        ready.unlink(missing_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "audiomesh",  # __main__: a Ctrl-C while the child still imports ends it without a traceback
            "serve",
            self._service_of[name],
            "--port",
            str(self.ports[name]),
            "--ready-file",
            str(ready),
        ]
        self._paused.discard(name)
        self.envs[name] = env
        env = {**env, f"{ENV_PREFIX}METRICS_PORT": str(self._metrics_port(name))}
        out = None if self.inherit_output else open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115
        try:
            self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()  # the child has its own copy
        if name in self.affinity:
            # Right after exec the interpreter has one thread; torch's and OpenMP's pools start
            # later (on import) and inherit the mask. (preexec_fn would be exact but is unsafe
            # with threads, and supervise() runs in one.)
            os.sched_setaffinity(self.procs[name].pid, self.affinity[name])
        return ready

    def _wait_ready(self, ready: dict[str, Path], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while ready and time.monotonic() < deadline:
            for name, path in list(ready.items()):
                if path.exists():
                    self._read_ready(name, path)
                    del ready[name]
                elif self.procs[name].poll() is not None:
                    self.stop()
                    raise Unavailable(
                        f"{name} exited with code {self.procs[name].returncode}; see {self.log_dir}/{name}.log"
                    )
            time.sleep(0.1)
        if ready:
            self.stop()
            raise Unavailable(f"{', '.join(ready)} did not become healthy within {timeout:.0f} s; see {self.log_dir}")

    def _read_ready(self, name: str, path: Path) -> None:
        """A child is up: its address, and its /metrics (kept for a restart on the same ports)."""
        ready = json.loads(path.read_text())
        self.addresses[name] = f"{self.client_host}:{ready['port']}"
        if "metrics_port" in ready:
            self.metrics[name] = f"{self.client_host}:{ready['metrics_port']}"
            self.metrics_ports[name] = int(ready["metrics_port"])
            service = self._service_of[name]
            if name == self._instances[service][0]:  # the service's name finds its (first) instance
                self.metrics[service] = self.metrics[name]

    def _metrics_port(self, name: str) -> int:
        """The /metrics port to give instance ``name``: its preferred one (a service's default),
        or 0 (any free one) when another process holds it, e.g. a second `up` (which prints
        where each went) — rather than a service that cannot start."""
        port = self.metrics_ports[name]
        if port and not _port_free(self.settings.host, port):
            logger().warning("metrics port taken; serving /metrics on a free port", instance=name, port=port)
            self.metrics_ports[name] = 0
        return self.metrics_ports[name]

    def start(self, timeout: float = 300.0) -> Mesh:
        env = dict(self.env)
        if self.settings.api_keys and not self.settings.service_token.get_secret_value():
            # One token for this run, shared by the children: workers answer only this orchestrator.
            env[f"{ENV_PREFIX}SERVICE_TOKEN"] = secrets.token_urlsafe(32)
        # Each worker gets a share of the cores so concurrent stages don't oversubscribe them.
        cores = usable_cores()
        ready = {
            inst: self._spawn(
                inst, thread_env(name, self.settings, env, cores=len(self.affinity.get(inst, ())) or cores)
            )
            for name in WORKERS
            for inst in self._instances[name]
        }
        self._wait_ready(ready, timeout)
        for name in WORKERS:
            self.addresses[name] = self._target(name)
            env[f"AUDIOMESH_{name.upper()}_ADDR"] = self.addresses[name]
        self.env = env
        self._start_service("orchestrator", timeout)
        self.env["AUDIOMESH_ORCHESTRATOR_ADDR"] = self.addresses["orchestrator"]
        if self.gateway:
            self._start_service("gateway", timeout)
        return self

    def _start_service(self, service: str, timeout: float) -> None:
        insts = self._instances[service]
        ready = {}
        for inst in insts:
            env = self.env
            if len(insts) > 1:  # each orchestrator owns jobs under its own name (leases)
                env = {**env, f"{ENV_PREFIX}REPLICA_ID": inst}
            ready[inst] = self._spawn(inst, env)
        self._wait_ready(ready, timeout)
        self.addresses[service] = self._target(service)

    def restart(self, name: str, timeout: float = 120.0) -> None:
        """Start a stopped (or killed) instance again on the same port, with the same environment."""
        name = self._instance(name)
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            raise RuntimeError(f"{name} is still running (pid {proc.pid}); kill or terminate it first")
        self.ports[name] = int(self.addresses[name].rpartition(":")[2])
        self._wait_ready({name: self._spawn(name, self.envs.get(name, self.env))}, timeout)

    def supervise(
        self,
        stop: threading.Event,
        *,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        crash_limit: int = 5,
        crash_window: float = 300.0,
        start_timeout: float = 300.0,
        poll: float = 0.2,
    ) -> None:
        """Keep every child running until ``stop`` is set, as Kubernetes restarts a pod's container.

        A child that exits is started again on the same port after a backoff (``backoff``, then
        doubling per recent exit, up to ``max_backoff``), so the others keep reaching it and jobs
        go on: the orchestrator retries nodes whose worker is UNAVAILABLE, and a restarted
        orchestrator resumes its jobs from their manifests. ``crash_limit`` exits of one child
        within ``crash_window`` seconds is a crash loop: the mesh stops and :class:`CrashLoop`
        names the child, how it ended and the tail of its log.
        """
        exits: dict[str, list[float]] = {}
        due: dict[str, float] = {}  # child → when to start it again
        starting: dict[str, tuple[Path, float]] = {}  # child → (its ready file, start deadline)
        while not stop.is_set() and not self._stopping.is_set():
            now = time.monotonic()
            for name, proc in list(self.procs.items()):
                if name in due or proc.poll() is None:
                    continue
                starting.pop(name, None)
                recent = [t for t in exits.get(name, []) if now - t < crash_window] + [now]
                exits[name] = recent
                how, tail = _exit_reason(proc.returncode), self._log_tail(name)
                if len(recent) >= crash_limit:
                    self.stop()
                    where = f"; last lines of {self.log_dir / f'{name}.log'}:\n{tail}" if tail else ""
                    raise CrashLoop(
                        f"{name} crashed {len(recent)} times within {crash_window:.0f} s (last: {how}); "
                        f"the mesh is stopped{where}"
                    )
                delay = min(backoff * 2 ** (len(recent) - 1), max_backoff)
                self.restarts.append({"service": name, "exit_code": proc.returncode, "delay_s": delay})
                self._log.warning(
                    "service exited; restarting it",
                    service=name,
                    exit=how,
                    restart_in_s=delay,
                    address=self.addresses.get(name),
                    **({"log_tail": tail} if tail else {}),
                )
                due[name] = now + delay
            for name, when in list(due.items()):
                if now >= when and not stop.is_set() and not self._stopping.is_set():
                    del due[name]
                    if name in self.addresses:  # the same port: the others keep its address
                        self.ports[name] = int(self.addresses[name].rpartition(":")[2])
                    starting[name] = (self._spawn(name, self.envs.get(name, self.env)), now + start_timeout)
            for name, (ready, deadline) in list(starting.items()):
                if ready.exists():
                    del starting[name]
                    self._read_ready(name, ready)
                    self._log.info("service restarted", service=name, address=self.addresses[name])
                elif now > deadline:  # hung at start: end it; the next pass counts the exit
                    del starting[name]
                    self.procs[name].kill()
            stop.wait(poll)

    def _log_tail(self, name: str, lines: int = 15) -> str:
        """The last lines a child wrote to its log ("" when its output goes to the terminal)."""
        path = self.log_dir / f"{name}.log"
        if self.inherit_output or not path.is_file():
            return ""
        with path.open("rb") as fh:
            fh.seek(max(0, path.stat().st_size - 16384))
            text = fh.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def pid(self, name: str) -> int:
        """The process id of an instance (or of a service's only instance)."""
        return self.procs[self._instance(name)].pid

    def kill(self, name: str) -> None:
        """kill -9 an instance (a service's only instance) and reap it."""
        name = self._instance(name)
        proc = self.procs[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        self._paused.discard(name)

    def terminate(self, name: str, timeout: float = 60.0) -> int:
        """SIGTERM an instance (it drains) and wait for it to exit; its exit code. A paused one
        is resumed first, or it could not act on the signal."""
        name = self._instance(name)
        proc = self.procs[name]
        proc.send_signal(signal.SIGTERM)
        if name in self._paused:
            self.resume(name)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{name} (pid {proc.pid}) did not exit within {timeout:.0f} s of SIGTERM") from None

    def pause(self, name: str) -> None:
        """SIGSTOP an instance: it holds its port and connections but does nothing (a frozen
        or partitioned process, as far as its peers can tell) until :meth:`resume`."""
        name = self._instance(name)
        self.procs[name].send_signal(signal.SIGSTOP)
        self._paused.add(name)

    def resume(self, name: str) -> None:
        """SIGCONT a paused instance."""
        name = self._instance(name)
        self.procs[name].send_signal(signal.SIGCONT)
        self._paused.discard(name)

    def stop(self, grace: float = 30.0) -> None:
        self._stopping.set()
        order = [inst for service in ("gateway", "orchestrator", *WORKERS) for inst in self._instances[service]]
        for name in order:
            proc = self.procs.get(name)
            if proc and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                if name in self._paused:  # a stopped process acts on SIGTERM only once continued
                    proc.send_signal(signal.SIGCONT)
        self._paused.clear()
        deadline = time.monotonic() + grace
        for name in order:
            proc = self.procs.get(name)
            if proc is None:
                continue
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._remove_run_files()

    def _remove_run_files(self) -> None:
        """The ready files go; the folder too unless it holds the logs (kept for a post-mortem).
        With ``inherit_output`` (``audiomesh up``) no logs are written there: it always goes."""
        if self.log_dir == self._run_dir and not self.inherit_output:
            for pattern in ("*.ready", "*.tmp"):
                for ready in self._run_dir.glob(pattern):
                    ready.unlink(missing_ok=True)
        else:
            shutil.rmtree(self._run_dir, ignore_errors=True)

    @property
    def orchestrator(self) -> str:
        return self.addresses["orchestrator"]

    @property
    def url(self) -> str:
        """The HTTP facade's base URL (when started with ``gateway=True``)."""
        return f"http://{self.addresses['gateway']}"

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class CrashLoop(Unavailable):
    """A child of the mesh kept exiting: :meth:`Mesh.supervise` gave up and stopped the mesh."""


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def default_ports(settings: Settings | None = None) -> dict[str, int]:
    """Each service's port from its address setting (the first address of a list)."""
    settings = settings or load_settings()
    return {name: int(settings.address_of(name).split(",")[0].rpartition(":")[2]) for name in (*SERVICES, "gateway")}


def check_replicas(replicas: Mapping[str, int]) -> dict[str, int]:
    """``replicas`` checked: known services (not the gateway: one HTTP port), counts >= 1."""
    for service, n in replicas.items():
        if service not in SERVICES:
            raise ConfigError(
                f"replicas: unknown service {service!r}; choose from {', '.join(SERVICES)} "
                "(the gateway runs once: it is one HTTP port)"
            )
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"replicas: {service}={n!r}; give a whole number of processes, at least 1")
    return dict(replicas)


def pin_cores(service: str, count: int, cores: Sequence[int] | None = None) -> list[list[int]]:
    """``cores`` (default: the CPUs this process may use) cut into ``count`` contiguous sets of
    near-equal size, one per instance of ``service``: how one machine imitates ``count`` pods.

    >>> pin_cores("separation", 2, [0, 1, 2, 3, 4])
    [[0, 1, 2], [3, 4]]
    """
    cores = sorted(os.sched_getaffinity(0)) if cores is None else list(cores)
    if count < 1:
        raise ConfigError(f"pin: {service} needs at least 1 instance to pin, got {count}")
    if count > len(cores):
        raise ConfigError(
            f"pin: {service} runs {count} instances but only {len(cores)} CPUs are usable: give each "
            f"at least one, i.e. at most {len(cores)} instances, or do not pin"
        )
    size, extra = divmod(len(cores), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [cores[bounds[i] : bounds[i + 1]] for i in range(count)]


def multi_target(addresses: list[str]) -> str:
    """One gRPC target for several ``host:port`` addresses: ``ipv4:a:p,b:p`` (or ``ipv6:[a]:p,…``),
    which a channel with the round_robin policy spreads calls over. gRPC lists take IP literals
    only, so a host name is resolved here."""
    import ipaddress
    import socket

    literal: list[str] = []
    for addr in addresses:
        host, _, port = addr.rpartition(":")
        host = host.strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = ipaddress.ip_address(socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0][4][0])
        literal.append(f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}")
    v6 = [a.startswith("[") for a in literal]
    if any(v6) and not all(v6):
        raise ConfigError(f"cannot list IPv4 and IPv6 addresses in one gRPC target: {', '.join(literal)}")
    return ("ipv6:" if all(v6) else "ipv4:") + ",".join(literal)


def _port_free(host: str, port: int) -> bool:
    """Whether a server could bind ``host:port`` now (as the metrics server does: reuse allowed)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True
