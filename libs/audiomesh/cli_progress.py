"""The progress lines of ``audiomesh process`` / ``retry`` / ``download``: one line per job.

The words are the web page's (``gateway/static/app.js``: STAGE_LABELS, runningText, fmtEta),
so the terminal and the page say the same thing. A line never exceeds the terminal's width
(``COLUMNS``): the stage words are cut first, the bar keeps its width. On a terminal the
lines are redrawn in place; into a pipe or file a line is written only when its words or its
10 % step change, so a log stays readable.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from audiomesh.v1 import orchestrator_pb2

__all__ = ["EtaEstimator", "ProgressBoard", "fmt_eta", "render_line", "running_text", "stage_label"]

# As the page shows them (app.js STAGE_LABELS).
STAGE_LABELS = {
    "decode": "Reading the file",
    "validate": "Checking the file",
    "separation": "Separating stems",
    "stitch": "Joining the separated parts",
    "hpss": "Splitting harmonic and percussive parts",
    "composite": "Mixing the main tracks",
    "normalize": "Normalizing loudness",
}
STATE_WORDS = {
    "QUEUED": "Waiting for a free slot",
    "SUCCEEDED": "Done",
    "FAILED": "Failed",
    "CANCELLED": "Cancelled",
}
FILL, EMPTY = "█", " "
SEPARATOR = " · "


def stage_label(name: str) -> str:
    """``"hpss:drums"`` -> ``"Splitting harmonic and percussive parts (drums)"``,
    ``"separation:part1of2"`` -> ``"Separating stems (part 1 of 2)"``,
    ``"hpss:drums:part1of2"`` -> ``"Splitting harmonic and percussive parts (drums, part 1 of 2)"``."""
    if not name:
        return ""
    stage, *details = name.split(":")
    base = STAGE_LABELS.get(stage, stage.replace("_", " "))
    detail = ", ".join(re.sub(r"^part(\d+)of(\d+)$", r"part \1 of \2", d).replace("_", " ") for d in details)
    return f"{base} ({detail})" if detail else base


def job_state(job: orchestrator_pb2.Job) -> str:
    from audiomesh.v1 import common_pb2

    return common_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_")


def running_text(job: orchestrator_pb2.Job) -> str:
    """What a job is doing, in words: its first running node (the one ``current_stage`` names
    first, if running) and how many more run beside it, e.g. "Separating stems + 1 more step"."""
    from audiomesh.v1 import common_pb2

    state = job_state(job)
    if state != "RUNNING":
        return STATE_WORDS.get(state, state.capitalize())
    running = [n.name for n in job.nodes if n.state == common_pb2.NODE_STATE_RUNNING]
    named = [s.strip() for s in job.current_stage.split(",") if s.strip()]
    first = next((n for n in named if n in running), running[0] if running else (named[0] if named else ""))
    if not first:
        return "Starting"
    more = max(0, len(running) - 1) if first in running else len(running)
    return stage_label(first) + (f" + {more} more step{'s' if more > 1 else ''}" if more else "")


def fmt_eta(seconds: float) -> str:
    """Time left, short: "Almost done", "42 s left", "3 min 5 s left", "1 h 12 min left"."""
    s = max(0, round(seconds))
    if s < 5:
        return "Almost done"
    if s < 60:
        return f"{s} s left"
    if s < 3600:
        m, rest = divmod(s, 60)
        return f"{m} min {rest} s left" if rest and m < 10 else f"{m} min left"
    return f"{s // 3600} h {round((s % 3600) / 60)} min left"


class EtaEstimator:
    """Time left for one job, from its own pace, in two parts: while the separation runs, the
    separation's time left (the line names that step); after it, the rest of the job's.

    The server's ``eta_seconds`` divides the time since the job started (which includes the
    decode, the model load and any wait for a worker) by the job's fraction done, whose stage
    weights are fixed guesses: early on it ran ~3x high (issue 18), and with a real-size
    model, whose separation is ~90 % of the time rather than the weights' 66 %, it stayed
    2-5x high. Here the separation is timed by its own progress (its chunks take equal
    time), from the first snapshot in which it has made some (or from first sight, for a job
    picked up later): no model load, no queue. The steps after it get a fresh basis. Each part
    says nothing until ``min_gain`` of progress and ``min_seconds`` have passed since its basis.
    """

    def __init__(self, *, min_gain: float = 0.05, min_seconds: float = 2.0) -> None:
        self.min_gain = min_gain
        self.min_seconds = min_seconds
        self._separation: tuple[float, float] | None = None  # (time, separation fraction) at its basis
        self._rest: tuple[float, float] | None = None  # (time, job fraction) once separation is done

    def update(self, job: orchestrator_pb2.Job, now: float) -> float | None:
        """Seconds left after this snapshot (of the separation while it runs, else of the
        job), or None while there is no basis yet."""
        from audiomesh.v1 import common_pb2

        if job.state != common_pb2.JOB_STATE_RUNNING:
            return None
        separation = [n for n in job.nodes if n.stage == "separation"]
        if separation and any(n.state != common_pb2.NODE_STATE_SUCCEEDED for n in separation):
            done = sum(n.fraction for n in separation) / len(separation)
            if self._separation is None:
                if done > 0:
                    self._separation = (now, done)
                return None
            return self._pace(self._separation, (now, done))
        if self._rest is None:
            self._rest = (now, job.fraction)
            return None
        return self._pace(self._rest, (now, job.fraction))

    def _pace(self, basis: tuple[float, float], current: tuple[float, float]) -> float | None:
        (start, start_done), (now, done) = basis, current
        if done - start_done < self.min_gain or now - start < self.min_seconds:
            return None
        return (now - start) * max(0.0, 1.0 - done) / (done - start_done)


def terminal_width() -> int:
    """Columns to draw in: COLUMNS when set (tests, narrow terminals), else the terminal's."""
    return shutil.get_terminal_size(fallback=(80, 24)).columns


def _cut(text: str, width: int) -> str:
    if width <= 0:
        return ""
    return text if len(text) <= width else text[: width - 1] + "…"


def render_line(label: str, fraction: float, words: str, eta: str, width: int) -> str:
    """One progress line of at most ``width - 1`` characters (the last column would wrap on
    some terminals): ``label  42% |█████     | Separating stems · 1 min 5 s left``.

    The label and the bar have fixed widths for a given terminal (lines stay aligned); the
    words are cut with "…" to fit, the time left goes first when there is no room for both.
    """
    room = max(20, width - 1)
    bar_width = max(10, min(30, room // 5))
    label_width = max(8, min(24, room // 5))
    pct = min(100, max(0, int(fraction * 100)))
    filled = round(bar_width * min(1.0, max(0.0, fraction)))
    head = f"{_cut(label, label_width):<{label_width}} {pct:>3}% |{FILL * filled}{EMPTY * (bar_width - filled)}|"
    left = room - len(head) - 1
    keep = left - len(SEPARATOR) - len(eta)
    if eta and not words:
        tail = _cut(eta, left)
    elif eta and keep >= 8:
        tail = f"{_cut(words, keep)}{SEPARATOR}{eta}"
    else:
        tail = _cut(words, left)
    return f"{head} {tail}".rstrip() if tail else head


@dataclass
class _Row:
    label: str
    fraction: float = 0.0
    words: str = "Uploading"
    eta: float | None = None  # seconds left as of eta_at
    eta_at: float = 0.0
    estimator: EtaEstimator | None = None
    printed: tuple[str, int] | None = None  # (words, 10 % step) last written into a pipe


class ProgressBoard:
    """Progress lines for the jobs in flight, plus messages printed above them.

    ``stream`` gets the lines (stderr); on a terminal the active lines are redrawn in place
    (ANSI cursor-up and erase-line) and a finished job's last line stays above them. ``echo``
    prints a message without tearing the lines. ``enabled=False`` (``--quiet``) draws nothing.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        enabled: bool = True,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty() if tty is None else tty
        self.clock = clock
        self._rows: dict[str, _Row] = {}
        self._drawn = 0  # active lines on screen below the cursor's start

    def add(self, key: str, label: str, words: str = "Uploading") -> None:
        """A row for ``key``; a row already there keeps its place and takes the new words."""
        if key not in self._rows:
            self._rows[key] = _Row(label=label, estimator=EtaEstimator())
        self._rows[key].words = words
        self._changed(key)

    def has(self, key: str) -> bool:
        return key in self._rows

    def job(self, key: str, job: orchestrator_pb2.Job) -> None:
        """A new snapshot of the row's job."""
        row = self._rows[key]
        now = self.clock()
        row.fraction = job.fraction
        row.words = running_text(job)
        assert row.estimator is not None
        row.eta, row.eta_at = row.estimator.update(job, now), now
        self._changed(key)

    def note(self, key: str, words: str) -> None:
        """Words in place of the stage, e.g. "Reconnecting (try 2)"."""
        self._rows[key].words = words
        self._changed(key)

    def finish(self, key: str, words: str, *, fraction: float | None = None) -> None:
        """The row's last line ("Done in 12 s", "Failed"): written once, then the row goes."""
        row = self._rows[key]
        if fraction is not None:
            row.fraction = fraction
        row.words, row.eta = words, None
        if self.enabled:
            self._clear()
            self.stream.write(self._line(row) + "\n")
            del self._rows[key]
            self._draw()
        else:
            del self._rows[key]

    def echo(self, text: str, *, stream: TextIO) -> None:
        """A message line (a result on stdout, a warning on stderr) above the active lines."""
        if self.enabled and self.tty:
            self._clear()
            stream.write(text + "\n")
            stream.flush()
            self._draw()
        else:
            stream.write(text + "\n")
            stream.flush()

    def tick(self) -> None:
        """Redraw on a terminal so the time left counts down between snapshots."""
        if self.enabled and self.tty and self._rows:
            self._clear()
            self._draw()

    def close(self) -> None:
        if self.enabled and self.tty:
            self._clear()
        self._rows.clear()

    # ----------------------------------------------------------------- drawing

    def _eta_words(self, row: _Row) -> str:
        if row.eta is None:
            return ""
        return fmt_eta(row.eta - (self.clock() - row.eta_at))

    def _line(self, row: _Row) -> str:
        return render_line(row.label, row.fraction, row.words, self._eta_words(row), terminal_width())

    def _changed(self, key: str) -> None:
        if not self.enabled:
            return
        if self.tty:
            self._clear()
            self._draw()
            return
        row = self._rows[key]
        step = (row.words, int(row.fraction * 10))
        if step != row.printed:
            row.printed = step
            self.stream.write(self._line(row) + "\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}A\r\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        if not self.tty:
            return
        for row in self._rows.values():
            self.stream.write(self._line(row) + "\n")
        self._drawn = len(self._rows)
        self.stream.flush()
