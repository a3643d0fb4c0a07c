"""BS-RoFormer and Mel-Band RoFormer behind the :class:`~audiomesh.separation.base.SeparatorModel` interface.

The community trains and shares these models with Music-Source-Separation-Training (MSST): a
checkpoint (``NAME.ckpt``, a plain ``state_dict``) beside its YAML config (``NAME.yaml``: the
network's hyper-parameters under ``model:``, ``audio.chunk_size`` / ``sample_rate``,
``inference.num_overlap`` / ``batch_size``, ``training.instruments`` / ``target_instrument``).
This module runs such a pair without MSST:

* the network is the ``bs-roformer`` package's (lucidrains, pinned 1.2.4), built with the
  keyword arguments that make it compute MSST's network (:func:`build_network`: hyper-connections
  off, value residual off or neutralised, MSST's ``zero_dc`` default, ``mlp_expansion_factor``
  through rebuilt mask estimators); MSST checkpoint keys are mapped onto the package's module
  layout (:func:`load_checkpoint`; :func:`msst_state_dict` is the inverse);
* the inference is MSST's generic ``demix`` (``msst.utils.model_utils.demix``), recomputed chunk by
  chunk in bounded memory (:class:`_Geometry`, :meth:`RoformerModel.separate_stream`): chunks of
  ``chunk_size`` every ``chunk_size // num_overlap`` frames over the mix reflect-padded by
  ``chunk_size - step`` at both ends (only when the mix is longer than twice that), a short last
  chunk right-padded (reflect when longer than half a chunk, else zeros), MSST's linear-fade window
  (no fade-in on the first batch, no fade-out on the last), weighted sums divided by the summed
  weights, NaN (0/0) set to 0. The same float32 operations in the same order: with
  ``inference.batch_size: 1`` the stems equal MSST's bit for bit; MSST runs ``batch_size`` chunks
  in one batched forward, which rounds differently (measured <= 2e-8 with batch_size 4), while the
  windows (decided per batch in MSST) are reproduced exactly.

With ``training.target_instrument`` set, the model delivers the target and the residual
``mix - target`` (MSST's ``--extract_instrumental``, computed from the de-normalised target), named
after the other instrument when the config lists exactly two (``("vocals", "other")``), else
``"no_" + target``.
"""

from __future__ import annotations

import importlib
import math
import re
import threading
import types
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml

from audiomesh.audio.stream import ArraySource, MixSource
from audiomesh.errors import Cancelled, InvalidInput, ModelUnavailable
from audiomesh.separation.base import (
    ModelInfo,
    Origin,
    ProgressFn,
    SeparationOptions,
    SeparatorModel,
    _MonotonicProgress,
    _two_stems,
    resolve_device,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "BS_ROFORMER_EP317",
    "KIND",
    "MEL_ROFORMER_KJ",
    "ROFORMER_NETWORKS",
    "RoformerConfig",
    "RoformerModel",
    "build_network",
    "config_from_mapping",
    "load_checkpoint",
    "load_config",
    "msst_state_dict",
]

# bs_roformer/attend.py enters torch.backends.cuda.sdp_kernel() on every attention call, which
# warns each time that it is deprecated: noise in every separation's log, nothing to act on.
warnings.filterwarnings(
    "ignore", message=r"`torch\.backends\.cuda\.sdp_kernel\(\)` is deprecated", category=FutureWarning
)

#: The registry kind.
KIND = "roformer"

#: The networks this module builds (MSST's ``model_type`` names).
ROFORMER_NETWORKS = ("bs_roformer", "mel_band_roformer")

_TITLES = {"bs_roformer": "BS-RoFormer", "mel_band_roformer": "Mel-Band RoFormer"}

#: ``model:`` keys of MSST's BSRoformer / MelBandRoformer (MSST ccc011a, msst 0.1.0), plus
#: ``sage_attention``, which MSST had from 2025-05 to 2026-01 (an attention kernel choice only).
_MSST_COMMON_KEYS = frozenset(
    {
        "dim",
        "depth",
        "stereo",
        "num_stems",
        "time_transformer_depth",
        "freq_transformer_depth",
        "linear_transformer_depth",
        "dim_head",
        "heads",
        "attn_dropout",
        "ff_dropout",
        "flash_attn",
        "dim_freqs_in",
        "stft_n_fft",
        "stft_hop_length",
        "stft_win_length",
        "stft_normalized",
        "zero_dc",
        "mask_estimator_depth",
        "multi_stft_resolution_loss_weight",
        "multi_stft_resolutions_window_sizes",
        "multi_stft_hop_size",
        "multi_stft_normalized",
        "mlp_expansion_factor",
        "use_torch_checkpoint",
        "skip_connection",
        "use_pope",
        "sage_attention",
    }
)
_MSST_KEYS = {
    "bs_roformer": _MSST_COMMON_KEYS | {"freqs_per_bands"},
    "mel_band_roformer": _MSST_COMMON_KEYS | {"num_bands", "sample_rate", "match_input_audio_length"},
}

#: Model keys that only matter for training or pick an attention kernel: dropped before building.
_IGNORED_KEYS = ("use_torch_checkpoint", "sage_attention")

#: The package's value-residual mixing (BS always has it past the first layer; MSST has none):
#: sigmoid(0 * x - 1e4) == 0 exactly, so ``v.lerp(residual, 0) == v`` and the layer computes MSST's.
_VALUE_RESIDUAL = re.compile(r"\.to_value_residual_mix\.(weight|bias)$")
_NEUTRAL_BIAS = -1e4

_BS_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
_MULTI_STFT = {
    "multi_stft_resolution_loss_weight": 1.0,
    "multi_stft_resolutions_window_sizes": (4096, 2048, 1024, 512, 256),
    "multi_stft_hop_size": 147,
    "multi_stft_normalized": False,
}

#: viperx' BS-RoFormer ``model_bs_roformer_ep_317_sdr_12.9755`` (MSST's
#: ``configs/viperx/model_bs_roformer_ep_317_sdr_12.9755.yaml``; training keys that inference
#: does not read left out): 159,848,380 parameters in the package. For benchmarks with random
#: weights: ``build_network(config_from_mapping(BS_ROFORMER_EP317), seed=0)``.
BS_ROFORMER_EP317: dict[str, Any] = {
    "audio": {"chunk_size": 352800, "hop_length": 441, "n_fft": 2048, "num_channels": 2, "sample_rate": 44100},
    "model": {
        "dim": 512,
        "depth": 12,
        "stereo": True,
        "num_stems": 1,
        "time_transformer_depth": 1,
        "freq_transformer_depth": 1,
        "linear_transformer_depth": 0,
        "freqs_per_bands": _BS_BANDS,
        "dim_head": 64,
        "heads": 8,
        "attn_dropout": 0.1,
        "ff_dropout": 0.1,
        "flash_attn": True,
        "dim_freqs_in": 1025,
        "stft_n_fft": 2048,
        "stft_hop_length": 441,
        "stft_win_length": 2048,
        "stft_normalized": False,
        "mask_estimator_depth": 2,
        **_MULTI_STFT,
    },
    "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals", "use_amp": True},
    "inference": {"batch_size": 4, "dim_t": 801, "num_overlap": 2},
}

#: Kimberley Jensen's vocals Mel-Band RoFormer (MSST's
#: ``configs/KimberleyJensen/config_vocals_mel_band_roformer_kj.yaml``): no
#: ``linear_transformer_depth`` (MSST's default 0; the package's is 1). 228,202,852 parameters.
MEL_ROFORMER_KJ: dict[str, Any] = {
    "audio": {"chunk_size": 352800, "hop_length": 441, "n_fft": 2048, "num_channels": 2, "sample_rate": 44100},
    "model": {
        "dim": 384,
        "depth": 6,
        "stereo": True,
        "num_stems": 1,
        "time_transformer_depth": 1,
        "freq_transformer_depth": 1,
        "num_bands": 60,
        "dim_head": 64,
        "heads": 8,
        "attn_dropout": 0,
        "ff_dropout": 0,
        "flash_attn": True,
        "dim_freqs_in": 1025,
        "sample_rate": 44100,
        "stft_n_fft": 2048,
        "stft_hop_length": 441,
        "stft_win_length": 2048,
        "stft_normalized": False,
        "mask_estimator_depth": 2,
        **_MULTI_STFT,
    },
    "training": {"instruments": ["vocals", "other"], "target_instrument": "vocals", "use_amp": True},
    "inference": {"batch_size": 4, "dim_t": 256, "num_overlap": 2},
}

#: Stem names become file names and API keys.
_STEM_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")


# --------------------------------------------------------------------------- config


@dataclass(frozen=True)
class RoformerConfig:
    """What an MSST YAML says about one RoFormer model (see :func:`load_config`).

    Attributes
    ----------
    network : {"bs_roformer", "mel_band_roformer"}
        ``training.model_type`` when present, else detected: ``model.freqs_per_bands`` is a
        BS-RoFormer, ``model.num_bands`` a Mel-Band RoFormer.
    model : mapping
        The ``model:`` block as written (read-only; sequences as tuples).
    chunk_size : int
        Frames per chunk: ``inference.chunk_size`` when present, else ``audio.chunk_size``.
    num_overlap : int
        Chunks start every ``chunk_size // num_overlap`` frames.
    batch_size : int
        ``inference.batch_size`` (default 1). MSST runs that many chunks per forward and picks the
        fade-in/fade-out of a whole batch by its first/last chunk; :class:`RoformerModel` runs
        chunks one at a time with those same windows, so it equals MSST bit for bit when it is 1
        and within float32 rounding of a batched matmul (<= ~2e-8 measured) otherwise.
    sample_rate : int
        ``audio.sample_rate`` (default 44100, as MSST).
    channels : int
        2 if ``model.stereo`` else 1.
    instruments : tuple of str
        ``training.instruments``.
    target : str or None
        ``training.target_instrument``.
    normalize : bool
        ``inference.normalize is True``: the mix is fed as ``(mix - mean) / std`` of its channel
        mean and every stem is scaled back.
    sources : tuple of str
        What the model delivers, in order: ``instruments`` without a target; else
        ``(target, residual)``, the residual ``mix - target`` named after the other instrument when
        there are exactly two, else ``"no_" + target``.
    use_amp : bool
        ``training.use_amp`` (default True): float16 autocast on CUDA, as MSST (never on CPU).
    origin : str
        Where the config came from (the YAML's path), for messages.
    """

    network: str
    model: Mapping[str, Any]
    chunk_size: int
    num_overlap: int
    batch_size: int
    sample_rate: int
    channels: int
    instruments: tuple[str, ...]
    target: str | None
    normalize: bool
    sources: tuple[str, ...]
    use_amp: bool = True
    origin: str = "<config>"

    @property
    def hop_length(self) -> int:
        """``model.stft_hop_length`` (the package's default 512 when absent)."""
        return int(self.model.get("stft_hop_length", 512))

    @property
    def num_stems(self) -> int:
        """Outputs of the network (``model.num_stems``, default 1)."""
        return int(self.model.get("num_stems", 1))

    @property
    def residual(self) -> str | None:
        """The name of the ``mix - target`` stem, or None without a target."""
        return self.sources[1] if self.target is not None else None

    @property
    def title(self) -> str:
        """The network's name: ``"BS-RoFormer"`` or ``"Mel-Band RoFormer"``."""
        return _TITLES[self.network]

    def shape(self) -> str:
        """Size and chunking, e.g. ``"512x12 (dim x depth), 8.0 s chunks, overlap 2"``."""
        seconds = self.chunk_size / self.sample_rate
        size = f"{self.model.get('dim')}x{self.model.get('depth')} (dim x depth)"
        return f"{size}, {seconds:.1f} s chunks, overlap {self.num_overlap}"

    def describe(self) -> str:
        """One line for humans, e.g. ``"BS-RoFormer 512x12, vocals + other (other = mix - vocals), 8.0 s chunks, overlap 2"``."""
        size = f"{self.model.get('dim')}x{self.model.get('depth')}"
        if self.target is not None:
            stems = f"{self.target} + {self.residual} ({self.residual} = mix - {self.target})"
        else:
            stems = ", ".join(self.sources)
        seconds = self.chunk_size / self.sample_rate
        return f"{self.title} {size}, {stems}, {seconds:.1f} s chunks, overlap {self.num_overlap}"


class _MsstLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus the one Python tag MSST configs use (``!!python/tuple``)."""


def _construct_tuple(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[Any, ...]:
    assert isinstance(node, yaml.SequenceNode)
    return tuple(loader.construct_sequence(node, deep=True))


_MsstLoader.add_constructor("tag:yaml.org,2002:python/tuple", _construct_tuple)


def load_config(path: Path) -> RoformerConfig:
    """Read an MSST RoFormer config (YAML, ``!!python/tuple`` allowed; nothing else executable).

    Raises
    ------
    ModelUnavailable
        The file is missing or unreadable, or the config is not one this module can run: the
        message names the file and the key (missing blocks or keys, bad values, unsupported
        features such as ``skip_connection: true`` or a BS-RoFormer with linear attention).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelUnavailable(f"RoFormer config {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelUnavailable(f"RoFormer config {path} cannot be read: {error}") from error
    try:
        data = yaml.load(text, Loader=_MsstLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ModelUnavailable(
            f"RoFormer config {path} is not valid YAML (safe, plus !!python/tuple): {error}"
        ) from error
    return config_from_mapping(data, origin=str(path))


def config_from_mapping(data: Any, *, origin: str = "<config>") -> RoformerConfig:
    """:func:`load_config` for a config already parsed (e.g. :data:`BS_ROFORMER_EP317`).

    Raises
    ------
    ModelUnavailable
        As :func:`load_config`; messages start with ``origin``.
    """

    def fail(message: str) -> ModelUnavailable:
        return ModelUnavailable(f"RoFormer config {origin}: {message}")

    if not isinstance(data, Mapping):
        raise fail(f"must be a mapping with model:, audio:, training: and inference: blocks, got {type(data).__name__}")
    blocks: dict[str, Mapping[str, Any]] = {}
    for name in ("model", "audio", "training", "inference"):
        block = data.get(name)
        if not isinstance(block, Mapping):
            raise fail(f"the {name}: block is missing" if block is None else f"{name}: must be a mapping")
        blocks[name] = block
    model_block, audio, training, inference = (blocks[k] for k in ("model", "audio", "training", "inference"))
    model = {str(key): _tuples(value) for key, value in model_block.items()}

    def integer(block: str, key: str, value: Any, minimum: int = 1) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise fail(f"{block}.{key} must be an integer >= {minimum}, got {value!r}")
        return value

    # which network
    model_type = training.get("model_type")
    if model_type is not None:
        if model_type not in ROFORMER_NETWORKS:
            raise fail(f"training.model_type must be one of {', '.join(ROFORMER_NETWORKS)}, got {model_type!r}")
        network = str(model_type)
    elif ("freqs_per_bands" in model) == ("num_bands" in model):
        raise fail(
            "cannot tell the network: model.freqs_per_bands (BS-RoFormer) or model.num_bands "
            "(Mel-Band RoFormer) must be present, exactly one of them (or set training.model_type)"
        )
    else:
        network = "bs_roformer" if "freqs_per_bands" in model else "mel_band_roformer"

    for key in ("dim", "depth"):
        if key not in model:
            raise fail(f"model.{key} is missing")
        integer("model", key, model[key])
    unknown = sorted(set(model) - _MSST_KEYS[network])
    if unknown:
        raise fail(
            f"model.{unknown[0]} is not an option of MSST's {_TITLES[network]} "
            f"(unknown: {', '.join(unknown)}); bs-roformer cannot reproduce it"
        )
    if model.get("skip_connection", False):
        raise fail("model.skip_connection: true is not supported (the bs-roformer package has no skip connections)")
    if network == "bs_roformer" and model.get("linear_transformer_depth", 0):
        raise fail(
            "model.linear_transformer_depth > 0 is not supported for a BS-RoFormer "
            "(the bs-roformer package's BSRoformer has no linear attention)"
        )
    if network == "bs_roformer":
        bands = model["freqs_per_bands"]
        if not isinstance(bands, tuple) or not all(isinstance(b, int) and b >= 1 for b in bands):
            raise fail(f"model.freqs_per_bands must be a list of positive integers, got {bands!r}")
    stereo = model.get("stereo", False)
    if not isinstance(stereo, bool):
        raise fail(f"model.stereo must be true or false, got {stereo!r}")
    hop = integer("model", "stft_hop_length", model.get("stft_hop_length", 512))
    num_stems = integer("model", "num_stems", model.get("num_stems", 1))
    mlp = model.get("mlp_expansion_factor", 4)
    integer("model", "mlp_expansion_factor", mlp)

    # chunking
    if "chunk_size" in inference:
        chunk_key, chunk_size = "inference.chunk_size", inference["chunk_size"]
    elif "chunk_size" in audio:
        chunk_key, chunk_size = "audio.chunk_size", audio["chunk_size"]
    else:
        raise fail("audio.chunk_size is missing")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 or chunk_size % hop:
        raise fail(
            f"{chunk_key} must be a positive multiple of model.stft_hop_length ({hop}): the network returns "
            f"whole hops only, got {chunk_size!r}"
        )
    if "num_overlap" not in inference:
        raise fail("inference.num_overlap is missing")
    num_overlap = integer("inference", "num_overlap", inference["num_overlap"])
    if num_overlap > chunk_size:
        raise fail(f"inference.num_overlap ({num_overlap}) must be <= the chunk size ({chunk_size} frames)")
    batch_size = integer("inference", "batch_size", inference.get("batch_size", 1))
    sample_rate = integer("audio", "sample_rate", audio.get("sample_rate", 44100))

    # stems
    instruments = training.get("instruments")
    if (
        not isinstance(instruments, list | tuple)
        or not instruments
        or not all(isinstance(name, str) and _STEM_NAME.match(name) for name in instruments)
    ):
        raise fail(
            "training.instruments must be a non-empty list of stem names (letters, digits, '_', '.', '-'), "
            f"got {instruments!r}"
        )
    if len(set(instruments)) != len(instruments):
        raise fail(f"training.instruments must not repeat a name, got {list(instruments)}")
    target = training.get("target_instrument")
    if target is not None and target not in instruments:
        raise fail(
            f"training.target_instrument must be one of training.instruments {list(instruments)}, got {target!r}"
        )
    if target is None:
        if num_stems != len(instruments):
            raise fail(
                f"model.num_stems ({num_stems}) must equal the number of training.instruments "
                f"({len(instruments)}) when there is no training.target_instrument"
            )
        sources = tuple(instruments)
    else:
        if num_stems not in (1, len(instruments)):
            raise fail(
                f"model.num_stems ({num_stems}) must be 1 (the target) or the number of training.instruments "
                f"({len(instruments)}) with training.target_instrument {target!r}"
            )
        others = [name for name in instruments if name != target]
        residual = others[0] if len(instruments) == 2 else f"no_{target}"
        if residual == target:
            raise fail(f"the residual stem's name {residual!r} clashes with the target's")
        sources = (target, residual)
    use_amp = training.get("use_amp", True)
    return RoformerConfig(
        network=network,
        model=types.MappingProxyType(model),
        chunk_size=chunk_size,
        num_overlap=num_overlap,
        batch_size=batch_size,
        sample_rate=sample_rate,
        channels=2 if stereo else 1,
        instruments=tuple(instruments),
        target=target,
        normalize=inference.get("normalize") is True,
        sources=sources,
        use_amp=bool(use_amp),
        origin=origin,
    )


def _tuples(value: Any) -> Any:
    """Lists as tuples, at any depth (the package's ``@beartype`` rejects a list for a tuple)."""
    if isinstance(value, list | tuple):
        return tuple(_tuples(item) for item in value)
    return value


# --------------------------------------------------------------------------- network


def _package_kwargs(config: RoformerConfig) -> tuple[dict[str, Any], int]:
    """The package constructor's keyword arguments that compute MSST's network, and MSST's mlp factor."""
    kwargs = dict(config.model)
    for key in _IGNORED_KEYS:
        kwargs.pop(key, None)
    kwargs.pop("skip_connection", None)  # only False gets here (load_config refuses True)
    mlp = int(kwargs.pop("mlp_expansion_factor", 4))
    linear = kwargs.pop("linear_transformer_depth", 0)
    if config.network == "mel_band_roformer":
        # MSST's default is 0 (the package's 1); MSST's Mel has no value residual.
        kwargs.update(linear_transformer_depth=linear, add_value_residual=False)
    kwargs.setdefault("zero_dc", True)  # MSST's default (the package's is False)
    kwargs["num_residual_streams"] = 1  # hyper-connections off: a plain residual, as MSST
    return kwargs, mlp


def build_network(config: RoformerConfig, *, seed: int | None = None) -> nn.Module:
    """The ``bs-roformer`` package's network for ``config``, computing MSST's, in eval mode.

    Parameters
    ----------
    config : RoformerConfig
    seed : int or None, keyword-only
        Draw the random weights from ``torch.manual_seed(seed)`` without touching the global
        generator (``torch.random.fork_rng``); None draws from the global generator.

    Raises
    ------
    ModelUnavailable
        The package rejects the ``model:`` block (the message names the config).
    """
    from bs_roformer import BSRoformer, MelBandRoformer

    klass = BSRoformer if config.network == "bs_roformer" else MelBandRoformer
    kwargs, mlp = _package_kwargs(config)

    def build() -> nn.Module:
        network = klass(**kwargs)
        if mlp != 4:
            # The package builds its mask estimators without MSST's mlp_expansion_factor: rebuild them.
            module = importlib.import_module(klass.__module__)
            old = network.mask_estimators[0]
            network.mask_estimators = torch.nn.ModuleList(
                module.MaskEstimator(
                    dim=kwargs["dim"],
                    dim_inputs=old.dim_inputs,
                    depth=kwargs.get("mask_estimator_depth", 2 if config.network == "bs_roformer" else 1),
                    mlp_expansion_factor=mlp,
                )
                for _ in range(len(network.mask_estimators))
            )
        result: nn.Module = network.eval()
        return result

    try:
        if seed is None:
            return build()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build()
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        # beartype's violations are TypeErrors; the package validates band sums with assert
        raise ModelUnavailable(
            f"RoFormer config {config.origin}: model: cannot build a {_TITLES[config.network]}: "
            f"{type(error).__name__}: {str(error).strip()[:300]}"
        ) from error


def _mel_without_linear(config: RoformerConfig) -> bool:
    """The package's Mel-Band layers keep a ``None`` slot for linear attention at index 0."""
    return config.network == "mel_band_roformer" and not config.model.get("linear_transformer_depth", 0)


_LAYER = re.compile(r"^layers\.(\d+)\.(\d+)\.(.*)$")
_BRANCH_IN = re.compile(r"^(layers\.\d+\.\d+\.layers\.\d+\.\d+)\.")
_BRANCH_OUT = re.compile(r"^(layers\.\d+\.\d+\.layers\.\d+\.\d+)\.branch\.")


def _package_key(key: str, shift: bool) -> str:
    """MSST checkpoint key -> the package's (attention / feed-forward wrapped in ``.branch.``)."""
    if shift and (match := _LAYER.match(key)):
        key = f"layers.{match[1]}.{int(match[2]) + 1}.{match[3]}"
    return _BRANCH_IN.sub(r"\1.branch.", key)


def _msst_key(key: str, shift: bool) -> str:
    key = _BRANCH_OUT.sub(r"\1.", key)
    if shift and (match := _LAYER.match(key)):
        key = f"layers.{match[1]}.{int(match[2]) - 1}.{match[3]}"
    return key


def msst_state_dict(network: nn.Module, config: RoformerConfig) -> dict[str, torch.Tensor]:
    """What MSST's own network would hold for ``network``'s weights: the checkpoint the community saves.

    The inverse of :func:`load_checkpoint`'s key map; the package-only value-residual weights
    (neutral, see :func:`load_checkpoint`) are left out.
    """
    shift = _mel_without_linear(config)
    return {
        _msst_key(key, shift): value.detach()
        for key, value in network.state_dict().items()
        if not _VALUE_RESIDUAL.search(key)
    }


def load_checkpoint(path: Path, config: RoformerConfig) -> nn.Module:
    """The network of ``config`` with the weights of an MSST checkpoint, on the CPU, in eval mode.

    ``path`` holds a ``state_dict`` of MSST's network, as MSST saves it (``torch.save(
    model.state_dict(), ...)``), possibly under ``state`` / ``state_dict`` / ``model_state_dict``;
    ``.safetensors`` files are read with safetensors. Keys are mapped onto the package's layout
    (``...layers.I.J.X`` -> ``...layers.I.J.branch.X``; Mel-Band layers shifted past the package's
    empty linear-attention slot); the package's value-residual mixing, which MSST's network does
    not have, is set to weight 0, bias -1e4 (sigmoid exactly 0: the layer computes MSST's). The
    load is strict.

    Raises
    ------
    ModelUnavailable
        The file is missing, unreadable (truncated, not a checkpoint), or its weights do not fit
        the config: the message names the file and a few missing / unexpected keys.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelUnavailable(f"RoFormer checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated zip, pickle errors, unsafe globals, ...
        raise ModelUnavailable(
            f"RoFormer checkpoint {path} cannot be read: {type(error).__name__}: {str(error).strip()[:300]}"
        ) from error
    for wrapper in ("state", "state_dict", "model_state_dict"):  # as MSST's load_start_checkpoint
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelUnavailable(f"RoFormer checkpoint {path} does not hold a state_dict (names -> tensors)")
    network = build_network(config, seed=0)
    target = network.state_dict()
    shift = _mel_without_linear(config)
    mapped: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, value in state.items():
        package_key = _package_key(key, shift)
        if package_key not in target:
            unexpected.append(key)
        elif target[package_key].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} (config: {tuple(target[package_key].shape)})")
        else:
            mapped[package_key] = value
    missing = []
    for key, value in target.items():
        if key in mapped:
            continue
        kind = _VALUE_RESIDUAL.search(key)
        if kind:
            mapped[key] = torch.zeros_like(value) if kind[1] == "weight" else torch.full_like(value, _NEUTRAL_BIAS)
        else:
            missing.append(_msst_key(key, shift))
    if missing or unexpected or mismatched:
        problems = [
            f"{label} {_some(keys)}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
            if keys
        ]
        raise ModelUnavailable(
            f"RoFormer checkpoint {path} does not fit config {config.origin} ({config.describe()}): "
            + "; ".join(problems)
        )
    network.load_state_dict(mapped, strict=True)
    return network.eval()


def _some(keys: list[str], shown: int = 3) -> str:
    more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


# --------------------------------------------------------------------------- inference


def _msst_window(chunk_size: int, fade_size: int) -> torch.Tensor:
    """MSST's ``_getWindowingArray``: linear fade-in and fade-out of ``fade_size`` (none when <= 0)."""
    window = torch.ones(chunk_size)
    if fade_size > 0:
        window[-fade_size:] = torch.linspace(1, 0, fade_size)
        window[:fade_size] = torch.linspace(0, 1, fade_size)
    return window


class _Geometry:
    """Where MSST's demix puts its chunks over a mix of ``frames`` frames, and their windows.

    Padded position ``j`` (MSST's coordinates after the reflect border) is mix frame ``j - lead``.
    """

    def __init__(self, frames: int, chunk_size: int, num_overlap: int, batch_size: int) -> None:
        self.frames = frames
        self.chunk_size = chunk_size
        self.step = chunk_size // num_overlap
        self.batch_size = batch_size
        self.fade = chunk_size // 10
        border = chunk_size - self.step
        self.lead = border if frames > 2 * border and border > 0 else 0
        self.length = frames + 2 * self.lead
        self.count = -(-self.length // self.step)  # chunks start at 0, step, 2 step, ... < length
        middle = _msst_window(chunk_size, self.fade)
        self._first = middle.clone()
        self._first[: self.fade] = 1
        self._last = middle.clone()
        if self.fade > 0:  # window[-0:] would be the whole window
            self._last[-self.fade :] = 1
        self._middle = middle

    def window(self, k: int) -> torch.Tensor:
        """The window MSST applies to chunk ``k``: one per batch, decided after its last chunk."""
        last = min((k // self.batch_size + 1) * self.batch_size, self.count) - 1
        after = (last + 1) * self.step  # MSST's `i` once the batch is full
        if after - self.step == 0:
            return self._first
        if after >= self.length:
            return self._last
        return self._middle

    def read(self, source: MixSource, start: int, stop: int) -> np.ndarray:
        """Padded positions ``[start, stop)``: the mix, reflected at both ends (``F.pad(mode="reflect")``)."""
        index = np.arange(start, stop) - self.lead
        index = np.where(index < 0, -index, index)
        index = np.where(index >= self.frames, 2 * (self.frames - 1) - index, index)
        lo, hi = int(index.min()), int(index.max()) + 1
        block = source.read(lo, hi)
        if lo == start - self.lead and hi - lo == stop - start:
            return block  # no reflection in this range
        return block[:, index - lo]


def _mix_stats(source: MixSource) -> tuple[np.float32, np.float32]:
    """MSST's ``normalize_audio`` statistics: mean and std (ddof 0) of the channel mean, float32.

    For an :class:`ArraySource` computed as MSST does (numpy, float32), bit for bit; otherwise in
    one pass of float64 block moments (one extra read of the source), equal within float32
    rounding. A std that is not finite or <= float32 eps is 1 (msst 0.1.0's guard for silence).
    Also checks that every sample is finite.
    """
    if isinstance(source, ArraySource):
        if not np.isfinite(source.mix).all():
            raise InvalidInput("mix must hold finite samples (found NaN or infinity)")
        mono = source.mix.mean(0)
        mean, std = mono.mean(), mono.std()
    else:
        count, total, m2 = 0, 0.0, 0.0
        scan = 1 << 20
        for start in range(0, source.frames, scan):
            block = source.read(start, min(start + scan, source.frames))
            if not np.isfinite(block).all():
                raise InvalidInput("mix must hold finite samples (found NaN or infinity)")
            mono64 = block.mean(0, dtype=np.float64)
            n = mono64.size
            block_mean = float(mono64.mean())
            block_m2 = float(np.square(mono64 - block_mean).sum())
            delta = block_mean - total
            count += n
            total += delta * n / count
            m2 += block_m2 + delta * delta * (count - n) * n / count
        mean, std = np.float32(total), np.float32(math.sqrt(m2 / count))
    if not np.isfinite(std) or std <= np.finfo(np.float32).eps:
        std = np.float32(1.0)
    return np.float32(mean), np.float32(std)


class RoformerModel(SeparatorModel):
    """A BS-RoFormer or Mel-Band RoFormer ready to separate on one device, as MSST's demix does.

    Parameters
    ----------
    network : torch.nn.Module
        What :func:`load_checkpoint` (or :func:`build_network`) returns for ``config``. Moved to
        ``device`` once and put in eval mode.
    config : RoformerConfig
    name : str, keyword-only
        The name clients use.
    origin : {"pretrained", "local_repo", "builtin"}, keyword-only
    description : str, keyword-only
        Default :meth:`RoformerConfig.describe`.
    device : str, keyword-only
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Notes
    -----
    Options: MSST has no shift trick, so ``shifts`` must be 0 or 1 (both: one pass). ``segment``,
    when given, replaces the chunk size by the nearest whole number of STFT hops (as MSST's
    ``inference.chunk_size``). ``overlap`` is ignored: the config's ``inference.num_overlap``
    decides (``SeparationOptions`` cannot tell its default from a request). ``split=False``
    computes the same chunked result.

    The mix must have the model's channel count: MSST 0.1.0 duplicates a mono mix for a stereo
    model and keeps channel 0 of the result; a caller that converts channels first (the
    separation service does) gets that channel 0 too.
    """

    def __init__(
        self,
        network: nn.Module,
        config: RoformerConfig,
        *,
        name: str,
        origin: Origin = "local_repo",
        description: str = "",
        device: str = "auto",
    ) -> None:
        self._device = resolve_device(device)
        self._network = network.eval().to(self._device)
        self.config = config
        self.info = ModelInfo(
            name=name,
            sources=config.sources,
            sample_rate=config.sample_rate,
            audio_channels=config.channels,
            origin=origin,
            description=description or config.describe(),
            kind=KIND,
            max_segment=None,
            available=True,
            loaded=True,
        )

    @classmethod
    def load(
        cls,
        config_path: Path,
        checkpoint_path: Path,
        *,
        name: str,
        origin: Origin = "local_repo",
        description: str = "",
        device: str = "auto",
    ) -> RoformerModel:
        """:func:`load_config` + :func:`load_checkpoint`, wrapped (raises ``ModelUnavailable``)."""
        config = load_config(config_path)
        network = load_checkpoint(checkpoint_path, config)
        return cls(network, config, name=name, origin=origin, description=description, device=device)

    @property
    def device(self) -> str:
        return self._device

    @property
    def network(self) -> nn.Module:
        """The wrapped network (on :attr:`device`)."""
        return self._network

    def _check_options(self, options: SeparationOptions | None) -> SeparationOptions:
        options = (options or SeparationOptions()).validate(self)
        if options.shifts > 1:
            raise InvalidInput(
                f"shifts={options.shifts} is a Demucs option: RoFormer models run one pass "
                "(MSST's inference has no shift trick); use 0 or 1"
            )
        return options

    def chunk_size(self, options: SeparationOptions) -> int:
        """Frames per chunk: the config's, or ``options.segment`` in whole STFT hops."""
        if options.segment is None:
            return self.config.chunk_size
        hop = self.config.hop_length
        frames = max(round(options.segment * self.sample_rate / hop), 1) * hop
        n_fft = int(self.config.model.get("stft_n_fft", 2048))
        if frames < n_fft:
            raise InvalidInput(
                f"segment must span at least one STFT window ({n_fft} frames, "
                f"{n_fft / self.sample_rate:.3g} s) for model '{self.name}', got {options.segment:g} s"
            )
        if self.config.num_overlap > frames:
            raise InvalidInput(f"segment must span at least {self.config.num_overlap} frames, got {frames}")
        return frames

    def separate_stream(
        self,
        source: MixSource,
        *,
        options: SeparationOptions | None = None,
        progress: ProgressFn | None = None,
        cancel: threading.Event | None = None,
        stats: Any = None,
        seed: int | None = None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Separate a mix of any length in bounded memory; yield ``(start, stems)`` in order.

        MSST's ``demix`` (see the module), chunk by chunk: ``stems`` maps every source (or the two
        stems of ``options.two_stems``) to float32 ``(channels, n)`` for mix frames
        ``[start, start + n)``, released as soon as no later chunk touches them. Memory holds the
        network's work on one chunk and about two chunks of audio per stem, whatever the length of
        the mix; the reflect border is read from ``source`` where it lies.

        Parameters
        ----------
        source : MixSource
            The mix at :attr:`sample_rate` with :attr:`audio_channels` channels.
        options, progress, cancel
            As for :meth:`separate` (see the class notes for which options apply).
        stats
            Ignored (Demucs' normalisation is not MSST's). With ``inference.normalize: true`` the
            mix's mean and std are computed from ``source`` (one extra read of it).
        seed
            Ignored: the inference draws nothing at random.

        Raises
        ------
        InvalidInput
            Bad options (``shifts > 1``), channel count, rate or samples (non-finite).
        Cancelled
            ``cancel`` was set (checked before each chunk).
        """
        del stats, seed
        options = self._check_options(options)
        self.check_source(source)
        if cancel is not None and cancel.is_set():
            raise Cancelled("separation cancelled")
        report = _MonotonicProgress(progress)
        report(0.0)
        for start, stems in self._blocks(source, self.chunk_size(options), report, cancel):
            if options.two_stems is not None:
                stems = _two_stems(stems, options.two_stems)
            yield start, stems
        if cancel is not None and cancel.is_set():
            raise Cancelled("separation cancelled")
        report(1.0)

    def _separate_sources(
        self,
        mix: np.ndarray,
        *,
        options: SeparationOptions,
        progress: ProgressFn,
        cancel: threading.Event | None,
    ) -> dict[str, np.ndarray]:
        self._check_options(options)
        source = ArraySource(mix, self.sample_rate)
        blocks = [stems for _, stems in self._blocks(source, self.chunk_size(options), progress, cancel)]
        return {name: np.concatenate([stems[name] for stems in blocks], axis=-1) for name in self.sources}

    def _blocks(
        self,
        source: MixSource,
        chunk_size: int,
        progress: ProgressFn,
        cancel: threading.Event | None,
    ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """Every source, block by block: the streamed demix (``source`` checked by the caller)."""
        config = self.config
        geometry = _Geometry(source.frames, chunk_size, config.num_overlap, config.batch_size)
        stats = _mix_stats(source) if config.normalize else None
        target_index = (
            config.instruments.index(config.target)
            if config.target is not None and config.num_stems == len(config.instruments) > 1
            else None
        )
        device_type = torch.device(self._device).type
        amp = config.use_amp and device_type == "cuda"  # MSST: float16 autocast on CUDA only
        step, count = geometry.step, geometry.count
        acc: torch.Tensor | None = None  # (stems, channels, n) weighted sum; padded positions from acc_start
        weight: torch.Tensor | None = None  # (n,) summed window
        acc_start = 0
        for k in range(count):
            if cancel is not None and cancel.is_set():
                raise Cancelled("separation cancelled")
            start = k * step
            seg = min(chunk_size, geometry.length - start)
            part_np = geometry.read(source, start, start + seg)
            if not np.isfinite(part_np).all():
                raise InvalidInput("mix must hold finite samples (found NaN or infinity)")
            if stats is not None:
                part_np = (part_np - stats[0]) / stats[1]
            part = torch.from_numpy(np.ascontiguousarray(part_np, dtype=np.float32))
            mode = "reflect" if seg > chunk_size // 2 else "constant"
            part = torch.nn.functional.pad(part, (0, chunk_size - seg), mode=mode, value=0)
            with torch.autocast(device_type=device_type, enabled=amp), torch.inference_mode():
                out = self._network(part[None].to(self._device))
            out = out.cpu()  # MSST: x[j, ..., :seg_len].cpu() * window
            if out.ndim == 3:
                out = out[:, None]  # one stem: (batch, channels, t) -> (batch, 1, channels, t)
            if target_index is not None:
                out = out[:, target_index : target_index + 1]
            window = geometry.window(k)[:seg]
            if acc is None or weight is None:
                acc = torch.zeros((out.shape[1], out.shape[2], 0), dtype=torch.float32)
                weight = torch.zeros(0, dtype=torch.float32)
                acc_start = start
            grow = start + seg - (acc_start + acc.shape[-1])
            if grow > 0:
                acc = torch.cat([acc, acc.new_zeros((*acc.shape[:-1], grow))], dim=-1)
                weight = torch.cat([weight, weight.new_zeros(grow)])
            lo = start - acc_start
            acc[..., lo : lo + seg] += out[0, ..., :seg] * window
            weight[lo : lo + seg] += window
            progress((k + 1) / count)
            # Positions before the next chunk's start are final (the last chunk finishes everything).
            cut = ((k + 1) * step if k + 1 < count else acc_start + acc.shape[-1]) - acc_start
            if cut <= 0:
                continue
            block = (acc[..., :cut] / weight[:cut]).nan_to_num_(nan=0.0)
            acc, weight = acc[..., cut:].clone(), weight[cut:].clone()
            first = acc_start - geometry.lead  # mix frame of block[..., 0]
            acc_start += cut
            lo, hi = max(0, -first), min(cut, source.frames - first)
            if hi > lo:
                yield first + lo, self._stems(block[..., lo:hi].numpy(), source, first + lo, stats)

    def _stems(
        self, block: np.ndarray, source: MixSource, start: int, stats: tuple[np.float32, np.float32] | None
    ) -> dict[str, np.ndarray]:
        """The sources of one block of the network's output ``(stems, channels, n)``, de-normalised."""
        if stats is not None:
            block = block * stats[1] + stats[0]  # MSST's denormalize_audio, float32
        block = np.ascontiguousarray(block, dtype=np.float32)
        config = self.config
        if config.target is None:
            return {name: block[index] for index, name in enumerate(config.sources)}
        target = block[0]
        residual = source.read(start, start + target.shape[-1]) - target
        return {config.sources[0]: target, config.sources[1]: np.ascontiguousarray(residual, dtype=np.float32)}
