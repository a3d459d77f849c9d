"""A run whose training process is gone reads ``interrupted``, everywhere; it resumes; and two
processes never train one run at once.

The fast tests write the heartbeat record a trainer would have left (``store.liveness`` has its
schema) and check what every surface reads from it; the slow ones start real processes: a
finished subprocess's pid, a background job killed with SIGKILL, a resumed run.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from selfclassifier_core.cli import main
from selfclassifier_core.store import liveness, runfiles
from selfclassifier_core.store.fsutil import atomic_write_json
from selfclassifier_core.store.runfiles import RunRecorder, claim_run
from selfclassifier_core.store.workspace import RunBusyError, Workspace
from selfclassifier_core.workflows import jobs
from selfclassifier_core.workflows.pipeline import train
from train_fixtures import FAST, make_folder, train_one_epoch_then_cancel


@pytest.fixture
def ws(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return Workspace.open(tmp_path / "ws", root=folder, create=True)


def stored_status(ws: Workspace, run_id: int) -> str:
    """The status column itself, not what the workspace makes of it."""
    with ws.connect() as conn:
        return conn.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()[0]


def beat(ws: Workspace, run_id: int, **record) -> dict:
    """Write the heartbeat a training process would have written."""
    now = time.time()
    full = {"pid": None, "host": liveness.this_host(), "proc_start": None, "started": now,
            "updated": now, **record}
    atomic_write_json(ws.run_dir(run_id) / liveness.HEARTBEAT_FILE, full)
    return full


def running_run(ws: Workspace, mode: str = "scratch") -> int:
    run_id = ws.create_run(mode, {"folder": str(ws.root)})
    ws.update_run(run_id, status="running")
    return run_id


def live_other_process() -> dict:
    """A live process of this host that is not this one: our parent (pytest's launcher)."""
    pid = os.getppid()
    assert liveness.process_alive(pid, liveness.proc_start_time(pid))
    return {"pid": pid, "proc_start": liveness.proc_start_time(pid)}


# --------------------------------------------------------------------------- reading the state
def test_running_run_whose_process_is_dead_reads_interrupted(ws, monkeypatch):
    run_id = running_run(ws)
    beat(ws, run_id, pid=12345, proc_start="777")
    seen = []
    monkeypatch.setattr(liveness, "process_alive",
                        lambda pid, start=None: seen.append((pid, start)) or False)
    run = ws.get_run(run_id)
    assert run.status == "interrupted"
    assert seen and seen[0] == (12345, "777")       # asked about the recorded process
    assert [r.status for r in ws.list_runs()] == ["interrupted"]
    assert "pid 12345" in run.summary and "is gone" in run.summary
    cmd = (f"python -m selfclassifier_core train {ws.root} --workspace {ws.path} --resume "
           f"--run {run_id}")
    assert cmd in run.summary
    assert stored_status(ws, run_id) == "running"   # derived when read, never written
    monkeypatch.setattr(liveness, "process_alive", lambda pid, start=None: True)
    assert ws.get_run(run_id).status == "running"   # and it follows the process, not a cache


def test_reused_pid_reads_interrupted(ws):
    """The recorded pid is alive but is another program (its start time differs)."""
    run_id = running_run(ws)
    beat(ws, run_id, pid=os.getpid(), proc_start="1")
    assert ws.get_run(run_id).status == "interrupted"
    beat(ws, run_id, pid=os.getpid(), proc_start=liveness.proc_start_time(os.getpid()))
    assert ws.get_run(run_id).status == "running"


def test_heartbeat_from_another_host_is_judged_by_its_age(ws):
    run_id = running_run(ws, mode="fast")
    now = time.time()
    beat(ws, run_id, pid=4242, host="elsewhere", updated=now - 5)
    assert ws.get_run(run_id).status == "running"   # its pid cannot be checked from here
    beat(ws, run_id, pid=4242, host="elsewhere", updated=now - liveness.STALE_AFTER_S - 30)
    run = ws.get_run(run_id)
    assert run.status == "interrupted"
    assert "no heartbeat" in run.summary and "pid 4242 on elsewhere" in run.summary
    assert "start it again" in run.summary and "--resume" not in run.summary  # fast mode


def test_a_run_without_a_process_and_finished_runs_are_left_alone(ws):
    fresh = ws.create_run("scratch", {})
    assert ws.get_run(fresh).status == "created"    # nothing started: not interrupted
    done = running_run(ws)
    beat(ws, done, pid=2 ** 22 + 11)                # beyond pid_max: no such process
    assert ws.get_run(done).status == "interrupted"
    ws.update_run(done, status="done")
    assert ws.get_run(done).status == "done"        # a leftover record does not matter
    with pytest.raises(ValueError, match="run status must be one of"):
        ws.update_run(done, status="interrupted")   # never stored


def test_legacy_job_record_without_heartbeat(ws):
    """Runs started before heartbeats existed are judged by their job.json."""
    run_id = running_run(ws)
    atomic_write_json(ws.run_dir(run_id) / liveness.JOB_FILE,
                      {"pid": 2 ** 22 + 13, "host": liveness.this_host(), "argv": []})
    assert ws.get_run(run_id).status == "interrupted"


# --------------------------------------------------------------------------- the writer
def test_recorder_beats_while_running_and_clears_at_the_end(ws, monkeypatch):
    monkeypatch.setattr(liveness, "HEARTBEAT_EVERY_S", 0.05)
    run_id = ws.create_run("scratch", {})
    rec = RunRecorder(ws, run_id, "scratch")
    rec.start({"mode": "scratch"})
    path = ws.run_dir(run_id) / liveness.HEARTBEAT_FILE
    first = json.loads(path.read_text())
    assert (first["pid"], first["host"]) == (os.getpid(), liveness.this_host())
    assert first["proc_start"] == liveness.proc_start_time(os.getpid())
    deadline = time.monotonic() + 10
    while json.loads(path.read_text())["updated"] == first["updated"]:
        assert time.monotonic() < deadline, "the heartbeat was not refreshed"
        time.sleep(0.02)
    assert ws.get_run(run_id).status == "running"
    rec.finish("done")
    assert not path.exists() and ws.get_run(run_id).status == "done"
    time.sleep(0.2)
    assert not path.exists()                        # the thread stopped with it


def test_claim_refuses_a_run_another_live_process_trains(ws):
    run_id = running_run(ws)
    other = beat(ws, run_id, **live_other_process())
    with pytest.raises(RunBusyError) as err:
        claim_run(ws, run_id)
    assert f"pid {other['pid']} on {liveness.this_host()}" in str(err.value)
    with pytest.raises(RunBusyError):
        RunRecorder(ws, run_id, "scratch").start({"mode": "scratch"})
    assert json.loads((ws.run_dir(run_id) / liveness.HEARTBEAT_FILE).read_text()) == other
    # once that process is gone the run is free (and reads interrupted until claimed)
    beat(ws, run_id, pid=2 ** 22 + 17)
    assert ws.get_run(run_id).status == "interrupted"
    assert claim_run(ws, run_id)["pid"] == os.getpid()
    assert ws.get_run(run_id).status == "running"


def test_second_resume_of_a_live_run_is_refused_in_one_line(ws, tmp_path, capsys):
    run_id = running_run(ws)
    (ws.run_dir(run_id) / "checkpoint.pt").write_bytes(b"not loaded: refused before")
    other = beat(ws, run_id, **live_other_process())
    with pytest.raises(RunBusyError, match=f"run {run_id} is being trained by pid {other['pid']}"):
        train(None, ws, resume=True, run_id=run_id)
    code = main(["train", str(ws.root), "--workspace", str(ws.path), "--resume",
                 "--run", str(run_id)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error: --resume: run") and f"pid {other['pid']} on" in err[0]
    with pytest.raises(RunBusyError, match=f"pid {other['pid']}"):
        jobs.resume(ws, run_id)                     # the app's Resume
    assert stored_status(ws, run_id) == "running"   # the other process's run is untouched
    assert ws.get_run(run_id).message is None


# --------------------------------------------------------------------------- the surfaces
def test_cli_runs_shows_interrupted_and_the_resume_command(ws, capsys):
    scratch = running_run(ws)
    beat(ws, scratch, pid=2 ** 22 + 19)
    fast = running_run(ws, mode="fast")
    beat(ws, fast, pid=2 ** 22 + 23)
    live = running_run(ws)
    beat(ws, live, pid=os.getpid(), proc_start=liveness.proc_start_time(os.getpid()))
    assert main(["runs", str(ws.path)]) == 0
    rows = {int(line.split()[0]): line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[scratch].split()[1] == "interrupted"
    assert (f"python -m selfclassifier_core train {ws.root} --workspace {ws.path} --resume "
            f"--run {scratch}") in rows[scratch]
    assert rows[fast].split()[1] == "interrupted" and "start it again" in rows[fast]
    assert rows[live].split()[1] == "running" and "interrupted" not in rows[live]


def test_job_status_of_an_interrupted_run(ws):
    run_id = running_run(ws)
    beat(ws, run_id, pid=2 ** 22 + 29)
    (ws.run_dir(run_id) / runfiles.LOG_FILE).write_text("step 3\nerror: CUDA out of memory\n")
    st = jobs.job_status(ws, run_id)
    assert (st.status, st.alive, st.finished) == ("interrupted", False, True)
    assert "error: CUDA out of memory" in st.message and "--resume --run" in st.message
    assert not st.can_resume                        # nothing to resume from yet
    (ws.run_dir(run_id) / "checkpoint.pt").write_bytes(b"")
    assert jobs.job_status(ws, run_id).can_resume
    assert stored_status(ws, run_id) == "running"   # job_status does not rewrite it
    jobs.cancel(ws, run_id)                         # cancelling it ends it for good
    assert ws.get_run(run_id).status == "cancelled"


def test_an_interrupted_fast_run_is_not_resumed(ws):
    run_id = running_run(ws, mode="fast")
    beat(ws, run_id, pid=2 ** 22 + 31)
    (ws.run_dir(run_id) / "checkpoint.pt").write_bytes(b"")
    st = jobs.job_status(ws, run_id)
    assert st.status == "interrupted" and not st.can_resume
    with pytest.raises(Exception, match="fast-mode run is not resumed"):
        jobs.resume(ws, run_id)


def test_a_finished_run_whose_continuation_died_reads_done_with_its_results(ws):
    """Training a finished run further and losing the process (kill -9, power cut) must not
    hide the finished run: it reads done as it was (message, config, finish time), its
    continuation interrupted with why and how to go on; a live continuation reads running."""
    run_id = ws.create_run("scratch", {"folder": str(ws.root), "epochs": 2})
    ws.update_run(run_id, status="done", finished=123.0, message="time budget reached")
    finished = ws.get_run(run_id)
    rec = RunRecorder(ws, run_id, "scratch")
    rec.start({"folder": str(ws.root), "epochs": 5}, resume=True, continuing=finished)
    try:
        now = ws.get_run(run_id)
        assert now.status == "running" and now.summary is None     # live: nothing to add
    finally:
        rec.release()
    beat(ws, run_id, pid=2 ** 22 + 5)                              # its process is gone
    run = ws.get_run(run_id)
    assert stored_status(ws, run_id) == "running"                  # read, not rewritten
    assert (run.status, run.finished, run.message) == ("done", 123.0, "time budget reached")
    assert run.config["epochs"] == 2 and run.continuation["status"] == "interrupted"
    assert "continuing it was interrupted" in run.summary and "--resume" in run.summary
    assert [r.id for r in ws.list_runs() if r.status == "done"] == [run_id]
    # a continuation that ends well clears the record
    rec = RunRecorder(ws, run_id, "scratch")
    rec.start({"folder": str(ws.root), "epochs": 5}, resume=True, continuing=run)
    rec.finish("done")
    assert ws.get_run(run_id).continuation is None and ws.get_run(run_id).summary is None


# --------------------------------------------------------------------------- real processes
@pytest.mark.slow  # starts a subprocess
def test_pid_of_an_ended_process_reads_interrupted(ws):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    run_id = running_run(ws)
    beat(ws, run_id, pid=proc.pid)
    assert ws.get_run(run_id).status == "interrupted"


@pytest.mark.slow  # trains
def test_resume_of_an_interrupted_run(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=16)
    opts = dict(classes=2, epochs=2, batch_size=8, **FAST)
    first = train_one_epoch_then_cancel(folder, tmp_path / "ws", **opts)
    ws, run_id = first.workspace, first.run_id
    # as a `kill -9` after the first epoch's checkpoint leaves it: running, a dead process
    ws.update_run(run_id, status="running", message=None)
    beat(ws, run_id, pid=2 ** 22 + 37)
    assert ws.get_run(run_id).status == "interrupted"
    resumed = train(None, ws, resume=True, run_id=run_id, device="cpu")
    assert resumed.status == "done" and resumed.run_id == run_id
    run = ws.get_run(run_id)
    assert run.status == "done" and run.summary is None
    assert not (run.dir / liveness.HEARTBEAT_FILE).exists()
    assert [s["epoch"] for s in runfiles.read_stats(run.dir)] == [1, 2]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow  # background training processes
@pytest.mark.usefixtures("one_torch_thread")
def test_kill_9_of_a_background_job_reads_interrupted_and_resumes(tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", n=16)
    opts = dict(classes=2, epochs=500, batch_size=8, n_local=0, workers=0, device="cpu")
    run_id = jobs.start_training(folder, tmp_path / "ws", opts, after=())
    ws = Workspace.open(tmp_path / "ws")
    run_dir = ws.run_dir(run_id)
    try:
        _wait_for(lambda: (run_dir / "checkpoint.pt").exists()
                  or jobs.job_status(ws, run_id).finished, 240, "the first checkpoint")
        st = jobs.job_status(ws, run_id)
        assert st.alive and st.status == "running", st.log_tail
        assert json.loads((run_dir / liveness.HEARTBEAT_FILE).read_text())["pid"] == st.pid
        os.kill(st.pid, signal.SIGKILL)
        st = _wait_for(lambda: (s := jobs.job_status(ws, run_id)).status == "interrupted" and s,
                       30, "interrupted")
        assert not st.alive and st.finished and st.can_resume
        assert "signal 9" in st.message and "--resume --run" in st.message
        assert stored_status(ws, run_id) == "running"
        assert jobs.active_run(ws) is None
        assert main(["runs", str(ws.path)]) == 0
        row = capsys.readouterr().out.splitlines()[1]
        assert row.split()[:2] == [str(run_id), "interrupted"] and "--resume" in row
        # the app's Resume: a new process, claimed and tracked
        jobs.resume(ws, run_id)
        st2 = jobs.job_status(ws, run_id)
        assert st2.pid != st.pid and st2.alive and st2.status in ("created", "running")
        assert json.loads((run_dir / liveness.HEARTBEAT_FILE).read_text())["pid"] == st2.pid
        jobs.cancel(ws, run_id)
        st3 = jobs.wait(ws, run_id, timeout=240)
        assert st3.status == "cancelled", st3.log_tail
    finally:
        pid = jobs.job_status(ws, run_id).pid
        if pid and jobs.job_status(ws, run_id).alive:
            os.killpg(pid, signal.SIGKILL)
