"""How a loaded separation model runs, between the model layer and the wire.

The model layer names it in words (:attr:`ModelInfo.execution <audiomesh.separation.base.ModelInfo>`:
``"eager"``, ``"compiling"``, ``"compiled"``, ``"compile_failed"``, ``"eager_faster"``); the
wire carries ``audiomesh.v1.ModelExecution``. Each word is its enum value's name without the
``MODEL_EXECUTION_`` prefix, so the proto enum is the one list: a new value needs no table here,
in the separation worker or in the CLI. :func:`model_info_pb` is a model's whole description
on the wire (``ListModels``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from audiomesh.v1 import separation_pb2

if TYPE_CHECKING:
    from audiomesh.separation.base import ModelInfo

__all__ = ["execution_label", "execution_value", "model_info_pb"]

_PREFIX = "MODEL_EXECUTION_"


def execution_value(execution: str) -> separation_pb2.ModelExecution.ValueType:
    """The enum value of the model layer's word (``""``, not loaded: ``MODEL_EXECUTION_UNSPECIFIED``).

    >>> execution_value("compile_failed") == separation_pb2.MODEL_EXECUTION_COMPILE_FAILED
    True
    """
    return separation_pb2.ModelExecution.Value(_PREFIX + (execution or "unspecified").upper())


def execution_label(value: int) -> str:
    """The value as ``audiomesh models`` shows it: ``"compile failed"``; ``""`` for unspecified or unknown
    (a newer server's value)."""
    if value == separation_pb2.MODEL_EXECUTION_UNSPECIFIED or value not in separation_pb2.ModelExecution.values():
        return ""
    return separation_pb2.ModelExecution.Name(value).removeprefix(_PREFIX).lower().replace("_", " ")  # type: ignore[arg-type]


def model_info_pb(info: ModelInfo) -> separation_pb2.ModelInfo:
    """``ListModels``' entry for a model (the factory's :class:`ModelInfo`; optional facts absent: defaults)."""
    eager_s, compiled_s = getattr(info, "chunk_seconds", None) or (None, None)
    return separation_pb2.ModelInfo(
        name=info.name,
        sources=list(info.sources),
        sample_rate=info.sample_rate,
        audio_channels=info.audio_channels,
        origin=info.origin,
        available=getattr(info, "available", True),
        loaded=getattr(info, "loaded", False),
        description=getattr(info, "description", ""),
        max_segment_seconds=info.max_segment,
        execution=_known_execution(getattr(info, "execution", "")),
        compile_error=getattr(info, "compile_error", ""),
        eager_chunk_seconds=eager_s,
        compiled_chunk_seconds=compiled_s,
        kind=getattr(info, "kind", ""),
    )


def _known_execution(execution: str) -> separation_pb2.ModelExecution.ValueType:
    """:func:`execution_value`, with a word the enum lacks (a plug-in separator's) as unspecified:
    one model's odd word must not fail ``ListModels``, which every job's plan calls."""
    try:
        return execution_value(execution)
    except ValueError:
        return separation_pb2.MODEL_EXECUTION_UNSPECIFIED
