"""Fuzzing of audio probing/decoding and manifest parsing (hypothesis, bounded in examples).

The property: any input gives a result or our own InvalidInput (a clear 400), never another
exception, hang or crash.
"""

from __future__ import annotations

import io
import json

import numpy as np
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiomesh import manifest
from audiomesh.audio.io import probe, read_audio, scan_samples
from audiomesh.errors import InvalidInput
from audiomesh.v1 import orchestrator_pb2

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None
)


def _wav(subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    t = np.arange(4410) / 44100
    y = np.stack([np.sin(2 * np.pi * 440 * t), np.sin(2 * np.pi * 660 * t)]).T * 0.5
    buf = io.BytesIO()
    sf.write(buf, y, 44100, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = [_wav(), _wav("FLOAT"), _wav("PCM_24", "FLAC"), _wav("VORBIS", "OGG")]


def _decode_all(path) -> None:
    try:
        info = probe(path)
        assert info.frames > 0 and info.channels > 0 and info.sample_rate > 0
        scan_samples(path)
        y, rate = read_audio(path)
        assert y.ndim == 2 and np.isfinite(y).all()
    except InvalidInput as exc:
        assert str(exc)  # a message, always


@FUZZ
@given(data=st.binary(max_size=4096))
def test_probe_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fz") / "x.wav"
    path.write_bytes(data)
    _decode_all(path)


@FUZZ
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=12),
    cut=st.one_of(st.none(), st.integers(0, 12_000)),
)
def test_probe_mutated_audio(tmp_path_factory, seed, flips, cut):
    data = bytearray(SEEDS[seed])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    if cut is not None:
        data = data[:cut]
    path = tmp_path_factory.mktemp("fz") / "x.bin"
    path.write_bytes(bytes(data))
    _decode_all(path)


def _valid_manifest() -> dict:
    job = orchestrator_pb2.Job(job_id="0b6d8b0e-8f3a-4d7c-9a51-2f5b8c1d9e10", state=2)
    job.create_time.GetCurrentTime()
    job.update_time.GetCurrentTime()
    job.input.name = "s.wav"
    job.nodes.add(name="decode", stage="decode", state=3, attempts=1)
    job.tracks.add(name="main", key="jobs/x/output/main.wav", size_bytes=12)
    return json.loads(manifest.dumps(orchestrator_pb2.Manifest(schema_version=manifest.SCHEMA_VERSION, job=job)))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_manifest_random_bytes(data):
    try:
        manifest.loads(data)
    except InvalidInput as exc:
        assert "manifest" in str(exc)


@FUZZ
@given(
    path=st.lists(st.sampled_from(["job", "nodes", 0, "tracks", "input", "state", "sizeBytes", "name"]), max_size=3),
    value=JSON,
)
def test_manifest_mutated_documents(path, value):
    doc = _valid_manifest()
    target = doc
    for step in path[:-1]:
        try:
            target = target[step]
        except (KeyError, IndexError, TypeError):
            break
    if path and isinstance(target, dict) and isinstance(path[-1], str):
        target[path[-1]] = value
    elif isinstance(target, list) and target:
        target[0] = value
    try:
        parsed = manifest.loads(json.dumps(doc).encode())
    except InvalidInput as exc:
        assert "manifest" in str(exc)
    else:
        assert parsed.schema_version == manifest.SCHEMA_VERSION
