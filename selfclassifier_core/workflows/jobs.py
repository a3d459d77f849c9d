"""Background training jobs: start, watch, cancel and resume ``train`` in a detached process.

The app never trains inside its own process: :func:`start_training` creates the run, then
launches ``python -m selfclassifier_core.workflows.jobs WS N`` (which calls
:func:`.pipeline.train` on that run with the options stored in ``job.json``) in a new session
(so a browser reload, a Streamlit rerun or even a server restart does not stop it) with its
output in ``runs/<id>/train.log`` and its process id in ``runs/<id>/job.json``. Everything the
app shows about a job is read back from disk by :func:`job_status`: the run row in the
database, ``progress.json`` and ``stats.jsonl`` written by the trainer, and whether the recorded
process is still alive. A run whose process has died reads as ``interrupted`` (the workspace's
rule, :mod:`selfclassifier_core.store.liveness`), with how it ended (the signal, when this
process started it) and the end of its log; resume continues it. The launch claims the run for
the new process, so a run another live process trains is refused.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from shlex import quote
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..store.checkpoint import CHECKPOINT_FILE
from ..store.fsutil import atomic_write_json
from ..store.liveness import process_alive
from ..store.runfiles import (CANCEL_FILE, JOB_FILE, LOG_FILE, RunRecorder, busy_message,
                              claim_run, other_trainer, read_json, read_progress, read_stats,
                              request_cancel)
from ..store.workspace import INTERRUPTED, RunBusyError, Workspace, WorkspaceError, as_workspace
from ..training.config import flag_name, make_config, option_specs, run_mode
from .group import VIEWS, prepare_views

log = logging.getLogger(__name__)

_FINAL = ("done", "failed", "cancelled", INTERRUPTED)
_RESUMABLE = ("failed", "cancelled", INTERRUPTED)
AFTER_TRAINING = VIEWS

# Popen objects of the jobs this process started, so finished children are reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen] = {}


@dataclass
class JobStatus:
    """What is known about one training run, read from disk."""

    run_id: int
    status: str                 # created | running | done | failed | cancelled | interrupted
    alive: bool                 # the recorded training process is running
    progress: dict[str, Any] = field(default_factory=dict)
    stats: list[dict[str, Any]] = field(default_factory=list)
    message: str | None = None
    log_tail: str = ""
    pid: int | None = None
    cancel_requested: bool = False
    mode: str | None = None
    has_checkpoint: bool = False

    @property
    def finished(self) -> bool:
        return self.status in _FINAL and not self.alive

    @property
    def can_resume(self) -> bool:
        """A failed, cancelled or interrupted scratch/finetune run with a checkpoint, whose
        process has ended (fast runs are started again instead)."""
        return (self.status in _RESUMABLE and not self.alive and self.mode != "fast"
                and self.has_checkpoint)


def build_command(workspace: Workspace, run_id: int, resume: bool = False) -> list[str]:
    """The command of the background process that trains run ``run_id`` (see :func:`_child`)."""
    cmd = [sys.executable, "-m", "selfclassifier_core.workflows.jobs", str(workspace.path.resolve()),
           str(int(run_id))]
    return cmd + (["--resume"] if resume else [])


def cli_equivalent(folder: str | os.PathLike, workspace: Workspace, options: dict[str, Any],
                   run_id: int | None = None, resume: bool = False) -> str:
    """The ``train`` command line doing the same (shown to the person, written to the log);
    every option is spelled as the config field's flag."""
    cmd = ["python", "-m", "selfclassifier_core", "train", quote(str(folder)),
           "--workspace", quote(str(workspace.path))]
    for key, value in options.items():
        if value is None or value == "" or value is False:
            continue
        cmd += [flag_name(key)] if value is True else [flag_name(key), quote(str(value))]
    if resume:
        cmd += ["--resume", "--run", str(run_id)]
    return " ".join(cmd)


def _check_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options without empty values, checked as ``train`` will check them."""
    options = {k: v for k, v in options.items() if v is not None and v != ""}
    mode = run_mode(options.get("mode"), options)
    fields = {spec.name: spec.modes for spec in option_specs()}
    unknown = sorted(set(options) - set(fields) - {"mode"})
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(fields)}")
    for name in options:
        if name != "mode" and mode not in fields[name]:
            raise ValueError(f"option {name!r} applies to {' and '.join(fields[name])} mode "
                             "only")
    make_config(mode, {k: v for k, v in options.items() if k != "mode"})
    return options


def _launch(ws: Workspace, run_id: int, cmd: list[str], spec: dict[str, Any] | None = None) -> int:
    """Start ``cmd`` as the process that trains run ``run_id``, claimed for it (the run's
    heartbeat names it from the start); raises :class:`RunBusyError` when another live process
    trains the run."""
    run_dir = ws.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    package_parent = str(Path(__file__).resolve().parents[2])  # the folder holding the package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)

    def start() -> int:
        with open(run_dir / LOG_FILE, "ab") as logfh:
            logfh.write(f"\n$ {' '.join(cmd)}\n".encode())
            logfh.flush()
            proc = subprocess.Popen(cmd, stdout=logfh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                    cwd=str(run_dir), close_fds=True)
        _CHILDREN[proc.pid] = proc
        return proc.pid

    record = claim_run(ws, run_id, launch=start)
    atomic_write_json(run_dir / JOB_FILE, dict(
        spec or read_json(run_dir / JOB_FILE), pid=record["pid"], started=record["started"],
        argv=cmd, proc_start=record["proc_start"], host=record["host"]))
    log.info("started training run %s (pid %s)", run_id, record["pid"])
    return record["pid"]


def start_training(folder: str | os.PathLike, workspace: Workspace | str | os.PathLike | None,
                   options: dict[str, Any] | None = None,
                   after: tuple[str, ...] | None = None) -> int:
    """Create a run and train it in a detached background process; return the run id.

    Args:
        folder: the image folder.
        workspace: a :class:`Workspace`, its path, or None for the folder's default workspace.
        options: any of mode, classes, backbone, epochs, minutes, batch_size, device, pretrained
            (None values use the trainer's defaults); in fast mode also views, image_size.
        after: what the background process prepares once the run is done, so the app's screens
            open instantly: ``"neighbors"`` (the FAISS index) and/or ``"map"`` (UMAP points).
            The run counts as done before this starts. Default: :data:`AFTER_TRAINING`.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise WorkspaceError(f"image folder {folder} does not exist or is not a folder")
    options = _check_options(dict(options or {}))
    ws = workspace if isinstance(workspace, Workspace) else Workspace.for_folder(folder, workspace)
    after = _ready_for_a_run(ws, after)  # before the run is created: a bad call leaves none
    run_id = ws.create_run(run_mode(options.get("mode"), options),
                           dict(options, folder=str(folder.resolve())))
    return _start_job(ws, run_id, {"folder": str(folder.resolve()), "options": options,
                                   "after": list(after),
                                   "cli": cli_equivalent(folder, ws, options)})


def _ready_for_a_run(ws: Workspace, after: tuple[str, ...] | None) -> tuple[str, ...]:
    """The after-training steps of a new background run (default :data:`AFTER_TRAINING`),
    checked, and no run training in ``ws``: raises before anything is created."""
    active = active_run(ws)
    if active is not None:
        raise WorkspaceError(f"run {active} is still training in this workspace; "
                             "wait for it or cancel it first")
    after = AFTER_TRAINING if after is None else tuple(after)
    bad = set(after) - set(VIEWS)
    if bad:
        raise ValueError(f"unknown after-training step(s) {sorted(bad)}; valid: {VIEWS}")
    return after


def _start_job(ws: Workspace, run_id: int, spec: dict[str, Any]) -> int:
    """Write the job file of the created run ``run_id`` and start its background process
    (a run that cannot start is marked failed)."""
    atomic_write_json(ws.run_dir(run_id) / JOB_FILE, spec)
    try:
        _launch(ws, run_id, build_command(ws, run_id), spec)
    except OSError as exc:
        ws.update_run(run_id, status="failed", message=f"could not start training: {exc}")
        raise WorkspaceError(f"could not start training: {exc}") from exc
    return run_id


def start_refit(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
                options: dict[str, Any] | None = None,
                after: tuple[str, ...] | None = None) -> int:
    """Plan a refit of run ``run_id`` (:func:`~.refit.prepare_refit`: the new run is created
    with its targets) and train it in a background process like any run; returns the new
    run's id. ``options``: a budget (epochs, minutes), device."""
    from .refit import prepare_refit

    ws = as_workspace(workspace)
    after = _ready_for_a_run(ws, after)
    new_id, plan, opts = prepare_refit(ws, run_id, **{k: v for k, v in (options or {}).items()
                                                      if v is not None and v != ""})
    cli = (f"python -m selfclassifier_core refit {quote(str(ws.path))} --run "
           f"{plan.feedback.run_id}")
    return _start_job(ws, new_id, {"folder": None, "options": opts, "after": list(after),
                                   "cli": cli, "refit_of": plan.feedback.run_id})


def resume(workspace: Workspace | str | os.PathLike, run_id: int) -> int:
    """Continue a cancelled, failed or interrupted run from its last checkpoint in a new
    background process (the process that trained it must have ended)."""
    ws = as_workspace(workspace)
    st = job_status(ws, run_id)
    if st.alive:
        raise WorkspaceError(f"run {run_id} is still running (pid {st.pid})")
    other = other_trainer(ws.run_dir(run_id))
    if other is not None:
        raise RunBusyError(busy_message(run_id, other))
    if st.status not in _RESUMABLE:
        raise WorkspaceError(f"run {run_id} is {st.status}; only a cancelled, failed or "
                             "interrupted run can be resumed")
    if st.mode == "fast":
        raise WorkspaceError("a fast-mode run is not resumed: start a new one, it reuses the "
                             "cached features and takes seconds")
    (ws.run_dir(run_id) / CANCEL_FILE).unlink(missing_ok=True)
    _launch(ws, run_id, build_command(ws, run_id, resume=True))  # claims it: never two trainers
    ws.update_run(run_id, status="created", message=None)
    return run_id


def cancel(workspace: Workspace | str | os.PathLike, run_id: int, force: bool = False) -> None:
    """Ask a run to stop: a CANCEL file (the trainer checkpoints and exits) and SIGTERM.

    SIGTERM goes to the training process only, not its process group: its data-loader workers
    must live until it has stopped cleanly (they exit with it). ``force`` kills the whole group
    at once (SIGKILL), for a job that does not respond. A run whose process is already gone is
    marked cancelled straight away.
    """
    ws = as_workspace(workspace)
    run_dir = ws.run_dir(run_id)
    request_cancel(run_dir)
    job = read_json(run_dir / JOB_FILE)
    pid = job.get("pid")
    if pid and _alive(pid, job.get("proc_start")):
        try:
            if force:
                os.killpg(pid, signal.SIGKILL)  # the job leads its own process group
            else:
                os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        return
    run = ws.get_run(run_id)  # another live trainer (a `train` in a terminal) reads the CANCEL
    if run.status == INTERRUPTED:
        ws.update_run(run_id, status="cancelled",
                      message="cancelled after its training process had stopped")
    elif run.status == "created" and other_trainer(run_dir) is None:
        ws.update_run(run_id, status="cancelled", message="cancelled before it started")


def job_status(workspace: Workspace | str | os.PathLike, run_id: int,
               log_lines: int = 20) -> JobStatus:
    """Everything about run ``run_id`` from disk. A run whose process died reads as
    ``interrupted`` (with how the process ended, when known, and the last error in its log);
    one that was asked to stop first (CANCEL, "Stop now") is recorded as cancelled."""
    ws = as_workspace(workspace)
    run_dir = ws.run_dir(run_id)
    job = read_json(run_dir / JOB_FILE)
    pid = job.get("pid")
    alive = bool(pid) and _alive(pid, job.get("proc_start"))
    run = ws.get_run(run_id)  # read after the liveness check: a dead process wrote its last word
    status, message = run.status, run.summary
    tail = _tail(run_dir / LOG_FILE, log_lines)
    if status == INTERRUPTED and alive:  # it died between the two looks: look again
        alive = _alive(pid, job.get("proc_start"))
    if status == INTERRUPTED and (run_dir / CANCEL_FILE).exists():
        status, message = "cancelled", "cancelled"
        ws.update_run(run_id, status=status, message=message)
    elif status == INTERRUPTED:
        code = _exit_code(pid) if pid else None
        if code is not None:
            message += (f". The process was killed by signal {-code}" if code < 0
                        else f". The process ended with exit code {code}")
        last = _last_error_line(tail)
        if last:
            message += f". Last message: {last}"
    elif status == "created" and alive:
        status = "running"
    return JobStatus(run_id=int(run_id), status=status, alive=alive,
                     progress=read_progress(run_dir),
                     stats=read_stats(run_dir), message=message, log_tail=tail, pid=pid,
                     cancel_requested=(run_dir / CANCEL_FILE).exists(), mode=run.mode,
                     has_checkpoint=(run_dir / CHECKPOINT_FILE).exists())


def active_run(workspace: Workspace | str | os.PathLike) -> int | None:
    """The id of the newest run that is training right now, if any."""
    ws = as_workspace(workspace)
    for run in reversed(ws.list_runs()):
        if run.status in ("created", "running") and job_status(ws, run.id).alive:
            return run.id
    return None


def started_runs(workspace: Workspace | str | os.PathLike) -> list[int]:
    """Ids of the runs started as background jobs (oldest first), whatever their status."""
    ws = as_workspace(workspace)
    return [r.id for r in ws.list_runs() if (r.dir / JOB_FILE).exists()]


def wait(workspace: Workspace | str | os.PathLike, run_id: int, timeout: float = 600,
         poll: float = 0.5) -> JobStatus:
    """Block until the run's process has ended (or ``timeout`` seconds); return its status."""
    ws = as_workspace(workspace)
    deadline = time.monotonic() + timeout
    while True:
        st = job_status(ws, run_id)
        if not st.alive and (st.status in _FINAL or not st.pid):
            return st
        if time.monotonic() > deadline:
            raise TimeoutError(f"run {run_id} still {st.status} after {timeout:.0f} s")
        time.sleep(poll)


# --------------------------------------------------------------------------- helpers
def _alive(pid: int, proc_start: str | None = None) -> bool:
    """The store's rule (:func:`~selfclassifier_core.store.liveness.process_alive`); a job this
    process started is reaped first, so it leaves no zombie and its exit code is known."""
    child = _CHILDREN.get(int(pid))
    if child is not None and child.poll() is not None:
        return False
    return process_alive(pid, proc_start)


def _exit_code(pid: int) -> int | None:
    """How a job this process started ended (None for another process's job). Called once the
    run reads interrupted: the process is gone, but the kernel may not have handed over its
    exit status yet, so wait for it a moment."""
    child = _CHILDREN.get(int(pid))
    if child is None:
        return None
    try:
        return child.wait(timeout=2)
    except subprocess.TimeoutExpired:
        return None


def _tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _last_error_line(tail: str) -> str | None:
    for line in reversed(tail.splitlines()):
        line = line.strip()
        if line.startswith("error:") or "Error" in line.split(":")[0]:
            return line[:300]
    return None


# --------------------------------------------------------------------------- the background process
def _child(argv: list[str] | None = None) -> int:
    """``python -m selfclassifier_core.workflows.jobs WORKSPACE RUN_ID [--resume]``: train one run."""
    import argparse
    import threading

    from .pipeline import train  # torch: here, not in the app that starts and watches jobs

    parser = argparse.ArgumentParser(prog="python -m selfclassifier_core.workflows.jobs")
    parser.add_argument("workspace")
    parser.add_argument("run_id", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    ws = Workspace.open(args.workspace)
    spec = read_json(ws.run_dir(args.run_id) / JOB_FILE)
    options = dict(spec.get("options") or {})
    print(f"equivalent command: {spec.get('cli', '?')}", flush=True)
    # the heartbeat beats from here on (the scan before training can be long); the launch
    # claimed the run for this process already, so this only fails for a second, stray start
    recorder = RunRecorder(ws, args.run_id, ws.get_run(args.run_id).mode)
    try:
        recorder.claim()
    except RunBusyError as exc:  # the run is another process's: leave its record alone
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    try:
        if args.resume:
            opts = {k: v for k, v in options.items() if k in ("device",)}
            result = train(None, ws, resume=True, run_id=args.run_id, should_stop=stop.is_set,
                           **opts)
        else:
            result = train(spec.get("folder"), ws, run_id=args.run_id, should_stop=stop.is_set,
                           **options)
    except RunBusyError as exc:  # another process trains the run: not this one's to record
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except BaseException as exc:  # noqa: BLE001 - recorded in words for the app, then re-raised
        message = str(exc) or type(exc).__name__
        status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            if ws.get_run(args.run_id).status in ("created", "running"):
                ws.update_run(args.run_id, status=status, message=message)
        except Exception:  # noqa: BLE001
            pass
        print(f"error: {message}", file=sys.stderr, flush=True)
        if isinstance(exc, (ValueError, WorkspaceError, FileNotFoundError)):
            return 2
        raise
    finally:
        recorder.release()  # the pipeline released it already unless it failed before starting
    status = getattr(result, "status", "done")
    print(f"run {result.run_id}: {status}", flush=True)
    if status == "done":
        for view, seconds in prepare_views(ws, result.run_id, spec.get("after") or []).items():
            print(f"prepared {view} in {seconds:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_child())
