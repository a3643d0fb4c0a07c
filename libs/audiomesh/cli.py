"""The ``audiomesh`` command: run the mesh, submit songs, inspect jobs.

audiomesh up                         every service on localhost, file store in ./data
audiomesh up --replicas orchestrator=3 --replicas separation=2   several processes of a service
audiomesh process a.wav b.mp3 -o out one job per file, progress lines, tracks in out/<name>/
                                     (Demucs' flags: -n MODEL, --two-stems, --mp3, --flac, -j ...)
audiomesh process --demo --out out   the same on a synthesized clip
audiomesh download JOB [-o DIR]      a job's tracks and manifest.json (waits for a running job)
audiomesh jobs | show JOB | cancel JOB | retry JOB | models   (JOB: an id or a unique start of one)
audiomesh warm [--model M]           compile separation models into the compile cache ahead of time
audiomesh serve NAME [--port N]      one service in this process (containers)

The commands that take a job live in ``cli_process`` (process, retry, download), the progress
lines in ``cli_progress``, what they share about jobs in ``cli_jobs``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from audiomesh import __version__, bench, churn, cli_process
from audiomesh.cli_jobs import resolve_job_id
from audiomesh.cli_progress import job_state
from audiomesh.config import SERVICES, Settings, load_settings
from audiomesh.errors import AudiomeshError

if TYPE_CHECKING:
    from audiomesh.rpc.client import ClientFactory
    from audiomesh.v1.orchestrator_pb2_grpc import OrchestratorServiceAsyncStub


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    import signal
    import threading

    from audiomesh.launcher import Mesh, default_ports
    from audiomesh.metrics import DEFAULT_METRICS_PORTS
    from audiomesh.telemetry import configure_logging

    configure_logging("up", level=settings.log_level, fmt=settings.log_format)
    stop = threading.Event()
    mesh = Mesh(
        settings=settings,
        ports=default_ports(settings),
        inherit_output=True,
        gateway=True,
        replicas=dict(args.replicas),
        # The services' default /metrics ports, unless AUDIOMESH_METRICS_PORT names one (then any free
        # ones: several processes cannot share a port).
        metrics_ports=DEFAULT_METRICS_PORTS if settings.metrics_port < 0 else None,
    )
    try:
        mesh.start()
    except BaseException:  # Ctrl-C or a service that did not start: nothing may stay behind
        mesh.stop()
        raise
    print("audiomesh is up (Ctrl-C to stop):")
    for name in SERVICES:
        instances = mesh.instances(name)
        if len(instances) == 1:
            print(f"  {name:<13} {mesh.addresses[name]}")
            continue
        print(f"  {name:<13} {mesh.addresses[name]}   ({len(instances)} processes, round-robin)")
        for instance in instances:
            print(f"    {instance:<15} {mesh.addresses[instance]}")
    print(f"  store         {settings.store_url}")
    if settings.api_keys and not settings.service_token.get_secret_value():
        print("  service token generated for this run: the workers answer only this orchestrator")
    print(f"  web page      {mesh.url}/   (API: {mesh.url}/openapi.json)")
    if mesh.metrics:
        print("  metrics       Prometheus text format at /metrics:")
        for name in (*SERVICES, "gateway"):
            for instance in mesh.instances(name):
                if instance in mesh.metrics:
                    print(f"    {instance:<15} http://{mesh.metrics[instance]}/metrics")
    sys.stdout.flush()  # a pipe (a supervisor, a test) sees the addresses now, not at exit
    # Ctrl-C (the children get it too and drain) or SIGTERM stops the mesh; a child that dies
    # otherwise is restarted, and a crash loop ends `up` with an error naming it (CrashLoop).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        mesh.supervise(stop)
    finally:
        mesh.stop()
    return 0


async def _simple(args: argparse.Namespace, settings: Settings) -> int:
    """jobs, show, cancel, models: one call each, printed."""
    from audiomesh.separation.execution import execution_label
    from audiomesh.v1 import orchestrator_pb2, separation_pb2

    async def work(stub: OrchestratorServiceAsyncStub, clients: ClientFactory) -> int:
        if args.command == "jobs":
            resp = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=args.limit))
            if not resp.jobs:
                print("no jobs yet: `audiomesh process FILE` starts one")
                return 0
            print(f"{'JOB ID':<36}  {'STATE':<9}  {'CREATED (UTC)':<19}  {'DONE':>6}  INPUT")
            for job in resp.jobs:
                created = job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                print(f"{job.job_id:<36}  {job_state(job):<9}  {created}  {job.fraction * 100:5.1f}%  {job.input.name}")
        elif args.command == "show":
            job_id = await resolve_job_id(stub, args.job_id)
            job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id))).job
            print(json_format.MessageToJson(job, indent=2))
        elif args.command == "cancel":
            job_id = await resolve_job_id(stub, args.job_id)
            job = (await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job_id))).job
            print(f"{job.job_id} {job_state(job)}")
        elif args.command == "models":
            listed = await stub.ListModels(separation_pb2.ListModelsRequest())
            if not listed.models:
                print("no separation models: the separation service lists none (see its log)")
                return 0
            width = max(18, *(len(m.name) for m in listed.models))
            print(f"  {'MODEL':<{width}} {'KIND':<9} {'ORIGIN':<11} {'WEIGHTS':<16} {'RUNS':<14} STEMS")
            for m in listed.models:
                mark = "*" if m.name == listed.default_model else " "
                avail = "available" if m.available else "no weights here"
                runs = execution_label(m.execution) or "-"
                kind = m.kind or "-"
                print(f"{mark} {m.name:<{width}} {kind:<9} {m.origin:<11} {avail:<16} {runs:<14} {','.join(m.sources)}")
                if m.description:  # what it is and what it costs, in one line
                    print(f"    {m.description}")
                if m.compile_error:
                    print(f"    {m.compile_error}")
                if m.HasField("eager_chunk_seconds") and m.HasField("compiled_chunk_seconds"):
                    print(
                        f"    one chunk: {m.eager_chunk_seconds:.2f} s eager, {m.compiled_chunk_seconds:.2f} s compiled"
                        f" ({m.eager_chunk_seconds / max(m.compiled_chunk_seconds, 1e-9):.2f}x)"
                    )
            print("* = the default model (AUDIOMESH_DEFAULT_MODEL)")
        return 0

    return await cli_process.with_orchestrator(settings, work)


def cmd_warm(args: argparse.Namespace, settings: Settings) -> int:
    """Compile models with AUDIOMESH_COMPILE_BACKEND into AUDIOMESH_COMPILE_CACHE_DIR; 1 if any failed."""
    from audiomesh.separation import SeparatorFactory
    from audiomesh.separation.compiled import configure_cache, warm_cache
    from audiomesh.separation.registry import configure_torch_threads

    if settings.torch_threads:
        configure_torch_threads(settings.torch_threads)
    cache = configure_cache(settings.compile_cache_path())
    factory = SeparatorFactory(model_repo=settings.model_repo, device=settings.device)
    results = warm_cache(
        factory,
        args.model or [settings.default_model],
        backend=settings.compile_backend,
        cache_dir=cache,
        log=lambda text: print(text, flush=True),
    )
    return 1 if any(isinstance(r, Exception) for r in results.values()) else 0


def _page_size(text: str) -> int:
    from audiomesh.ranges import PAGE_SIZE

    if not text.isdigit() or not PAGE_SIZE.minimum <= int(text) <= PAGE_SIZE.maximum:
        raise argparse.ArgumentTypeError(f"{text!r}: give {PAGE_SIZE.minimum:g} to {PAGE_SIZE.maximum:g}")
    return int(text)


def _replica_count(text: str) -> tuple[str, int]:
    """``SERVICE=N`` of ``up --replicas``."""
    service, sep, count = text.partition("=")
    if not sep or service not in SERVICES or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give SERVICE=N with N >= 1 and SERVICE one of {', '.join(SERVICES)} (e.g. separation=2)"
        )
    return service, int(count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audiomesh", description="Music separation as a mesh of gRPC services.")
    parser.add_argument("--version", action="version", version=f"audiomesh {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run one service in this process")
    p.add_argument("service", choices=[*SERVICES, "gateway"])
    p.add_argument("--port", type=int, default=None, help="0 picks a free port; default from AUDIOMESH_<NAME>_ADDR")
    p.add_argument("--ready-file", type=Path, default=None, help="write {port} here once SERVING")
    p = sub.add_parser("up", help="start every service and the web page on localhost (file store in ./data)")
    p.add_argument(
        "--replicas",
        action="append",
        type=_replica_count,
        default=[],
        metavar="SERVICE=N",
        help="run N processes of SERVICE (repeatable; default 1 each), e.g. orchestrator=3",
    )
    p = sub.add_parser(
        "process",
        help="separate files (Demucs' flags; starts a mesh when none is running)",
        description="One job per file; tracks and manifest.json in DIR/<file name>/. Demucs' flags mean"
        " what they mean there. Ctrl-C cancels the jobs being followed (--detach: submit and return).",
    )
    cli_process.add_process_arguments(p)
    p.set_defaults(usage_error=p.error)
    p = sub.add_parser("download", help="fetch a job's tracks and manifest.json (waits for a running job)")
    p.add_argument("job_id", metavar="JOB", help="a job id or a unique start of one")
    p.add_argument("-o", "--out", default="out", metavar="DIR", help="files go to DIR/<input name>/ (default out)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--limit", type=_page_size, default=20, help="how many (1..200, default 20)")
    p = sub.add_parser("show", help="print a job as JSON")
    p.add_argument("job_id", metavar="JOB", help="a job id or a unique start of one")
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id", metavar="JOB", help="a job id or a unique start of one")
    p = sub.add_parser(
        "retry", help="run a FAILED or CANCELLED job again from what it wrote, follow it, fetch its tracks"
    )
    p.add_argument("job_id", metavar="JOB", help="a job id or a unique start of one")
    p.add_argument("-o", "--out", default="out", metavar="DIR", help="files go to DIR/<input name>/ (default out)")
    p.add_argument("--detach", action="store_true", help="start it again and return")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    sub.add_parser("models", help="list separation models")
    p = sub.add_parser(
        "warm",
        help="compile separation models into the compile cache ahead of time (image build, init job)",
    )
    p.add_argument(
        "--model", action="append", default=[], help="model to compile (repeatable; default AUDIOMESH_DEFAULT_MODEL)"
    )
    bench.add_arguments(
        sub.add_parser(
            "bench", help="measure the mesh against raw Demucs (or MSST for a RoFormer) and librosa (BENCHMARKS.md)"
        )
    )
    churn.add_arguments(
        sub.add_parser(
            "churn", help="a cluster under kill -9, rolling restarts and SIGSTOP: jobs lost, take-over times"
        )
    )
    p = sub.add_parser("hash-key", help="print an AUDIOMESH_API_KEYS entry for a key (a new key if none given)")
    p.add_argument("name", help="the principal this key stands for, e.g. alice")
    p.add_argument("--key", default=None, help="an existing key (default: generate one)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.command == "serve":
            from audiomesh.launcher import serve

            asyncio.run(serve(args.service, settings, port=args.port, ready_file=args.ready_file))
            return 0
        if args.command == "up":
            return cmd_up(args, settings)
        if args.command == "hash-key":
            from audiomesh.auth import hash_key, new_key

            key = args.key or new_key()
            if not args.key:
                print(f"key (give this to the client; it is not stored): {key}")
            print(f"AUDIOMESH_API_KEYS entry: {args.name}=sha256:{hash_key(key)}")
            return 0
        if args.command == "process":
            try:  # flags that cannot go together: a usage error before any file or mesh is touched
                cli_process.job_options(args)
            except ValueError as exc:
                args.usage_error(str(exc))
            return cli_process.cmd_process(args, settings)
        if args.command == "retry":
            return asyncio.run(cli_process.retry(args, settings))
        if args.command == "download":
            return asyncio.run(cli_process.download(args, settings))
        if args.command == "bench":
            return bench.cmd_bench(args)
        if args.command == "churn":
            return churn.cmd_churn(args)
        if args.command == "warm":
            return cmd_warm(args, settings)
        return asyncio.run(_simple(args, settings))
    except AudiomeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
