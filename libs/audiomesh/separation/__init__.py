"""The model layer of the separation service: pure Python/torch, no gRPC.

``SeparatorFactory().get("htdemucs").separate(mix, options=SeparationOptions(...))``
returns ``{source: (channels, frames) float32}``. See :mod:`.base` for the contract,
:mod:`.demucs_model` for Demucs, :mod:`.registry` for name resolution and caching,
:mod:`.repo` for local weight folders (``AUDIOMESH_MODEL_REPO``).
"""

from audiomesh.separation.base import (
    MAX_SHIFTS,
    ModelInfo,
    SeparationOptions,
    SeparatorModel,
    resolve_device,
)
from audiomesh.separation.demucs_model import DemucsModel
from audiomesh.separation.registry import (
    BUILTIN,
    PRETRAINED,
    ModelSpec,
    SeparatorFactory,
    configure_torch_threads,
)
from audiomesh.separation.repo import HTDEMUCS_CONFIG, build_htdemucs, save_model_to_repo, scan_repo

__all__ = [
    "BUILTIN",
    "HTDEMUCS_CONFIG",
    "MAX_SHIFTS",
    "PRETRAINED",
    "DemucsModel",
    "ModelInfo",
    "ModelSpec",
    "SeparationOptions",
    "SeparatorFactory",
    "SeparatorModel",
    "build_htdemucs",
    "configure_torch_threads",
    "resolve_device",
    "save_model_to_repo",
    "scan_repo",
]
