"""Background training jobs: a real short run reaches done, cancel works, a dead process reads
interrupted."""
from __future__ import annotations

import json
import os
import signal
import sys
import time

import numpy as np
import pytest
from PIL import Image

from selfclassifier_core.workflows import jobs
from selfclassifier_core.store import recent
from selfclassifier_core.store.workspace import Workspace, WorkspaceError

pytestmark = pytest.mark.slow  # background training processes

FAST = {"classes": 2, "epochs": 1, "batch_size": 16, "backbone": "resnet18", "device": "cpu"}


@pytest.fixture
def tiny_folder(tmp_path):
    """32 small images of two visually distinct kinds (dark and bright noise)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(32):
        base = 40 if i % 2 else 210
        arr = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    return folder


def _wait_until(predicate, timeout=120.0, poll=0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not met in time")


def test_background_training_reaches_done(tiny_folder, tmp_path):
    ws_path = tmp_path / "ws"
    run_id = jobs.start_training(tiny_folder, ws_path, FAST, after=("neighbors",))
    ws = Workspace.open(ws_path)
    job = (ws.run_dir(run_id) / jobs.JOB_FILE)
    assert job.exists(), "pid must be recorded in job.json"
    st = jobs.job_status(ws, run_id)
    assert st.pid and st.status in ("created", "running", "done")
    # a second start while one is training is refused, in words
    if st.alive:
        with pytest.raises(WorkspaceError, match="still training"):
            jobs.start_training(tiny_folder, ws_path, FAST)
    st = jobs.wait(ws, run_id, timeout=300)
    assert st.status == "done", f"{st.message}\n{st.log_tail}"
    assert not st.alive
    assert (ws.run_dir(run_id) / jobs.LOG_FILE).stat().st_size > 0
    assert st.progress.get("status") == "done"
    assert st.stats and "loss" in st.stats[-1]
    assert ws.get_run(run_id).status == "done"
    assert jobs.active_run(ws) is None
    # the neighbour index was built by the background process, ready for the app
    from selfclassifier_core.curation import neighbors
    assert (ws.run_dir(run_id) / neighbors.INDEX_FILE).exists()
    assert "prepared neighbors" in (ws.run_dir(run_id) / jobs.LOG_FILE).read_text()


def test_cancel_stops_a_running_job(tiny_folder, tmp_path):
    ws_path = tmp_path / "ws"
    opts = dict(FAST, epochs=500)
    run_id = jobs.start_training(tiny_folder, ws_path, opts, after=())
    ws = Workspace.open(ws_path)
    _wait_until(lambda: jobs.job_status(ws, run_id).progress.get("step") is not None
                or jobs.job_status(ws, run_id).finished, timeout=180)
    assert jobs.active_run(ws) == run_id
    jobs.cancel(ws, run_id)
    st = jobs.wait(ws, run_id, timeout=120)
    assert st.status == "cancelled", f"{st.message}\n{st.log_tail}"
    assert st.cancel_requested
    # a cancelled run can be resumed, and the resumed process is tracked again
    assert st.can_resume
    log_before = (ws.run_dir(run_id) / jobs.LOG_FILE).read_text()
    jobs.resume(ws, run_id)
    again = jobs.job_status(ws, run_id)
    job = json.loads((ws.run_dir(run_id) / jobs.JOB_FILE).read_text())
    assert job["pid"] == again.pid != st.pid                 # a new process, recorded
    assert job["argv"][-1] == "--resume" and job["cli"]      # the spec kept, the command new
    assert again.alive and again.status in ("created", "running") and not again.cancel_requested
    log_after = (ws.run_dir(run_id) / jobs.LOG_FILE).read_text()
    assert log_after.startswith(log_before)                  # appended, not replaced
    assert f"$ {' '.join(job['argv'])}" in log_after[len(log_before):]
    jobs.cancel(ws, run_id)
    st = jobs.wait(ws, run_id, timeout=120)
    assert st.status == "cancelled"


def test_dead_process_is_reported_as_interrupted(tmp_path, tiny_folder):
    """A run the database calls running whose process died reads interrupted, with the signal,
    the log's last error and the command that resumes it; the database is not rewritten."""
    ws = Workspace.for_folder(tiny_folder, tmp_path / "ws")
    run_id = ws.create_run("scratch", {"folder": str(tiny_folder)})
    # stand-in for a training process that crashes hard (killed by the OOM killer, say)
    cmd = [sys.executable, "-c",
           "import time; print('error: out of memory while loading batch', flush=True); "
           "time.sleep(60)"]
    pid = jobs._launch(ws, run_id, cmd)
    ws.update_run(run_id, status="running")
    _wait_until(lambda: "\nerror: out of memory" in jobs.job_status(ws, run_id).log_tail, 30)
    st = jobs.job_status(ws, run_id)
    assert st.alive and st.status == "running"
    os.killpg(pid, signal.SIGKILL)
    st = _wait_until(lambda: (s := jobs.job_status(ws, run_id)).status == "interrupted" and s,
                     30)
    assert not st.alive and st.finished
    assert st.message.startswith("interrupted: its training process (pid "
                                 f"{pid} on {os.uname().nodename}) is gone")
    assert "killed by signal 9" in st.message
    assert "Last message: error: out of memory" in st.message and "out of memory" in st.log_tail
    assert f"--resume --run {run_id}" in st.message
    assert ws.get_run(run_id).status == "interrupted"    # every reader sees the same
    assert not st.can_resume                             # no checkpoint was ever written
    (ws.run_dir(run_id) / "checkpoint.pt").write_bytes(b"")
    assert jobs.job_status(ws, run_id).can_resume


def test_dead_process_of_another_server_is_reported(tmp_path, tiny_folder):
    """After a server restart the job is not our child: liveness comes from the pid alone."""
    ws = Workspace.for_folder(tiny_folder, tmp_path / "ws")
    run_id = ws.create_run("scratch", {})
    ws.update_run(run_id, status="running")
    from selfclassifier_core.store.fsutil import atomic_write_json
    atomic_write_json(ws.run_dir(run_id) / jobs.JOB_FILE, {"pid": 2 ** 22 - 3, "argv": []})
    st = jobs.job_status(ws, run_id)
    assert st.status == "interrupted" and not st.alive


def test_unknown_option_and_missing_folder_rejected(tmp_path, tiny_folder):
    with pytest.raises(ValueError, match="colour"):
        jobs.start_training(tiny_folder, tmp_path / "ws", {"colour": 1})
    with pytest.raises(ValueError, match="fast mode only"):
        jobs.start_training(tiny_folder, tmp_path / "ws", {"mode": "scratch", "image_size": 96})
    with pytest.raises(ValueError, match="after-training"):
        jobs.start_training(tiny_folder, tmp_path / "ws", {}, after=("coffee",))
    with pytest.raises(WorkspaceError, match="does not exist"):
        jobs.start_training(tmp_path / "nope", tmp_path / "ws2", {})


def test_cancel_of_a_run_without_process_marks_it_cancelled(tmp_path, tiny_folder):
    ws = Workspace.for_folder(tiny_folder, tmp_path / "ws")
    run_id = ws.create_run("scratch", {})
    jobs.cancel(ws, run_id)
    assert ws.get_run(run_id).status == "cancelled"


def test_recent_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    assert recent.load_recent() == []
    recent.remember(a, tmp_path / "wa")
    recent.remember(b)
    recent.remember(a, tmp_path / "wa")
    folders = [e["folder"] for e in recent.load_recent()]
    assert folders == [str(a.resolve()), str(b.resolve())]
    assert recent.load_recent()[0]["workspace"] == str((tmp_path / "wa").resolve())
    b.rmdir()
    assert [e["folder"] for e in recent.load_recent()] == [str(a.resolve())]
    for i in range(15):
        (tmp_path / f"f{i}").mkdir()
        recent.remember(tmp_path / f"f{i}")
    assert len(recent.load_recent()) == recent.MAX_RECENT
    # a corrupt file counts as empty and is replaced on the next write
    (recent.default_home() / recent.RECENT_FILE).write_text("{not json")
    assert recent.load_recent() == []
    recent.remember(a)
    assert len(recent.load_recent()) == 1
