"""audiomesh.audio.stream writers as the workers use them: TrackWriter as a context manager and
the separation stem writers (blocks in on one thread, files and measurements out)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from audiomesh.audio.stream import ArraySource, TrackWriter, write_track, write_tracks
from audiomesh.dsp.composite import mix, mix_blocks
from audiomesh.dsp.loudness import measure
from audiomesh.errors import Cancelled, InvalidInput

RATE = 44100


def tone(seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    y = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([y, 0.5 * y]).astype(np.float32)


def test_track_writer_block_closes_and_measures(tmp_path) -> None:
    y = tone(1.0)
    with TrackWriter(tmp_path / "t.wav", RATE, 2, subtype="FLOAT") as writer:
        for start in range(0, y.shape[1], 10_000):
            writer.write(y[:, start : start + 10_000])
        assert writer.measurement is None  # only the end of the block finishes the file
    np.testing.assert_array_equal(sf.read(tmp_path / "t.wav", dtype="float32")[0].T, y)
    assert writer.measurement == measure(y, RATE)
    assert writer.close() == writer.measurement  # closing again: the same result, no error


@pytest.mark.parametrize("exc", [ValueError("boom"), KeyboardInterrupt(), Cancelled("cancelled")])
def test_track_writer_block_removes_the_file_and_reraises(tmp_path, exc: BaseException) -> None:
    with pytest.raises(type(exc)), TrackWriter(tmp_path / "t.wav", RATE, 2) as writer:
        writer.write(tone(0.5))
        assert (tmp_path / "t.wav").exists()
        raise exc
    assert not (tmp_path / "t.wav").exists()
    assert writer.measurement is None


def test_write_tracks_writes_each_stream_and_reports_progress(tmp_path) -> None:
    a, b = tone(1.0), tone(1.0, freq=220.0, amp=0.3)
    done: list[int] = []
    blocks = ((a[:, i : i + 16384], b[:, i : i + 16384]) for i in range(0, a.shape[1], 16384))
    paths = [tmp_path / "a.wav", tmp_path / "b.flac"]
    measured = write_tracks(paths, blocks, RATE, 2, fmt="wav", subtype="FLOAT", progress=done.append)
    np.testing.assert_array_equal(sf.read(paths[0], dtype="float32")[0].T, a)
    assert measured == [measure(a, RATE), measure(b, RATE)]
    assert done[-1] == a.shape[1] and done == sorted(done) and len(done) == -(-a.shape[1] // 16384)
    assert write_track(tmp_path / "c.wav", [a], RATE, 2, measure=False) is None


def test_write_tracks_leaves_nothing_on_a_failing_stream_or_a_cancel(tmp_path) -> None:
    def failing():
        yield tone(0.2), tone(0.2)
        raise InvalidInput("the kernel failed")

    paths = [tmp_path / "a.wav", tmp_path / "b.wav"]
    with pytest.raises(InvalidInput, match="kernel failed"):
        write_tracks(paths, failing(), RATE, 2)
    assert list(tmp_path.iterdir()) == []
    calls = iter([False, True])
    with pytest.raises(Cancelled, match="hpss cancelled"):
        write_tracks(paths, [(tone(0.2), tone(0.2))] * 3, RATE, 2, cancelled=lambda: next(calls), what="hpss")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="zip"):  # a stream with fewer parts than paths
        write_tracks(paths, [(tone(0.2),)], RATE, 2)
    assert list(tmp_path.iterdir()) == []


def test_mix_blocks_equals_mix_bit_for_bit() -> None:
    signals = {"a": tone(1.0), "b": tone(1.0, freq=330.0, amp=0.7), "c": tone(1.0, freq=55.0, amp=0.2)}
    sources = {name: ArraySource(y, RATE) for name, y in signals.items()}
    blocks = list(mix_blocks(sources, block_frames=10_000))  # not a divisor: the last block is short
    assert [b.shape[1] for b in blocks[:-1]] == [10_000] * (len(blocks) - 1)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), mix(signals))


@pytest.mark.parametrize(
    ("other", "rate", "words"),
    [
        (np.zeros((2, 100), np.float32), RATE, "'b' has 100 samples but 'a' has 441"),
        (np.zeros((1, 441), np.float32), RATE, "'b' has 1 channels but 'a' has 2"),
        (np.zeros((2, 441), np.float32), 48000, "differ in sample rate"),
    ],
)
def test_mix_blocks_refuses_mismatched_sources(other: np.ndarray, rate: int, words: str) -> None:
    sources = {"a": ArraySource(np.zeros((2, 441), np.float32), RATE), "b": ArraySource(other, rate)}
    with pytest.raises(InvalidInput, match=words):
        next(mix_blocks(sources))
    with pytest.raises(InvalidInput, match="at least one"):
        next(mix_blocks({}))
