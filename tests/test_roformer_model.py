"""RoFormer models (audiomesh.separation.roformer_model) against Music-Source-Separation-Training's own code.

Tiny random-weight models are written the way the community shares them (MSST's own network
class, ``torch.save(state_dict)`` + the YAML, tests/helpers/roformer.py), loaded with
:class:`RoformerModel` (the bs-roformer package's network), and separated; the reference is
``msst.utils.model_utils.demix`` (msst 0.1.0, a test-only dependency) on MSST's network with the
same checkpoint. The issue's bar is 1e-5; with ``inference.batch_size: 1`` the stems are equal
bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from audiomesh.audio.stream import ArraySource, SoundFileSource
from audiomesh.errors import Cancelled, InvalidInput, ModelUnavailable
from audiomesh.separation.base import SeparationOptions
from audiomesh.separation.roformer_model import (
    BS_ROFORMER_EP317,
    KIND,
    MEL_ROFORMER_KJ,
    RoformerModel,
    build_network,
    config_from_mapping,
    load_checkpoint,
    load_config,
    msst_state_dict,
)
from tests.helpers.roformer import (
    SAMPLE_RATE,
    msst_reference,
    msst_separate,
    roformer_config,
    write_config,
    write_roformer,
)

pytest.importorskip("msst")
pytest.importorskip("bs_roformer")

# bs_roformer/attend.py enters the deprecated torch.backends.cuda.sdp_kernel() on every attention call
# (roformer_model filters it at import; pytest resets filters per test).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.backends.cuda.sdp_kernel\\(\\)` is deprecated:FutureWarning")

#: The issue's bar for "equal to the reference demix".
TOLERANCE = 1e-5
FOUR_STEMS = ("drums", "bass", "other", "vocals")
CHUNK = 8820  # 0.2 s, 20 hops of 441


def song(frames: int, channels: int = 2, seed: int = 0) -> np.ndarray:
    """Noise with a slow tone: ragged, nothing special at chunk edges."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / SAMPLE_RATE
    tone = 0.3 * np.sin(2 * np.pi * 220 * t)
    return (0.2 * rng.standard_normal((channels, frames)) + tone).astype(np.float32)


def streamed(model: RoformerModel, source, **kwargs: Any) -> dict[str, np.ndarray]:
    """separate_stream's blocks, checked to tile the mix in order, concatenated per stem."""
    position = 0
    parts: dict[str, list[np.ndarray]] = {}
    for start, stems in model.separate_stream(source, **kwargs):
        assert start == position
        lengths = {audio.shape[-1] for audio in stems.values()}
        assert len(lengths) == 1 and lengths.pop() > 0
        for name, audio in stems.items():
            assert audio.dtype == np.float32 and audio.shape[0] == model.audio_channels
            parts.setdefault(name, []).append(audio)
        position += next(iter(stems.values())).shape[-1]
    assert position == source.frames
    return {name: np.concatenate(blocks, axis=-1) for name, blocks in parts.items()}


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max())


class Repo:
    """Tiny models written once per module: (RoformerModel, MSST config, MSST network, network name)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._cache: dict[tuple[Any, ...], tuple[RoformerModel, Any, Any, str]] = {}

    def get(self, **kwargs: Any) -> tuple[RoformerModel, Any, Any, str]:
        key = tuple(sorted(kwargs.items()))
        if key not in self._cache:
            name = f"tiny{len(self._cache)}"
            yaml_path, ckpt_path = write_roformer(self.folder, name, **kwargs)
            network = kwargs.get("network", "bs_roformer")
            config, reference = msst_reference(yaml_path, ckpt_path, network)
            model = RoformerModel.load(yaml_path, ckpt_path, name=name, device="cpu")
            self._cache[key] = (model, config, reference, network)
        return self._cache[key]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Repo]:
    # One thread: the tiny models gain nothing from two, and two shared cores thrash (26 s vs 54 s here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Repo(tmp_path_factory.mktemp("roformer"))
    torch.set_num_threads(threads)


BS_VOCALS: dict[str, Any] = {"network": "bs_roformer"}
MEL_FOUR: dict[str, Any] = {"network": "mel_band_roformer", "instruments": FOUR_STEMS, "target": None}


# --------------------------------------------------------------------------- equality with MSST's demix


def check_against_msst(repo: Repo, frames: int, *, source_kind: str = "array", tmp_path: Path | None = None, **kwargs):
    model, config, reference, network = repo.get(**kwargs)
    mix = song(frames, model.audio_channels, seed=frames)
    if source_kind == "file":
        assert tmp_path is not None
        path = tmp_path / "mix.wav"
        sf.write(path, mix.T, SAMPLE_RATE, subtype="FLOAT")
        with SoundFileSource(path) as source:
            ours = streamed(model, source)
    else:
        ours = streamed(model, ArraySource(mix, SAMPLE_RATE))
    theirs = msst_separate(config, reference, mix, network)
    assert list(ours) == list(model.sources)
    worst = 0.0
    for name, audio in theirs.items():
        worst = max(worst, max_diff(ours[name], audio))
    if model.config.target is not None:
        residual = model.sources[1]
        worst = max(worst, max_diff(ours[residual], mix - theirs[model.config.target]))
    assert worst <= TOLERANCE
    return worst


@pytest.mark.parametrize("overlap", [1, 2, 4])
@pytest.mark.parametrize("frames", [100, 3000, CHUNK, CHUNK + 1, 30011])
def test_bs_vocals_equals_msst_demix(repo: Repo, frames: int, overlap: int) -> None:
    """BS-RoFormer with a target (vocals + residual): shorter than half a chunk (zero pad), shorter than a
    chunk, exactly one, one more frame, several chunks with a ragged end; overlaps 1 (no border), 2, 4."""
    check_against_msst(repo, frames, num_overlap=overlap, **BS_VOCALS)


@pytest.mark.parametrize("overlap", [1, 2, 4])
@pytest.mark.parametrize("frames", [100, CHUNK, CHUNK + 1, 20011])
def test_mel_four_stems_equals_msst_demix(repo: Repo, frames: int, overlap: int) -> None:
    """Mel-Band RoFormer, 4 stems, no target: every instrument equals MSST's."""
    check_against_msst(repo, frames, num_overlap=overlap, **MEL_FOUR)


def test_file_source_and_longer_chunk_equal_msst_demix(repo: Repo, tmp_path: Path) -> None:
    """Read in place from a WAV file (SoundFileSource), chunk 17640, overlap 4."""
    check_against_msst(repo, 50021, source_kind="file", tmp_path=tmp_path, chunk_size=2 * CHUNK, num_overlap=4)


@pytest.mark.parametrize("network", ["bs_roformer", "mel_band_roformer"])
def test_batch_size_four_is_within_rounding_of_msst(repo: Repo, network: str) -> None:
    """MSST runs 4 chunks per forward and picks each batch's window by its first/last chunk; we run chunks
    one at a time with the same windows: equal within the rounding of a batched forward."""
    worst = check_against_msst(repo, 40000, network=network, batch_size=4, num_overlap=2)
    assert worst <= 1e-6


def test_mono_model_equals_msst_demix(repo: Repo) -> None:
    """A mono config (stereo: false). msst 0.1.0's demix duplicates every mono mix to stereo, which a mono
    network rejects, so the reference runs MSST's network on channel 0 of that duplicate (upstream MSST's
    demix, which does not duplicate; windows and padding act per frame, so this is the same computation)."""
    from msst.utils.model_utils import demix

    model, config, reference, network = repo.get(stereo=False, num_overlap=2)
    assert model.audio_channels == 1

    class OnChannelZero(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = reference(x[:, :1])
            return torch.cat([out, out], dim=-2)  # channel axis is -2 with or without a stem axis

    for frames in (5000, 30011):
        mix = song(frames, 1, seed=frames)
        ours = streamed(model, ArraySource(mix, SAMPLE_RATE))
        theirs = demix(config, OnChannelZero(), mix, "cpu", network)
        assert max_diff(ours["vocals"], theirs["vocals"]) <= TOLERANCE
        assert max_diff(ours["other"], mix - theirs["vocals"]) <= TOLERANCE


def test_mono_mix_duplicated_for_stereo_model_is_msst_channel_zero(repo: Repo) -> None:
    """msst 0.1.0 separates a mono mix with a stereo model by duplicating it and keeping channel 0: ours on
    the duplicated mix (what the service's channel conversion feeds) has that as channel 0."""
    model, config, reference, network = repo.get(num_overlap=2, **BS_VOCALS)
    mono = song(20000, 1)
    ours = model.separate(np.repeat(mono, 2, axis=0))
    theirs = msst_separate(config, reference, mono, network)
    assert theirs["vocals"].shape == (1, 20000)
    assert max_diff(ours["vocals"][:1], theirs["vocals"]) <= TOLERANCE


def test_normalize_equals_msst_inference(repo: Repo, tmp_path: Path) -> None:
    """inference.normalize: true feeds (mix - mean) / std and scales every stem back, as MSST's inference;
    the residual is mix - the de-normalised target. From an array and, in one streamed pass, a file."""
    model, config, reference, network = repo.get(normalize=True, num_overlap=2, **BS_VOCALS)
    assert model.config.normalize
    mix = song(30011) * 0.5 + 0.1  # an offset and a scale the normalisation removes
    theirs = msst_separate(config, reference, mix, network)
    ours = model.separate(mix)
    assert max_diff(ours["vocals"], theirs["vocals"]) <= TOLERANCE
    assert max_diff(ours["other"], mix - theirs["vocals"]) <= TOLERANCE
    path = tmp_path / "mix.wav"
    sf.write(path, mix.T, SAMPLE_RATE, subtype="FLOAT")
    with SoundFileSource(path) as source:
        from_file = streamed(model, source)
    assert max_diff(from_file["vocals"], theirs["vocals"]) <= TOLERANCE


@pytest.mark.parametrize(
    "overrides",
    [
        {"network": "mel_band_roformer", "linear_transformer_depth": None},  # KJ: the key absent (MSST's 0)
        {"network": "mel_band_roformer", "linear_transformer_depth": 1},
        {"network": "mel_band_roformer", "mlp_expansion_factor": 2},
        {"network": "bs_roformer", "mlp_expansion_factor": 2},
        {"network": "bs_roformer", "depth": 2},  # value residual (package-only) neutralised in layer 2
        {"network": "bs_roformer", "use_pope": True},
        {"network": "bs_roformer", "instruments": ("vocals", "drums", "rest"), "target": "drums"},
    ],
    ids=["mel-kj-no-linear-key", "mel-linear-1", "mel-mlp-2", "bs-mlp-2", "bs-depth-2", "bs-pope", "bs-3-instr"],
)
def test_model_options_equal_msst_demix(repo: Repo, overrides: dict[str, Any]) -> None:
    """The kwargs translation and key map hold for the options the configs in the wild use."""
    check_against_msst(repo, 20011, num_overlap=2, **overrides)


def test_target_among_all_stems_is_sliced_like_msst(repo: Repo) -> None:
    """num_stems == len(instruments) with a target: MSST keeps the target's output only."""
    model, *_ = repo.get(num_overlap=2, instruments=("vocals", "other"), target="vocals", num_stems=2)
    assert model.sources == ("vocals", "other") and model.config.num_stems == 2
    check_against_msst(repo, 20011, num_overlap=2, instruments=("vocals", "other"), target="vocals", num_stems=2)


def test_segment_is_msst_inference_chunk_size(repo: Repo) -> None:
    """options.segment replaces the chunk size (in whole hops), as MSST's inference.chunk_size does."""
    import copy

    model, config, reference, network = repo.get(num_overlap=2, **BS_VOCALS)
    mix = song(30011)
    ours = model.separate(mix, options=SeparationOptions(segment=0.3))  # 0.3 s = 30 hops of 441
    config = copy.deepcopy(config)
    config.inference.chunk_size = 13230
    theirs = msst_separate(config, reference, mix, network)
    assert max_diff(ours["vocals"], theirs["vocals"]) <= TOLERANCE
    with pytest.raises(InvalidInput, match="STFT window"):
        model.separate(mix, options=SeparationOptions(segment=0.01))


# --------------------------------------------------------------------------- streaming


class RecordingSource:
    """An ArraySource that records every read."""

    def __init__(self, mix: np.ndarray) -> None:
        self._inner = ArraySource(mix, SAMPLE_RATE)
        self.frames, self.channels, self.sample_rate = self._inner.frames, self._inner.channels, SAMPLE_RATE
        self.reads: list[tuple[int, int]] = []

    def read(self, start: int, stop: int) -> np.ndarray:
        self.reads.append((start, stop))
        return self._inner.read(start, stop)


def test_stream_equals_separate_in_bounded_reads(repo: Repo) -> None:
    """A 4 s song (40 chunks): the stream equals separate() bit for bit; no read spans more than a chunk;
    blocks come out while the song is still being read, each once no later chunk touches it."""
    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    mix = song(4 * SAMPLE_RATE + 123)
    whole = model.separate(mix)
    source = RecordingSource(mix)
    position = 0
    first_block_after = None
    parts: dict[str, list[np.ndarray]] = {name: [] for name in model.sources}
    for start, stems in model.separate_stream(source):
        assert start == position
        if first_block_after is None:
            first_block_after = max(stop for _, stop in source.reads)
        for name, audio in stems.items():
            parts[name].append(audio)
        position += next(iter(stems.values())).shape[-1]
        # Everything read so far lies within ~2 chunks past what was handed out.
        assert max(stop for _, stop in source.reads) <= position + 2 * CHUNK
    for name in model.sources:
        assert np.array_equal(np.concatenate(parts[name], axis=-1), whole[name])
    assert max(stop - start for start, stop in source.reads) <= CHUNK
    assert first_block_after is not None and first_block_after <= 2 * CHUNK


def test_split_false_computes_the_same(repo: Repo) -> None:
    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    mix = song(20011)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(
            model.separate(mix).values(),
            model.separate(mix, options=SeparationOptions(split=False)).values(),
            strict=True,
        )
    )


# --------------------------------------------------------------------------- options, progress, cancel


def test_shifts_above_one_refused_zero_and_one_are_one_pass(repo: Repo) -> None:
    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    mix = song(10000)
    with pytest.raises(InvalidInput, match="shifts=2 is a Demucs option: RoFormer models run one pass"):
        model.separate(mix, options=SeparationOptions(shifts=2))
    with pytest.raises(InvalidInput, match="Demucs option"):
        next(model.separate_stream(ArraySource(mix, SAMPLE_RATE), options=SeparationOptions(shifts=3)))
    one = model.separate(mix, options=SeparationOptions(shifts=1))
    zero = model.separate(mix, options=SeparationOptions(shifts=0))
    assert all(np.array_equal(one[name], zero[name]) for name in model.sources)


def test_two_stems_sums_the_others(repo: Repo) -> None:
    model, *_ = repo.get(num_overlap=2, **MEL_FOUR)
    mix = song(20011)
    every = model.separate(mix)
    two = streamed(model, ArraySource(mix, SAMPLE_RATE), options=SeparationOptions(two_stems="vocals"))
    assert list(two) == ["vocals", "no_vocals"]
    assert np.array_equal(two["vocals"], every["vocals"])
    assert np.allclose(two["no_vocals"], every["drums"] + every["bass"] + every["other"], atol=1e-6)


def test_progress_is_monotonic_and_cancel_stops_before_a_chunk(repo: Repo) -> None:
    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    mix = song(50000)
    seen: list[float] = []
    streamed(model, ArraySource(mix, SAMPLE_RATE), progress=seen.append)
    assert seen[0] == 0.0 and seen[-1] == 1.0 and len(seen) > 5
    assert all(b > a for a, b in zip(seen[:-1], seen[1:], strict=True))

    cancel = threading.Event()
    calls: list[float] = []

    def stop_after_two(fraction: float) -> None:
        calls.append(fraction)
        if len(calls) == 3:  # 0.0, then two chunks
            cancel.set()

    with pytest.raises(Cancelled):
        list(model.separate_stream(ArraySource(mix, SAMPLE_RATE), progress=stop_after_two, cancel=cancel))
    assert len(calls) == 3  # no chunk ran after the event was set
    with pytest.raises(Cancelled):
        model.separate(mix, cancel=cancel)


def test_info_and_wrong_mix_refused(repo: Repo) -> None:
    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    info = model.info
    assert (info.kind, info.sources, info.sample_rate, info.audio_channels) == (KIND, ("vocals", "other"), 44100, 2)
    assert info.max_segment is None and info.available and info.loaded and info.origin == "local_repo"
    assert info.description == "BS-RoFormer 16x1, vocals + other (other = mix - vocals), 0.2 s chunks, overlap 2"
    with pytest.raises(InvalidInput, match="2 channels"):
        model.separate(song(5000, 1))
    with pytest.raises(InvalidInput, match="2 channels"):
        next(model.separate_stream(ArraySource(song(5000, 1), SAMPLE_RATE)))
    with pytest.raises(InvalidInput, match="44100 Hz"):
        next(model.separate_stream(ArraySource(song(5000), 48000)))
    bad = song(5000)
    bad[0, 4000] = np.nan
    with pytest.raises(InvalidInput, match="finite"):
        list(model.separate_stream(ArraySource(bad, SAMPLE_RATE)))


# --------------------------------------------------------------------------- config loader


def test_released_configs_load_from_yaml_with_python_tuples(tmp_path: Path) -> None:
    """The released YAMLs (as MSST writes them: !!python/tuple) load with the safe loader plus that tag."""
    path = write_config(tmp_path / "model_bs_roformer_ep_317_sdr_12.9755.yaml", BS_ROFORMER_EP317)
    assert "!!python/tuple" in path.read_text()
    config = load_config(path)
    assert config.network == "bs_roformer"
    assert (config.chunk_size, config.num_overlap, config.batch_size) == (352800, 2, 4)
    assert (config.sample_rate, config.channels, config.target, config.normalize) == (44100, 2, "vocals", False)
    assert config.sources == ("vocals", "other") and config.instruments == ("vocals", "other")
    assert isinstance(config.model["freqs_per_bands"], tuple) and len(config.model["freqs_per_bands"]) == 62
    assert config.describe() == "BS-RoFormer 512x12, vocals + other (other = mix - vocals), 8.0 s chunks, overlap 2"
    kj = load_config(write_config(tmp_path / "kj.yaml", MEL_ROFORMER_KJ))
    assert kj.network == "mel_band_roformer" and "linear_transformer_depth" not in kj.model
    assert kj.describe().startswith("Mel-Band RoFormer 384x6, vocals + other")


def test_released_sizes_build_with_the_packages_parameter_counts() -> None:
    """Construction only (no forward): BS ep_317 has MSST's 159,758,092 plus 90,288 neutral value-residual
    parameters; KJ Mel (no linear attention, as MSST's default) 228,202,852."""
    for config, expected in ((BS_ROFORMER_EP317, 159_848_380), (MEL_ROFORMER_KJ, 228_202_852)):
        network = build_network(config_from_mapping(config), seed=0)
        assert sum(p.numel() for p in network.parameters()) == expected
        assert not network.training
        del network


def test_lists_load_as_tuples_and_seeded_builds_repeat(tmp_path: Path) -> None:
    """freqs_per_bands as a plain YAML list (the package's beartype wants a tuple); a seed gives the same
    weights and leaves the global generator alone."""
    data = roformer_config()
    data["model"]["freqs_per_bands"] = list(data["model"]["freqs_per_bands"])
    path = tmp_path / "lists.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert isinstance(config.model["freqs_per_bands"], tuple)
    state = torch.random.get_rng_state()
    a, b = build_network(config, seed=3), build_network(config, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_attention_kernel_and_training_keys_ignored(repo: Repo, tmp_path: Path) -> None:
    """sage_attention (older MSST) and use_torch_checkpoint change nothing at inference."""
    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    yaml_path, ckpt_path = write_roformer(tmp_path, "plain", num_overlap=2)
    data = yaml.load(yaml_path.read_text(), Loader=yaml.FullLoader)
    data["model"].update(sage_attention=True, use_torch_checkpoint=True, skip_connection=False)
    write_config(yaml_path, data)
    extra = RoformerModel.load(yaml_path, ckpt_path, name="plain", device="cpu")
    mix = song(10000)
    assert all(
        np.array_equal(a, b) for a, b in zip(extra.separate(mix).values(), model.separate(mix).values(), strict=True)
    )


def mutate(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, key = path.split(".")
    node = data
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[key]
    else:
        node[key] = value


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("model.skip_connection", True, "skip_connection: true is not supported"),
        ("model.linear_transformer_depth", 1, "linear_transformer_depth > 0 is not supported for a BS-RoFormer"),
        ("model.flux_capacitor", 3, "model.flux_capacitor is not an option of MSST's BS-RoFormer"),
        ("model.freqs_per_bands", DELETE, "cannot tell the network"),
        ("model.num_bands", 60, "cannot tell the network"),
        ("model.dim", DELETE, "model.dim is missing"),
        ("audio.chunk_size", 8821, "audio.chunk_size must be a positive multiple of model.stft_hop_length \\(441\\)"),
        ("inference.chunk_size", 0, "inference.chunk_size must be a positive multiple"),
        ("inference.num_overlap", 0, "inference.num_overlap must be an integer >= 1"),
        ("inference.num_overlap", DELETE, "inference.num_overlap is missing"),
        ("inference.batch_size", "four", "inference.batch_size must be an integer"),
        ("training.target_instrument", "piano", "training.target_instrument must be one of"),
        ("training.instruments", ["vocals", "vocals"], "must not repeat a name"),
        ("training.instruments", ["voc/als", "other"], "training.instruments must be a non-empty list of stem names"),
        ("training.model_type", "htdemucs", "training.model_type must be one of bs_roformer, mel_band_roformer"),
        ("model.num_stems", 3, "model.num_stems \\(3\\) must be 1 \\(the target\\)"),
        ("inference", DELETE, "the inference: block is missing"),
    ],
)
def test_bad_configs_refused_naming_file_and_key(tmp_path: Path, path: str, value: Any, message: str) -> None:
    data = roformer_config()
    mutate(data, path, value)
    yaml_path = write_config(tmp_path / "bad.yaml", data)
    with pytest.raises(ModelUnavailable, match=message) as caught:
        load_config(yaml_path)
    assert str(yaml_path) in str(caught.value)


def test_config_shapes_that_load(tmp_path: Path) -> None:
    """Residual names, inference.chunk_size over audio.chunk_size, model_type over detection, normalize."""
    three = roformer_config(instruments=("vocals", "drums", "rest"), target="vocals")
    assert load_config(write_config(tmp_path / "a.yaml", three)).sources == ("vocals", "no_vocals")
    data = roformer_config(normalize=True)
    data["inference"]["chunk_size"] = 4410
    data["training"]["model_type"] = "bs_roformer"
    config = load_config(write_config(tmp_path / "b.yaml", data))
    assert (config.chunk_size, config.network, config.normalize) == (4410, "bs_roformer", True)
    mono_four = roformer_config(network="mel_band_roformer", instruments=FOUR_STEMS, target=None, stereo=False)
    config = load_config(write_config(tmp_path / "c.yaml", mono_four))
    assert (config.sources, config.channels, config.network) == (FOUR_STEMS, 1, "mel_band_roformer")


def test_unsafe_or_broken_yaml_refused(tmp_path: Path) -> None:
    """Only !!python/tuple is allowed of the Python tags: a config cannot run code."""
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ModelUnavailable, match="evil.yaml is not valid YAML"):
        load_config(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ModelUnavailable, match="not valid YAML"):
        load_config(path)
    path.write_text("- just a list\n")
    with pytest.raises(ModelUnavailable, match="must be a mapping"):
        load_config(path)
    with pytest.raises(ModelUnavailable, match="missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("kwargs", [BS_VOCALS, MEL_FOUR], ids=["bs", "mel"])
def test_checkpoint_round_trips_to_msst_keys(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    """msst_state_dict inverts the key map: what the loaded network would save is the community's file."""
    yaml_path, ckpt_path = write_roformer(tmp_path, "rt", depth=2, **kwargs)
    config = load_config(yaml_path)
    original = torch.load(ckpt_path, weights_only=True)
    saved = msst_state_dict(load_checkpoint(ckpt_path, config), config)
    assert list(saved) == list(original)
    assert all(torch.equal(saved[key], original[key]) for key in original)


def test_wrapped_and_safetensors_checkpoints_load(repo: Repo, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, *_ = repo.get(num_overlap=2, **BS_VOCALS)
    yaml_path, ckpt_path = write_roformer(tmp_path, "w", num_overlap=2)
    state = torch.load(ckpt_path, weights_only=True)
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.ckpt")
    save_file(state, str(tmp_path / "w.safetensors"))
    mix = song(9000)
    expected = model.separate(mix)
    for path in (tmp_path / "wrapped.ckpt", tmp_path / "w.safetensors"):
        other = RoformerModel.load(yaml_path, path, name="w", device="cpu")
        assert all(np.array_equal(other.separate(mix)[name], expected[name]) for name in expected)


def test_missing_truncated_or_mismatched_checkpoints_refused(tmp_path: Path) -> None:
    bs_yaml, bs_ckpt = write_roformer(tmp_path, "bs")
    _, mel_ckpt = write_roformer(tmp_path, "mel", network="mel_band_roformer")
    _, wide_ckpt = write_roformer(tmp_path, "wide", dim=24)
    config = load_config(bs_yaml)
    with pytest.raises(ModelUnavailable, match="nothing.ckpt does not exist"):
        RoformerModel.load(bs_yaml, tmp_path / "nothing.ckpt", name="x")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(bs_ckpt.read_bytes()[: bs_ckpt.stat().st_size // 2])
    with pytest.raises(ModelUnavailable, match="truncated.ckpt cannot be read"):
        load_checkpoint(truncated, config)
    with pytest.raises(ModelUnavailable, match=r"mel.ckpt does not fit config .*bs.yaml.*missing .*unexpected"):
        load_checkpoint(mel_ckpt, config)
    with pytest.raises(ModelUnavailable, match=r"wide.ckpt does not fit .*wrong shape .*\(config: "):
        load_checkpoint(wide_ckpt, config)
    torch.save([1, 2, 3], tmp_path / "list.ckpt")
    with pytest.raises(ModelUnavailable, match="list.ckpt does not hold a state_dict"):
        load_checkpoint(tmp_path / "list.ckpt", config)
    with pytest.raises(ModelUnavailable, match="absent.yaml does not exist"):
        RoformerModel.load(tmp_path / "absent.yaml", bs_ckpt, name="x")
