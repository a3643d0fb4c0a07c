"""audiomesh.audio.stream writers as the workers use them: TrackWriter as a context manager,
write_tracks, dsp.composite.mix_blocks, and the separation stem writers
(audiomesh.separation.stems: blocks in on one thread, files and measurements out)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from audiomesh.audio.stream import ArraySource, TrackWriter, write_track, write_tracks
from audiomesh.dsp.composite import mix, mix_blocks
from audiomesh.dsp.loudness import measure
from audiomesh.errors import Cancelled, InvalidInput
from audiomesh.separation.stems import StemWriters, write_stems

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


def stem_blocks(n_blocks: int = 4, frames: int = 9000) -> tuple[dict[str, np.ndarray], list]:
    """Whole stems and the ``(start, {stem: block})`` stream a model would yield for them."""
    whole = {"drums": tone(n_blocks * frames / RATE, 110.0), "bass": tone(n_blocks * frames / RATE, 55.0, 0.3)}
    stream = [(i, {k: y[:, i : i + frames] for k, y in whole.items()}) for i in range(0, n_blocks * frames, frames)]
    return whole, stream


@pytest.mark.parametrize("threads", [1, 2, 3])  # >1: the stems of a block on a pool (a stitch)
def test_write_stems_writes_every_stem_and_its_measurement(tmp_path, threads) -> None:
    whole, stream = stem_blocks()
    written = write_stems(stream, tmp_path, RATE, 2, fmt="wav", subtype="FLOAT", ext=".wav", threads=threads)
    assert list(written) == ["drums", "bass"]  # the order stems came
    for name, (path, measured) in written.items():
        assert path.parent == tmp_path and path.suffix == ".wav"
        np.testing.assert_array_equal(sf.read(path, dtype="float32")[0].T, whole[name])
        assert measured == measure(whole[name], RATE)


@pytest.mark.parametrize("threads", [1, 2])
def test_write_stems_raises_a_writer_thread_error_on_the_caller_and_leaves_nothing(tmp_path, threads) -> None:
    _, stream = stem_blocks(n_blocks=12)
    stream[1][1]["bass"] = np.zeros((1, 9000), np.float32)  # the writer thread refuses it
    produced = []

    def blocks():
        for item in stream:
            produced.append(item[0])
            yield item

    with pytest.raises(InvalidInput, match="expected 2 channels"):
        write_stems(blocks(), tmp_path, RATE, 2, threads=threads)
    assert list(tmp_path.iterdir()) == []
    assert len(produced) < len(stream)  # the error stopped the producer early (bounded queue)


def test_write_stems_aborts_on_a_producer_error_or_a_cancel(tmp_path) -> None:
    _, stream = stem_blocks()

    def failing():
        yield from stream[:2]
        raise RuntimeError("model failed")

    with pytest.raises(RuntimeError, match="model failed"):
        write_stems(failing(), tmp_path, RATE, 2)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(Cancelled, match="separation cancelled"):
        write_stems(stream, tmp_path, RATE, 2, cancelled=lambda: True)
    assert list(tmp_path.iterdir()) == []


def test_stem_writers_left_without_finish_or_aborted_after_it_leave_nothing(tmp_path) -> None:
    _, stream = stem_blocks()
    with StemWriters(tmp_path, RATE, 2) as sink:  # left without finish(): nothing is claimed
        sink.put(stream[0][1])
    assert list(tmp_path.iterdir()) == []
    sink = StemWriters(tmp_path, RATE, 2)
    sink.put(stream[0][1])
    assert len(sink.finish()) == 2 and len(list(tmp_path.iterdir())) == 2
    sink.abort()
    assert list(tmp_path.iterdir()) == []
