"""Tiny RoFormer models saved the way the community saves them, and MSST's own inference on them.

:func:`write_roformer` builds Music-Source-Separation-Training's own network class
(``msst.models.bs_roformer``), seeded, and writes ``NAME.ckpt`` (``torch.save(model.state_dict())``,
as MSST's training does) beside ``NAME.yaml`` (``yaml.dump`` of the config, so tuples come out as
``!!python/tuple`` like the released configs). :func:`msst_reference` loads that pair back the way
MSST's inference does. msst is a test-only reference: it is imported inside the functions, so this
module imports without it (use ``pytest.importorskip("msst")``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Real band split of the released BS-RoFormers (62 bands over 1025 bins, n_fft 2048).
BS_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)

#: The real architectures, shrunk: dim 16, one layer, 2 heads of 8 (~0.7-4.5 M parameters,
#: ~10-30 ms per 0.2 s chunk on one core). Hop 441 as the released models.
TINY_MODEL: dict[str, Any] = {
    "dim": 16,
    "depth": 1,
    "time_transformer_depth": 1,
    "freq_transformer_depth": 1,
    "linear_transformer_depth": 0,
    "dim_head": 8,
    "heads": 2,
    "attn_dropout": 0.1,
    "ff_dropout": 0.1,
    "flash_attn": True,
    "dim_freqs_in": 1025,
    "stft_n_fft": 2048,
    "stft_hop_length": 441,
    "stft_win_length": 2048,
    "stft_normalized": False,
    "mask_estimator_depth": 2,
    "multi_stft_resolution_loss_weight": 1.0,
    "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
    "multi_stft_hop_size": 147,
    "multi_stft_normalized": False,
}

SAMPLE_RATE = 44100


def roformer_config(
    *,
    network: str = "bs_roformer",
    instruments: Sequence[str] = ("vocals", "other"),
    target: str | None = "vocals",
    num_overlap: int = 2,
    chunk_size: int = 8820,
    batch_size: int = 1,
    stereo: bool = True,
    normalize: bool | None = None,
    **model_overrides: Any,
) -> dict[str, Any]:
    """An MSST config (the YAML's shape) for a tiny model; a model override of None removes the key."""
    model: dict[str, Any] = {**TINY_MODEL, "stereo": stereo, "num_stems": 1 if target else len(instruments)}
    if network == "bs_roformer":
        model["freqs_per_bands"] = BS_BANDS
    else:
        model.update(num_bands=60, sample_rate=SAMPLE_RATE)
    for key, value in model_overrides.items():
        if value is None:
            model.pop(key, None)
        else:
            model[key] = value
    inference: dict[str, Any] = {"batch_size": batch_size, "num_overlap": num_overlap}
    if normalize is not None:
        inference["normalize"] = normalize
    return {
        "audio": {
            "chunk_size": chunk_size,
            "hop_length": 441,
            "n_fft": 2048,
            "num_channels": 2 if stereo else 1,
            "sample_rate": SAMPLE_RATE,
        },
        "model": model,
        "training": {
            "instruments": list(instruments),
            "target_instrument": target,
            "use_amp": True,
            "batch_size": 2,
            "optimizer": "adam",
        },
        "inference": inference,
    }


def write_config(path: Path, config: dict[str, Any]) -> Path:
    """``yaml.dump`` with PyYAML's default (unsafe) dumper, as MSST writes configs: tuples as ``!!python/tuple``."""
    import yaml

    path.write_text(yaml.dump(config, Dumper=yaml.Dumper, sort_keys=False))
    return path


def msst_network(config: dict[str, Any], network: str = "bs_roformer", seed: int = 0):
    """MSST's own network for ``config`` (what ``msst.utils.settings`` builds), seeded, in eval mode."""
    import torch
    from msst.models.bs_roformer import BSRoformer, MelBandRoformer

    klass = BSRoformer if network == "bs_roformer" else MelBandRoformer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = klass(**config["model"])
    return model.eval()


def write_roformer(
    folder: Path,
    name: str,
    *,
    network: str = "bs_roformer",
    instruments: Sequence[str] = ("vocals", "other"),
    target: str | None = "vocals",
    num_overlap: int = 2,
    chunk_size: int = 8820,
    batch_size: int = 1,
    stereo: bool = True,
    normalize: bool | None = None,
    seed: int = 0,
    **model_overrides: Any,
) -> tuple[Path, Path]:
    """A tiny random-weight RoFormer as the community shares it: ``folder/NAME.yaml`` + ``folder/NAME.ckpt``.

    The weights are MSST's own network's (``msst.models.bs_roformer``), ``torch.save``d as its
    ``state_dict``. Returns ``(yaml_path, ckpt_path)``.
    """
    import torch

    config = roformer_config(
        network=network,
        instruments=instruments,
        target=target,
        num_overlap=num_overlap,
        chunk_size=chunk_size,
        batch_size=batch_size,
        stereo=stereo,
        normalize=normalize,
        **model_overrides,
    )
    folder.mkdir(parents=True, exist_ok=True)
    yaml_path = write_config(folder / f"{name}.yaml", config)
    ckpt_path = folder / f"{name}.ckpt"
    torch.save(msst_network(config, network, seed).state_dict(), ckpt_path)
    return yaml_path, ckpt_path


def msst_reference(yaml_path: Path, ckpt_path: Path, network: str):
    """``(config, model)`` loaded the way MSST's inference loads them, strict.

    What ``msst.utils.settings.load_config`` + ``build_model_from_config`` do for a RoFormer
    (``ConfigDict(yaml.load(f, Loader=yaml.FullLoader))``, ``klass(**dict(config.model))``), spelled
    out because importing ``msst.utils.settings`` needs omegaconf, which msst's RoFormer path does not use.
    """
    import torch
    import yaml
    from ml_collections import ConfigDict
    from msst.models.bs_roformer import BSRoformer, MelBandRoformer

    with open(yaml_path) as f:
        config = ConfigDict(yaml.load(f, Loader=yaml.FullLoader))
    klass = BSRoformer if network == "bs_roformer" else MelBandRoformer
    model = klass(**dict(config.model))
    model.load_state_dict(torch.load(ckpt_path, map_location="cpu", weights_only=True))
    return config, model.eval()


def msst_separate(
    config, model, mix: np.ndarray, network: str, *, batch_size: int | None = None
) -> dict[str, np.ndarray]:
    """MSST's ``demix`` on ``mix`` (with ``inference.normalize`` as MSST's inference applies it).

    ``batch_size`` overrides ``inference.batch_size``. Returns MSST's stems (the target only, for a
    config with a target instrument).
    """
    import copy

    from msst.utils.model_utils import demix

    if batch_size is not None:
        config = copy.deepcopy(config)
        config.inference.batch_size = batch_size
    normalize = bool(config.inference.get("normalize", False))
    if normalize:
        # msst.utils.audio_utils.normalize_audio / denormalize_audio (msst 0.1.0), copied: that
        # module imports matplotlib at the top, which the reference does not otherwise need.
        mono = mix.mean(0)
        mean, std = mono.mean(), mono.std()
        if not np.isfinite(std) or std <= np.finfo(np.float32).eps:
            std = 1.0
        mix = (mix - mean) / std
    stems = demix(config, model, mix, "cpu", network)
    if normalize:
        stems = {name: audio * std + mean for name, audio in stems.items()}
    return stems
