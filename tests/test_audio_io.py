"""Audio I/O: probe/read across formats, resampling, channel adaptation, writing, bad files."""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from audiomesh.audio import AudioInfo, file_sha256, probe, read_audio, resample, write_audio
from audiomesh.audio.io import NOT_AUDIO, decode_blocks, scan_samples
from audiomesh.demo import synth_song
from audiomesh.errors import InvalidInput, NotFound, UnsupportedAudio
from tests.helpers.audio import (
    sine,
    write_empty,
    write_fake_m4a,
    write_nan_wav,
    write_text_as_wav,
    write_truncated_wav,
    write_wav,
)
from tests.helpers.audio import (
    write_zero_frame_wav as write_zero_frame,
)

SR = 44100
MP3_OK = "MP3" in sf.available_formats()


def _dominant_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[np.argmax(spectrum)])


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[-1], b.shape[-1])
    return float(np.corrcoef(a.ravel()[:n], b.ravel()[:n])[0, 1])


# --------------------------------------------------------------------------- synthetic audio


def test_synth_song_is_deterministic_and_sane() -> None:
    y = synth_song(2.0, SR, 2, seed=3)
    assert y.shape == (2, 2 * SR) and y.dtype == np.float32
    assert np.isfinite(y).all() and 0.85 < np.abs(y).max() <= 0.9 + 1e-6
    assert np.array_equal(y, synth_song(2.0, SR, 2, seed=3))
    assert not np.array_equal(y, synth_song(2.0, SR, 2, seed=4))
    assert not np.allclose(y[0], y[1])  # panned, really stereo
    mono = synth_song(1.0, 22050, 1)
    assert mono.shape == (1, 22050) and 0.85 < np.abs(mono).max() <= 0.9 + 1e-6
    wide = synth_song(0.5, SR, 3, seed=3)
    assert np.array_equal(wide[[0, 1, 0]], wide) and np.array_equal(wide[:2], synth_song(0.5, SR, seed=3))
    with pytest.raises(ValueError, match="channels must be >= 1"):
        synth_song(1.0, SR, 0)


# --------------------------------------------------------------------------- formats


FORMATS = [
    pytest.param("WAV", "PCM_16", "wav", 1e-4, id="wav"),
    pytest.param("FLAC", "PCM_24", "flac", 1e-6, id="flac"),
    pytest.param("OGG", "VORBIS", "ogg", None, id="ogg"),
    pytest.param(
        "MP3",
        "MPEG_LAYER_III",
        "mp3",
        None,
        id="mp3",
        marks=pytest.mark.skipif(not MP3_OK, reason="this libsndfile was built without MP3 support"),
    ),
]


@pytest.mark.parametrize(("fmt", "subtype", "ext", "atol"), FORMATS)
def test_probe_and_read_formats(tmp_path, fmt: str, subtype: str, ext: str, atol: float | None) -> None:
    y = synth_song(2.0, SR, 2)
    path = tmp_path / f"song.{ext}"
    sf.write(path, y.T, SR, format=fmt, subtype=subtype)
    info = probe(path)
    assert isinstance(info, AudioInfo)
    assert (info.format, info.subtype, info.sample_rate, info.channels) == (fmt, subtype, SR, 2)
    if atol is not None:  # lossless: exact length
        assert info.frames == 2 * SR
    else:  # lossy codecs add encoder delay/padding
        assert abs(info.frames - 2 * SR) < SR // 10
    assert info.duration_s == pytest.approx(info.frames / SR)

    got, sr = read_audio(path)
    assert sr == SR and got.dtype == np.float32 and got.shape == (2, info.frames)
    assert got.flags.c_contiguous
    if atol is not None:
        np.testing.assert_allclose(got, y, atol=atol)
    else:
        # Align by cross-correlation (encoder delay), then compare shapes of the waveforms.
        lag = int(np.argmax(np.correlate(got[0, : SR // 2], y[0, : SR // 4], mode="valid")))
        assert _corr(got[:, lag:], y) > 0.9


def test_content_is_sniffed_not_the_extension(tmp_path) -> None:
    y = synth_song(0.5, SR, 2)
    flac_named_wav = tmp_path / "actually_flac.wav"
    sf.write(flac_named_wav, y.T, SR, format="FLAC", subtype="PCM_16")
    assert probe(flac_named_wav).format == "FLAC"
    wav_named_mp3 = tmp_path / "actually_wav.mp3"
    sf.write(wav_named_mp3, y.T, SR, format="WAV", subtype="PCM_16")
    assert probe(wav_named_mp3).format == "WAV"
    no_extension = tmp_path / "upload"
    sf.write(no_extension, y.T, SR, format="OGG", subtype="VORBIS")
    assert probe(no_extension).format == "OGG"


# --------------------------------------------------------------------------- resampling and channels


def test_resample_48k_to_44k1() -> None:
    y = np.stack([sine(1000, 1.0, 48000), sine(3000, 1.0, 48000, 0.25)])
    out = resample(y, 48000, 44100)
    assert out.shape == (2, 44100) and out.dtype == np.float32 and out.flags.c_contiguous
    assert _dominant_hz(out[0], 44100) == pytest.approx(1000, abs=2)
    assert _dominant_hz(out[1], 44100) == pytest.approx(3000, abs=2)
    mid = slice(1000, -1000)  # away from the filter's edge effects
    assert np.abs(out[0, mid]).max() == pytest.approx(0.5, abs=0.01)
    assert np.abs(out[1, mid]).max() == pytest.approx(0.25, abs=0.01)
    mono = resample(y[0], 48000, 44100, quality="HQ")
    assert mono.shape == (44100,)
    assert resample(y, 48000, 48000) is y
    with pytest.raises(InvalidInput, match="sample rates must be > 0"):
        resample(y, 0, 44100)
    with pytest.raises(InvalidInput, match="quality"):
        resample(y, 48000, 44100, quality="LQ")


def test_read_audio_resamples(tmp_path) -> None:
    path = write_wav(tmp_path / "48k.wav", np.stack([sine(440, 1.0, 48000)] * 2), 48000)
    y, sr = read_audio(path, sample_rate=44100)
    assert sr == 44100 and y.shape == (2, 44100)
    assert _dominant_hz(y[0], sr) == pytest.approx(440, abs=2)


def test_channel_adaptation(tmp_path) -> None:
    mono = write_wav(tmp_path / "mono.wav", sine(440, 0.5, SR), SR)
    y, _ = read_audio(mono, channels=2)
    assert y.shape == (2, SR // 2) and np.array_equal(y[0], y[1])
    y1, _ = read_audio(mono, channels=1)
    assert y1.shape == (1, SR // 2)

    left, right = sine(440, 0.5, SR, 0.4), sine(660, 0.5, SR, 0.2)
    stereo = write_wav(tmp_path / "stereo.wav", np.stack([left, right]), SR, subtype="FLOAT")
    down, _ = read_audio(stereo, channels=1)
    np.testing.assert_allclose(down[0], (left + right) / 2, atol=1e-6)
    both, sr = read_audio(stereo, channels=1, sample_rate=22050)
    assert both.shape == (1, SR // 4) and sr == 22050

    y3 = synth_song(0.2, SR, 3)
    three = write_wav(tmp_path / "three.wav", y3, SR, subtype="FLOAT")
    stereo3, _ = read_audio(three, channels=2)  # 1st+3rd left, 2nd right
    np.testing.assert_allclose(stereo3[0], (y3[0] + y3[2]) / 2, atol=1e-6)
    np.testing.assert_allclose(stereo3[1], y3[1], atol=1e-6)
    with pytest.raises(InvalidInput, match="has 3 channels and 4 are needed"):
        read_audio(three, channels=4)
    assert read_audio(three)[0].shape[0] == 3


# --------------------------------------------------------------------------- writing


@pytest.mark.parametrize(
    ("fmt", "subtype", "atol"),
    [
        ("wav", "PCM_16", 1 / 32767),
        ("wav", "PCM_24", 1 / 2**23 * 2),
        ("wav", "FLOAT", 0.0),
        ("flac", "PCM_16", 1 / 32767),
        ("flac", "PCM_24", 1 / 2**23 * 2),
    ],
)
def test_write_audio_round_trip(tmp_path, fmt: str, subtype: str, atol: float) -> None:
    y = synth_song(0.5, SR, 2)
    path = tmp_path / f"out.{fmt}"
    write_audio(path, y, SR, fmt=fmt, subtype=subtype)
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels) == (fmt.upper(), subtype, SR, 2)
    back, sr = read_audio(path)
    assert sr == SR
    np.testing.assert_allclose(back, y, atol=atol, rtol=0)
    assert sorted(os.listdir(tmp_path)) == [f"out.{fmt}"]  # no temp file left


def test_write_audio_defaults_and_mono(tmp_path) -> None:
    path = tmp_path / "mono.wav"
    write_audio(path, sine(440, 0.1, 8000), 8000)  # (frames,) is mono
    info = sf.info(path)
    assert (info.format, info.subtype, info.channels) == ("WAV", "PCM_16", 1)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_write_audio_clips_pcm_without_wrapping(tmp_path, subtype: str) -> None:
    y = np.array([[0.5, 1.0, 1.5, 30.0, -1.0, -1.5, -30.0]], dtype=np.float32)
    path = tmp_path / "clip.wav"
    write_audio(path, y, SR, subtype=subtype)
    back, _ = read_audio(path)
    assert back[0, 0] == pytest.approx(0.5, abs=1e-4)
    assert np.all(back[0, 1:4] > 0.999)  # positive stays positive: clipped, not wrapped
    assert np.all(back[0, 4:] <= -0.999)


def test_write_audio_float_keeps_overs(tmp_path) -> None:
    y = np.array([[0.5, 1.5, -2.0]], dtype=np.float32)
    write_audio(tmp_path / "f.wav", y, SR, subtype="FLOAT")
    np.testing.assert_array_equal(read_audio(tmp_path / "f.wav")[0], y)


def test_write_audio_errors_and_atomicity(tmp_path) -> None:
    y = synth_song(0.1, SR, 2)
    target = tmp_path / "keep.flac"
    write_audio(target, y, SR, fmt="flac")
    before = target.read_bytes()
    with pytest.raises(InvalidInput, match="FLAC stores integer PCM only"):
        write_audio(target, y, SR, fmt="flac", subtype="FLOAT")
    with pytest.raises(InvalidInput, match=r"output format must be one of \('wav', 'flac', 'mp3'\), got 'ogg'"):
        write_audio(target, y, SR, fmt="ogg")
    with pytest.raises(InvalidInput, match="output subtype must be one of"):
        write_audio(target, y, SR, subtype="PCM_8")
    with pytest.raises(InvalidInput, match="NaN or infinite"):
        write_audio(target, np.full((2, 10), np.nan, np.float32), SR)
    with pytest.raises(InvalidInput, match=r"pass \(channels, frames\), not \(frames, channels\)"):
        write_audio(target, y.T, SR)
    with pytest.raises(InvalidInput, match="cannot write FLAC"):  # libsndfile refuses: FLAC max is 655350 Hz
        write_audio(target, y, 1_000_000, fmt="flac")
    assert target.read_bytes() == before  # failed writes never touched the target
    assert sorted(os.listdir(tmp_path)) == ["keep.flac"]  # and left no temp files


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (write_empty, r"'bad\.wav': the file is empty \(0 bytes\)"),
        (
            write_text_as_wav,
            r"'bad\.wav' is not a supported audio file \(WAV, FLAC, OGG, MP3\) \(it looks like a text file, "
            r"not audio\); install ffmpeg for other formats",
        ),
        (write_truncated_wav, r"'bad\.wav' is a truncated WAV file: its header declares \d+ bytes of audio but"),
        (write_zero_frame, r"'bad\.wav' contains no audio samples \(0 frames\)"),
        (write_fake_m4a, r"looks like an MP4/M4A file \(AAC or ALAC audio\)\); install ffmpeg"),
    ],
    ids=["empty", "text", "truncated", "zero-frames", "m4a-without-ffmpeg"],
)
def test_bad_files(tmp_path, monkeypatch, make, message: str) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))  # no ffmpeg, whatever the machine has
    path = make(tmp_path / "bad.wav")
    with pytest.raises(InvalidInput, match=message):
        probe(path)
    with pytest.raises(InvalidInput, match=message):
        read_audio(path)
    with pytest.raises(InvalidInput, match=message):
        list(decode_blocks(path))


def test_bad_file_messages_use_given_name(tmp_path) -> None:
    path = write_empty(tmp_path / "tmp123")
    with pytest.raises(InvalidInput, match=r"'My Song\.wav': the file is empty"):
        probe(path, name="My Song.wav")


@pytest.mark.parametrize("ffmpeg", ["hidden", "stand-in that fails", "installed"])
def test_damaged_header_is_called_damaged(tmp_path, monkeypatch, ffmpeg) -> None:
    """The same 400 and words whether or not ffmpeg was tried (not "unsupported", 415)."""
    if ffmpeg == "hidden":
        monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    elif ffmpeg == "stand-in that fails":
        _fake_tool(tmp_path / "bin", "ffmpeg", "import sys\nsys.stderr.write('Invalid data found\\n')\nsys.exit(1)\n")
        monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    elif shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed here: the real-ffmpeg path cannot run")
    path = tmp_path / "cut.wav"
    write_wav(path, synth_song(0.2, SR, 2), SR)
    path.write_bytes(path.read_bytes()[:30])  # cut inside the fmt chunk
    with pytest.raises(
        InvalidInput, match="looks like a WAV file but cannot be decoded; it is probably damaged"
    ) as err:
        probe(path)
    assert not isinstance(err.value, UnsupportedAudio)


def test_nan_samples(tmp_path) -> None:
    path = write_nan_wav(tmp_path / "nan.wav")
    assert probe(path).format == "WAV"  # the container is fine...
    with pytest.raises(InvalidInput, match=r"'nan\.wav' contains 2 NaN or infinite sample\(s\)"):
        read_audio(path)  # ...the samples are not
    with pytest.raises(
        InvalidInput, match=r"'nan\.wav' contains 2 NaN or infinite sample\(s\), the first at frame 100"
    ):
        list(decode_blocks(path))


def test_nan_message_names_the_first_bad_frame(tmp_path) -> None:
    """The bad samples are in the second block: the message says where, not where the block starts."""
    y = sine(440, 3.0, SR)
    y[100_000] = np.nan
    path = tmp_path / "late.wav"
    sf.write(path, y, SR, format="WAV", subtype="FLOAT")
    where = r"the first at frame 100000 \(2\.268 s\)"
    with pytest.raises(InvalidInput, match=where):
        scan_samples(path, block_frames=1 << 16)
    with pytest.raises(InvalidInput, match=where):
        list(decode_blocks(path, block_frames=1 << 16))
    with pytest.raises(InvalidInput, match=where):
        read_audio(path)


def _damaged(tmp_path, kind: str) -> str:
    """A truncated FLAC (cut at 60 %) or an MP3 with 4000 junk bytes in the middle: both probe fine."""
    y = synth_song(3.0, SR, 2)
    path = tmp_path / f"whole.{kind}"
    sf.write(path, y.T, SR, format=kind.upper())
    data = bytearray(path.read_bytes())
    if kind == "flac":
        data = data[: int(len(data) * 0.6)]
    else:
        middle = len(data) // 3
        data[middle : middle + 4000] = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    out = tmp_path / "upload-x1y2z3"  # a server-side spool name: never shown
    out.write_bytes(bytes(data))
    return str(out)


@pytest.mark.parametrize("kind", ["flac", pytest.param("mp3", marks=pytest.mark.skipif(not MP3_OK, reason="no MP3"))])
def test_damaged_flac_and_mp3_fail_the_scan(tmp_path, kind) -> None:
    path = _damaged(tmp_path, kind)
    assert probe(path, name=f"song.{kind}").frames == 3 * SR  # the header is intact...
    with pytest.raises(
        InvalidInput, match=rf"'song\.{kind}' \({kind.upper()}\) stops decoding after .* damaged"
    ) as err:
        scan_samples(path, name=f"song.{kind}")  # ...the frames are not
    assert str(tmp_path) not in str(err.value) and "upload-" not in str(err.value)
    with pytest.raises(InvalidInput, match=rf"'song\.{kind}' \({kind.upper()}\) could not be decoded") as err:
        list(decode_blocks(path, name=f"song.{kind}"))
    assert str(tmp_path) not in str(err.value)


@pytest.mark.parametrize(
    ("rate", "channels", "want_rate", "want_channels", "subtype"),
    [
        (SR, 2, SR, 2, "FLOAT"),  # as is
        (48000, 2, SR, 2, "PCM_16"),  # resampled
        (22050, 1, SR, 2, "PCM_24"),  # resampled, then mono duplicated
        (48000, 4, SR, 2, "FLOAT"),  # 4 channels downmixed, then resampled
        (SR, 2, None, None, "FLOAT"),  # nothing asked
    ],
)
def test_decode_blocks_equal_read_audio(tmp_path, rate, channels, want_rate, want_channels, subtype) -> None:
    y = (synth_song(7.3, rate, 2)[np.arange(channels) % 2] * 0.5).astype(np.float32)  # > 2 blocks of 2**16
    path = tmp_path / "in.wav"
    sf.write(path, y.T, rate, subtype=subtype)
    whole, whole_rate = read_audio(path, sample_rate=want_rate, channels=want_channels)
    blocks = list(decode_blocks(path, sample_rate=want_rate, channels=want_channels, block_frames=1 << 16))
    assert len(blocks) > 2 and all(b.dtype == np.float32 for b in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), whole)
    assert whole_rate == (want_rate or rate)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        probe(tmp_path / "nope.wav")
    with pytest.raises(InvalidInput, match="is a directory"):
        probe(tmp_path)


# --------------------------------------------------------------------------- ffmpeg fallback


def _fake_tool(bin_dir, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    script.chmod(0o755)


def test_ffmpeg_fallback(tmp_path, monkeypatch) -> None:
    """A stand-in ffmpeg (writes a 22.05 kHz stereo sine to its last argument) is used."""
    bin_dir = tmp_path / "bin"
    _fake_tool(
        bin_dir,
        "ffmpeg",
        """
        import sys
        import numpy as np
        import soundfile as sf
        assert "-i" in sys.argv and sys.argv[-2] == "auto", sys.argv
        t = np.arange(22050) / 22050
        y = 0.5 * np.sin(2 * np.pi * 440 * t)
        sf.write(sys.argv[-1], np.stack([y, y], 1), 22050, format="WAV", subtype="FLOAT")
        """,
    )
    monkeypatch.setenv("PATH", str(bin_dir))
    path = write_fake_m4a(tmp_path / "song.m4a")
    info = probe(path)
    assert (info.format, info.subtype, info.sample_rate, info.channels, info.frames) == (
        "M4A",
        "FFMPEG",
        22050,
        2,
        22050,
    )
    y, sr = read_audio(path, sample_rate=44100)
    assert sr == 44100 and y.shape == (2, 44100)
    assert _dominant_hz(y[0], sr) == pytest.approx(440, abs=2)


def test_ffmpeg_fallback_failure_is_reported(tmp_path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    _fake_tool(
        bin_dir,
        "ffmpeg",
        """
        import sys
        sys.stderr.write("song.m4a: Invalid data found when processing input\\n")
        sys.exit(1)
        """,
    )
    monkeypatch.setenv("PATH", str(bin_dir))
    path = write_fake_m4a(tmp_path / "song.m4a")
    with pytest.raises(
        InvalidInput,
        match=r"is not a supported audio file \(neither soundfile nor ffmpeg can decode it\); it looks like an "
        r"MP4/M4A .*Invalid data found when processing input",
    ):
        probe(path)


@pytest.mark.parametrize("ffmpeg", ["hidden", "installed"])
def test_not_audio_refusal_says_so_with_and_without_ffmpeg(tmp_path, monkeypatch, ffmpeg) -> None:
    """Both refusal paths carry NOT_AUDIO and the user's name, never the server's path (#14.17, #14.15).

    "installed" uses the machine's real ffmpeg (skipped where there is none; the stand-in
    tests above cover that path's wording everywhere)."""
    if ffmpeg == "hidden":
        monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    elif shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed here: the real-ffmpeg refusal path cannot run")
    spool = tmp_path / "audiomesh-scratch" / "4242" / "upload-abc123"
    spool.parent.mkdir(parents=True)
    spool.write_bytes(b"hello, I am not a song\n" * 40)
    with pytest.raises(InvalidInput) as err:
        probe(spool, name="song.wav")
    message = str(err.value)
    assert message.startswith(f"'song.wav' {NOT_AUDIO}"), message
    assert str(tmp_path) not in message and "upload-abc123" not in message, message


# --------------------------------------------------------------------------- hashing


def test_file_sha256(tmp_path) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert file_sha256(path) == hashlib.sha256(data).hexdigest()
    assert file_sha256(path, chunk_size=4099) == hashlib.sha256(data).hexdigest()
