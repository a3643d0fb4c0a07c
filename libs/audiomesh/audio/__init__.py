"""Audio file I/O: arrays are float32 ``(channels, frames)``; see :mod:`audiomesh.audio.io`."""

from audiomesh.hashing import file_sha256

from .io import (
    OUTPUT_FORMATS,
    OUTPUT_SUBTYPES,
    SUPPORTED_INPUTS,
    AudioInfo,
    probe,
    read_audio,
    resample,
    write_audio,
)

__all__ = [
    "AudioInfo",
    "OUTPUT_FORMATS",
    "OUTPUT_SUBTYPES",
    "SUPPORTED_INPUTS",
    "file_sha256",
    "probe",
    "read_audio",
    "resample",
    "write_audio",
]
