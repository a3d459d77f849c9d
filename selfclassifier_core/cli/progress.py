"""What the commands show on stderr while a long step runs.

One :class:`Reporter` per command: ``reporter.step(name, unit)`` is the core's
``progress(done, total)`` callback (:mod:`selfclassifier_core.store.progress`) for one step, and
``reporter.run_progress()`` turns a training run's progress records
(:mod:`selfclassifier_core.store.runfiles`) into the same steps: ``embedding images`` (fast
mode's features), ``training`` (optimizer steps, or the share of a time budget) and a line when
the run goes on to predict.

On a terminal a step is a tqdm bar. Otherwise (a log file, a pipe, a background job's
``train.log``) it is a line when it starts, one about every 10 % with an estimate of the time
left, and one at the end::

    embedding images: 0/10,000 images
    embedding images: 1,000/10,000 images (10%), about 1 min 17 s left
    ...
    embedding images: 10,000/10,000 images (100%) in 1 min 26 s

A step that has nothing left to do at its first report (a saved index loaded, cached features,
no file to read) shows nothing.
"""
from __future__ import annotations

import sys
from typing import IO, Any, Callable

from ..store.progress import TimeLeft, format_seconds

LOG_PARTS = 10  # log mode: a line each time another tenth of the step is done


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Step:
    """The display of one step; calling it is ``progress(done, total)``.

    ``percent=True`` shows only the share done (a training run budgeted by minutes reports
    0..100 of its budget, no count).
    """

    def __init__(self, reporter: "Reporter", name: str, unit: str = "", percent: bool = False):
        self.reporter, self.name, self.unit, self.percent = reporter, name, unit, percent
        self.closed = False
        self._bar: Any = None
        self._left: TimeLeft | None = None  # from the first report on
        self._next_part = 1

    def __call__(self, done: int, total: int) -> None:
        self.update(done, total)

    def update(self, done: int, total: int, *, eta_s: float | None = None,
               note: str | None = None) -> None:
        """``done`` of ``total``; ``eta_s`` overrides the estimate of the time left, ``note``
        (e.g. the loss) is shown after the count."""
        if self.closed:
            return
        if total <= 0:  # nothing to count
            self.close()
            return
        if self._left is None:
            if done >= total:  # nothing left to do: nothing to show
                self.closed = True
                return
            self._left = TimeLeft()
            self._next_part = done * LOG_PARTS // total + 1
            if not self.reporter.tty:
                self._print(self._count(done, total, share=False)
                            + (f", {note}" if note else ""))
        left = self._left(done, total)
        if self.reporter.tty:
            self._show_bar(done, total, note)
        elif done >= total:
            self._print(f"{self._count(total, total)} in {format_seconds(self._left.elapsed)}")
        elif done * LOG_PARTS // total >= self._next_part:
            self._next_part = done * LOG_PARTS // total + 1
            line = self._count(done, total)
            if note:
                line += f", {note}"
            left = eta_s if eta_s is not None else left
            if left is not None:
                line += f", about {format_seconds(left)} left"
            self._print(line)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.closed = True

    def _count(self, done: int, total: int, share: bool = True) -> str:
        """``name: done/total unit (p%)`` (without the share: the first line), or for a
        percent step ``name: p% unit``."""
        pct = 100 * done // total
        if self.percent:
            return f"{self.name}: {pct}% {self.unit}".rstrip()
        count = f"{self.name}: {done:,}/{total:,} {self.unit}".rstrip()
        return f"{count} ({pct}%)" if share else count

    def _show_bar(self, done: int, total: int, note: str | None) -> None:
        if self._bar is None:
            from tqdm import tqdm  # only on a terminal

            self._bar = tqdm(total=total, initial=done, desc=self.name, unit=self.unit or "it",
                             file=self.reporter.stream, dynamic_ncols=True, leave=True)
        if self._bar.total != total:
            self._bar.total = total
        if note:
            self._bar.set_postfix_str(note, refresh=False)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    def _print(self, line: str) -> None:
        print(line, file=self.reporter.stream, flush=True)


class Reporter:
    """The progress display of one command, on ``stream`` (default: stderr).

    ``tty`` says whether to draw bars (default: whether ``stream`` is a terminal). Use it as a
    context manager so that a bar left open by an error is closed.
    """

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream) if tty is None else tty
        self._steps: list[Step] = []

    def step(self, name: str, unit: str = "", *, percent: bool = False) -> Step:
        """A new step's ``progress(done, total)`` callback."""
        step = Step(self, name, unit, percent)
        self._steps.append(step)
        return step

    def note(self, text: str) -> None:
        """One line (under the bars on a terminal)."""
        if self.tty:
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def run_progress(self) -> Callable[[dict[str, Any]], None]:
        """A callback for a training run's progress records (``train(progress=...)``)."""
        return _RunProgress(self)

    def close(self) -> None:
        for step in self._steps:
            step.close()

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _RunProgress:
    """A run's records (keys in :mod:`selfclassifier_core.store.runfiles`) as steps."""

    def __init__(self, reporter: Reporter):
        self.reporter = reporter
        self.phase: str | None = None
        self.step: Step | None = None

    def __call__(self, record: dict[str, Any]) -> None:
        status, phase = record.get("status"), record.get("phase")
        if status in ("done", "cancelled", "failed"):
            self._enter(None, record)
        elif status == "predicting" or phase == "predicting":
            self._enter("predicting", record)
            if record.get("total"):
                self.step.update(int(record.get("done") or 0), int(record["total"]))
        elif phase == "features" and record.get("total"):
            self._enter("features", record)
            self.step.update(int(record.get("done") or 0), int(record["total"]))
        elif phase == "training":
            self._enter("training", record)
            loss = record.get("loss")
            note = f"loss {loss:.4f}" if isinstance(loss, (int, float)) else None
            if self.step.percent:
                fraction = min(1.0, float(record.get("fraction") or 0.0))
                self.step.update(int(100 * fraction), 100, eta_s=record.get("eta_s"),
                                 note=note)
            else:
                self.step.update(int(record.get("step") or 0), int(record.get("steps") or 0),
                                 eta_s=record.get("eta_s"), note=note)

    def _enter(self, phase: str | None, record: dict[str, Any]) -> None:
        if phase == self.phase:
            return
        if self.step is not None:
            self.step.close()
        self.phase, self.step = phase, None
        if phase == "features":
            self.step = self.reporter.step("embedding images", "images")
        elif phase == "training":
            if record.get("steps"):
                self.step = self.reporter.step("training", "steps")
            else:  # budgeted by minutes: the share of the budget
                self.step = self.reporter.step("training", "of the time budget", percent=True)
        elif phase == "predicting":
            self.step = self.reporter.step("predicting every image", "images")
