"""A corpus of bad and hostile input, generated here, sent through the HTTP facade.

Each case gets its documented status and a message naming the problem; the services stay
healthy; nothing is left in the store for refused input. Cases the service must accept
(silence, odd names, many channels) run to SUCCEEDED.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from audiomesh.audio.io import probe, scan_samples
from audiomesh.demo import synth_song
from tests.helpers.mesh import new_stored_files, stored_files

RATE = 44100


def wav(y: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.atleast_2d(y).T, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def song(seconds: float = 1.0) -> np.ndarray:
    return synth_song(seconds, RATE)


def lying_length() -> bytes:
    data = bytearray(wav(song(1.0)))
    struct.pack_into("<I", data, 40, 0xFFFFFFF0)  # data chunk claims 4 GB
    return bytes(data)


def lying_riff_size() -> bytes:
    data = bytearray(wav(song(1.0)))
    struct.pack_into("<I", data, 4, 0x7FFFFFFF)
    return bytes(data)


def nan_float() -> bytes:
    y = song(1.0)
    y[0, 1000:1010] = np.nan
    return wav(y, subtype="FLOAT")


def inf_float() -> bytes:
    y = song(1.0)
    y[1, 5] = np.inf
    return wav(y, subtype="FLOAT")


def multipart_file(name: str, data: bytes, **fields: str):
    return {"files": {"file": (name, data, "application/octet-stream")}, "data": fields}


REFUSED = {
    # name: (request kwargs, HTTP status, words in the message)
    "empty file": (multipart_file("a.wav", b""), 400, "empty"),
    "text with .wav": (multipart_file("song.wav", b"just some text\n" * 64), 415, "not a supported audio"),
    "png with .mp3": (multipart_file("song.mp3", b"\x89PNG\r\n\x1a\n" + b"\0" * 512), 415, "png"),
    "html with .flac": (multipart_file("song.flac", b"<!doctype html><html>" + b" " * 600), 415, "not a supported"),
    "truncated wav": (multipart_file("t.wav", wav(song(1.0))[:3000]), 400, "truncated"),
    "wav header only": (multipart_file("h.wav", wav(song(1.0))[:44]), 400, ""),
    "lying data length": (multipart_file("l.wav", lying_length()), 400, "truncated"),
    "zero frames": (multipart_file("z.wav", wav(np.zeros((2, 0), np.float32))), 400, "no audio"),
    "one sample": (multipart_file("one.wav", wav(np.zeros((2, 1), np.float32))), 400, "too short"),
    "0.1 s": (multipart_file("short.wav", wav(song(0.1))), 400, "too short"),
    "1 kHz rate": (multipart_file("r.wav", wav(np.zeros((1, 2000), np.float32), rate=1000)), 400, "sample rate"),
    "384 kHz rate": (multipart_file("r.wav", wav(np.zeros((1, 384000), np.float32), rate=384000)), 400, "sample rate"),
    "9 channels": (multipart_file("c.wav", wav(np.zeros((9, RATE), np.float32))), 400, "channels"),
    "NaN floats": (multipart_file("n.wav", nan_float()), 400, "nan"),
    "Inf floats": (multipart_file("i.wav", inf_float()), 400, "nan or infinite"),
    "over the size limit": (multipart_file("big.wav", b"RIFF" + b"\0" * (9 << 20)), 413, "limit"),
    "garbage options JSON": (multipart_file("s.wav", wav(song()), options="{not json"), 400, "options"),
    "options wrong type": (multipart_file("s.wav", wav(song()), options='{"model": 5}'), 400, "options"),
    "unknown enum": (
        multipart_file("s.wav", wav(song()), options='{"encoding": "AUDIO_ENCODING_MP9"}'),
        400,
        "options",
    ),
    "unknown option": (multipart_file("s.wav", wav(song()), options='{"volume": 11}'), 400, "options"),
    "unknown model": (multipart_file("s.wav", wav(song()), model="../../etc/passwd"), 404, "unknown model"),
    "unknown form field": (multipart_file("s.wav", wav(song()), evil="1"), 400, "unknown form field"),
    "no file field": ({"data": {"model": "demucs_unittest"}, "files": {"other": ("x", b"1")}}, 400, "form field"),
    "not multipart": ({"content": wav(song()), "headers": {"content-type": "audio/wav"}}, 415, "multipart"),
    "bad hpss margin": (multipart_file("s.wav", wav(song()), options='{"hpss": {"marginHarmonic": 0}}'), 400, "margin"),
    "NaN target": (multipart_file("s.wav", wav(song()), options='{"normalize": {"target": "NaN"}}'), 400, "target"),
}
JSON_REFUSED = {
    "CreateJob garbage body": (b"\x00\xff{", 400, "invalid request"),
    "CreateJob wrong type": (json.dumps({"inputKey": ["a"]}).encode(), 400, "inputkey"),
    "CreateJob traversal key": (json.dumps({"inputKey": "../../etc/passwd"}).encode(), 400, "key"),
    "CreateJob absolute key": (json.dumps({"inputKey": "/etc/passwd"}).encode(), 400, "key"),
    "CreateJob control chars": (json.dumps({"inputKey": "a/\u0007b.wav"}).encode(), 400, "key"),
    "CreateJob huge key": (json.dumps({"inputKey": "a/" + "x" * 5000}).encode(), 400, "key"),
}
ACCEPTED = {
    "silence": ("silence.wav", wav(np.zeros((2, RATE), np.float32)), "silence.wav"),
    "traversal name": ("../../../etc/passwd.wav", wav(song()), "passwd.wav"),
    "unicode name": ("Björk – Jóga 🎵.wav", wav(song()), None),
    "control chars in name": ("a\x00b\x1b[31mc.wav", wav(song()), None),
    "8 channels": ("eight.wav", wav(synth_song(1.0, RATE, 8)), "eight.wav"),
    "48 kHz FLAC": ("s.flac", wav(synth_song(1.0, 48000), rate=48000, fmt="FLAC"), "s.flac"),
}


@pytest.fixture(scope="module")
def http(gateway_url):
    with httpx.Client(base_url=gateway_url, timeout=120) as client:
        yield client


#: Refusals for the request, not the file: their file must pass the upload checks, or the mesh
#: could refuse it for a problem of the file and the case would pass for the wrong reason.
NOT_THE_FILE = [
    "garbage options JSON",
    "options wrong type",
    "unknown enum",
    "unknown option",
    "unknown model",
    "unknown form field",
    "bad hpss margin",
    "NaN target",
]


def test_corpus_files_are_what_the_cases_say(tmp_path):
    """Without a mesh: the orchestrator's upload checks (probe, then every sample scanned)
    pass every accepted file and every file of a request-level refusal, as the cases claim."""

    def checked(name: str, data: bytes):
        path = tmp_path / f"{len(list(tmp_path.iterdir()))}{Path(name).suffix}"
        path.write_bytes(data)
        info = probe(path, name=name)
        assert scan_samples(path, name=name) == info.frames, name
        return info

    for case in NOT_THE_FILE:
        name, data, _ = REFUSED[case][0]["files"]["file"]
        info = checked(name, data)
        assert (info.channels, info.sample_rate, info.frames) == (2, RATE, RATE), case
    infos = {case: checked(name, data) for case, (name, data, _) in ACCEPTED.items()}
    assert infos["8 channels"].channels == 8
    assert (infos["48 kHz FLAC"].format, infos["48 kHz FLAC"].sample_rate) == ("FLAC", 48000)
    assert all(info.duration_s >= 1.0 for info in infos.values())


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_uploads(case, http, file_mesh):
    kwargs, status, words = REFUSED[case]
    before = stored_files(file_mesh)
    resp = http.post("/v1/jobs:upload", **kwargs)
    assert resp.status_code == status, (case, resp.text)
    body = resp.json()
    assert body["message"] and words.lower() in body["message"].lower(), body
    assert http.get("/health").status_code == 200
    assert not new_stored_files(file_mesh, before)


@pytest.mark.parametrize("case", list(JSON_REFUSED))
def test_refused_json(case, http, file_mesh):
    body, status, words = JSON_REFUSED[case]
    before = stored_files(file_mesh)
    resp = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, (case, resp.text)
    assert words.lower() in resp.json()["message"].lower()
    assert not new_stored_files(file_mesh, before)


@pytest.mark.parametrize("case", list(ACCEPTED))
def test_accepted_odd_input_runs_to_the_end(case, http, file_mesh):
    filename, data, stored_as = ACCEPTED[case]
    resp = http.post("/v1/jobs:upload", files={"file": (filename, data)})
    assert resp.status_code == 200, resp.text
    job = resp.json()["job"]
    key = job["input"]["key"]
    assert key.startswith(f"jobs/{job['jobId']}/input/") and ".." not in key and "\x00" not in key
    assert key.count("/") == 3  # no path from the name survives
    if stored_as:
        assert key.endswith("/" + stored_as)
    with http.stream("GET", f"/v1/jobs/{job['jobId']}:watch") as stream:
        final = [json.loads(x) for x in stream.iter_lines() if x][-1]["result"]["job"]
    assert final["state"] == "JOB_STATE_SUCCEEDED", final.get("error")
