"""The files of one run (``<workspace>/runs/<id>/``) and the one writer of them.

Every mode's loop and the run pipeline write through a :class:`RunRecorder`; the app, the CLI
and the background jobs read through :func:`read_progress` and :func:`read_stats`. The file
names are spelled here only (``heartbeat.json`` and ``job.json`` in :mod:`.liveness`, which reads
them, imported here).

``progress.json`` has one schema for every mode (missing keys are unknown, not zero):

    status        created | running | predicting | done | failed | cancelled
    mode          scratch | finetune | fast
    phase         features | training | predicting | done (what the run is doing now)
    fraction      0..1 of the whole training budget (epochs, steps or minutes)
    epoch         the epoch in progress, 1-based (at the end: epochs trained)
    epochs        epochs planned (None when budgeted by minutes)
    step          optimizer steps taken in the run
    steps         optimizer steps planned (None when budgeted by minutes)
    epoch_step    steps taken in the current epoch;  epoch_steps: steps per epoch
    done / total  images processed in a non-training phase (features, predicting)
    loss, lr, images_per_s, eta_s, classes_in_use {K: n}, message, updated (unix time)

``stats.jsonl`` gets one JSON line per epoch (fast mode: per logging interval) with at least
``epoch``, ``step``, ``steps`` (steps in this row), ``loss``, ``lr``, ``images_per_s``,
``seconds`` and ``classes_in_use``.

``heartbeat.json`` names the process training the run (schema and the rule that reads it in
:mod:`selfclassifier_core.store.liveness`). :func:`claim_run` writes it, refusing a run that
another live process trains; :meth:`RunRecorder.start` claims the run and refreshes the record
from a background thread every few seconds until :meth:`RunRecorder.finish` (or ``restore``)
removes it. A run whose record outlives its process reads as ``interrupted``.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import liveness
from .fsutil import atomic_open, atomic_write_json
from .liveness import HEARTBEAT_FILE
from .workspace import RunBusyError, RunInfo, Workspace

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
STATS_FILE = "stats.jsonl"
PROGRESS_FILE = "progress.json"
CANCEL_FILE = "CANCEL"
JOB_FILE = liveness.JOB_FILE  # read by the liveness rule too (runs from before heartbeats)
LOG_FILE = "train.log"
PROGRESS_EVERY_S = 2.0

ProgressFn = Callable[[dict[str, Any]], None]


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; ``{}`` when it is missing, torn or not an object."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def read_progress(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run's live ``progress.json`` (``{}`` before the first write)."""
    return read_json(Path(run_dir) / PROGRESS_FILE)


def read_stats(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The statistics lines of a run (a torn last line is skipped)."""
    out = []
    try:
        with open(Path(run_dir) / STATS_FILE, encoding="utf-8") as fh:
            for line in fh:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    except FileNotFoundError:
        pass
    return out


# --------------------------------------------------------------------------- who trains the run
def other_trainer(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The heartbeat record of a live process other than this one that trains the run, if any."""
    record = liveness.read_heartbeat(run_dir)
    if record is None or liveness.is_this_process(record) or liveness.gone_reason(record):
        return None
    return record


def busy_message(run_id: int, record: dict[str, Any]) -> str:
    return (f"run {run_id} is being trained by {liveness.describe(record)}; wait for it to "
            "finish or cancel it first (two processes never train one run)")


def claim_run(workspace: Workspace, run_id: int,
              launch: Callable[[], int] | None = None) -> dict[str, Any]:
    """Make this process (or, with ``launch``, the process it starts and whose pid it returns)
    the one that trains run ``run_id``: its heartbeat record is written and returned.

    The check and the write happen inside one workspace transaction (``BEGIN IMMEDIATE``), so of
    two processes claiming a run at once one wins and the other gets :class:`RunBusyError`.

    Raises:
        RunBusyError: another live process trains the run (named by pid and host).
    """
    run_dir = workspace.run_dir(run_id)
    with workspace.transaction():
        other = other_trainer(run_dir)
        if other is not None:
            raise RunBusyError(busy_message(run_id, other))
        record = liveness.process_record(launch() if launch is not None else None)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / HEARTBEAT_FILE, record)
    return record


class _Heartbeat:
    """Refreshes one run's heartbeat record every ``liveness.HEARTBEAT_EVERY_S`` from a daemon
    thread (it dies with the process, which is the point)."""

    def __init__(self, path: Path, record: dict[str, Any]):
        self.path, self.record = path, dict(record)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True,
                                        name=f"heartbeat {path.parent.name}")
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(liveness.HEARTBEAT_EVERY_S):
            self.beat()

    def beat(self, record: dict[str, Any] | None = None) -> None:
        with self._lock:
            if self._stop.is_set() or not self.path.parent.is_dir():
                return
            if record is not None:
                self.record = dict(record)
            self.record["updated"] = time.time()
            try:
                atomic_write_json(self.path, self.record)
            except OSError as exc:  # advisory between beats; a reader allows STALE_AFTER_S
                log.debug("cannot write %s: %s", self.path, exc)

    def stop(self) -> None:
        with self._lock:
            self._stop.set()
        self._thread.join(timeout=10)


_BEATING: dict[Path, _Heartbeat] = {}  # this process's heartbeats, by run directory
_BEATING_LOCK = threading.Lock()


class RunRecorder:
    """Writes one run's record: its row in the database and the files in its directory.

    Args:
        workspace: the workspace.
        run_id: the run (already created).
        mode: the run's mode (written into every progress record).
        progress: optional callback, called with every progress record.
        main: False on every distributed rank but 0: nothing is written, nothing reported.
    """

    def __init__(self, workspace: Workspace, run_id: int, mode: str,
                 progress: ProgressFn | None = None, main: bool = True):
        self.ws, self.run_id, self.mode = workspace, int(run_id), mode
        self.dir = workspace.run_dir(run_id)
        self.callback = progress
        self.main = main
        self._last_write = 0.0
        self._last: dict[str, Any] = {}

    # ---------------------------------------------------------------- start and end
    def start(self, config: dict[str, Any], heads: list[int] | None = None,
              resume: bool = False, continuing: RunInfo | None = None) -> None:
        """The run begins (or, with ``resume``, continues): its config is recorded and its
        message and continuation record cleared. A CANCEL written before a new run started still
        cancels it; a resumed run's old one is removed. The run is claimed first
        (:meth:`claim`): a run another live process trains raises :class:`RunBusyError`.

        ``continuing``: the run was ``done`` (as given) and is trained further; what it was is
        kept in its continuation record (``status`` ``running``, ``was``), so a continuation
        whose process dies reads as that finished run again, its continuation interrupted
        (:class:`~selfclassifier_core.store.workspace.RunInfo`), not as a run without results."""
        if not self.main:
            return
        self.claim()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.write_config(config)
        record = None
        if continuing is not None:
            record = {"status": "running", "at": time.time(),
                      "was": {"finished": continuing.finished, "message": continuing.message,
                              "config": continuing.config}}
        fields: dict[str, Any] = {"status": "running", "message": None, "continuation": record,
                                  "config": config}
        if heads:
            fields.update(heads=list(heads), main_head=int(heads[0]))
        self.ws.update_run(self.run_id, **fields)
        if resume:
            (self.dir / CANCEL_FILE).unlink(missing_ok=True)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.main:
            atomic_write_json(self.dir / CONFIG_FILE, config)

    def set_heads(self, heads: list[int]) -> None:
        if self.main:
            self.ws.update_run(self.run_id, heads=list(heads), main_head=int(heads[0]))

    def finish(self, status: str, message: str | None = None, **info: Any) -> None:
        """Record the final status in the database and in ``progress.json`` (a continuation
        record of a finished run trained further is cleared: it ended here)."""
        if not self.main:
            return
        self.ws.update_run(self.run_id, status=status, message=message, continuation=None)
        self.release()
        self.final_progress(status, message, **info)

    def claim(self) -> None:
        """This process trains the run: it is claimed (:func:`claim_run`) and its heartbeat
        refreshed every few seconds until :meth:`release`. Claiming a run this process already
        holds only refreshes the record."""
        if not self.main:
            return
        record = claim_run(self.ws, self.run_id)
        with _BEATING_LOCK:
            beat = _BEATING.get(self.dir)
            if beat is None:
                _BEATING[self.dir] = _Heartbeat(self.dir / HEARTBEAT_FILE, record)
        if beat is not None:
            beat.beat(record)

    def release(self) -> None:
        """The run is no longer trained here: the heartbeat stops and its record goes (only
        this process's own record)."""
        if not self.main:
            return
        with _BEATING_LOCK:
            beat = _BEATING.pop(self.dir, None)
        if beat is not None:
            beat.stop()
        if liveness.is_this_process(liveness.read_heartbeat(self.dir)):
            (self.dir / HEARTBEAT_FILE).unlink(missing_ok=True)

    def final_progress(self, status: str, message: str | None = None, **info: Any) -> None:
        """The last progress record: what the run reached, with its final status."""
        if not self.main:
            return
        record = {**read_progress(self.dir), **self._last, **info, "status": status,
                  "mode": self.mode, "message": message, "updated": time.time()}
        if status in ("done", "cancelled", "failed"):
            record["phase"] = "done" if status == "done" else record.get("phase")
            record["eta_s"] = 0.0 if status == "done" else None
        self._write(record)
        if self.callback is not None:
            self.callback(record)

    def restore(self, before: RunInfo, status: str, reason: str | None = None) -> None:
        """Put back a finished run as it was (``done``, its message and config) after its
        continuation ended with ``status`` (``failed`` or ``cancelled``, for ``reason``); that is
        recorded in the run's ``continuation``, replacing an earlier record."""
        if not self.main:
            return
        continuation = {"status": status, "reason": reason, "at": time.time()}
        self.ws.update_run(before.id, status="done", finished=before.finished,
                           message=before.message, config=before.config,
                           continuation=continuation)
        self.release()
        self.write_config(before.config)
        self.final_progress("done", replace(before, continuation=continuation).summary)

    # ---------------------------------------------------------------- during the run
    def progress(self, info: dict[str, Any], force: bool = False) -> None:
        """Report live progress: the callback every time, ``progress.json`` every 2 s (or
        when ``force``). Keys as in this module's docstring."""
        if not self.main:
            return
        record = {"status": "running", **info, "mode": self.mode, "updated": time.time()}
        if "classes_in_use" in record:  # JSON object keys are strings
            record["classes_in_use"] = {str(k): v for k, v in record["classes_in_use"].items()}
        self._last = {k: v for k, v in record.items() if k not in ("status", "message")}
        if self.callback is not None:
            self.callback(record)
        now = time.monotonic()
        if force or now - self._last_write >= PROGRESS_EVERY_S:
            self._last_write = now
            self._write(record)

    def trim_stats(self, step: int) -> int:
        """Drop the statistics lines of steps after ``step`` (a resumed run's checkpoint): an
        epoch's line is written just before its checkpoint, so a run killed between the two
        would otherwise have that epoch twice once resumed. Returns the lines dropped."""
        if not self.main:
            return 0
        rows = read_stats(self.dir)
        keep = [r for r in rows if not isinstance(r.get("step"), int) or r["step"] <= step]
        if len(keep) < len(rows):
            text = "".join(json.dumps(r) + "\n" for r in keep)
            with atomic_open(self.dir / STATS_FILE, "w") as fh:
                fh.write(text)
            log.info("run %s: %d statistics line(s) after step %d dropped (not in the "
                     "checkpoint)", self.run_id, len(rows) - len(keep), step)
        return len(rows) - len(keep)

    def append_stats(self, row: dict[str, Any]) -> None:
        if not self.main:
            return
        if "classes_in_use" in row:
            row = {**row, "classes_in_use": {str(k): v for k, v in row["classes_in_use"].items()}}
        with open(self.dir / STATS_FILE, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Write the run's ``checkpoint.pt`` atomically (rank 0 only)."""
        if not self.main:
            return
        from .checkpoint import CHECKPOINT_FILE, save_checkpoint  # torch: only for a run that saves

        save_checkpoint(self.dir / CHECKPOINT_FILE, state)

    def cancel_requested(self) -> bool:
        """True once someone asked the run to stop (a ``CANCEL`` file in its directory)."""
        return (self.dir / CANCEL_FILE).exists()

    def stats(self) -> list[dict[str, Any]]:
        return read_stats(self.dir)

    def _write(self, record: dict[str, Any]) -> None:
        try:
            atomic_write_json(self.dir / PROGRESS_FILE, record)
        except OSError as exc:  # progress is advisory; never fail a run on it
            log.debug("cannot write %s: %s", PROGRESS_FILE, exc)


def request_cancel(run_dir: str | os.PathLike) -> None:
    """Ask the run in ``run_dir`` to stop at its next step (read by :meth:`cancel_requested`)."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / CANCEL_FILE).write_text(f"{time.time()}\n")
