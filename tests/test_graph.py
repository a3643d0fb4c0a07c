"""make_plan and the stage graph, tested directly: no mesh, no gRPC calls, no store."""

from __future__ import annotations

import dataclasses
import graphlib
import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool
from hypothesis import given, settings
from hypothesis import strategies as st

from audiomesh.errors import FailedPrecondition, InvalidInput
from audiomesh.separation.split import shift_seed
from audiomesh.services.orchestrator import graph
from audiomesh.services.orchestrator.graph import (
    DERIVED_TRACKS,
    LOCAL_STAGE,
    MAX_HPSS_PARTS,
    MAX_SEPARATION_PARTS,
    STAGE_WEIGHTS,
    DecodeRequest,
    Plan,
    describe,
    make_plan,
    overall_fraction,
)
from audiomesh.services.orchestrator.runner import _RPCS, _match_nodes
from audiomesh.tracks import ENCODINGS, INTERMEDIATE, extension
from audiomesh.v1 import common_pb2, hpss_pb2, normalize_pb2, orchestrator_pb2, separation_pb2

HTDEMUCS = ["drums", "bass", "other", "vocals"]
HTDEMUCS_6S = ["drums", "bass", "other", "vocals", "guitar", "piano"]
JOB = "0b8e7a2c-job"
README = Path(__file__).resolve().parents[1] / "README.md"


def plan_of(sources=HTDEMUCS, two_stems="", main_stems=(), ext=".wav", parts=1, hpss_parts=1) -> Plan:
    return make_plan(
        JOB,
        sources=list(sources),
        two_stems=two_stems,
        main_stems=list(main_stems),
        ext=ext,
        parts=parts,
        hpss_parts=hpss_parts,
    )


def job_of(encoding: int = common_pb2.AUDIO_ENCODING_WAV_PCM16) -> orchestrator_pb2.Job:
    return orchestrator_pb2.Job(
        job_id=JOB,
        input=orchestrator_pb2.JobInput(key=f"jobs/{JOB}/input/song.flac", name="song.flac"),
        options=orchestrator_pb2.JobOptions(model="htdemucs", encoding=encoding),
    )


def deps(plan: Plan) -> dict[str, list[str]]:
    return {n.name: plan.depends_on(n.name) for n in plan.nodes}


def rel(plan: Plan, keys) -> list[str]:
    return [k.removeprefix(plan.prefix + "/") for k in keys]


# --- recipes ------------------------------------------------------------------------------
def test_default_recipe_of_the_four_stem_model():
    plan = plan_of()
    assert plan.stems == ("drums", "bass", "other", "vocals")
    assert plan.main_stems == ("drums", "bass", "other")
    assert [(n.name, n.stage) for n in plan.nodes] == [
        ("decode", "decode"),
        ("separation", "separation"),
        ("hpss:mix", "hpss"),
        ("hpss:drums", "hpss"),
        ("hpss:bass", "hpss"),
        ("hpss:other", "hpss"),
        ("composite", "composite"),
        ("normalize", "normalize"),
    ]
    assert deps(plan) == {
        "decode": [],
        "separation": ["decode"],
        "hpss:mix": ["decode"],
        "hpss:drums": ["separation"],
        "hpss:bass": ["separation"],
        "hpss:other": ["separation"],
        "composite": ["separation", "hpss:drums", "hpss:bass", "hpss:other"],
        # normalize reads the mix as the reference of linked gain
        "normalize": ["decode", "separation", "hpss:mix", "composite"],
    }
    assert rel(plan, plan.node("separation").writes) == [f"separation/{s}.wav" for s in HTDEMUCS]
    delivered = [*HTDEMUCS, "harmonic", "percussive", "main", "main_harmonic", "main_percussive"]
    assert rel(plan, plan.node("normalize").writes) == [f"output/{t}.wav" for t in delivered]
    assert plan.composites()["main_harmonic"] == [(plan.hpss_keys(s)[0],) for s in ("drums", "bass", "other")]


def test_two_stems_vocals_makes_main_the_accompaniment():
    plan = plan_of(two_stems="vocals")
    assert plan.stems == ("vocals", "no_vocals")
    assert plan.main_stems == ("no_vocals",)
    assert [n.name for n in plan.nodes if n.stage == "hpss"] == ["hpss:mix", "hpss:no_vocals"]
    assert plan.composites()["main"] == [(plan.stem_key("no_vocals"),)]
    assert deps(plan)["composite"] == ["separation", "hpss:no_vocals"]


def test_two_stems_of_another_source_sums_both_into_main():
    plan = plan_of(two_stems="drums")
    assert plan.stems == ("drums", "no_drums")
    assert plan.main_stems == ("drums", "no_drums")  # no vocals to leave out
    assert rel(plan, plan.node("separation").writes) == ["separation/drums.wav", "separation/no_drums.wav"]


def test_explicit_main_stems_keep_their_order_and_drop_duplicates():
    assert plan_of(main_stems=["vocals", "bass"]).main_stems == ("vocals", "bass")
    plan = plan_of(main_stems=["bass", "drums", "bass"])
    assert plan.main_stems == ("bass", "drums")
    assert [n.name for n in plan.nodes if n.stage == "hpss"] == ["hpss:mix", "hpss:bass", "hpss:drums"]
    assert plan_of(two_stems="vocals", main_stems=["vocals"]).main_stems == ("vocals",)


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_encoding_sets_the_extension_of_delivered_tracks_only(encoding):
    ext = extension(encoding)
    plan = plan_of(ext=ext)
    assert all(k.endswith(ext) for k in plan.node("normalize").writes)
    intermediate = [k for n in plan.nodes if n.name != "normalize" for k in n.writes]
    assert all(k.endswith(".wav") for k in intermediate)  # float32 WAV between stages
    request = plan.node("normalize").build_request(plan, job_of(encoding))
    assert request.encoding == encoding
    assert [i.output_key for i in request.items] == list(plan.node("normalize").writes)


def test_six_stem_model():
    plan = plan_of(HTDEMUCS_6S)
    assert plan.stems == tuple(HTDEMUCS_6S)
    assert plan.main_stems == ("drums", "bass", "other", "guitar", "piano")
    assert [n.name for n in plan.nodes if n.stage == "hpss"] == ["hpss:mix"] + [f"hpss:{s}" for s in plan.main_stems]
    assert len(plan.node("normalize").writes) == 6 + 5
    # Every stage a plan can have is weighted (stitch only in split plans).
    assert set(STAGE_WEIGHTS) == {n.stage for n in plan.nodes} | {n.stage for n in plan_of(parts=2).nodes}


@pytest.mark.parametrize(
    ("sources", "two_stems", "main_stems", "match"),
    [
        (HTDEMUCS, "piano", [], r"two_stems 'piano' is not a source of this model; choose one of \["),
        (HTDEMUCS, "", ["guitar"], r"main_stems \['guitar'\] are not stems of this job; choose from \["),
        (HTDEMUCS, "vocals", ["drums"], r"main_stems \['drums'\] are not stems of this job"),
        (["vocals"], "", [], "main would be empty: set main_stems"),
        (["drums", "mix"], "", [], r"model sources .* must be distinct and none of \['mix'"),
        (["drums", "drums"], "", [], "must be distinct"),
    ],
)
def test_refused_combinations_name_the_field(sources, two_stems, main_stems, match):
    with pytest.raises(InvalidInput, match=match):
        plan_of(sources, two_stems=two_stems, main_stems=main_stems)


# --- requests and responses ---------------------------------------------------------------
def test_request_builders_use_the_keys_their_nodes_declare():
    plan, job = plan_of(), job_of()
    decode = plan.node("decode").build_request(plan, job)
    assert decode == DecodeRequest(job.input.key, "song.flac", plan.mix_key)

    node = plan.node("separation")
    sep = node.build_request(plan, job)
    assert isinstance(sep, separation_pb2.SeparateRequest)
    assert (sep.input_key,) == node.reads
    # the worker writes <output_prefix>/<stem>.wav
    assert tuple(f"{sep.output_prefix}/{s}.wav" for s in plan.stems) == node.writes
    assert (sep.model, sep.encoding, sep.job_id) == ("htdemucs", INTERMEDIATE, JOB)
    # Unsplit too: the job's seed, so every run of it draws the same shifts.
    assert sep.shift_seed == shift_seed(JOB) == plan.shift_seed != 0
    assert not sep.HasField("chunk_range") and not sep.range_key

    for name, source, delivered in [("hpss:mix", plan.mix_key, True), ("hpss:bass", plan.stem_key("bass"), False)]:
        node = plan.node(name)
        req = node.build_request(plan, job)
        assert isinstance(req, hpss_pb2.DecomposeRequest)
        assert req.input_key == source == node.reads[0]
        assert (req.harmonic_key, req.percussive_key) == node.writes
        assert req.skip_loudness is not delivered  # a stem's parts only feed composites

    node = plan.node("composite")
    comp = node.build_request(plan, job)
    assert {k for c in comp.composites for k in c.input_keys} == set(node.reads)
    assert tuple(c.output_key for c in comp.composites) == node.writes

    node = plan.node("normalize")
    norm = node.build_request(plan, job)
    assert {i.input_key for i in norm.items} | {norm.reference_key} == set(node.reads)
    assert tuple(i.output_key for i in norm.items) == node.writes


def test_normalize_reuses_loudness_measured_upstream():
    plan, job = plan_of(), job_of()
    loud = common_pb2.Loudness(integrated_lufs=-20.5, sample_peak_dbfs=-3, true_peak_dbtp=-2.5)
    job.nodes.add(name="decode").outputs.add(name="mix", key=plan.mix_key, loudness=loud)
    job.nodes.add(name="separation").outputs.add(name="bass", key=plan.stem_key("bass"), loudness=loud)
    request = plan.node("normalize").build_request(plan, job)
    assert request.reference_loudness == loud
    measured = {i.name for i in request.items if i.HasField("loudness")}
    assert measured == {"bass"}  # the others were not measured yet: the worker measures them


def test_collectors_keep_what_responses_say():
    plan, job = plan_of(), job_of()
    node = orchestrator_pb2.Node(name="separation", warnings=["from the last attempt"])
    stems = [common_pb2.Track(name=s, key=plan.stem_key(s)) for s in plan.stems]
    result = separation_pb2.SeparateResult(stems=stems, warnings=["compiled model fell back to eager"])
    assert plan.node("separation").collect(result, node, job) == stems
    assert list(node.warnings) == ["compiled model fell back to eager"]

    tracks = [common_pb2.Track(name="main", key="k")]
    response = normalize_pb2.NormalizeResponse(
        tracks=[normalize_pb2.NormalizedTrack(track=t, gain_db=-3) for t in tracks],
        reference=common_pb2.Loudness(integrated_lufs=-11),
        linked_gain_db=-3,
        limited_by_ceiling=True,
    )
    assert plan.node("normalize").collect(response, orchestrator_pb2.Node(), job) == tracks
    assert job.normalization.linked_gain_db == -3 and job.normalization.limited_by_ceiling
    assert job.normalization.reference.integrated_lufs == -11


@pytest.mark.parametrize("parts", [1, 2])
def test_every_stage_has_a_call_that_takes_its_request(parts):
    """The runner's stub table matches the contracts and the graph's requests."""
    plan, job = plan_of(parts=parts, hpss_parts=parts), job_of()
    pool = descriptor_pool.Default()
    for node in plan.nodes:
        if node.stage == LOCAL_STAGE:
            continue
        rpc = _RPCS[node.stage]
        service = pool.FindServiceByName("audiomesh.v1." + rpc.stub.__name__.removesuffix("Stub"))
        method = service.methods_by_name[rpc.method]
        assert method.server_streaming is rpc.streams
        assert node.build_request(plan, job).DESCRIPTOR is method.input_type


# --- resume -------------------------------------------------------------------------------
def test_resumed_manifest_nodes_are_matched_by_name():
    plan = plan_of()
    job = job_of()
    # as the code before the graph records wrote it: normalize without decode, no hpss:other
    job.nodes.add(name="decode", stage="decode", state=common_pb2.NODE_STATE_SUCCEEDED)
    job.nodes.add(
        name="normalize",
        stage="normalize",
        state=common_pb2.NODE_STATE_PENDING,
        depends_on=["separation", "hpss:mix", "composite"],
    )
    _match_nodes(job, plan)
    assert {n.name: list(n.depends_on) for n in job.nodes} == deps(plan)
    assert job.nodes[0].state == common_pb2.NODE_STATE_SUCCEEDED
    assert {n.name for n in job.nodes if n.state == common_pb2.NODE_STATE_PENDING} == (
        {n.name for n in plan.nodes} - {"decode"}
    )

    job.nodes.add(name="hpss:piano", stage="hpss")
    with pytest.raises(FailedPrecondition, match=r"nodes \['hpss:piano'\] are not in this job's plan"):
        _match_nodes(job, plan)


# --- a separation split into parts ----------------------------------------------------------
@pytest.mark.parametrize("parts", [2, 3])
def test_split_plan_runs_parts_then_stitch_and_the_rest_unchanged(parts):
    whole, plan = plan_of(), plan_of(parts=parts)
    part_names = [f"separation:part{i}of{parts}" for i in range(1, parts + 1)]
    assert [(n.name, n.stage) for n in plan.nodes][: parts + 3] == [
        ("decode", "decode"),
        *[(name, "separation") for name in part_names],
        ("stitch", "stitch"),
        ("hpss:mix", "hpss"),
    ]
    ranges = [f"separation/ranges/{i}-of-{parts}.range" for i in range(parts)]
    for name, key in zip(part_names, ranges, strict=True):
        assert plan.node(name).reads == (plan.mix_key,)
        assert rel(plan, plan.node(name).writes) == [key]
        assert plan.depends_on(name) == ["decode"]
    stitch = plan.node("stitch")
    assert rel(plan, stitch.reads) == ranges  # every part, in index order
    assert plan.depends_on("stitch") == part_names
    # The stitch writes exactly the stems the single separation node writes: what follows is the same.
    assert stitch.writes == whole.node("separation").writes
    after = [n for n in whole.nodes if n.name not in ("decode", "separation")]
    assert [(n.name, n.reads, n.writes) for n in after] == [
        (n.name, n.reads, n.writes) for n in plan.nodes if n.name in {a.name for a in after}
    ]
    rename = {"separation": "stitch"}
    assert {n: plan.depends_on(n) for n in ("hpss:drums", "composite", "normalize")} == {
        n: [rename.get(d, d) for d in whole.depends_on(n)] for n in ("hpss:drums", "composite", "normalize")
    }
    writers: dict[str, list[str]] = {}
    for node in plan.nodes:
        for key in node.writes:
            writers.setdefault(key, []).append(node.name)
    assert all(len(w) == 1 for w in writers.values()), "a key is written twice"
    graph.check_graph(plan.nodes)
    assert "stitch" in describe(plan) and plan.part_name(parts - 1) == part_names[-1]


@pytest.mark.parametrize("parts", [2, 3])
def test_split_requests_name_their_range_seed_and_keys(parts):
    plan, job = plan_of(two_stems="vocals", parts=parts), job_of()
    job.options.separation.shifts = 2
    job.options.separation.two_stems = "vocals"
    for i in range(parts):
        node = plan.node(plan.part_name(i))
        request = node.build_request(plan, job)
        assert isinstance(request, separation_pb2.SeparateRequest)
        assert (request.chunk_range.index, request.chunk_range.count) == (i, parts)
        assert (request.input_key,) == node.reads and (request.range_key,) == node.writes
        assert request.shift_seed == shift_seed(JOB)  # every part draws the same shifts
        assert (request.model, request.options, request.job_id) == ("htdemucs", job.options.separation, JOB)
    stitch = plan.node("stitch")
    request = stitch.build_request(plan, job)
    assert isinstance(request, separation_pb2.StitchRequest)
    assert tuple(request.range_keys) == stitch.reads
    assert tuple(f"{request.output_prefix}/{s}.wav" for s in plan.stems) == stitch.writes
    assert request.options.two_stems == "vocals" and (request.encoding, request.job_id) == (INTERMEDIATE, JOB)
    # A part's response names the object it wrote; the stitch's, the stems.
    part = orchestrator_pb2.Node(name=plan.part_name(0))
    written = common_pb2.Track(name=f"range-0-of-{parts}", key=plan.range_key(0), sha256="ab", size_bytes=9)
    result = separation_pb2.SeparateResult(range=written, warnings=["compile fell back"])
    assert plan.node(part.name).collect(result, part, job) == [written]
    assert list(part.warnings) == ["compile fell back"]
    stems = [common_pb2.Track(name=s, key=plan.stem_key(s)) for s in plan.stems]
    assert stitch.collect(separation_pb2.SeparateResult(stems=stems), orchestrator_pb2.Node(), job) == stems


def test_parts_share_the_separation_weight():
    """K parts weigh what the one separation node weighs: the job's progress and ETA stay right."""

    def fraction(parts: int, separated: float, rest: float = 0.0) -> float:
        nodes = []
        for spec in plan_of(parts=parts).nodes:
            done = separated if spec.stage == "separation" else 1.0 if spec.name == "decode" else rest
            nodes.append(orchestrator_pb2.Node(name=spec.name, stage=spec.stage, fraction=done))
        return overall_fraction(nodes)

    for separated in (0.0, 0.5, 1.0):
        one = fraction(1, separated)
        assert fraction(2, separated) == pytest.approx(one, rel=0.05)
        assert fraction(4, separated) == pytest.approx(fraction(2, separated), abs=1e-12)
    assert fraction(3, 1.0, rest=1.0) == pytest.approx(1.0)


@pytest.mark.parametrize("parts", [0, MAX_SEPARATION_PARTS + 1])
def test_part_counts_out_of_range_are_refused(parts):
    with pytest.raises(InvalidInput, match=rf"separation_parts must be from 1 to {MAX_SEPARATION_PARTS}, got {parts}"):
        plan_of(parts=parts)


@pytest.mark.parametrize("hpss_parts", [0, MAX_HPSS_PARTS + 1])
def test_hpss_part_counts_out_of_range_are_refused(hpss_parts):
    with pytest.raises(InvalidInput, match=rf"hpss_parts must be from 1 to {MAX_HPSS_PARTS}, got {hpss_parts}"):
        plan_of(hpss_parts=hpss_parts)


@pytest.mark.parametrize("hpss_parts", [2, 3])
def test_split_stem_hpss_runs_parts_that_the_composite_reads_joined(hpss_parts):
    whole, plan = plan_of(), plan_of(hpss_parts=hpss_parts)
    stems = ["drums", "bass", "other"]
    names = [n.name for n in plan.nodes]
    for stem in stems:
        parts = [f"hpss:{stem}:part{i + 1}of{hpss_parts}" for i in range(hpss_parts)]
        assert f"hpss:{stem}" not in names and all(p in names for p in parts)
        for i, name in enumerate(parts):
            node = plan.node(name)
            assert node.stage == "hpss" and plan.depends_on(name) == ["separation"]
            assert rel(plan, node.writes) == [
                f"hpss/parts/{stem}_harmonic.{i}-of-{hpss_parts}.wav",
                f"hpss/parts/{stem}_percussive.{i}-of-{hpss_parts}.wav",
            ]
            request = node.build_request(plan, job_of())
            assert (request.part.index, request.part.count) == (i, hpss_parts)
            assert request.skip_loudness and request.input_key == plan.stem_key(stem)
    # The mix's HPSS is delivered: never split, and measured.
    mix = plan.node("hpss:mix").build_request(plan, job_of())
    assert not mix.HasField("part") and not mix.skip_loudness
    # The composite waits for every part and sums each stem's parts joined, in the recipe's order.
    composite = plan.node("composite")
    assert set(plan.depends_on("composite")) == {"separation"} | {
        n for n in names if n.startswith("hpss:") and ":part" in n
    }
    request = {c.name: c for c in composite.build_request(plan, job_of()).composites}
    assert list(request["main"].input_keys) == [plan.stem_key(s) for s in stems] and not request["main"].input_parts
    for name, kind in (("main_harmonic", "harmonic"), ("main_percussive", "percussive")):
        spec = request[name]
        assert not spec.input_keys
        assert [rel(plan, p.keys) for p in spec.input_parts] == [
            [f"hpss/parts/{stem}_{kind}.{i}-of-{hpss_parts}.wav" for i in range(hpss_parts)] for stem in stems
        ]
    # Everything downstream is the same plan: the same composites and delivered tracks.
    assert plan.intermediate_tracks() == whole.intermediate_tracks()
    assert plan.node("normalize").build_request(plan, job_of()) == whole.node("normalize").build_request(
        whole, job_of()
    )
    # One whole stem HPSS per stem, unsplit: the composite keeps input_keys only.
    unsplit = {c.name: c for c in whole.node("composite").build_request(whole, job_of()).composites}
    assert list(unsplit["main_harmonic"].input_keys) == [whole.hpss_keys(s)[0] for s in stems]


def test_hpss_parts_share_their_stems_weight():
    def fraction(hpss_parts: int, stems_done: float) -> float:
        nodes = [
            orchestrator_pb2.Node(
                name=spec.name,
                stage=spec.stage,
                fraction=stems_done if ":" in spec.name and spec.name != "hpss:mix" else 1.0,
            )
            for spec in plan_of(hpss_parts=hpss_parts).nodes
        ]
        return overall_fraction(nodes)

    for done in (0.0, 0.3, 1.0):
        assert fraction(3, done) == pytest.approx(fraction(1, done), abs=1e-12)


def test_resumed_split_job_matches_its_parts_by_name():
    plan = plan_of(parts=2)
    job = job_of()
    job.separation_parts = 2
    job.nodes.add(name="decode", stage="decode", state=common_pb2.NODE_STATE_SUCCEEDED)
    job.nodes.add(name="separation:part2of2", stage="separation", state=common_pb2.NODE_STATE_SUCCEEDED, attempts=1)
    _match_nodes(job, plan)
    assert {n.name: list(n.depends_on) for n in job.nodes} == deps(plan)
    assert [n.name for n in job.nodes if n.state == common_pb2.NODE_STATE_SUCCEEDED] == [
        "decode",
        "separation:part2of2",
    ]
    # A manifest of another split than the plan's is refused, not half-matched.
    with pytest.raises(FailedPrecondition, match=r"nodes \['separation:part2of2', 'separation:part1of2'\] are not"):
        _match_nodes(job, plan_of(parts=3))


# --- the README shows the graph as the code has it -----------------------------------------
def test_readme_shows_the_default_plan():
    table = describe(plan_of())
    assert table in README.read_text(), f"README's architecture section should show:\n{table}"


# --- properties ---------------------------------------------------------------------------
# Real source names and short made-up ones (which collide more often: "a" and "no_a", ...).
names = st.one_of(
    st.sampled_from([*HTDEMUCS_6S, "no_vocals", "main_x", "mix_harmonic"]),
    st.text(alphabet="abno_", min_size=1, max_size=5),
).filter(lambda s: s not in DERIVED_TRACKS)


@st.composite
def recipes(draw):
    sources = draw(st.lists(names, min_size=1, max_size=7, unique=True))
    two_stems = draw(st.one_of(st.just(""), st.sampled_from(sources), names))
    stems = [two_stems, f"no_{two_stems}"] if two_stems else sources
    main = draw(st.lists(st.one_of(st.sampled_from(stems), names), max_size=5))
    parts = draw(st.integers(1, 5))
    hpss_parts = draw(st.integers(1, 4))
    return sources, two_stems, main, parts, hpss_parts


@settings(max_examples=100, deadline=None)
@given(recipes())
def test_every_accepted_plan_is_a_sound_graph(recipe):
    sources, two_stems, main_stems, parts, hpss_parts = recipe
    try:
        plan = make_plan(
            JOB,
            sources=sources,
            two_stems=two_stems,
            main_stems=main_stems,
            ext=".flac",
            parts=parts,
            hpss_parts=hpss_parts,
        )
    except InvalidInput as exc:
        assert re.match(r"(two_stems|main_stems|main would be empty)", str(exc)), exc
        return
    writers: dict[str, list[int]] = {}
    for i, node in enumerate(plan.nodes):
        for key in node.writes:
            writers.setdefault(key, []).append(i)
    assert all(len(w) == 1 for w in writers.values()), "a key is written by two nodes"
    for i, node in enumerate(plan.nodes):
        for key in node.reads:
            assert key in writers and writers[key][0] < i, f"{node.name} reads {key} before it is written"
        expected = {plan.nodes[writers[k][0]].name for k in node.reads}
        assert set(plan.depends_on(node.name)) == expected
    graphlib.TopologicalSorter(deps(plan)).prepare()  # raises CycleError on a cycle
    assert len({n.name for n in plan.nodes}) == len(plan.nodes)
    # every delivered track is written before normalize reads it, and normalize writes it
    normalize = plan.node("normalize")
    request = normalize.build_request(plan, job_of())
    delivered = {i.name for i in request.items}
    assert delivered == {*plan.stems, "harmonic", "percussive", "main", "main_harmonic", "main_percussive"}
    assert all(i.input_key in writers and i.output_key in normalize.writes for i in request.items)
    assert all(k.endswith(".flac") for k in normalize.writes)
    assert plan.main_stems and set(plan.main_stems) <= set(plan.stems)


def test_a_broken_graph_is_caught_at_plan_time():
    """A record that reads what nothing earlier writes is a bug make_plan refuses to run."""
    plan = plan_of()
    nodes = list(plan.nodes)
    nodes[1], nodes[2] = nodes[2], nodes[1]  # still valid: both read only the mix
    graph.check_graph(nodes)
    with pytest.raises(RuntimeError, match="hpss:drums reads .*separation/drums.wav that no earlier node writes"):
        graph.check_graph([nodes[0], nodes[3], *nodes[1:3], *nodes[4:]])
    with pytest.raises(RuntimeError, match="written by both"):
        graph.check_graph([*nodes, dataclasses.replace(nodes[-1], name="again", reads=())])
