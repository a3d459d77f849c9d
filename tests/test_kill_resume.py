"""A training process killed with SIGKILL in the middle of an epoch, with local crops and loader
workers on, continues with ``train --resume``: the run completes, and it completes the same way
every time (two copies of the killed workspace resumed give identical weights, which are also
the weights of the run never killed)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from selfclassifier_core.store.checkpoint import load_checkpoint
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.store.runfiles import read_progress, read_stats
from selfclassifier_core.store.workspace import Workspace
from train_fixtures import assert_same_weights, make_folder

pytestmark = pytest.mark.slow  # trains in subprocesses, kills one

REPO = Path(__file__).resolve().parents[1]
# 32 images, batch 8: 4 steps an epoch; one local crop per image, one loader worker
OPTIONS = dict(classes=2, epochs=3, batch_size=8, seed=7, n_local=1, workers=1,
               nn_positives=True, global_size=8, proj_hidden_dim=64, device="cpu")
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # every process computes alike

# train(folder, workspace, **OPTIONS) with progress.json written at every step (normally every
# 2 s), so that the test sees the moment epoch 2 is under way; nothing else is changed
CHILD = textwrap.dedent("""
    import json, sys
    from selfclassifier_core.store import runfiles
    from selfclassifier_core.workflows.pipeline import train

    runfiles.PROGRESS_EVERY_S = 0.0
    train(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
    print("finished")
""")


def _start_training(folder: Path, workspace: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(folder), str(workspace),
                             json.dumps(OPTIONS)], cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume(folder: Path, workspace: Path, run_id: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "selfclassifier_core", "train", str(folder),
                             "--workspace", str(workspace), "--resume", "--run", str(run_id),
                             "--device", "cpu"], cwd=REPO, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_in_epoch_2(proc: subprocess.Popen, run_dir: Path) -> dict:
    """SIGKILL the process group (the trainer and its loader worker) once progress.json shows
    epoch 2 begun and not yet at its last step; returns that progress record."""
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached epoch 2"
            seen = read_progress(run_dir)   # {} until there is one
            if seen.get("epoch") == 2 and 1 <= seen.get("epoch_step", 0) < seen["epoch_steps"]:
                os.killpg(proc.pid, signal.SIGKILL)
                return seen
            time.sleep(0.005)
    finally:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL and "finished" not in out, err[-2000:]


def test_sigkill_mid_epoch_then_resume_completes_and_is_deterministic(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=32)
    straight = _start_training(folder, tmp_path / "straight")   # the run never killed
    killed_ws = tmp_path / "killed"
    seen = _kill_in_epoch_2(_start_training(folder, killed_ws), killed_ws / "runs" / "1")

    # killed in epoch 2: its last checkpoint is epoch 1's, whole (written atomically)
    ckpt = load_checkpoint(killed_ws / "runs" / "1" / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["partial"]) == (1, 4, False)
    assert seen["step"] > 4
    killed = Workspace.open(killed_ws).get_run(1)
    assert killed.status != "done"                        # running or interrupted
    assert (killed.config["n_local"], killed.config["workers"]) == (1, 1)
    copies = [tmp_path / "copy-a", tmp_path / "copy-b"]
    for copy in copies:
        shutil.copytree(killed_ws, copy)   # workspace.db with its -wal, as the kill left it

    resumes = [_resume(folder, copy, 1) for copy in copies]
    for proc in [*resumes, straight]:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        assert ("run 1 done" in out) if proc in resumes else ("finished" in out), out

    for copy in copies:
        ws = Workspace.open(copy)
        run = ws.get_run(1)
        assert run.status == "done" and read_progress(run.dir)["status"] == "done"
        assert [s["epoch"] for s in read_stats(run.dir)] == [1, 2, 3]  # no half epoch 2 line
        assert load_checkpoint(run.dir / "checkpoint.pt")["step"] == 12
        preds = load_predictions(run.dir)
        assert sorted(preds.image_ids.tolist()) == sorted(i for i, _ in ws.usable_images())
        assert len(preds.image_ids) == 32
    assert_same_weights(copies[0] / "runs" / "1", copies[1] / "runs" / "1")
    assert_same_weights(copies[0] / "runs" / "1", tmp_path / "straight" / "runs" / "1")
