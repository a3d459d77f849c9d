"""`train`, `predict`, `runs` through the command line (subprocess), and bad values."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading

import pytest
import torch

from selfclassifier_core.engine.backbones import build_backbone
from selfclassifier_core.cli import build_parser, main
from selfclassifier_core.store.workspace import Workspace
from train_fixtures import make_folder

pytestmark = pytest.mark.slow  # trains through the command line in subprocesses


def _cli(*args, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "selfclassifier_core", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_train_predict_runs_cli(tmp_path, capsys):
    folder = make_folder(tmp_path / "imgs", n=16)
    ws = tmp_path / "my ws"
    r = _cli("train", folder, "--workspace", ws, "--classes", "2", "--epochs", "1",
             "--batch-size", "8", "--device", "cpu", "--n-local", "0", "--workers", "0",
             "--augment", "device")
    assert r.returncode == 0, r.stderr
    assert f"run 1 done in workspace {ws}" in r.stdout
    hint = r.stdout.splitlines()[-1]                  # the summary ends with the export command
    assert hint.strip().startswith("export the labels:")
    assert shlex.split(hint.split(":", 1)[1])[3:] == ["export", str(ws), "--csv",
                                                      "labels.csv"]  # copy-pastable
    run_dir = Workspace.open(ws).run_dir(1)
    assert json.loads((run_dir / "config.json").read_text())["augment"] == "device"
    stats = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [s["augment"] for s in stats] == ["device"]
    r = _cli("runs", ws)
    assert r.returncode == 0 and "done" in r.stdout and "scratch" in r.stdout
    assert "2*,4,8" in r.stdout
    r = _cli("predict", ws, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "16 images predicted: run 1" in r.stdout
    # a continuation that did not finish is told in the message column, in words
    Workspace.open(ws).update_run(1, continuation={"status": "failed", "reason": "disk on fire",
                                                   "at": 1.0})
    assert main(["runs", str(ws)]) == 0
    assert "continuing it failed (disk on fire)" in capsys.readouterr().out


def test_bad_values_exit_2_with_one_line(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=8)
    for args, words in [(["--classes", "0"], "--classes"),
                        (["--classes", "4", "--batch-size", "2"], "smaller than --classes")]:
        r = _cli("train", folder, "--workspace", tmp_path / "ws", "--device", "cpu", *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], r.stderr


def test_resume_without_checkpoint_exit_2(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=8)
    assert _cli("scan", folder, "--workspace", tmp_path / "ws").returncode == 0
    r = _cli("train", folder, "--workspace", tmp_path / "ws", "--resume")
    assert r.returncode == 2 and "no run with a checkpoint" in r.stderr


def test_resume_of_a_fast_run_exit_2_and_run_untouched(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=8)
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    run_id = ws.create_run("fast", {"classes": 2})
    (ws.run_dir(run_id) / "checkpoint.pt").write_bytes(b"never loaded")
    ws.update_run(run_id, status="done")
    before = ws.get_run(run_id)
    for args, words in [(["--run-id", str(run_id)], f"run {run_id} is a fast-mode run"),
                        ([], "fast-mode runs are not resumed")]:
        r = _cli("train", folder, "--workspace", tmp_path / "ws", "--resume", *args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith("error: --resume") and words in lines[0], r.stderr
    assert ws.get_run(run_id) == before


def test_augment_flag_values(tmp_path, capsys):
    parse = build_parser().parse_args
    assert parse(["train", "f"]).augment is None  # the trainer resolves auto
    for value in ("auto", "cpu", "device"):
        assert parse(["train", "f", "--augment", value]).augment == value
    with pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path), "--augment", "gpu"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--augment" in err and "invalid choice: 'gpu'" in err


def test_fast_run_stopped_by_sigterm_prints_no_resume_hint(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=8)
    weights = tmp_path / "small.pth"
    torch.save(build_backbone("convnet_small", False)[0].state_dict(), weights)
    cmd = [sys.executable, "-m", "selfclassifier_core", "train", str(folder), "--workspace",
           str(tmp_path / "ws"), "--pretrained", str(weights), "--backbone", "convnet_small",
           "--classes", "2", "--batch-size", "8", "--epochs", "100000", "--device", "cpu",
           "--workers", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    watchdog = threading.Timer(240, proc.kill)  # should the log line below never come
    watchdog.start()
    try:
        for line in proc.stderr:  # the training loop starts after this line
            if "fast mode:" in line and "steps" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 1, err
    run = Workspace.open(tmp_path / "ws").get_run(1)
    assert run.mode == "fast" and run.status == "cancelled"
    assert "--resume" not in out and f"run 1 cancelled in workspace {tmp_path / 'ws'}" in out
    assert "run the same train command again; it reuses the cached features" in out
