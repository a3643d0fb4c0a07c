"""``audiomesh process``, ``retry`` and ``download``: submit or pick up jobs, follow them with
progress lines, fetch their tracks.

Ctrl-C while a job is followed asks the orchestrator to cancel it (``process``, ``retry``: the
command started it); ``download`` only stops waiting. ``--detach`` submits and returns,
printing how to fetch the tracks later. A Ctrl-C that comes once a file was wholly sent waits
(bounded) for its job's id, so that job too is cancelled, or named under ``--detach``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from audiomesh.cli_jobs import (
    NoMesh,
    WriteFailed,
    download_job,
    encoding_from_flags,
    loudness_note,
    no_mesh_or,
    output_folder,
    resolve_job_id,
    unwritable,
)
from audiomesh.cli_progress import ProgressBoard, job_state, stage_label
from audiomesh.errors import AudiomeshError, InvalidInput, NotFound

if TYPE_CHECKING:
    from audiomesh.config import Settings
    from audiomesh.rpc.client import ClientFactory
    from audiomesh.v1 import orchestrator_pb2
    from audiomesh.v1.orchestrator_pb2_grpc import OrchestratorServiceAsyncStub

CHUNK = 1 << 20
# How long Ctrl-C after a whole file went waits for the orchestrator's answer (the job's id).
LATE_ANSWER_SECONDS = 15.0
DEVICES = ("cpu", "cuda", "auto")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
# Errors one file of a batch may end with; the batch goes on.
FILE_ERRORS = (AudiomeshError, grpc.aio.AioRpcError, OSError)


def job_options(args: argparse.Namespace) -> orchestrator_pb2.JobOptions:
    """JobOptions from ``process``' flags (Demucs' names where the meaning is the same)."""
    from audiomesh.v1 import orchestrator_pb2

    options = orchestrator_pb2.JobOptions(model=args.model or "")
    if args.two_stems:
        options.separation.two_stems = args.two_stems
    if args.shifts is not None:
        options.separation.shifts = args.shifts
    if args.overlap is not None:
        options.separation.overlap = args.overlap
    if args.segment is not None:
        options.separation.segment_seconds = args.segment
    encoding, bitrate = encoding_from_flags(args)
    options.encoding = encoding  # type: ignore[assignment]
    if bitrate:
        options.mp3_bitrate_kbps = bitrate
    return options


def fmt_duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    m, rest = divmod(s, 60)
    return f"{m} min {rest} s" if m < 60 else f"{m // 60} h {m % 60} min"


def why_not_done(job: orchestrator_pb2.Job) -> str:
    """A FAILED or CANCELLED job in words: "failed in Separating stems: INTERNAL: ...", "cancelled"."""
    state = job_state(job)
    if state == "CANCELLED":
        return "cancelled" + (f" ({job.error.message})" if job.error.message else "")
    where = f" in {stage_label(job.error.node)}" if job.error.node else ""
    code = f"{job.error.code}: " if job.error.code else ""
    return f"{state.lower()}{where}: {code}{job.error.message or 'no reason given'}"


def _manifest_config(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()).get("config") or {})
    except (OSError, ValueError, AttributeError):
        return {}


async def upload(
    stub: OrchestratorServiceAsyncStub,
    path: Path,
    options: orchestrator_pb2.JobOptions,
    *,
    late_answer: Callable[[orchestrator_pb2.UploadAudioResponse | None], None] | None = None,
) -> orchestrator_pb2.UploadAudioResponse:
    """Upload ``path`` as a new job. Cancelled before the whole file went, the call is cancelled
    (the orchestrator discards a partial upload). Cancelled after, the job may be being created:
    the answer is awaited (``LATE_ANSWER_SECONDS`` at most) and handed to ``late_answer`` (None:
    no answer in time, or a refusal) before the cancellation goes on, so the caller can cancel
    the job or say how to fetch it."""
    from audiomesh.v1 import orchestrator_pb2

    size = await asyncio.to_thread(lambda: path.stat().st_size)
    sent = False

    async def messages() -> AsyncIterator[orchestrator_pb2.UploadAudioRequest]:
        nonlocal sent
        yield orchestrator_pb2.UploadAudioRequest(
            metadata=orchestrator_pb2.UploadMetadata(
                filename=path.name, options=options, create_job=True, size_bytes=size
            )
        )
        with path.open("rb") as fh:
            while chunk := fh.read(CHUNK):
                yield orchestrator_pb2.UploadAudioRequest(chunk=chunk)
        sent = True  # gRPC asks for a next message only once the last one was written

    call = stub.UploadAudio(messages())
    answer: asyncio.Future[orchestrator_pb2.UploadAudioResponse] = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(answer)
    except asyncio.CancelledError:
        if not sent:
            call.cancel()
            raise
        response = await _answer_within(answer, LATE_ANSWER_SECONDS)
        if response is None:
            call.cancel()
        if late_answer is not None:
            late_answer(response)
        raise


async def _answer_within(answer: asyncio.Future[Any], seconds: float) -> Any:
    """``answer``'s result once it comes within ``seconds``; None if it failed or did not come.
    A repeated cancellation does not cut the wait short: the deadline bounds it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not answer.done() and (left := deadline - loop.time()) > 0:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({answer}, timeout=left)
    if not answer.done() or answer.cancelled() or answer.exception() is not None:
        return None
    return answer.result()


async def follow(
    stub: OrchestratorServiceAsyncStub, job_id: str, board: ProgressBoard, key: str
) -> orchestrator_pb2.Job:
    """Follow a job on ``board``'s row ``key`` until it ends; return its last snapshot. The
    watch is reopened when its orchestrator goes away (the row says "Reconnecting")."""
    from audiomesh.rpc.client import follow_job
    from audiomesh.v1 import orchestrator_pb2

    def reconnecting(attempt: int, delay: float, why: str) -> None:
        board.note(key, f"Reconnecting (try {attempt})")

    request = orchestrator_pb2.WatchJobRequest(job_id=job_id)
    job = None
    async for msg in follow_job(lambda: stub.WatchJob(request), on_retry=reconnecting):
        job = msg.job
        board.job(key, job)
    if job is None:  # WatchJob always sends a snapshot first; say so rather than fail on None later
        raise AudiomeshError(f"WatchJob for {job_id} ended without sending the job")
    return job


async def _ticking(board: ProgressBoard) -> None:
    while True:  # cancelled by its owner; one redraw a second
        await asyncio.sleep(1.0)
        board.tick()


class Follower:
    """The progress board, its clock and the jobs in flight, for one command."""

    def __init__(self, settings: Settings, stub: OrchestratorServiceAsyncStub, *, quiet: bool) -> None:
        self.settings = settings
        self.stub = stub
        self.board = ProgressBoard(sys.stderr, enabled=not quiet)
        self.in_flight: dict[str, str] = {}  # job id -> what the user calls it (file name)
        self._ticker: asyncio.Task | None = None

    def __enter__(self) -> Follower:
        if self.board.enabled and self.board.tty:
            self._ticker = asyncio.get_running_loop().create_task(_ticking(self.board))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        self.board.close()

    def out(self, text: str) -> None:
        self.board.echo(text, stream=sys.stdout)

    def err(self, text: str) -> None:
        self.board.echo(text, stream=sys.stderr)

    async def run(self, key: str, label: str, job_id: str) -> orchestrator_pb2.Job:
        """Follow one job to its end on its own row."""
        self.in_flight[job_id] = label
        self.board.add(key, label, words="Submitted")
        try:
            job = await follow(self.stub, job_id, self.board, key)
        except BaseException:
            self.board.finish(key, "Stopped")
            raise
        self.in_flight.pop(job_id, None)
        if job_state(job) == "SUCCEEDED":
            from audiomesh.manifest import run_start

            took = job.update_time.ToDatetime() - run_start(job).ToDatetime()  # a retry: its own run
            self.board.finish(key, f"Done in {fmt_duration(took.total_seconds())}", fraction=1.0)
        else:
            self.board.finish(key, why_not_done(job).capitalize())
        return job

    async def deliver(self, job: orchestrator_pb2.Job, label: str, dest: Path) -> None:
        """Fetch a SUCCEEDED job's files into ``dest`` and say what came, and the loudness
        outcome when the true-peak ceiling limited it."""
        try:
            written = await asyncio.to_thread(download_job, self.settings, job, dest)
        except WriteFailed as exc:  # the job is done on the server: it can be fetched again
            raise WriteFailed(
                f"{exc}; the job is done: `audiomesh download {job.job_id[:8]} -o DIR` fetches it"
            ) from exc
        self.out(f"{label}: job {job.job_id} done; {len(written)} files in {dest}/")
        for file in written:
            self.out(f"  {file.name}")
        note = loudness_note(job, _manifest_config(dest / "manifest.json"))
        if note:
            self.out(f"{label}: {note}")

    async def cancel_in_flight(self) -> None:
        """After Ctrl-C: ask the orchestrator to cancel every job still followed (bounded)."""
        from audiomesh.v1 import orchestrator_pb2

        if not self.in_flight:
            return
        jobs = list(self.in_flight.items())
        n = len(jobs)
        self.err(f"interrupted: cancelling {n} job{'s' if n > 1 else ''} (--detach leaves jobs running)")
        results = await asyncio.gather(
            *(self.stub.CancelJob(orchestrator_pb2.CancelJobRequest(job_id=job_id), timeout=15) for job_id, _ in jobs),
            return_exceptions=True,
        )
        for (job_id, label), result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                why = (
                    f"{result.code().name}: {result.details()}" if isinstance(result, grpc.aio.AioRpcError) else result
                )
                self.err(f"{label}: could not cancel job {job_id} ({why}); `audiomesh cancel {job_id[:8]}` tries again")
            else:
                self.err(f"{label}: job {job_id} {job_state(result.job).lower()}")


# ---------------------------------------------------------------------- process


def check_files(args: argparse.Namespace) -> tuple[list[Path], list[tuple[str, str]]]:
    """The inputs that can be processed, and (name, why) for those that cannot (missing, not a
    file, their output folder blocked): checked before any mesh is looked for or started."""
    found, missing = [], []
    for name in args.files:
        path = Path(name)
        if not path.exists():
            missing.append((name, "no such file"))
        elif not path.is_file():
            missing.append((name, "not a file"))
        elif not args.detach and (why := unwritable(Path(args.out) / path.stem)):
            missing.append((name, f"its tracks cannot go to {Path(args.out) / path.stem}: {why}"))
        else:
            found.append(path)
    return found, missing


async def process_files(
    args: argparse.Namespace,
    settings: Settings,
    target: str,
    files: list[Path],
    failures: list[tuple[str, str]],
) -> int:
    """Upload and follow ``files`` (``--jobs`` at once), fetching each one's tracks as it ends.
    A file that fails is recorded in ``failures`` and the batch goes on; 0 when all succeeded."""
    from audiomesh.v1 import orchestrator_pb2_grpc

    clients = settings.client_factory(as_user=True)
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, target)
    options = job_options(args)
    slots = asyncio.Semaphore(args.jobs)
    succeeded = 0

    def submitted(follower: Follower, path: Path, job_id: str) -> None:
        follower.board.finish(str(path), "Submitted")
        follower.out(
            f"{path.name}: job {job_id} submitted; fetch its tracks with `audiomesh download {job_id[:8]} -o {args.out}`"
        )

    async def one(follower: Follower, path: Path) -> None:
        nonlocal succeeded
        async with slots:
            label = path.name
            follower.board.add(str(path), label, words="Uploading")

            def late_answer(response: orchestrator_pb2.UploadAudioResponse | None) -> None:
                """Ctrl-C came after the whole file went: its job is in flight like any other."""
                if response is None:
                    follower.board.finish(str(path), "Stopped")
                    follower.err(
                        f"{label}: uploaded, but no job id came back; `audiomesh jobs` shows whether one exists"
                    )
                elif args.detach:
                    submitted(follower, path, response.job.job_id)
                else:
                    follower.board.finish(str(path), "Stopped")
                    follower.err(f"{label}: job {response.job.job_id}")
                    follower.in_flight[response.job.job_id] = label  # cancel_in_flight cancels it

            try:
                response = await upload(stub, path, options, late_answer=late_answer)
                job_id = response.job.job_id
                if args.detach:
                    submitted(follower, path, job_id)
                    succeeded += 1
                    return
                follower.err(f"{label}: job {job_id}")
                job = await follower.run(str(path), label, job_id)
                if job_state(job) != "SUCCEEDED":
                    raise AudiomeshError(f"job {job.job_id} {why_not_done(job)}")
                await follower.deliver(job, label, Path(args.out) / path.stem)
                succeeded += 1
            except FILE_ERRORS as exc:
                if follower.board.has(str(path)):
                    follower.board.finish(str(path), "Failed")
                why = await _explain(exc, clients, target)
                follower.err(f"error: {label}: {why}")
                failures.append((label, why))

    try:
        await check_options_with_model(stub, options)
        if args.device:
            await _say_device_is_the_mesh(stub, args.device, target)
        with Follower(settings, stub, quiet=args.quiet) as follower:
            tasks = [asyncio.ensure_future(one(follower, path)) for path in files]
            try:
                await asyncio.gather(*tasks)
            except asyncio.CancelledError:  # Ctrl-C (asyncio.run cancels the main task)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if args.detach:
                    follower.err("interrupted: jobs submitted above go on; files not yet uploaded were not")
                else:
                    await follower.cancel_in_flight()
                raise
    finally:
        await clients.close()
    total = succeeded + len(failures)
    if failures and total > 1:
        print(f"{succeeded} of {total} files {'submitted' if args.detach else 'done'}; failed:", file=sys.stderr)
        for label, why in failures:
            print(f"  {label}: {why}", file=sys.stderr)
    return 1 if failures else 0


async def check_options_with_model(stub: OrchestratorServiceAsyncStub, options: orchestrator_pb2.JobOptions) -> None:
    """The options against the model the jobs will use, once, before any file is uploaded: a
    model the mesh lacks, a ``--two-stems`` it has no stem for, a ``--segment`` over its limit
    or ``--mp3`` at a rate MP3 cannot store is one error, not one per file of the batch. The
    orchestrator checks each job the same way (these are its functions); a mesh that cannot
    list its models now leaves the check to it."""
    from audiomesh.v1 import separation_pb2

    try:
        listed = await stub.ListModels(separation_pb2.ListModelsRequest(), timeout=30)
    except grpc.aio.AioRpcError:
        return
    name = options.model or listed.default_model
    info = next((m for m in listed.models if m.name == name), None)
    if info is None:
        if listed.models and name:
            known = ", ".join(m.name for m in listed.models)
            raise NotFound(f"unknown model {name!r}; available: {known} (`audiomesh models` says more)")
        return
    from audiomesh.options import check_model_options

    check_model_options(options, info)


async def _explain(exc: BaseException, clients: ClientFactory, target: str) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        exc = await no_mesh_or(exc, clients, target)
        if isinstance(exc, grpc.aio.AioRpcError):
            return f"{exc.code().name}: {exc.details()}"
    return str(exc)


async def _say_device_is_the_mesh(stub: OrchestratorServiceAsyncStub, device: str, target: str) -> None:
    """``-d`` against a running mesh: the device is the mesh's setting, fixed when it started."""
    from audiomesh.v1 import orchestrator_pb2

    try:
        config = (await stub.GetConfig(orchestrator_pb2.GetConfigRequest(), timeout=10)).config
        current = config["device"] if "device" in config else "?"
    except grpc.aio.AioRpcError:
        current = "?"
    if current != device:
        print(
            f"note: -d {device} not applied: the running mesh at {target} uses AUDIOMESH_DEVICE={current},"
            " set when it started; a device cannot be chosen per job (stop it and start"
            f" `AUDIOMESH_DEVICE={device} audiomesh up`, or let `process` start its own mesh)",
            file=sys.stderr,
        )


async def _mesh_running(settings: Settings, target: str) -> bool:
    clients = settings.client_factory()
    try:
        return await clients.health(target, timeout=1.0) == "SERVING"
    finally:
        await clients.close()


def check_out(out: str | Path, folder: Path | None = None) -> None:
    """``-o OUT`` (or the job's ``folder`` in it): refused before anything is uploaded, started
    or waited for when files could not be written there (a file in the way, no permission)."""
    why = unwritable(folder or out)
    if why:
        raise InvalidInput(f"-o {out}: {why}")


def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    if not args.detach:  # --detach writes nothing here
        check_out(args.out)
    files, failures = check_files(args)
    for name, why in failures:
        print(f"error: {name}: {why}", file=sys.stderr)
    tmp = None
    if args.demo:
        import soundfile as sf

        from audiomesh.demo import synth_song

        tmp = tempfile.TemporaryDirectory(prefix="audiomesh-demo-")
        demo = Path(tmp.name) / "demo.wav"
        sf.write(demo, synth_song(args.demo_seconds).T, 44100, subtype="PCM_16")
        files.append(demo)
    try:
        if not files:
            if not failures:
                print("error: give one or more audio files, or --demo", file=sys.stderr)
                return 2
            return 1
        return _run_process(args, settings, files, failures)
    finally:
        if tmp:
            tmp.cleanup()


def _check_device_here(device: str) -> None:
    """``-d cuda`` for a mesh this command starts on a machine whose torch sees no GPU: say so,
    in the flag's terms, instead of a mesh that fails to start (importing torch only then)."""
    from audiomesh.errors import FailedPrecondition
    from audiomesh.separation.base import resolve_device

    try:
        resolve_device(device)
    except FailedPrecondition as exc:
        import torch

        raise FailedPrecondition(
            f"-d {device}: torch {torch.__version__} sees no CUDA device on this machine, so the mesh this command "
            "would start cannot separate there; use -d cpu (or -d auto: the GPU where there is one)"
        ) from exc


def _run_process(args: argparse.Namespace, settings: Settings, files: list[Path], failures: list) -> int:
    target = settings.orchestrator_addr
    if asyncio.run(_mesh_running(settings, target)):
        return asyncio.run(process_files(args, settings, target, files, failures))
    if args.detach:
        raise NoMesh(target)  # a mesh this command starts would stop, and its jobs with it, on return
    from audiomesh.launcher import Mesh

    default_store = Path("data").resolve().as_uri()
    log_dir = Path("data/logs") if settings.store_url == default_store else None
    env = {}
    if args.device and args.device != "auto":
        _check_device_here(args.device)  # before a mesh starts whose separation worker would fail
    if args.device:
        env["AUDIOMESH_DEVICE"] = args.device
        settings = settings.model_copy(update={"device": args.device})
        args.device = None  # applied: nothing to say about it later
    print("no mesh running: starting one for this command (logs in %s)" % (log_dir or "a temp folder"), file=sys.stderr)
    with Mesh(env=env, settings=settings, log_dir=log_dir) as mesh:
        return asyncio.run(process_files(args, settings, mesh.orchestrator, files, failures))


# ---------------------------------------------------------------------- retry, download


async def with_orchestrator(
    settings: Settings, work: Callable[[OrchestratorServiceAsyncStub, ClientFactory], Awaitable[int]]
) -> int:
    """Run ``work(stub, clients)`` against AUDIOMESH_ORCHESTRATOR_ADDR; a call that finds nothing
    there ends as :class:`NoMesh` ("no mesh at ADDR: start one with `audiomesh up`")."""
    from audiomesh.v1 import orchestrator_pb2_grpc

    target = settings.orchestrator_addr
    clients = settings.client_factory(as_user=True)
    stub = clients.stub(orchestrator_pb2_grpc.OrchestratorServiceStub, target)
    try:
        return await work(stub, clients)
    except grpc.aio.AioRpcError as exc:
        raise await no_mesh_or(exc, clients, target) from None
    finally:
        await clients.close()


async def retry(args: argparse.Namespace, settings: Settings) -> int:
    from audiomesh.v1 import orchestrator_pb2

    async def work(stub: OrchestratorServiceAsyncStub, clients: ClientFactory) -> int:
        job_id = await resolve_job_id(stub, args.job_id)
        if not args.detach:  # a folder its files cannot go to is said before the job runs again
            job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id))).job
            check_out(args.out, output_folder(args.out, job))
        job = (await stub.RetryJob(orchestrator_pb2.RetryJobRequest(job_id=job_id))).job
        label = job.input.name or job_id[:8]
        if args.detach:
            print(
                f"{label}: job {job_id} {job_state(job).lower()} again; fetch its tracks with"
                f" `audiomesh download {job_id[:8]} -o {args.out}`"
            )
            return 0
        print(f"{label}: job {job_id} {job_state(job).lower()} again", file=sys.stderr)
        with Follower(settings, stub, quiet=args.quiet) as follower:
            try:
                job = await follower.run(job_id, label, job_id)
            except asyncio.CancelledError:
                await follower.cancel_in_flight()
                raise
            if job_state(job) != "SUCCEEDED":
                print(f"error: {label}: job {job_id} {why_not_done(job)}", file=sys.stderr)
                return 1
            try:
                await follower.deliver(job, label, output_folder(args.out, job))
            except WriteFailed as exc:
                print(f"error: {label}: {exc}", file=sys.stderr)
                return 1
        return 0

    if not args.detach:
        check_out(args.out)
    return await with_orchestrator(settings, work)


async def download(args: argparse.Namespace, settings: Settings) -> int:
    from audiomesh.v1 import orchestrator_pb2

    async def work(stub: OrchestratorServiceAsyncStub, clients: ClientFactory) -> int:
        job_id = await resolve_job_id(stub, args.job_id)
        job = (await stub.GetJob(orchestrator_pb2.GetJobRequest(job_id=job_id))).job
        label = job.input.name or job_id[:8]
        check_out(args.out, output_folder(args.out, job))  # before waiting for a running job
        with Follower(settings, stub, quiet=args.quiet) as follower:
            if job_state(job) not in TERMINAL:
                try:
                    job = await follower.run(job_id, label, job_id)
                except asyncio.CancelledError:
                    follower.err(f"stopped waiting: job {job_id} goes on; run `audiomesh download {job_id[:8]}` again")
                    raise
            if job_state(job) != "SUCCEEDED":
                print(
                    f"error: {label}: job {job_id} {why_not_done(job)}: nothing to download;"
                    f" `audiomesh retry {job_id[:8]}` runs it again",
                    file=sys.stderr,
                )
                return 1
            try:
                await follower.deliver(job, label, output_folder(args.out, job))
            except WriteFailed as exc:
                print(f"error: {label}: {exc}", file=sys.stderr)
                return 1
        return 0

    check_out(args.out)
    return await with_orchestrator(settings, work)


def device(text: str) -> str:
    """``-d``'s type: the devices a mesh can be started on (AUDIOMESH_DEVICE)."""
    if text not in DEVICES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: a mesh runs on cpu, cuda or auto (AUDIOMESH_DEVICE); pick a GPU with CUDA_VISIBLE_DEVICES"
        )
    return text


def positive_files_in_flight(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 64:
        raise argparse.ArgumentTypeError(f"{text!r}: give the number of files in flight at once, 1 to 64")
    return value


def add_process_arguments(p: argparse.ArgumentParser) -> None:
    """``process``' flags: Demucs' own names where the meaning is the same (README: From Demucs)."""
    from audiomesh.cli_jobs import ranged

    p.add_argument("files", nargs="*", metavar="FILE", help="audio files (WAV, FLAC, OGG, MP3; more with ffmpeg)")
    p.add_argument("--demo", action="store_true", help="also process a synthesized demo clip")
    p.add_argument("--demo-seconds", type=float, default=10.0)
    p.add_argument(
        "-n", "--name", "--model", dest="model", default="", metavar="MODEL",
        help="separation model (default: AUDIOMESH_DEFAULT_MODEL); `audiomesh models` lists them",
    )  # fmt: skip
    p.add_argument(
        "-o",
        "--out",
        default="out",
        metavar="DIR",
        help="tracks and manifest.json go to DIR/<file name>/ (default out)",
    )
    p.add_argument("--two-stems", default="", metavar="STEM", help="e.g. vocals: vocals + no_vocals only")
    fmt = p.add_argument_group("output format (default: AUDIOMESH_OUTPUT_ENCODING, WAV 16-bit)")
    fmt.add_argument("--mp3", action="store_true", help="MP3 tracks")
    fmt.add_argument(
        "--mp3-bitrate", type=ranged("mp3_bitrate_kbps", int), default=None, metavar="KBPS",
        help="MP3 bitrate in kbit/s, 32..320 (default 320)",
    )  # fmt: skip
    fmt.add_argument("--flac", action="store_true", help="FLAC tracks (16-bit; 24-bit with --int24)")
    fmt.add_argument("--int24", action="store_true", help="24-bit samples (WAV, or FLAC with --flac)")
    fmt.add_argument("--float32", action="store_true", help="32-bit float WAV")
    sep = p.add_argument_group("separation, as Demucs")
    sep.add_argument(
        "--segment", type=ranged("separation.segment_seconds"), default=None, metavar="S",
        help="seconds per chunk the model sees (default: the model's own)",
    )  # fmt: skip
    sep.add_argument(
        "--overlap", type=ranged("separation.overlap"), default=None, metavar="F",
        help="overlap between chunks, 0..0.99 (default 0.25)",
    )  # fmt: skip
    sep.add_argument(
        "--shifts", type=ranged("separation.shifts", int), default=None, metavar="N",
        help="random shifts averaged, 0..20 (default 1)",
    )  # fmt: skip
    p.add_argument(
        "-j", "--jobs", type=positive_files_in_flight, default=1, metavar="N",
        help="files in flight at once (default 1); the mesh bounds how many run",
    )  # fmt: skip
    p.add_argument(
        "-d", "--device", type=device, default=None, metavar="DEVICE",
        help="cpu, cuda or auto for a mesh this command starts; a running mesh keeps its own",
    )  # fmt: skip
    p.add_argument(
        "--detach", action="store_true",
        help="submit and return (needs a running mesh); prints how to download each job",
    )  # fmt: skip
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
