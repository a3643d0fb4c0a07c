"""audiomesh.audio.stream writers as the workers use them: TrackWriter as a context manager and
the separation stem writers (blocks in on one thread, files and measurements out)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from audiomesh.audio.stream import TrackWriter
from audiomesh.dsp.loudness import measure
from audiomesh.errors import Cancelled

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
