"""The allowed range of every job option: one table.

Read by the validators (:mod:`audiomesh.options`, which the orchestrator runs at
CreateJob/UploadAudio and the workers run again), by the model layer (``MAX_SHIFTS``) and by
the HTTP facade's OpenAPI document (``minimum``/``maximum``), so a number lives here only.

Keys are the option's path in ``audiomesh.v1.JobOptions`` (proto field names). The bounds
keep every allocation a worker makes from an option to a sane size (an HPSS kernel of
2**31-1 frames, an ``n_fft`` of 2**24 or a 10**9 s segment would otherwise be tried and fail
as INTERNAL) while covering what the underlying libraries are used with: librosa's HPSS
(kernels of tens of frames, margins 1..10, ``n_fft`` 256..8192), Demucs (``--shifts`` up to
~10, segments of a few to ~40 s), loudness targets of streaming services (-24..-5 LUFS).
It imports nothing heavy: the gateway reads it without loading the DSP stack.

Request fields that are not job options have their range here too (``PAGE_SIZE``), read by
the orchestrator and by the OpenAPI document alike.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from audiomesh.errors import InvalidInput

__all__ = [
    "DEFAULT_MP3_BITRATE_KBPS",
    "DEFAULT_PAGE_SIZE",
    "PAGE_SIZE",
    "RANGES",
    "Range",
    "check",
    "field_schemas",
    "target_range",
]


@dataclass(frozen=True, slots=True)
class Range:
    """``minimum <= value <= maximum`` (``> minimum`` when ``exclusive_minimum``).

    ``zero_is_default``: proto3 int32 fields whose 0 means "the default" (``default``).
    ``kind``: "integer", "number", "length" (characters of a string) or "items" (of a list).
    """

    minimum: float
    maximum: float
    kind: str = "number"
    unit: str = ""
    exclusive_minimum: bool = False
    zero_is_default: bool = False
    default: str = ""

    def describe(self) -> str:
        """The rule in words, e.g. "an integer from 16 to 65536 (0 = default 2048)"."""
        unit = f" {self.unit}" if self.unit else ""
        if self.kind == "length":
            return f"at most {self.maximum:g} characters"
        if self.kind == "items":
            return f"at most {self.maximum:g} items"
        what = "an integer" if self.kind == "integer" else "a number"
        if self.exclusive_minimum:
            text = f"{what} > {self.minimum:g} and <= {self.maximum:g}{unit}"
        else:
            text = f"{what} from {self.minimum:g} to {self.maximum:g}{unit}"
        return text + (f" (0 = default {self.default})" if self.zero_is_default else "")

    def contains(self, value: object) -> bool:
        if self.kind in ("length", "items"):
            return len(value) <= self.maximum  # type: ignore[arg-type]
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        number = float(value)  # ints, floats and numpy scalars alike (the bounds are small)
        if not math.isfinite(number) or (self.kind == "integer" and int(number) != number):
            return False
        if self.zero_is_default and number == 0:
            return True
        low_ok = number > self.minimum if self.exclusive_minimum else number >= self.minimum
        return low_ok and number <= self.maximum

    def schema(self) -> dict:
        """JSON Schema keywords for the field (OpenAPI 3.1)."""
        if self.kind == "length":
            return {"maxLength": int(self.maximum)}
        if self.kind == "items":
            return {"maxItems": int(self.maximum)}
        bound = int if self.kind == "integer" else float
        keywords: dict = {"type": "integer" if self.kind == "integer" else "number", "maximum": bound(self.maximum)}
        if self.zero_is_default:
            keywords["minimum"] = 0
            keywords["anyOf"] = [{"const": 0}, {"minimum": bound(self.minimum)}]
        elif self.exclusive_minimum:
            keywords["exclusiveMinimum"] = bound(self.minimum)
        else:
            keywords["minimum"] = bound(self.minimum)
        if self.kind == "number":
            keywords["anyOf"] = [{"type": "number"}]  # replaces the proto JSON's "NaN"/"Infinity" strings
        keywords["description"] = self.describe()
        return keywords


# JobOptions.mp3_bitrate_kbps = 0: the highest MPEG-1 bitrate, as demucs --mp3 defaults to.
DEFAULT_MP3_BITRATE_KBPS = 320

RANGES: dict[str, Range] = {
    "model": Range(0, 128, "length"),
    "main_stems": Range(0, 16, "items"),
    "separation.shifts": Range(0, 20, "integer"),  # each shift is one more full pass over the mix
    "separation.overlap": Range(0, 0.99),
    # Demucs pads every chunk to this length; Transformer models also have their own maximum.
    "separation.segment_seconds": Range(0.1, 60, unit="s"),
    "separation.two_stems": Range(0, 64, "length"),
    "hpss.kernel_size_harmonic": Range(1, 1023, "integer", "frames", zero_is_default=True, default="31"),
    "hpss.kernel_size_percussive": Range(1, 1023, "integer", "bins", zero_is_default=True, default="31"),
    "hpss.margin_harmonic": Range(1, 100),
    "hpss.margin_percussive": Range(1, 100),
    "hpss.power": Range(0, 100, exclusive_minimum=True),
    "hpss.n_fft": Range(16, 65536, "integer", "samples", zero_is_default=True, default="2048"),
    # Also at most n_fft (frames further apart than a window leave gaps).
    "hpss.hop_length": Range(1, 65536, "integer", "samples", zero_is_default=True, default="n_fft / 4"),
    "normalize.target.loudness": Range(-70, 0, unit="LUFS"),
    "normalize.target.peak": Range(-60, 0, unit="dBFS"),
    "normalize.true_peak_ceiling_dbtp": Range(-20, 0, unit="dBTP"),
    # MPEG-1 Layer III's bitrates span 32..320 kbit/s (at 32, 44.1 and 48 kHz).
    "mp3_bitrate_kbps": Range(32, 320, "integer", "kbps", zero_is_default=True, default=str(DEFAULT_MP3_BITRATE_KBPS)),
}

# ListJobs: jobs per page (0 = this default); the orchestrator lists at most a page at once.
DEFAULT_PAGE_SIZE = 20
PAGE_SIZE = Range(1, 200, "integer", zero_is_default=True, default=str(DEFAULT_PAGE_SIZE))


def field_schemas() -> dict[str, dict]:
    """JSON Schema keywords by proto field full name (``audiomesh.v1.HpssOptions.n_fft``), for OpenAPI:
    every job option and ``ListJobsRequest.page_size``."""
    messages = {"separation": "SeparationOptions", "hpss": "HpssOptions", "normalize": "NormalizeOptions"}
    out: dict[str, dict] = {}
    for key, rule in RANGES.items():
        if key.startswith("normalize.target."):
            key, rule = "normalize.target", target_range("off")  # the mode decides; the schema has both
        parent, _, name = key.rpartition(".")
        out[f"audiomesh.v1.{messages.get(parent, 'JobOptions')}.{name}"] = rule.schema()
    out["audiomesh.v1.ListJobsRequest.page_size"] = PAGE_SIZE.schema()
    return out


def target_range(mode: str) -> Range:
    """The range of ``normalize.target`` for a mode ("loudness", "peak"; "off": either)."""
    if mode in ("loudness", "peak"):
        return RANGES[f"normalize.target.{mode}"]
    loud, peak = RANGES["normalize.target.loudness"], RANGES["normalize.target.peak"]
    return Range(min(loud.minimum, peak.minimum), max(loud.maximum, peak.maximum), unit="LUFS or dBFS")


def check(field: str, value: object, rule: Range | None = None) -> None:
    """InvalidInput naming ``field`` and its range when ``value`` is outside it."""
    rule = rule or RANGES[field]
    if not rule.contains(value):
        shown = f"{len(value)} items" if rule.kind == "items" else repr(value)  # type: ignore[arg-type]
        if rule.kind == "length":
            shown = f"{len(value)} characters"  # type: ignore[arg-type]
        raise InvalidInput(f"{field} must be {rule.describe()}, got {shown}")
