"""The CLI's progress lines, time left and result words, on jobs built as the orchestrator
builds them (no mesh needed): shape in narrow terminals, the page's stage words, an ETA only
once it has a basis and one that matches the time a job really took."""

from __future__ import annotations

import io
import re

import pytest

from audiomesh.cli import build_parser
from audiomesh.cli_jobs import encoding_from_flags, loudness_note
from audiomesh.cli_process import job_options
from audiomesh.cli_progress import EtaEstimator, ProgressBoard, fmt_eta, render_line, running_text, stage_label
from audiomesh.v1 import common_pb2, orchestrator_pb2

LINE = re.compile(r"^(?P<label>.+?) +(?P<pct>\d{1,3})% \|(?P<bar>[█ ]+)\|(?: (?P<tail>.*))?$")


def job_with(
    nodes: list[tuple[str, str, int, float]], *, state=common_pb2.JOB_STATE_RUNNING, current=""
) -> orchestrator_pb2.Job:
    """A job whose nodes are (name, stage, NodeState, fraction); fraction weighted as graph.py does."""
    from services.orchestrator.graph import overall_fraction

    job = orchestrator_pb2.Job(job_id="5b1c1d3e-0000-4000-8000-000000000000", state=state, current_stage=current)
    for name, stage, node_state, fraction in nodes:
        job.nodes.add(name=name, stage=stage, state=node_state, fraction=fraction)
    job.fraction = overall_fraction(job.nodes)
    return job


RUN, DONE, WAIT = common_pb2.NODE_STATE_RUNNING, common_pb2.NODE_STATE_SUCCEEDED, common_pb2.NODE_STATE_PENDING
STEMS = ("drums", "bass", "other")


def pipeline(sep: float, *, after: str = "") -> orchestrator_pb2.Job:
    """The default plan's nodes with separation at ``sep`` and, with ``after``, the later ones done up to that stage."""
    order = ["hpss", "composite", "normalize"]
    done_upto = order.index(after) if after else -1
    nodes = [("decode", "decode", DONE, 1.0), ("separation", "separation", DONE if sep >= 1 else RUN, sep)]
    nodes.append(("hpss:mix", "hpss", DONE if sep >= 1 else RUN, 1.0 if sep >= 1 else 0.5))
    for i, stage in enumerate(order):
        names = [f"hpss:{s}" for s in STEMS] if stage == "hpss" else [stage]
        state = DONE if i < done_upto else RUN if i == done_upto else WAIT
        nodes += [(n, stage, state, 1.0 if state == DONE else 0.0) for n in names]
    return job_with(nodes, current="separation, hpss:mix" if sep < 1 else after)


def test_stage_words_are_the_pages():
    assert stage_label("separation") == "Separating stems"
    assert stage_label("hpss:main_harmonic") == "Splitting harmonic and percussive parts (main harmonic)"
    assert stage_label("separation:part2of3") == "Separating stems (part 2 of 3)"
    assert stage_label("hpss:drums:part1of2") == "Splitting harmonic and percussive parts (drums, part 1 of 2)"
    assert running_text(pipeline(0.3)) == "Separating stems + 1 more step"
    assert running_text(pipeline(1.0, after="hpss")) == "Splitting harmonic and percussive parts (drums) + 2 more steps"
    assert running_text(pipeline(1.0, after="normalize")) == "Normalizing loudness"
    queued = job_with([], state=common_pb2.JOB_STATE_QUEUED)
    assert running_text(queued) == "Waiting for a free slot"
    assert running_text(job_with([], state=common_pb2.JOB_STATE_CANCELLED)) == "Cancelled"


@pytest.mark.parametrize("width", [60, 70, 80, 120, 30])
def test_a_line_keeps_its_shape_in_any_width(width):
    """The old bar: "|  , running separation" (a stray comma) and no bar at all at 70 columns."""
    lines = [
        render_line(label, fraction, words, eta, width)
        for label in ("a.wav", "a very long file name from a sample pack, take 12.flac")
        for fraction in (0.0, 0.37, 1.0)
        for words in ("Separating stems", running_text(pipeline(1.0, after="hpss")), "")
        for eta in ("", fmt_eta(83), fmt_eta(4000))
    ]
    shapes = set()
    for line in lines:
        assert len(line) <= max(20, width - 1), line
        match = LINE.match(line)
        assert match, line
        assert not (match["tail"] or "").startswith((",", " ")), line
        shapes.add((line.index("|"), len(match["bar"])))
    assert len(shapes) == 1  # every line: the bar in the same column, the same width
    assert shapes.pop()[1] >= 10
    full = render_line("a.wav", 0.5, "Separating stems", fmt_eta(83), 80)
    assert full.endswith("| Separating stems · 1 min 23 s left")
    narrow = render_line("a.wav", 0.5, running_text(pipeline(1.0, after="hpss")), fmt_eta(83), 60)
    assert narrow.endswith("… · 1 min 23 s left")  # the words give way, the time left stays


def after_separation(p: float) -> orchestrator_pb2.Job:
    """Separation done; every later node ``p`` of the way."""
    job = pipeline(1.0, after="hpss")
    for node in job.nodes:
        if node.state != DONE:
            node.state, node.fraction = RUN, p
    from services.orchestrator.graph import overall_fraction

    job.fraction = overall_fraction(job.nodes)
    return job


def test_eta_waits_for_a_basis_then_tracks_the_real_finish():
    """A job with 8 s of fixed cost before separation reports anything (decode, model load),
    20 s of separation at a steady pace, then 4 s for the steps after it (t = 32 s). The
    server's figure (elapsed / fraction) is far too high early on (the issue saw ~3x); this
    one says nothing until a pace is measured, then the separation's end while it runs and
    the job's end after it, each to within a second."""
    estimator = EtaEstimator()
    timeline = [(t, pipeline(0.0)) for t in (0.0, 4.0, 8.0)]
    timeline += [(float(t), pipeline((t - 8) / 20)) for t in range(9, 28)]
    timeline += [(28 + t / 4, after_separation(t / 16)) for t in range(16)]
    answers = [(t, job, estimator.update(job, t)) for t, job in timeline]
    assert [eta for t, _, eta in answers if t <= 10] == [None] * 5  # no basis yet: no number
    separating = [(t, eta) for t, job, eta in answers if eta is not None and t < 28]
    rest = [(t, eta) for t, job, eta in answers if eta is not None and t >= 28]
    assert separating and separating[0][0] <= 12 and rest
    assert all(abs(t + eta - 28) < 1.0 for t, eta in separating), separating
    assert all(abs(t + eta - 32) < 1.0 for t, eta in rest), rest
    early = [t + t * (1 - job.fraction) / job.fraction for t, job, _ in answers if 9 <= t <= 14]
    assert min(early) > 1.4 * 32, early  # runner.py's eta_seconds: the job "ends" > 45 s


def test_eta_counts_down_between_snapshots_and_goes_at_the_end():
    now = [0.0]
    board = ProgressBoard(io.StringIO(), tty=True, clock=lambda: now[0])
    board.add("a", "a.wav")
    for t in (0.0, 1.0, 5.0):
        now[0] = t
        board.job("a", pipeline(0.01 if t == 0 else t / 10))
    assert board._rows["a"].eta is not None
    row = board._rows["a"]
    shown = board._eta_words(row)
    now[0] = 35.0
    assert board._eta_words(row) != shown and board._eta_words(row) in (fmt_eta(0), shown)
    board.finish("a", "Done in 9 s", fraction=1.0)
    out = board.stream.getvalue()
    assert out.rstrip().endswith("| Done in 9 s") and "left" not in out.splitlines()[-1]


def test_a_pipe_gets_a_line_per_step_not_per_snapshot():
    stream = io.StringIO()
    board = ProgressBoard(stream, tty=False)
    board.add("a", "a.wav")
    for i in range(0, 101):
        board.job("a", pipeline(i / 100))
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) <= 16, lines  # uploading, each 10 % step, the stage changes
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()


def test_quiet_draws_nothing_but_messages():
    stream, out = io.StringIO(), io.StringIO()
    board = ProgressBoard(stream, enabled=False, tty=True)
    board.add("a", "a.wav")
    board.job("a", pipeline(0.5))
    board.echo("a.wav: done", stream=out)
    board.finish("a", "Done")
    assert stream.getvalue() == "" and out.getvalue() == "a.wav: done\n"


def parse_process(*argv: str):
    return build_parser().parse_args(["process", *argv, "x.wav"])


@pytest.mark.parametrize(
    ("flags", "encoding", "bitrate"),
    [
        ((), "AUDIO_ENCODING_UNSPECIFIED", 0),
        (("--mp3",), "AUDIO_ENCODING_MP3", 0),
        (("--mp3", "--mp3-bitrate", "192"), "AUDIO_ENCODING_MP3", 192),
        (("--flac",), "AUDIO_ENCODING_FLAC_PCM16", 0),
        (("--flac", "--int24"), "AUDIO_ENCODING_FLAC_PCM24", 0),
        (("--int24",), "AUDIO_ENCODING_WAV_PCM24", 0),
        (("--float32",), "AUDIO_ENCODING_WAV_FLOAT32", 0),
    ],
)
def test_demucs_output_flags_map_to_encodings(flags, encoding, bitrate):
    options = job_options(parse_process(*flags))
    assert common_pb2.AudioEncoding.Name(options.encoding) == encoding
    assert options.mp3_bitrate_kbps == bitrate


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (("--mp3", "--flac"), "choose one output format"),
        (("--int24", "--float32"), "choose one sample format"),
        (("--flac", "--float32"), "FLAC stores integers only"),
        (("--mp3", "--int24"), "MP3 has no sample format"),
        (("--mp3-bitrate", "128"), "--mp3-bitrate applies to --mp3 only"),
    ],
)
def test_conflicting_output_flags_say_why(flags, says):
    with pytest.raises(ValueError, match=re.escape(says)):
        encoding_from_flags(parse_process(*flags))


def test_demucs_separation_flags_and_aliases():
    args = parse_process("-n", "htdemucs_6s", "--two-stems", "vocals", "--segment", "7.5", "--overlap", "0.1")
    args2 = build_parser().parse_args(["process", "--shifts", "2", "-j", "3", "-d", "cpu", "-o", "sep", "a.wav"])
    options = job_options(args)
    assert options.model == "htdemucs_6s" and options.separation.two_stems == "vocals"
    assert options.separation.segment_seconds == 7.5 and options.separation.overlap == pytest.approx(0.1)
    assert not options.separation.HasField("shifts")
    assert job_options(args2).separation.shifts == 2
    assert (args2.jobs, args2.device, args2.out, args2.files) == (3, "cpu", "sep", ["a.wav"])
    assert build_parser().parse_args(["process", "--model", "m", "a.wav"]).model == "m"


@pytest.mark.parametrize(
    "argv",
    [
        ["--mp3-bitrate", "16"],
        ["--mp3-bitrate", "400"],
        ["--shifts", "21"],
        ["--overlap", "1"],
        ["--segment", "0"],
        ["-j", "0"],
        ["-d", "mps"],
    ],
)
def test_out_of_range_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["process", *argv, "a.wav"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and ("from" in err or "give" in err or "cpu, cuda or auto" in err)


def limited_job(**normalize) -> orchestrator_pb2.Job:
    job = orchestrator_pb2.Job()
    job.normalization.limited_by_ceiling = True
    job.normalization.reference.integrated_lufs = -20.0
    job.normalization.reference.sample_peak_dbfs = -6.0
    job.normalization.linked_gain_db = 2.7
    for key, value in normalize.items():
        setattr(job.options.normalize, key, value)
    return job


def test_the_loudness_outcome_in_words():
    config = {"true_peak_ceiling_db": -1.0, "normalize_mode": "loudness", "target_db": -14.0}
    assert (
        loudness_note(limited_job(), config) == "loudness limited by the -1 dBTP ceiling: -17.3 LUFS (target -14 LUFS)"
    )
    own = limited_job(target=-9.0, true_peak_ceiling_dbtp=-2.0)
    assert loudness_note(own, config) == "loudness limited by the -2 dBTP ceiling: -17.3 LUFS (target -9 LUFS)"
    peak = limited_job(mode=common_pb2.NORMALIZE_MODE_PEAK, target=-0.1)
    assert loudness_note(peak, config) == "peak limited by the -1 dBTP ceiling: -3.3 dBFS (target -0.1 dBFS)"
    assert loudness_note(orchestrator_pb2.Job(), config) is None
