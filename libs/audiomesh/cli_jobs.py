"""What the ``audiomesh`` commands share about jobs: ids given as short prefixes, the "no mesh"
message, output encodings from Demucs' flags, fetching a job's files, and the loudness outcome
in words.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from audiomesh import ranges
from audiomesh.errors import AudiomeshError, InvalidInput, NotFound

if TYPE_CHECKING:
    from audiomesh.config import Settings
    from audiomesh.rpc.client import ClientFactory
    from audiomesh.v1 import orchestrator_pb2
    from audiomesh.v1.orchestrator_pb2_grpc import OrchestratorServiceAsyncStub

__all__ = [
    "NoMesh",
    "WriteFailed",
    "download_job",
    "encoding_from_flags",
    "loudness_note",
    "no_mesh_or",
    "ranged",
    "resolve_job_id",
    "unwritable",
]

JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
JOB_ID_PREFIX = re.compile(r"[0-9a-f][0-9a-f-]{0,35}")
# A prefix is looked up in the newest PREFIX_PAGES x PAGE jobs (ListJobs is newest first).
PREFIX_PAGE = 200
PREFIX_PAGES = 50
# When older jobs were left unsearched, a prefix this long (what the CLI's hints print) is taken
# as unique; a shorter one could as well name one of them.
SAFE_PREFIX = 8


class NoMesh(AudiomeshError):
    """Nothing answers at the orchestrator's address."""

    code = "UNAVAILABLE"

    def __init__(self, addr: str) -> None:
        super().__init__(f"no mesh at {addr}: start one with `audiomesh up`")


class WriteFailed(AudiomeshError):
    """A job's files could not be written where the user asked (``-o``)."""

    code = "FAILED_PRECONDITION"


def unwritable(out: str | Path) -> str | None:
    """Why files cannot be written into folder ``out`` (None when they can, as far as can be
    told before trying): ``out`` or a folder above it is a file, or the nearest folder that
    exists cannot be written to."""
    for path in (Path(out), *Path(out).parents):  # the nearest that exists decides
        if not os.path.lexists(path):
            continue
        if not path.is_dir():
            return f"{path} is a file, not a folder"
        if not os.access(path, os.W_OK | os.X_OK):
            return f"{path} is not writable"
        return None
    return None


async def no_mesh_or(exc: grpc.aio.AioRpcError, clients: ClientFactory, addr: str) -> BaseException:
    """The error to report for a failed call: :class:`NoMesh` when nothing serves at ``addr``
    (a closed port, a host that does not answer), else the call's own error. UNAVAILABLE from
    a running orchestrator (e.g. while it drains) is passed on as it is."""
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if await clients.health(addr, timeout=1.0) == "UNREACHABLE":
            return NoMesh(addr)
    return exc


async def resolve_job_id(stub: OrchestratorServiceAsyncStub, text: str) -> str:
    """A job id from the id or a unique start of it (``cc26e1bc``), as ``git`` takes commits.

    Prefixes are matched against the newest jobs the caller may see (ListJobs, newest first,
    at most ``PREFIX_PAGES`` pages); NotFound when none starts so, InvalidInput listing the
    candidates when several do.
    """
    from audiomesh.v1 import orchestrator_pb2

    wanted = text.strip().lower()
    if JOB_ID.fullmatch(wanted):
        return wanted
    if not JOB_ID_PREFIX.fullmatch(wanted):
        raise InvalidInput(f"{text!r} is not a job id or the start of one (hex digits and dashes)")
    matches: list[orchestrator_pb2.Job] = []
    token = ""
    seen = 0
    for _ in range(PREFIX_PAGES):
        page = await stub.ListJobs(orchestrator_pb2.ListJobsRequest(page_size=PREFIX_PAGE, page_token=token))
        seen += len(page.jobs)
        matches += [job for job in page.jobs if job.job_id.startswith(wanted)]
        token = page.next_page_token
        if not token or len(matches) > 1:
            break
    if len(matches) == 1 and (not token or len(wanted) >= SAFE_PREFIX):
        return matches[0].job_id
    if len(matches) == 1:
        raise InvalidInput(
            f"{wanted!r} starts job {matches[0].job_id} among the newest {seen} jobs, but older ones were not"
            f" searched: give at least {SAFE_PREFIX} characters of the id"
        )
    if not matches:
        among = f" among the newest {seen} jobs" if token else ""
        raise NotFound(f"no job whose id starts with {wanted!r}{among}: `audiomesh jobs` lists them")
    listed = "\n".join(f"  {job.job_id}  {_state(job):<9}  {job.input.name}" for job in matches[:10])
    raise InvalidInput(f"{wanted!r} starts more than one job id; give more of it:\n{listed}")


def _state(job: orchestrator_pb2.Job) -> str:
    from audiomesh.v1 import common_pb2

    return common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def ranged(key: str, kind: type = float) -> Any:
    """An argparse ``type`` that parses a number and checks it against ``ranges.RANGES[key]``
    (the bounds the orchestrator enforces), so a bad value is a usage error before any upload."""
    rule = ranges.RANGES[key]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule.describe()}") from None
        if not rule.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: give {rule.describe()}")
        return value

    return parse


def encoding_from_flags(args: argparse.Namespace) -> tuple[int, int]:
    """``(JobOptions.encoding, JobOptions.mp3_bitrate_kbps)`` from Demucs' output flags.

    ``--mp3 [--mp3-bitrate N]`` MP3; ``--flac`` FLAC 16-bit, ``--flac --int24`` FLAC 24-bit;
    ``--int24`` WAV 24-bit, ``--float32`` WAV float; none: the mesh's default
    (AUDIOMESH_OUTPUT_ENCODING). Combinations that cannot be written raise ValueError.
    """
    from audiomesh.v1 import common_pb2

    if args.mp3 and args.flac:
        raise ValueError("--mp3 and --flac both given: choose one output format")
    if args.int24 and args.float32:
        raise ValueError("--int24 and --float32 both given: choose one sample format")
    if args.mp3_bitrate is not None and not args.mp3:
        raise ValueError("--mp3-bitrate applies to --mp3 only: add --mp3 or drop it")
    if args.mp3:
        if args.int24 or args.float32:
            raise ValueError("MP3 has no sample format: drop --int24/--float32, or use --flac/WAV")
        mp3 = getattr(common_pb2, "AUDIO_ENCODING_MP3", None)
        if mp3 is None:
            raise ValueError("--mp3: this audiomesh has no MP3 output (AUDIO_ENCODING_MP3 missing)")
        return mp3, args.mp3_bitrate or 0
    if args.flac:
        if args.float32:
            raise ValueError("FLAC stores integers only: --flac takes --int24 or nothing, not --float32")
        return (common_pb2.AUDIO_ENCODING_FLAC_PCM24 if args.int24 else common_pb2.AUDIO_ENCODING_FLAC_PCM16), 0
    if args.int24:
        return common_pb2.AUDIO_ENCODING_WAV_PCM24, 0
    if args.float32:
        return common_pb2.AUDIO_ENCODING_WAV_FLOAT32, 0
    return common_pb2.AUDIO_ENCODING_UNSPECIFIED, 0


def download_job(settings: Settings, job: orchestrator_pb2.Job, out_dir: Path) -> list[Path]:
    """The job's delivered tracks and its manifest.json into ``out_dir`` (created), read from
    the store the mesh writes to (AUDIOMESH_STORE_URL)."""
    store = settings.open_store()
    written = []
    dest = out_dir
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for track in job.tracks:
            dest = out_dir / Path(track.key).name
            store.get_to_file(track.key, dest)
            written.append(dest)
        dest = out_dir / "manifest.json"
        store.get_to_file(job.manifest_key, dest)
    except OSError as exc:  # the user's folder (a file in its place, no permission, disk full)
        why = unwritable(out_dir) or exc.strerror or str(exc)
        if exc.filename and Path(exc.filename) != dest and not unwritable(out_dir):
            why = f"{exc.filename}: {why}"
        raise WriteFailed(f"cannot write {dest}: {why}") from exc
    written.append(dest)
    return written


def output_folder(out: str | Path, job: orchestrator_pb2.Job, fallback: str = "") -> Path:
    """Where ``process`` and ``download`` put a job's files: ``OUT/<input name without suffix>``."""
    name = Path(job.input.name).stem or fallback or job.job_id
    return Path(out) / name


def loudness_note(job: orchestrator_pb2.Job, config: Mapping[str, Any]) -> str | None:
    """The normalization outcome in words when the true-peak ceiling held the job below its
    target, e.g. "loudness limited by the -1 dBTP ceiling: -17.3 LUFS (target -14 LUFS)";
    None otherwise. ``config`` is the job's settings snapshot (its manifest's ``config``) and
    gives the defaults the job's options left unset."""
    from audiomesh.v1 import common_pb2

    summary = job.normalization
    if not summary.limited_by_ceiling:
        return None
    options = job.options.normalize
    ceiling = (
        options.true_peak_ceiling_dbtp
        if options.HasField("true_peak_ceiling_dbtp")
        else float(config.get("true_peak_ceiling_db", -1.0))
    )
    if options.mode == common_pb2.NORMALIZE_MODE_UNSPECIFIED:
        peak = config.get("normalize_mode", "loudness") == "peak"
    else:
        peak = options.mode == common_pb2.NORMALIZE_MODE_PEAK
    default_target = float(config.get("target_db", -1.0 if peak else -14.0))
    target = options.target if options.HasField("target") else default_target
    if peak:
        reached = summary.reference.sample_peak_dbfs + summary.linked_gain_db
        return f"peak limited by the {ceiling:g} dBTP ceiling: {reached:.1f} dBFS (target {target:g} dBFS)"
    reached = summary.reference.integrated_lufs + summary.linked_gain_db
    return f"loudness limited by the {ceiling:g} dBTP ceiling: {reached:.1f} LUFS (target {target:g} LUFS)"
