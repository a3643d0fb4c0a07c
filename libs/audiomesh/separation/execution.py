"""How a loaded separation model runs, between the model layer and the wire.

The model layer names it in words (:attr:`ModelInfo.execution <audiomesh.separation.base.ModelInfo>`:
``"eager"``, ``"compiling"``, ``"compiled"``, ``"compile_failed"``, ``"eager_faster"``); the
wire carries ``audiomesh.v1.ModelExecution``. Each word is its enum value's name without the
``MODEL_EXECUTION_`` prefix, so the proto enum is the one list: a new value needs no table here,
in the separation worker or in the CLI.
"""

from __future__ import annotations

from audiomesh.v1 import separation_pb2

__all__ = ["execution_label", "execution_value"]

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
