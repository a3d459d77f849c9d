"""The core's one progress callback: ``progress(done, total)``.

Every long step (the scan, feature extraction, predictions, the neighbour index, the map,
thumbnails, the exports) takes ``progress: Progress | None = None`` as a keyword and calls it
with a count that never goes down and ends with ``progress(total, total)``: from 0, or from the
part already done (thumbnails made earlier); the unit is the step's own (files, images,
vectors, points, rows). What the step is called and how it is
shown (a bar, a log line, ``st.progress``) is the caller's business. Training runs report richer
records (a dict) through :class:`~selfclassifier_core.store.runfiles.RunRecorder`.

:class:`Tally` is the counting side (what a step calls); :class:`TimeLeft` and
:func:`format_seconds` the showing side shared by the command line and the app.
"""
from __future__ import annotations

import time
from typing import Callable

__all__ = ["Progress", "Tally", "TimeLeft", "format_seconds"]

Progress = Callable[[int, int], None]


class Tally:
    """Counts work towards ``total`` and reports it to ``progress`` (which may be None).

    Reports ``0`` at once, then whenever at least ``every`` more items are done, and ``total``
    at the end (:meth:`finish`); ``done`` never goes down nor past ``total``, and no count is
    reported twice.
    """

    def __init__(self, progress: Progress | None, total: int, every: int = 1):
        if total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self.progress, self.total, self.every = progress, int(total), max(1, int(every))
        self.done = 0
        self._shown = 0
        if progress is not None:
            progress(0, self.total)

    def add(self, n: int = 1) -> None:
        """``n`` more items are done."""
        self.done = min(self.total, self.done + int(n))
        if self.done - self._shown >= self.every or (self.done == self.total > self._shown):
            self._report()

    def finish(self) -> None:
        """All ``total`` items are done (reports ``total`` unless it was the last count)."""
        self.done = self.total
        if self._shown < self.total:
            self._report()

    def _report(self) -> None:
        self._shown = self.done
        if self.progress is not None:
            self.progress(self.done, self.total)


class TimeLeft:
    """Estimates the seconds a step has left from its reports: the rate since its first report
    (None until there is one)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._t0: float | None = None
        self._done0 = 0

    def __call__(self, done: int, total: int) -> float | None:
        now = self.clock()
        if self._t0 is None:
            self._t0, self._done0 = now, done
            return None
        if done <= self._done0 or now <= self._t0:
            return None
        return max(0, total - done) * (now - self._t0) / (done - self._done0)

    @property
    def elapsed(self) -> float:
        """Seconds since the first report."""
        return 0.0 if self._t0 is None else self.clock() - self._t0


def format_seconds(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"
