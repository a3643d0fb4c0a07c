"""The ``audiomesh`` command: run the mesh, submit songs, inspect jobs.

audiomesh up                         every service on localhost, file store in ./data
audiomesh up --replicas orchestrator=3 --replicas separation=2   several processes of a service
audiomesh process song.mp3 --out out one job per file, progress bar, tracks in out/
audiomesh process --demo --out out   the same on a synthesized clip
audiomesh jobs | show ID | cancel ID | models
audiomesh warm [--model M]           compile separation models into the compile cache ahead of time
audiomesh serve NAME [--port N]      one service in this process (containers)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf import json_format

from audiomesh import bench, churn
from audiomesh.config import SERVICES, Settings, load_settings
from audiomesh.errors import AudiomeshError

if TYPE_CHECKING:
    from audiomesh.v1 import orchestrator_pb2
    from audiomesh.v1.orchestrator_pb2_grpc import OrchestratorServiceAsyncStub

CHUNK = 1 << 20


def _state(job: orchestrator_pb2.Job) -> str:
    from audiomesh.v1 import common_pb2

    return common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def _fmt_eta(job: orchestrator_pb2.Job) -> str:
    if not job.HasField("eta_seconds"):
        return "--:--"
    s = int(job.eta_seconds)
    return f"{s // 60:02d}:{s % 60:02d}"


async def _upload(
    stub: OrchestratorServiceAsyncStub,
    path: Path,
    options: orchestrator_pb2.JobOptions,
    *,
    filename: str | None = None,
) -> orchestrator_pb2.UploadAudioResponse:
    from audiomesh.v1 import orchestrator_pb2

    size = await asyncio.to_thread(lambda: path.stat().st_size)

    async def messages() -> AsyncIterator[orchestrator_pb2.UploadAudioRequest]:
        yield orchestrator_pb2.UploadAudioRequest(
            metadata=orchestrator_pb2.UploadMetadata(
                filename=filename or path.name, options=options, create_job=True, size_bytes=size
            )
        )
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield orchestrator_pb2.UploadAudioRequest(chunk=chunk)

    return await stub.UploadAudio(messages())


async def _watch(
    stub: OrchestratorServiceAsyncStub, job_id: str, *, label: str, quiet: bool = False
) -> orchestrator_pb2.Job:
    """Follow a job with a progress bar (stage, %, ETA); return its final state.

    The watch is resumed when its orchestrator goes away (restart, kill, another replica
    answering): the bar says "reconnecting" meanwhile and goes on from the job's state then.
    """
    from tqdm import tqdm

    from audiomesh.rpc.client import follow_job
    from audiomesh.v1 import orchestrator_pb2

    bar = tqdm(total=100, desc=label, unit="%", bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}", disable=quiet)
    job = None

    def reconnecting(attempt: int, delay: float, why: str) -> None:
        bar.set_postfix_str(f"reconnecting (try {attempt})…", refresh=True)

    request = orchestrator_pb2.WatchJobRequest(job_id=job_id)
    try:
        async for msg in follow_job(lambda: stub.WatchJob(request), on_retry=reconnecting):
            job = msg.job
            bar.n = round(job.fraction * 100, 1)
            bar.set_postfix_str(f"{_state(job).lower()} {job.current_stage} ETA {_fmt_eta(job)}", refresh=False)
            bar.refresh()
    finally:
        bar.close()
    if job is None:  # WatchJob always sends a snapshot first; say so rather than fail on None later
        raise AudiomeshError(f"WatchJob for {job_id} ended without sending the job")
    return job


def _download(settings: Settings, job: orchestrator_pb2.Job, out_dir: Path) -> list[Path]:
    store = settings.open_store()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for track in job.tracks:
        dest = out_dir / Path(track.key).name
        store.get_to_file(track.key, dest)
        written.append(dest)
    dest = out_dir / "manifest.json"
    store.get_to_file(job.manifest_key, dest)
    written.append(dest)
    return written


def _job_options(args: argparse.Namespace) -> orchestrator_pb2.JobOptions:
    from audiomesh.v1 import orchestrator_pb2

    options = orchestrator_pb2.JobOptions(model=args.model or "")
    if getattr(args, "two_stems", None):
        options.separation.two_stems = args.two_stems
    if getattr(args, "shifts", None) is not None:
        options.separation.shifts = args.shifts
    return options


async def _process(args: argparse.Namespace, settings: Settings, target: str) -> int:
    from audiomesh.v1 import orchestrator_pb2_grpc

    clients = settings.client_factory(as_user=True)
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, target)
    files = [Path(f) for f in args.files]
    tmp = None
    if args.demo:
        import soundfile as sf

        from audiomesh.demo import synth_song

        tmp = tempfile.TemporaryDirectory(prefix="audiomesh-demo-")
        demo = Path(tmp.name) / "demo.wav"
        sf.write(demo, synth_song(args.demo_seconds).T, 44100, subtype="PCM_16")
        files.append(demo)
    if not files:
        print("error: give one or more audio files, or --demo", file=sys.stderr)
        return 2
    failures = 0
    try:
        for path in files:
            if not path.is_file():
                print(f"error: {path}: no such file", file=sys.stderr)
                failures += 1
                continue
            response = await _upload(stub, path, _job_options(args))
            job = await _watch(stub, response.job.job_id, label=path.name, quiet=args.quiet)
            if _state(job) != "SUCCEEDED":
                print(
                    f"{path.name}: job {job.job_id} {_state(job)}: {job.error.code}: {job.error.message}",
                    file=sys.stderr,
                )
                failures += 1
                continue
            dest = Path(args.out) / path.stem
            written = await asyncio.to_thread(_download, settings, job, dest)
            print(f"{path.name}: job {job.job_id} done; {len(written)} files in {dest}/")
            for file in written:
                print(f"  {file.name}")
    finally:
        await clients.close()
        if tmp:
            tmp.cleanup()
    return 1 if failures else 0


async def _mesh_running(settings: Settings, target: str) -> bool:
    clients = settings.client_factory()
    try:
        return await clients.health(target, timeout=1.0) == "SERVING"
    finally:
        await clients.close()


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    target = settings.orchestrator_addr
    if asyncio.run(_mesh_running(settings, target)):
        return asyncio.run(_process(args, settings, target))
    from audiomesh.launcher import Mesh

    default_store = Path("data").resolve().as_uri()
    log_dir = Path("data/logs") if settings.store_url == default_store else None
    print("no mesh running: starting one for this command (logs in %s)" % (log_dir or "a temp folder"), file=sys.stderr)
    with Mesh(settings=settings, log_dir=log_dir) as mesh:
        return asyncio.run(_process(args, settings, mesh.orchestrator))


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
    from audiomesh.separation.execution import execution_label
    from audiomesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, separation_pb2

    clients = settings.client_factory(as_user=True)
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, settings.orchestrator_addr)
    try:
        if args.command == "jobs":
            resp = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=args.limit))
            for job in resp.jobs:
                created = job.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
                print(f"{job.job_id}  {_state(job):<9}  {created}  {job.fraction * 100:5.1f}%  {job.input.name}")
        elif args.command == "show":
            job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=args.job_id))).job
            print(json_format.MessageToJson(job, indent=2))
        elif args.command == "cancel":
            job = (await stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=args.job_id))).job
            print(f"{job.job_id} {_state(job)}")
        elif args.command == "retry":
            job = (await stub.RetryJob(orchestrator_pb2.RetryJobRequest(job_id=args.job_id))).job
            print(f"{job.job_id} {_state(job)}")
        elif args.command == "models":
            listed = await stub.ListModels(separation_pb2.ListModelsRequest())
            for m in listed.models:
                mark = "*" if m.name == listed.default_model else " "
                avail = "available" if m.available else "no weights here"
                runs = execution_label(m.execution)
                print(f"{mark} {m.name:<18} {m.origin:<11} {avail:<16} {runs:<14} {','.join(m.sources)}")
                if m.compile_error:
                    print(f"    {m.compile_error}")
                if m.HasField("eager_chunk_seconds") and m.HasField("compiled_chunk_seconds"):
                    print(
                        f"    one chunk: {m.eager_chunk_seconds:.2f} s eager, {m.compiled_chunk_seconds:.2f} s compiled"
                        f" ({m.eager_chunk_seconds / max(m.compiled_chunk_seconds, 1e-9):.2f}x)"
                    )
    finally:
        await clients.close()
    return 0


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
    p = sub.add_parser("process", help="separate files (starts a mesh when none is running)")
    p.add_argument("files", nargs="*")
    p.add_argument("--demo", action="store_true", help="also process a synthesized demo clip")
    p.add_argument("--demo-seconds", type=float, default=10.0)
    p.add_argument("--model", default="", help="separation model (default: AUDIOMESH_DEFAULT_MODEL)")
    p.add_argument("--two-stems", default="", help="e.g. vocals: vocals + no_vocals only")
    p.add_argument("--shifts", type=int, default=None, help="random shifts averaged (default 1; 0 = none)")
    p.add_argument("--out", default="out", help="folder for the tracks and manifest.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("jobs", help="list jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p = sub.add_parser("show", help="print a job as JSON")
    p.add_argument("job_id")
    p = sub.add_parser("cancel", help="cancel a job")
    p.add_argument("job_id")
    p = sub.add_parser("retry", help="run a FAILED or CANCELLED job again from what it wrote")
    p.add_argument("job_id")
    sub.add_parser("models", help="list separation models")
    p = sub.add_parser(
        "warm",
        help="compile separation models into the compile cache ahead of time (image build, init job)",
    )
    p.add_argument(
        "--model", action="append", default=[], help="model to compile (repeatable; default AUDIOMESH_DEFAULT_MODEL)"
    )
    bench.add_arguments(sub.add_parser("bench", help="measure the mesh against raw Demucs and librosa (BENCHMARKS.md)"))
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
            return cmd_process(args, settings)
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
