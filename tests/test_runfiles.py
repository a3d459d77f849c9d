"""The run recorder's statistics file: a resumed run keeps only the lines its checkpoint has."""
from __future__ import annotations

import json

from selfclassifier_core.store.runfiles import STATS_FILE, RunRecorder, read_stats
from selfclassifier_core.store.workspace import Workspace


def _recorder(tmp_path) -> RunRecorder:
    ws = Workspace.open(tmp_path / "ws", create=True)
    run_id = ws.create_run("scratch", {"epochs": 3})
    return RunRecorder(ws, run_id, "scratch")


def test_a_resume_drops_the_lines_after_its_checkpoint(tmp_path):
    rec = _recorder(tmp_path)
    for epoch, step in ((1, 4), (2, 8), (3, 12)):      # epoch 3's line, then a kill: no ckpt
        rec.append_stats({"epoch": epoch, "step": step, "steps": 4, "loss": 1.0 / epoch})
    assert rec.trim_stats(8) == 1
    assert [(r["epoch"], r["step"]) for r in read_stats(rec.dir)] == [(1, 4), (2, 8)]
    rec.append_stats({"epoch": 3, "step": 12, "steps": 4, "loss": 0.3})  # the resumed epoch 3
    assert [r["epoch"] for r in read_stats(rec.dir)] == [1, 2, 3]    # once, not twice


def test_a_partial_epoch_in_the_checkpoint_is_kept(tmp_path):
    rec = _recorder(tmp_path)
    rec.append_stats({"epoch": 1, "step": 4, "steps": 4})
    rec.append_stats({"epoch": 2, "step": 6, "steps": 2})            # cancelled mid-epoch
    before = (rec.dir / STATS_FILE).read_text()
    assert rec.trim_stats(6) == 0                                      # its checkpoint: step 6
    assert (rec.dir / STATS_FILE).read_text() == before               # untouched
    assert [json.loads(x)["step"] for x in before.splitlines()] == [4, 6]


def test_no_statistics_yet_is_nothing_to_trim(tmp_path):
    rec = _recorder(tmp_path)
    assert rec.trim_stats(0) == 0 and not (rec.dir / STATS_FILE).exists()
