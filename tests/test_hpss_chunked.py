"""HPSS in blocks of frames: bit for bit the whole-signal result (and librosa's), bounded memory.

audiomesh.dsp.hpss.hpss(block_frames=...) and hpss_blocks (a source read block by block).
"""

from __future__ import annotations

import librosa
import numpy as np
import pytest

from audiomesh.audio.io import write_audio
from audiomesh.audio.stream import ArraySource, SoundFileSource
from audiomesh.dsp.hpss import BLOCK_FRAMES, hpss, hpss_blocks
from audiomesh.errors import InvalidInput
from tests.test_dsp_hpss import SETTINGS, SIGNALS

EXTRA_SETTINGS = [
    {"kernel_size": 1},
    {"kernel_size": (1, 5)},
    {"kernel_size": (30, 17)},
    {"pad_mode": "edge"},
    {"pad_mode": "linear_ramp"},  # its ramp depends on the pad's width: padded whole at the ends
    {"pad_mode": "symmetric"},
    {"n_fft": 1023, "hop_length": 300},
    {"n_fft": 1024, "hop_length": 256, "center": False, "kernel_size": (9, 31)},
]


@pytest.mark.parametrize(
    "settings", SETTINGS + EXTRA_SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults"
)
@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_blocks_equal_librosa_bit_for_bit(signal: str, settings: dict) -> None:
    y = SIGNALS[signal](22050, 3.0, 2)
    h_ref, p_ref = librosa.effects.hpss(y, **settings)
    for block_frames in (3, 40):
        h, p = hpss(y, block_frames=block_frames, **settings)
        np.testing.assert_array_equal(h, h_ref)
        np.testing.assert_array_equal(p, p_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_of_a_long_signal_equal_one_piece(dtype: type) -> None:
    y = SIGNALS["song"](44100, 26.0, 2).astype(dtype)  # > 2 default blocks
    whole = hpss(y, block_frames=10**6)
    blocked = hpss(y)  # BLOCK_FRAMES
    assert whole[0].dtype == blocked[0].dtype == dtype
    for a, b in zip(whole, blocked, strict=True):
        np.testing.assert_array_equal(a, b)


def test_hpss_blocks_streams_a_file_in_order(tmp_path) -> None:
    y = SIGNALS["song"](22050, 9.0, 2)
    path = tmp_path / "mix.wav"
    write_audio(path, y, 22050, subtype="FLOAT")
    reads: list[tuple[int, int]] = []

    class Recording(SoundFileSource):
        def read(self, start: int, stop: int) -> np.ndarray:
            reads.append((start, stop))
            return super().read(start, stop)

    with Recording(path) as source:
        blocks = list(hpss_blocks(source, block_frames=64))
    h_ref, p_ref = librosa.effects.hpss(y)
    starts = [start for start, _, _ in blocks]
    assert starts == sorted(starts) and starts[0] == 0 and len(blocks) > 3
    np.testing.assert_array_equal(np.concatenate([h for _, h, _ in blocks], axis=-1), h_ref)
    np.testing.assert_array_equal(np.concatenate([p for _, _, p in blocks], axis=-1), p_ref)
    # Each read is one block plus its neighbourhood, never the whole signal.
    assert max(stop - start for start, stop in reads) < y.shape[-1] / 2
    assert sum(stop - start for start, stop in reads) < 1.8 * y.shape[-1]


def test_hpss_blocks_of_a_short_signal_is_one_block() -> None:
    y = SIGNALS["tones"](22050, 1.0, 1)
    blocks = list(hpss_blocks(ArraySource(y, 22050)))
    assert len(blocks) == 1 and blocks[0][0] == 0
    np.testing.assert_array_equal(blocks[0][1], hpss(y)[0])
    assert BLOCK_FRAMES > 100


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"block_frames": 0}, "block_frames"), ({"block_frames": 2.5}, "block_frames"), ({"n_fft": 4096 * 8}, "n_fft")],
)
def test_bad_block_options_raise(kwargs: dict, message: str) -> None:
    y = SIGNALS["noise"](22050, 1.0, 2)
    with pytest.raises(InvalidInput, match=message):
        list(hpss_blocks(ArraySource(y, 22050), **kwargs))


def test_non_finite_block_is_refused() -> None:
    y = SIGNALS["noise"](22050, 6.0, 2)
    y[1, -100] = np.nan
    with pytest.raises(InvalidInput, match="finite"):
        list(hpss_blocks(ArraySource(y, 22050), block_frames=16))
