"""The model layer of the separation service: pure Python/torch, no gRPC.

``SeparatorFactory().get("htdemucs").separate(mix, options=SeparationOptions(...))``
returns ``{source: (channels, frames) float32}``. See :mod:`.base` for the contract,
:mod:`.demucs_model` for Demucs, :mod:`.registry` for name resolution and caching,
:mod:`.repo` for local weight folders (``AUDIOMESH_MODEL_REPO``), :mod:`.split` for one song's
separation split into chunk ranges computed by several workers and stitched exactly.
"""

from typing import Any

from audiomesh.separation.base import (
    MAX_SHIFTS,
    ModelInfo,
    SeparationOptions,
    SeparatorModel,
    resolve_device,
)

# torch and demucs load on first use, so processes that only need the option types (the
# orchestrator, the gateway) do not import them.
_LAZY = {
    "DemucsModel": "audiomesh.separation.demucs_model",
    "BUILTIN": "audiomesh.separation.registry",
    "PRETRAINED": "audiomesh.separation.registry",
    "ModelSpec": "audiomesh.separation.registry",
    "SeparatorFactory": "audiomesh.separation.registry",
    "configure_torch_threads": "audiomesh.separation.registry",
    "HTDEMUCS_CONFIG": "audiomesh.separation.repo",
    "build_htdemucs": "audiomesh.separation.repo",
    "save_model_to_repo": "audiomesh.separation.repo",
    "scan_repo": "audiomesh.separation.repo",
    "MAX_RANGES": "audiomesh.separation.split",
    "RangeInfo": "audiomesh.separation.split",
    "plan_chunks": "audiomesh.separation.split",
    "read_range_info": "audiomesh.separation.split",
    "separate_range": "audiomesh.separation.split",
    "shift_seed": "audiomesh.separation.split",
    "stitch_ranges": "audiomesh.separation.split",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'audiomesh.separation' has no attribute {name!r}")


__all__ = [
    "BUILTIN",
    "HTDEMUCS_CONFIG",
    "MAX_RANGES",
    "MAX_SHIFTS",
    "PRETRAINED",
    "DemucsModel",
    "ModelInfo",
    "ModelSpec",
    "RangeInfo",
    "SeparationOptions",
    "SeparatorFactory",
    "SeparatorModel",
    "build_htdemucs",
    "configure_torch_threads",
    "plan_chunks",
    "read_range_info",
    "resolve_device",
    "save_model_to_repo",
    "scan_repo",
    "separate_range",
    "shift_seed",
    "stitch_ranges",
]
