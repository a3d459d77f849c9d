"""Whether the process that trains a run is still there: the one rule.

A training process records itself in ``runs/<id>/heartbeat.json`` (written by
:class:`~selfclassifier_core.store.runfiles.RunRecorder`, or by the background-job launcher for
the process it starts)::

    pid          the process id
    host         the machine (``platform.node()``)
    proc_start   the process's start time (Linux ``/proc/<pid>/stat`` field 22), or None
    started      unix time the record was made
    updated      unix time of the last beat (every :data:`HEARTBEAT_EVERY_S` while it trains)

:func:`gone_reason` is the rule, used by the workspace (a run whose status says ``created`` or
``running`` reads as ``interrupted`` when its recorded process is gone), by the claim that keeps
two trainers off one run and by the background jobs:

* same host and a known pid: the process must exist, not be a zombie and, when its start time
  was recorded, have that start time (a reused pid is another program);
* another host, or no pid: the record must have been refreshed within :data:`STALE_AFTER_S`.

Runs from before heartbeats were written fall back to ``job.json`` (the background job's pid,
host and start time, in the same fields).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

HEARTBEAT_FILE = "heartbeat.json"
JOB_FILE = "job.json"
HEARTBEAT_EVERY_S = 5.0
# 12 missed beats: generous for a loaded machine or a slow shared file system, and for clocks
# that differ a little between the machines writing and reading the record
STALE_AFTER_S = 60.0


def this_host() -> str:
    return platform.node()


def proc_start_time(pid: int) -> str | None:
    """Start time of a process (Linux /proc), to tell a reused pid from the recorded process."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, proc_start: str | None = None) -> bool:
    """True when process ``pid`` of this host runs (not a zombie) and, if ``proc_start`` is
    given, is the process that had that start time."""
    pid = int(pid)
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    try:  # a zombie is dead; a different start time means the pid was reused
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):
            return False
        if proc_start is not None and fields[19] != str(proc_start):
            return False
    except (OSError, IndexError):
        pass
    return True


def process_record(pid: int | None = None) -> dict[str, Any]:
    """A fresh record for process ``pid`` of this host (default: this process)."""
    pid = os.getpid() if pid is None else int(pid)
    now = time.time()
    return {"pid": pid, "host": this_host(), "proc_start": proc_start_time(pid),
            "started": now, "updated": now}


def is_this_process(record: dict[str, Any] | None) -> bool:
    return bool(record) and record.get("pid") == os.getpid() and record.get("host") == this_host()


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
        return value if isinstance(value, dict) else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}


def read_heartbeat(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``heartbeat.json`` (None when there is none)."""
    return _read(Path(run_dir) / HEARTBEAT_FILE) or None


def recorded_process(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The process recorded as training the run: its heartbeat, else (runs from before
    heartbeats) its background job's ``job.json``; None when no process was ever started."""
    beat = read_heartbeat(run_dir)
    if beat is not None:
        return beat
    job = _read(Path(run_dir) / JOB_FILE)
    return job if job.get("pid") else None


def describe(record: dict[str, Any]) -> str:
    """``pid 4242 on host-a`` (what is known of the recorded process)."""
    parts = [f"pid {record['pid']}" if record.get("pid") else "unknown pid"]
    if record.get("host"):
        parts.append(f"on {record['host']}")
    return " ".join(parts)


def gone_reason(record: dict[str, Any], now: float | None = None) -> str | None:
    """None while the recorded process is (as far as can be told) alive; else why it is not,
    in words."""
    pid, host = record.get("pid"), record.get("host")
    who = f"its training process ({describe(record)})"
    if pid and host == this_host():
        if process_alive(pid, record.get("proc_start")):
            return None
        return f"{who} is gone"
    stamp = record.get("updated") or record.get("started")
    if not isinstance(stamp, (int, float)):
        return f"{who} left no heartbeat"
    age = (time.time() if now is None else now) - stamp
    if age <= STALE_AFTER_S:
        return None
    return f"no heartbeat from {who} for {age:.0f} s (the limit is {STALE_AFTER_S:.0f} s)"
