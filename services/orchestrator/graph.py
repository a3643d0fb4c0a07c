"""The stage graph of one job, as data: every node, the keys it reads and writes, its request.

Pure: no I/O, no gRPC calls (requests are protobuf messages, which are data). One
:class:`Node` record per node says everything about it; dependencies are derived (a node
waits for the nodes that write what it reads). The runner executes nodes as soon as their
dependencies have succeeded, so HPSS of the mix runs beside separation and the stem HPSS
fan-out runs in parallel. Adding a stage is adding one record here (plus its stub in the
runner's table).

    decode ─► separation ─► hpss:<stem> (each stem of the main recipe) ─► composite ─► normalize
       ├────► hpss:mix ─────────────────────────────────────────────────────────────────┤
       └─────────────────────────── (the mix: linked gain's reference) ─────────────────┘

A plan of ``parts`` K >= 2 splits the separation across workers: nodes
``separation:part1of{K}`` … ``separation:part{K}of{K}`` each compute a range of the song's chunks
into one object (``separation/ranges/{index}-of-{K}.range``, index from 0), and ``stitch`` joins
them into the same stem keys the single ``separation`` node writes (exactly, see
:mod:`audiomesh.separation.split`), so every node after it is the same. K = 1 is the single node.

Likewise ``hpss_parts`` K >= 2 splits each stem's HPSS: nodes ``hpss:{stem}:part1of{K}`` …
each decompose a run of the stem's blocks into their own objects
(``hpss/parts/{stem}_{harmonic,percussive}.{index}-of-{K}.wav``), and the composite reads each
stem's parts joined in order (:class:`~audiomesh.audio.stream.JoinedSource`) — the same
samples the whole stem's HPSS writes, with no join step.

:func:`describe` prints the default plan as a table (README's architecture section shows it).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from audiomesh.dsp.hpss import MAX_PARTS
from audiomesh.errors import InvalidInput
from audiomesh.separation.split import MAX_RANGES, shift_seed
from audiomesh.tracks import INTERMEDIATE
from audiomesh.v1 import common_pb2, composite_pb2, hpss_pb2, normalize_pb2, orchestrator_pb2, separation_pb2

# Expected relative cost, for the overall progress fraction and the ETA. The parts of a split
# node share its weight (overall_fraction); the stitch only adds and writes stems.
STAGE_WEIGHTS = {"decode": 1.0, "separation": 60.0, "stitch": 2.0, "hpss": 6.0, "composite": 2.0, "normalize": 4.0}
#: Most parts a separation, or a stem's HPSS, can be split into (what a worker accepts).
MAX_SEPARATION_PARTS = MAX_RANGES
MAX_HPSS_PARTS = MAX_PARTS
PART_MARK = ":part"  # "separation:part1of2", "hpss:drums:part1of2": a part of the node before it
VOCALS = "vocals"
LOCAL_STAGE = "decode"  # runs in the orchestrator itself; every other stage is a worker's RPC


@dataclass(frozen=True)
class DecodeRequest:
    """The local stage's request: the job's upload → the float mix every stage reads."""

    input_key: str
    input_name: str  # as uploaded: messages name the user's file, not a scratch copy
    output_key: str


# A request is a worker's protobuf request (or DecodeRequest); a response is what its RPC
# returns (a streaming RPC: its result message; decode: the mix's Track).
RequestBuilder = Callable[["Node", "Plan", orchestrator_pb2.Job], Any]
Collector = Callable[[Any, orchestrator_pb2.Node, orchestrator_pb2.Job], list[common_pb2.Track]]


@dataclass(frozen=True)
class Node:
    """One node of a job's graph: everything the runner needs to run it.

    ``reads``/``writes`` are object keys; the nodes that write what this one reads are its
    dependencies (:meth:`Plan.depends_on`). ``request`` builds the stage's request from the
    plan and the job (options, upload, and tracks earlier nodes wrote); ``collect`` turns the
    response into the node's output tracks, keeping what else the response says in the job.
    ``drops_reads``: what it reads exists only for it (a split separation's parts, as large as
    the stems): deleted once it succeeded.
    """

    name: str
    stage: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    request: RequestBuilder
    collect: Collector
    drops_reads: bool = False

    def build_request(self, plan: Plan, job: orchestrator_pb2.Job) -> Any:
        return self.request(self, plan, job)


@dataclass(frozen=True)
class Plan:
    """What a job will run and deliver, derived from the model's sources and the options."""

    job_id: str
    stems: tuple[str, ...]  # sources the separation writes
    main_stems: tuple[str, ...]  # summed into "main"
    ext: str  # extension of delivered tracks, ".wav", ".flac" or ".mp3"
    nodes: tuple[Node, ...] = ()  # in a valid execution order; filled by make_plan
    parts: int = 1  # separation split into this many ranges (1: one whole-song node)
    hpss_parts: int = 1  # each main stem's HPSS split into this many parts (1: one node per stem)

    @property
    def prefix(self) -> str:
        return f"jobs/{self.job_id}"

    @property
    def shift_seed(self) -> int:
        """The seed of the shift offsets every separation request of this job sends."""
        return shift_seed(self.job_id)

    def range_key(self, index: int) -> str:
        """Where part ``index`` (0-based) of the separation writes its partial sums."""
        return f"{self.prefix}/separation/ranges/{index}-of-{self.parts}.range"

    def part_name(self, index: int) -> str:
        """The node of part ``index`` (0-based): ``separation:part1of2``."""
        return f"separation:part{index + 1}of{self.parts}"

    def key(self, stage: str, track: str, ext: str = ".wav") -> str:
        return f"{self.prefix}/{stage}/{track}{ext}"

    @property
    def mix_key(self) -> str:
        return self.key("decode", "mix")

    def stem_key(self, stem: str) -> str:
        return self.key("separation", stem)

    def hpss_keys(self, source: str) -> tuple[str, str]:
        return self.key("hpss", f"{source}_harmonic"), self.key("hpss", f"{source}_percussive")

    def hpss_part_keys(self, stem: str, index: int) -> tuple[str, str]:
        """Where part ``index`` (0-based) of ``stem``'s HPSS writes its harmonic and percussive samples."""
        suffix = f".{index}-of-{self.hpss_parts}"
        return self.key("hpss/parts", f"{stem}_harmonic{suffix}"), self.key("hpss/parts", f"{stem}_percussive{suffix}")

    def stem_hpss_inputs(self, stem: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """``stem``'s harmonic and percussive inputs of the composites: each the one whole key,
        or its parts' keys in order."""
        if self.hpss_parts == 1:
            harmonic, percussive = self.hpss_keys(stem)
            return (harmonic,), (percussive,)
        parts = [self.hpss_part_keys(stem, i) for i in range(self.hpss_parts)]
        return tuple(h for h, _ in parts), tuple(p for _, p in parts)

    def intermediate_tracks(self) -> dict[str, str]:
        """Delivered track name → the key of its un-normalized version."""
        tracks = {stem: self.stem_key(stem) for stem in self.stems}
        tracks["harmonic"], tracks["percussive"] = self.hpss_keys("mix")
        for name in ("main", "main_harmonic", "main_percussive"):
            tracks[name] = self.key("composite", name)
        return tracks

    def output_key(self, track: str) -> str:
        return self.key("output", track, self.ext)

    def composites(self) -> dict[str, list[tuple[str, ...]]]:
        """Composite name → its inputs, summed in this order; each input one key or its parts' keys."""
        return {
            "main": [(self.stem_key(s),) for s in self.main_stems],
            "main_harmonic": [self.stem_hpss_inputs(s)[0] for s in self.main_stems],
            "main_percussive": [self.stem_hpss_inputs(s)[1] for s in self.main_stems],
        }

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node {name!r} in this plan; it has {[n.name for n in self.nodes]}")

    def writers(self) -> dict[str, str]:
        """Object key → the node that writes it."""
        return {key: node.name for node in self.nodes for key in node.writes}

    def depends_on(self, name: str) -> list[str]:
        """The nodes that write what ``name`` reads, in plan order."""
        writers = self.writers()
        needed = {writers[key] for key in self.node(name).reads}
        return [n.name for n in self.nodes if n.name in needed]


# --- the nodes: what each reads, writes and asks its worker ---------------------------------
def _graph(plan: Plan) -> tuple[Node, ...]:
    """Every node of ``plan``, in a valid execution order."""
    mix = plan.mix_key
    composites = plan.composites()
    delivered = plan.intermediate_tracks()
    stems = tuple(map(plan.stem_key, plan.stems))
    nodes = [Node("decode", "decode", (), (mix,), _decode_request, _one_track)]
    if plan.parts == 1:
        nodes.append(Node("separation", "separation", (mix,), stems, _separate_request, _separated))
    else:
        ranges = tuple(plan.range_key(i) for i in range(plan.parts))
        nodes += [
            Node(
                plan.part_name(i),
                "separation",
                (mix,),
                (ranges[i],),
                functools.partial(_separate_part_request, index=i),
                _separated_part,
            )
            for i in range(plan.parts)
        ]
        nodes.append(Node("stitch", "stitch", ranges, stems, _stitch_request, _separated, drops_reads=True))
    nodes.append(Node("hpss:mix", "hpss", (mix,), plan.hpss_keys("mix"), _decompose_request, _decomposed))
    for s in plan.main_stems:
        if plan.hpss_parts == 1:
            nodes.append(
                Node(f"hpss:{s}", "hpss", (plan.stem_key(s),), plan.hpss_keys(s), _decompose_request, _decomposed)
            )
            continue
        nodes += [
            Node(
                f"hpss:{s}{PART_MARK}{i + 1}of{plan.hpss_parts}",
                "hpss",
                (plan.stem_key(s),),
                plan.hpss_part_keys(s, i),
                functools.partial(_decompose_request, part=i),
                _decomposed,
            )
            for i in range(plan.hpss_parts)
        ]
    composite_reads = _unique(key for inputs in composites.values() for keys in inputs for key in keys)
    composite_writes = tuple(plan.key("composite", name) for name in composites)
    nodes.append(Node("composite", "composite", composite_reads, composite_writes, _composite_request, _composited))
    # Normalize reads every delivered track and the mix (the reference of linked gain).
    normalize_reads = _unique([*delivered.values(), mix])
    normalize_writes = tuple(plan.output_key(name) for name in delivered)
    nodes.append(Node("normalize", "normalize", normalize_reads, normalize_writes, _normalize_request, _normalized))
    return tuple(nodes)


def _unique(keys: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(keys))


def _decode_request(node: Node, plan: Plan, job: orchestrator_pb2.Job) -> DecodeRequest:
    return DecodeRequest(input_key=job.input.key, input_name=job.input.name, output_key=node.writes[0])


def _separate_request(node: Node, plan: Plan, job: orchestrator_pb2.Job) -> separation_pb2.SeparateRequest:
    # The worker writes <output_prefix>/<stem>.wav for each stem: plan.stem_key's layout.
    return separation_pb2.SeparateRequest(
        input_key=node.reads[0],
        output_prefix=f"{plan.prefix}/separation",
        model=job.options.model,
        options=job.options.separation,
        encoding=INTERMEDIATE,
        job_id=plan.job_id,
        # The same shift offsets on every run of the job, split or not (a retry redraws none).
        shift_seed=plan.shift_seed,
    )


def _separate_part_request(
    node: Node, plan: Plan, job: orchestrator_pb2.Job, *, index: int
) -> separation_pb2.SeparateRequest:
    # Part `index` of the song's chunks into one object; every part draws the same shifts.
    return separation_pb2.SeparateRequest(
        input_key=node.reads[0],
        model=job.options.model,
        options=job.options.separation,
        encoding=INTERMEDIATE,
        job_id=plan.job_id,
        chunk_range=separation_pb2.ChunkRange(index=index, count=plan.parts),
        range_key=node.writes[0],
        shift_seed=plan.shift_seed,
    )


def _stitch_request(node: Node, plan: Plan, job: orchestrator_pb2.Job) -> separation_pb2.StitchRequest:
    # The parts in index order (node.reads); stems under the prefix the whole-song node uses.
    return separation_pb2.StitchRequest(
        range_keys=node.reads,
        output_prefix=f"{plan.prefix}/separation",
        encoding=INTERMEDIATE,
        job_id=plan.job_id,
        options=job.options.separation,
        model=job.options.model,
    )


def _decompose_request(
    node: Node, plan: Plan, job: orchestrator_pb2.Job, *, part: int | None = None
) -> hpss_pb2.DecomposeRequest:
    harmonic_key, percussive_key = node.writes
    return hpss_pb2.DecomposeRequest(
        part=hpss_pb2.HpssPart(index=part, count=plan.hpss_parts) if part is not None else None,
        input_key=node.reads[0],
        harmonic_key=harmonic_key,
        percussive_key=percussive_key,
        options=job.options.hpss,
        encoding=INTERMEDIATE,
        job_id=plan.job_id,
        # Parts that are not delivered (a stem's: they only feed composites) need no loudness.
        skip_loudness=not set(node.writes) & set(plan.intermediate_tracks().values()),
    )


def _composite_request(node: Node, plan: Plan, job: orchestrator_pb2.Job) -> composite_pb2.CompositeRequest:
    request = composite_pb2.CompositeRequest(encoding=INTERMEDIATE, job_id=plan.job_id)
    for name, inputs in plan.composites().items():
        spec = request.composites.add(name=name, output_key=plan.key("composite", name))
        # Whole inputs as keys; parted ones (all of a composite's, or none) as input_parts.
        spec.input_keys.extend(keys[0] for keys in inputs if len(keys) == 1)
        for keys in inputs:
            if len(keys) > 1:
                spec.input_parts.add(keys=keys)
    return request


def _normalize_request(node: Node, plan: Plan, job: orchestrator_pb2.Job) -> normalize_pb2.NormalizeRequest:
    request = normalize_pb2.NormalizeRequest(
        reference_key=plan.mix_key,
        options=job.options.normalize,
        encoding=job.options.encoding,
        mp3_bitrate_kbps=job.options.mp3_bitrate_kbps,
        job_id=plan.job_id,
    )
    # Every input was measured by the worker that wrote it: normalize need not measure again.
    written = {track.key: track for n in job.nodes for track in n.outputs}
    for name, key in plan.intermediate_tracks().items():
        item = request.items.add(name=name, input_key=key, output_key=plan.output_key(name))
        if key in written and written[key].HasField("loudness"):
            item.loudness.CopyFrom(written[key].loudness)
    if plan.mix_key in written and written[plan.mix_key].HasField("loudness"):
        request.reference_loudness.CopyFrom(written[plan.mix_key].loudness)
    return request


def _one_track(
    response: common_pb2.Track, node: orchestrator_pb2.Node, job: orchestrator_pb2.Job
) -> list[common_pb2.Track]:
    return [response]


def _separated(
    result: separation_pb2.SeparateResult, node: orchestrator_pb2.Node, job: orchestrator_pb2.Job
) -> list[common_pb2.Track]:
    del node.warnings[:]  # e.g. a compiled model that fell back to eager: into the manifest
    node.warnings.extend(result.warnings)
    return list(result.stems)


def _separated_part(
    result: separation_pb2.SeparateResult, node: orchestrator_pb2.Node, job: orchestrator_pb2.Job
) -> list[common_pb2.Track]:
    del node.warnings[:]
    node.warnings.extend(result.warnings)
    return [result.range]


def _decomposed(
    result: hpss_pb2.DecomposeResult, node: orchestrator_pb2.Node, job: orchestrator_pb2.Job
) -> list[common_pb2.Track]:
    return [result.harmonic, result.percussive]


def _composited(
    response: composite_pb2.CompositeResponse, node: orchestrator_pb2.Node, job: orchestrator_pb2.Job
) -> list[common_pb2.Track]:
    return list(response.tracks)


def _normalized(
    response: normalize_pb2.NormalizeResponse, node: orchestrator_pb2.Node, job: orchestrator_pb2.Job
) -> list[common_pb2.Track]:
    job.normalization.CopyFrom(
        orchestrator_pb2.NormalizationSummary(
            reference=response.reference,
            linked_gain_db=response.linked_gain_db,
            limited_by_ceiling=response.limited_by_ceiling,
        )
    )
    return [item.track for item in response.tracks]


def check_graph(nodes: Sequence[Node]) -> None:
    """The invariants the runner relies on; a violation is a bug in this module, not bad input.

    Names are unique, every key is written by one node, and every key a node reads is written
    by an earlier node (so the order is an execution order and the graph has no cycle).
    """
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise RuntimeError(f"stage graph names a node twice: {names}")
    writer: dict[str, str] = {}
    for node in nodes:
        for key in node.reads:
            if key not in writer:
                raise RuntimeError(f"stage graph: {node.name} reads {key} that no earlier node writes")
        for key in node.writes:
            if key in writer:
                raise RuntimeError(f"stage graph: {key} is written by both {writer[key]} and {node.name}")
            writer[key] = node.name


# Track names the graph derives; a model source of the same name would overwrite one of them.
DERIVED_TRACKS = ("mix", "harmonic", "percussive", "main", "main_harmonic", "main_percussive")


def make_plan(
    job_id: str,
    *,
    sources: list[str],
    two_stems: str,
    main_stems: list[str],
    ext: str,
    parts: int = 1,
    hpss_parts: int = 1,
) -> Plan:
    """Resolve the stems a model will write and the recipe of ``main``; refuse what cannot work.

    ``parts``: how many ranges the separation is split into (1 to :data:`MAX_SEPARATION_PARTS`;
    the runner chooses it once per job and keeps it in ``Job.separation_parts``); ``hpss_parts``
    likewise each main stem's HPSS (``Job.hpss_parts``).
    """
    if not 1 <= parts <= MAX_SEPARATION_PARTS:
        raise InvalidInput(f"separation_parts must be from 1 to {MAX_SEPARATION_PARTS}, got {parts}")
    if not 1 <= hpss_parts <= MAX_HPSS_PARTS:
        raise InvalidInput(f"hpss_parts must be from 1 to {MAX_HPSS_PARTS}, got {hpss_parts}")
    clashes = [s for s in sources if s in DERIVED_TRACKS]
    if clashes or len(set(sources)) != len(sources):
        raise InvalidInput(
            f"model sources {sources} must be distinct and none of {list(DERIVED_TRACKS)} (tracks the job derives)"
        )
    if two_stems:
        if two_stems not in sources:
            raise InvalidInput(f"two_stems {two_stems!r} is not a source of this model; choose one of {sources}")
        stems = [two_stems, f"no_{two_stems}"]
    else:
        stems = list(sources)
    if main_stems:
        unknown = [s for s in main_stems if s not in stems]
        if unknown:
            raise InvalidInput(f"main_stems {unknown} are not stems of this job; choose from {stems}")
        recipe = list(dict.fromkeys(main_stems))
    else:
        recipe = [s for s in stems if s not in (VOCALS, f"no_{VOCALS}")] if VOCALS in stems else list(stems)
        if two_stems == VOCALS:
            recipe = [f"no_{VOCALS}"]
        if not recipe:
            raise InvalidInput("main would be empty: set main_stems")
    plan = Plan(
        job_id=job_id, stems=tuple(stems), main_stems=tuple(recipe), ext=ext, parts=parts, hpss_parts=hpss_parts
    )
    nodes = _graph(plan)
    check_graph(nodes)
    return dataclasses.replace(plan, nodes=nodes)


def overall_fraction(nodes: Iterable[orchestrator_pb2.Node]) -> float:
    """Progress of a job, each node weighted by its stage's expected cost; the parts of a split
    node share its weight (K parts of a separation: 60/K each; of a stem's HPSS: 6/K)."""
    nodes = list(nodes)
    shared = Counter(n.name.partition(PART_MARK)[0] for n in nodes)
    total = done = 0.0
    for node in nodes:
        weight = STAGE_WEIGHTS.get(node.stage, 1.0) / shared[node.name.partition(PART_MARK)[0]]
        total += weight
        done += weight * node.fraction
    return done / total if total else 0.0


def describe(plan: Plan) -> str:
    """The plan as a Markdown table, keys relative to the job's folder (README shows one)."""
    rows = ["| node | stage | waits for | reads | writes |", "|---|---|---|---|---|"]
    for node in plan.nodes:
        waits = ", ".join(plan.depends_on(node.name)) or "—"
        reads = _folders(plan, node.reads) if node.reads else "the upload"
        rows.append(f"| {node.name} | {node.stage} | {waits} | {reads} | {_folders(plan, node.writes)} |")
    return "\n".join(rows) + "\n"


def _folders(plan: Plan, keys: Sequence[str]) -> str:
    """``jobs/<id>/separation/a.wav``, ``…/b.wav`` → ``separation/{a,b}.wav``."""
    groups: dict[tuple[str, str], list[str]] = {}
    for key in keys:
        folder, _, file = key.removeprefix(plan.prefix + "/").rpartition("/")
        stem, dot, ext = file.rpartition(".")
        groups.setdefault((folder, dot + ext), []).append(stem)
    parts = [
        f"{folder}/{names[0] if len(names) == 1 else '{' + ','.join(names) + '}'}{ext}"
        for (folder, ext), names in groups.items()
    ]
    return " ".join(f"`{p}`" for p in parts)
