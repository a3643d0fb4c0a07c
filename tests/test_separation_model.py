"""The separation model layer: options, DemucsModel, local repositories, the factory.

Everything runs offline on tiny models: demucs' built-in ``demucs_unittest`` and a
tiny HTDemucs saved into a temporary local repository.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from demucs.apply import BagOfModels, apply_model
from demucs.pretrained import get_model

from audiomesh.demo import synth_song
from audiomesh.errors import (
    AlreadyExists,
    Cancelled,
    ConfigError,
    InvalidInput,
    ModelUnavailable,
    NotFound,
)
from audiomesh.separation import (
    DemucsModel,
    ModelInfo,
    ModelSpec,
    SeparationOptions,
    SeparatorFactory,
    SeparatorModel,
    build_htdemucs,
    configure_torch_threads,
    resolve_device,
    save_model_to_repo,
)
from audiomesh.separation import registry as registry_module
from tests.helpers.models import make_tiny_htdemucs, make_tiny_repo

SOURCES = ("drums", "bass", "other", "vocals")


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A local repository holding a tiny HTDemucs as ``tiny_ht.th``."""
    return make_tiny_repo(tmp_path_factory.mktemp("repo"))


@pytest.fixture(scope="module")
def factory(tiny_repo: tuple[Path, str]) -> SeparatorFactory:
    return SeparatorFactory(model_repo=tiny_repo[0], device="cpu", allow_download=False)


@pytest.fixture(scope="module")
def tiny(factory: SeparatorFactory, tiny_repo: tuple[Path, str]) -> SeparatorModel:
    return factory.get(tiny_repo[1])


@pytest.fixture(scope="module")
def mix() -> np.ndarray:
    return synth_song(2.0)


def _direct(model: torch.nn.Module, mix: np.ndarray, seed: int, **kwargs) -> np.ndarray:
    """What demucs.api.Separator.separate_tensor computes: normalize, apply_model, denormalize."""
    wav = torch.from_numpy(mix)
    ref = wav.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    random.seed(seed)
    with torch.no_grad():
        out = apply_model(model, ((wav - mean) / std)[None], progress=False, num_workers=0, **kwargs)
    return (out[0] * std + mean).numpy()


def _separate(model: SeparatorModel, mix: np.ndarray, seed: int, **kwargs) -> dict[str, np.ndarray]:
    random.seed(seed)  # apply_model draws its shifts from the `random` module
    return model.separate(mix, options=SeparationOptions(**kwargs))


# -- separation ---------------------------------------------------------------------------


def test_demucs_unittest_returns_every_source_with_the_mix_shape(mix: np.ndarray) -> None:
    model = SeparatorFactory(allow_download=False).get("demucs_unittest", device="cpu")
    assert model.info.origin == "builtin"
    stems = model.separate(mix, options=SeparationOptions(shifts=0))
    assert tuple(stems) == SOURCES
    for audio in stems.values():
        assert audio.shape == mix.shape
        assert audio.dtype == np.float32
        assert np.isfinite(audio).all()
    # demucs_unittest has random weights: its sources do not sum back to the mix.


@pytest.mark.parametrize(
    "options",
    [
        {"shifts": 0},
        {"shifts": 1, "overlap": 0.5},
        {"shifts": 2, "segment": 0.5},
        {"shifts": 0, "split": False},
    ],
    ids=["plain", "shift-overlap", "two-shifts-short-segment", "no-split"],
)
def test_local_repo_model_equals_apply_model(
    tiny: SeparatorModel, tiny_repo: tuple[Path, str], mix: np.ndarray, options: dict
) -> None:
    mix = mix[:, : 44100 // 2] if not options.get("split", True) else mix
    direct_model = get_model(tiny_repo[1], repo=tiny_repo[0])
    expected = _direct(direct_model, mix, seed=7, **options)
    stems = _separate(tiny, mix, seed=7, **options)
    assert tuple(stems) == SOURCES
    got = np.stack(list(stems.values()))
    assert np.abs(got - expected).max() <= 1e-5


def test_saved_model_reloads_to_the_same_output(tiny: SeparatorModel, mix: np.ndarray) -> None:
    original = make_tiny_htdemucs()  # same seed as the saved one
    expected = _direct(original, mix, seed=3, shifts=1)
    got = np.stack(list(_separate(tiny, mix, seed=3, shifts=1).values()))
    assert np.abs(got - expected).max() <= 1e-5


def test_progress_is_monotonic_and_ends_at_one(tiny: SeparatorModel, mix: np.ndarray) -> None:
    seen: list[float] = []
    tiny.separate(mix, options=SeparationOptions(shifts=2), progress=seen.append)
    assert len(seen) >= 5  # 2 shifts x ~3 chunks of 1 s with 25 % overlap
    assert all(b > a for a, b in zip(seen, seen[1:], strict=False))
    assert seen[0] >= 0.0 and seen[-1] == 1.0


@pytest.mark.parametrize("when", ["first-call", "after-first-chunk"])
def test_cancel_from_progress_raises_cancelled(tiny: SeparatorModel, mix: np.ndarray, when: str) -> None:
    cancel = threading.Event()
    seen: list[float] = []

    def progress(fraction: float) -> None:
        seen.append(fraction)
        if when == "first-call" or fraction > 0:
            cancel.set()

    with pytest.raises(Cancelled, match="separation cancelled"):
        tiny.separate(mix, options=SeparationOptions(shifts=2), progress=progress, cancel=cancel)
    # Stopped at the next chunk boundary: no chunk ran after the event was set.
    if when == "first-call":
        assert seen == [0.0]
    else:
        assert len(seen) == 2 and 0.0 < seen[-1] < 1.0


def test_already_cancelled_does_not_start(tiny: SeparatorModel, mix: np.ndarray) -> None:
    cancel = threading.Event()
    cancel.set()
    seen: list[float] = []
    with pytest.raises(Cancelled):
        tiny.separate(mix, progress=seen.append, cancel=cancel)
    assert seen == []


def test_two_stems_gives_stem_and_sum_of_the_others(tiny: SeparatorModel, mix: np.ndarray) -> None:
    full = _separate(tiny, mix, seed=11, shifts=1)
    two = _separate(tiny, mix, seed=11, shifts=1, two_stems="vocals")
    assert set(two) == {"vocals", "no_vocals"}
    np.testing.assert_allclose(two["vocals"], full["vocals"], atol=1e-5)
    np.testing.assert_allclose(two["no_vocals"], full["drums"] + full["bass"] + full["other"], atol=1e-5)
    np.testing.assert_allclose(two["vocals"] + two["no_vocals"], sum(full.values()), atol=1e-5)


def test_bag_of_models_from_a_local_yaml(tmp_path: Path, mix: np.ndarray) -> None:
    bag = BagOfModels([make_tiny_htdemucs(seed=1), make_tiny_htdemucs(seed=2)])
    path = save_model_to_repo(bag, "tiny_bag", tmp_path)
    assert path.name == "tiny_bag.yaml"
    model = SeparatorFactory(tmp_path, device="cpu", allow_download=False).get("tiny_bag")
    seen: list[float] = []
    random.seed(5)
    got = model.separate(mix, options=SeparationOptions(shifts=1), progress=seen.append)
    expected = _direct(get_model("tiny_bag", repo=tmp_path), mix, seed=5, shifts=1)
    assert np.abs(np.stack(list(got.values())) - expected).max() <= 1e-5
    assert seen[-1] == 1.0 and all(b > a for a, b in zip(seen, seen[1:], strict=False))
    assert any(0.4 < f < 0.6 for f in seen)  # the first of the two models finished near half way


# -- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"shifts": -1}, r"shifts must be from 0 to 20"),
        ({"shifts": 21}, r"shifts must be from 0 to 20"),
        ({"shifts": 1.5}, r"shifts must be an integer"),
        ({"overlap": 1.0}, r"overlap must be in \[0, 1\)"),
        ({"overlap": -0.1}, r"overlap must be in \[0, 1\)"),
        ({"segment": 0.0}, r"segment must be > 0"),
        ({"segment": 2.0}, r"segment must be <= 1 s for model 'tiny_ht'"),
        ({"segment": 0.5, "split": False}, r"segment only applies with split=True"),
        ({"two_stems": "guitar"}, r"two_stems must be one of .*\(drums, bass, other, vocals\)"),
    ],
)
def test_invalid_options_state_the_rule(tiny: SeparatorModel, mix: np.ndarray, options: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        tiny.separate(mix, options=SeparationOptions(**options))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: m[0], r"shape \(channels, frames\)"),
        (lambda m: np.concatenate([m, m]), r"must have 2 channels"),
        (lambda m: m[:, :0], r"at least one frame"),
        (lambda m: np.where(np.arange(m.shape[1]) == 5, np.nan, m).astype(np.float32), r"finite"),
        (lambda m: (m * 1000).astype(np.int16), r"floating-point"),
    ],
    ids=["mono-1d", "four-channels", "empty", "nan", "int16"],
)
def test_invalid_mix_states_the_rule(tiny: SeparatorModel, mix: np.ndarray, make, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        tiny.separate(make(mix))


def test_no_split_longer_than_the_transformer_segment(tiny: SeparatorModel, mix: np.ndarray) -> None:
    with pytest.raises(InvalidInput, match=r"split=False .* at most 1 s per chunk.*use split=True"):
        tiny.separate(mix, options=SeparationOptions(split=False, shifts=0))


def test_device_and_threads_validation() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in {"cpu", "cuda"}
    with pytest.raises(InvalidInput, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        resolve_device("gpu")
    with pytest.raises(InvalidInput, match=">= 1"):
        configure_torch_threads(0)
    assert configure_torch_threads(None) == torch.get_num_threads()


# -- the factory ----------------------------------------------------------------------


def test_unknown_model_is_not_found_and_lists_names(factory: SeparatorFactory) -> None:
    with pytest.raises(NotFound, match=r"unknown model 'nope'; available models: demucs_unittest, tiny_ht"):
        factory.get("nope")


def test_pretrained_offline_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # No cached weights (whatever this machine has), and download hosts that cannot resolve.
    monkeypatch.setattr(registry_module, "_hf_cached", lambda name: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(registry_module, "_DOWNLOAD_HOSTS", ("weights.audiomesh.invalid",))
    factory = SeparatorFactory(allow_download=True, probe_timeout=3.0, device="cpu")
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match=r"AUDIOMESH_MODEL_REPO=.*955717e8-8726e21a\.th") as info:
        factory.get("htdemucs")
    assert time.monotonic() - start < 15
    assert "model 'htdemucs' weights are not available offline" in str(info.value)
    assert "demucs_unittest" in str(info.value)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable, match="not available offline"):
        SeparatorFactory(allow_download=False).get("htdemucs_6s")
    assert time.monotonic() - start < 1


def test_pretrained_name_from_th_files_without_yaml(tmp_path: Path, mix: np.ndarray) -> None:
    """Real releases are <sig>-<sha256[:8]>.th; the bundled demucs/remote/htdemucs.yaml names them."""
    saved = save_model_to_repo(make_tiny_htdemucs(), "955717e8", tmp_path)
    checksum = hashlib.sha256(saved.read_bytes()).hexdigest()[:8]
    saved.rename(tmp_path / f"955717e8-{checksum}.th")
    model = SeparatorFactory(tmp_path, device="cpu", allow_download=False).get("htdemucs")
    assert model.info.origin == "local_repo"
    assert set(model.separate(mix[:, :22050], options=SeparationOptions(shifts=0))) == set(SOURCES)

    (tmp_path / f"955717e8-{checksum}.th").rename(tmp_path / "955717e8-00000000.th")
    with pytest.raises(ModelUnavailable, match="Invalid checksum"):
        SeparatorFactory(tmp_path, allow_download=False).get("htdemucs")


def _write_hf_cache(cache: Path, model: torch.nn.Module) -> None:
    """The HuggingFace cache layout of adefossez/HTDemucs, in demucs 4.1's safetensors format."""
    import json

    from safetensors.torch import save_file

    snapshot = cache / "models--adefossez--HTDemucs" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (cache / "models--adefossez--HTDemucs" / "refs").mkdir()
    (cache / "models--adefossez--HTDemucs" / "refs" / "main").write_text("0123abcd")
    (snapshot / "htdemucs.yaml").write_text("models: ['955717e8']\n")
    args, kwargs = model._init_args_kwargs
    segment = kwargs["segment"]
    kwargs = {
        **kwargs,
        "segment": {"_type": "fraction", "numerator": segment.numerator, "denominator": segment.denominator},
    }
    metadata = {"klass": "demucs.htdemucs.HTDemucs", "args": json.dumps(list(args)), "kwargs": json.dumps(kwargs)}
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(snapshot / "955717e8.safetensors"), metadata=metadata)


@pytest.mark.parametrize("cache", ["huggingface", "torch-hub"])
def test_pretrained_name_from_the_download_caches(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mix: np.ndarray, cache: str
) -> None:
    """Weights demucs downloaded earlier (HF hub in 4.1, AWS via torch.hub before) load offline."""
    import huggingface_hub.constants

    hub = tmp_path / "torch-hub"
    (hub / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    original = make_tiny_htdemucs(seed=4)
    if cache == "huggingface":
        _write_hf_cache(tmp_path / "hf", original)
    else:
        saved = save_model_to_repo(original, "955717e8", hub / "checkpoints")
        saved.rename(saved.with_name(f"955717e8-{hashlib.sha256(saved.read_bytes()).hexdigest()[:8]}.th"))
    factory = SeparatorFactory(device="cpu", allow_download=False)
    assert {i.name: i.available for i in factory.list_models()}["htdemucs"] is True
    model = factory.get("htdemucs")
    assert model.info.origin == "pretrained"
    short = mix[:, :22050]
    expected = _direct(original, short, seed=0, shifts=0)
    got = np.stack(list(model.separate(short, options=SeparationOptions(shifts=0)).values()))
    assert np.abs(got - expected).max() <= 1e-5


def test_bag_yaml_with_a_missing_model_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("models: ['cafe1234']\n")
    factory = SeparatorFactory(tmp_path, allow_download=False)
    with pytest.raises(ModelUnavailable, match=r"broken\.yaml lists cafe1234 but .* no cafe1234\.th"):
        factory.get("broken")
    assert {i.name: i.available for i in factory.list_models()}["broken"] is False


def test_factory_caches_models(factory: SeparatorFactory, tiny_repo: tuple[Path, str]) -> None:
    first = factory.get(tiny_repo[1])
    assert factory.get(tiny_repo[1]) is first
    assert factory.get(tiny_repo[1], device="cpu") is first


def test_concurrent_first_get_loads_once(tiny_repo: tuple[Path, str]) -> None:
    factory = SeparatorFactory(tiny_repo[0], device="cpu", allow_download=False)
    build = factory.builder("demucs")
    calls: list[str] = []

    def slow_build(spec: ModelSpec, device: str) -> SeparatorModel:
        calls.append(spec.name)
        time.sleep(0.2)
        return build(spec, device)

    factory.register("demucs", slow_build)
    barrier = threading.Barrier(6)
    results: list[SeparatorModel] = []

    def worker() -> None:
        barrier.wait()
        results.append(factory.get(tiny_repo[1]))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert calls == [tiny_repo[1]]
    assert len(results) == 6 and all(r is results[0] for r in results)


def test_list_models_marks_origin_availability_and_loading(tiny_repo: tuple[Path, str]) -> None:
    factory = SeparatorFactory(tiny_repo[0], device="cpu", allow_download=False)
    infos = {info.name: info for info in factory.list_models()}
    assert {"demucs_unittest", "tiny_ht", "htdemucs", "htdemucs_6s"} <= set(infos)
    assert infos["tiny_ht"].origin == "local_repo" and infos["tiny_ht"].sources == SOURCES
    assert infos["tiny_ht"].max_segment == 1.0
    assert infos["demucs_unittest"].available and not infos["demucs_unittest"].loaded
    assert infos["htdemucs_6s"].origin == "pretrained" and len(infos["htdemucs_6s"].sources) == 6
    factory.get("tiny_ht")
    assert {info.name: info for info in factory.list_models()}["tiny_ht"].loaded


class _HalfAndHalf(SeparatorModel):
    """A toy separator: two sources, each half the mix."""

    def __init__(self, name: str) -> None:
        self.info = ModelInfo(name, ("left", "right"), 44100, 2, "builtin", "toy", kind="toy")

    def _separate_sources(self, mix, *, options, progress, cancel):
        progress(0.5)
        return {"left": mix * 0.5, "right": mix * 0.5}


def test_another_separator_kind_plugs_in_by_name(mix: np.ndarray) -> None:
    factory = SeparatorFactory(allow_download=False, device="cpu")
    info = ModelInfo("halves", ("left", "right"), 44100, 2, "builtin", "toy", kind="toy")
    factory.register(
        "toy", lambda spec, device: _HalfAndHalf(spec.name), specs=[ModelSpec("halves", "toy", "builtin", info=info)]
    )
    model = factory.get("halves")
    stems = model.separate(mix, options=SeparationOptions(two_stems="left"))
    np.testing.assert_allclose(stems["left"] + stems["no_left"], mix, atol=1e-6)
    assert "halves" in {i.name for i in factory.list_models()}


# -- the repository helpers -------------------------------------------------------------


def test_save_model_to_repo_rules(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no '-'"):
        save_model_to_repo(make_tiny_htdemucs(), "bad-name", tmp_path)
    with pytest.raises(InvalidInput, match="capture_init"):
        save_model_to_repo(torch.nn.Linear(2, 2), "linear", tmp_path)
    (tmp_path / "dup-12345678.th").write_bytes(b"")
    with pytest.raises(AlreadyExists, match="signature 'dup'"):
        save_model_to_repo(make_tiny_htdemucs(), "dup", tmp_path)
    package = torch.load(save_model_to_repo(make_tiny_htdemucs(), "ok", tmp_path), weights_only=False)
    assert set(package) == {"klass", "args", "kwargs", "state", "training_args"}
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_build_htdemucs_has_the_released_configuration() -> None:
    model = build_htdemucs()
    assert model.sources == list(SOURCES) and model.samplerate == 44100 and model.audio_channels == 2
    assert model.segment == Fraction(39, 5)
    assert sum(p.numel() for p in model.parameters()) == 41_984_456  # htdemucs: 84 MB in float16
    state = torch.get_rng_state()
    a, b = build_htdemucs(seed=1, **_TINY), build_htdemucs(seed=1, **_TINY)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


_TINY = {"channels": 8, "bottom_channels": 0, "t_layers": 1}


def test_missing_model_repo_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="AUDIOMESH_MODEL_REPO"):
        SeparatorFactory(tmp_path / "absent")


def test_demucs_model_wraps_a_module_directly(mix: np.ndarray) -> None:
    model = DemucsModel(make_tiny_htdemucs(), name="direct", device="cpu")
    assert model.max_segment == 1.0 and model.device == "cpu"
    assert "HTDemucs" in model.info.description
    stems = model.separate(mix[:, :4410], options=SeparationOptions(shifts=0))
    assert all(a.shape == (2, 4410) for a in stems.values())
