"""Command line: `labels WS ...` and `export WS ...`, outputs and exit codes."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from selfclassifier_core.cli import main
from selfclassifier_core.curation.labels import Labels
from workspace_fixtures import add_run, make_workspace_with_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws_run(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=20, heads=(3, 6), seed=0)


def test_labels_edit_commands(ws_run, capsys):
    ws, _ = ws_run
    W = str(ws.path)
    assert main(["labels", W, "rename", "1", "Cats 🐱"]) == 0
    assert main(["labels", W, "merge", "0", "2", "--name", "Rest"]) == 0
    assert main(["labels", W, "move", "--to-cluster", "1", "3", "a/img_0004.png"]) == 0
    assert main(["labels", W, "move", "--to-label", "Birds", "6"]) == 0
    assert main(["labels", W, "create", "Fish"]) == 0
    assert main(["labels", W, "exclude", "7", "8"]) == 0
    assert main(["labels", W, "include", "8"]) == 0
    lab = Labels(ws)
    assert lab.cluster_names() == {0: "Rest", 1: "Cats 🐱", 2: "Rest"}
    df = lab.final_table()
    assert df.loc[3, "cluster"] == 1 and df.loc[5, "cluster"] == 1   # id 5 = a/img_0004.png
    assert df.loc[6, "label"] == "Birds" and df.loc[7, "excluded"] and not df.loc[8, "excluded"]
    assert "Fish" in lab.label_names()
    capsys.readouterr()
    assert main(["labels", W, "history"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[3] for line in out.splitlines()] == [
        "applied"] * 7 and "merge" in out
    assert main(["labels", W, "undo", "--steps", "2"]) == 0
    assert not Labels(ws).final_table().loc[7, "excluded"]
    assert main(["labels", W, "redo"]) == 0
    assert Labels(ws).final_table().loc[7, "excluded"]
    capsys.readouterr()
    assert main(["labels", W, "list"]) == 0
    out = capsys.readouterr().out
    assert "Cats 🐱" in out and "Rest" in out
    assert main(["labels", W, "list", "--by-label"]) == 0
    assert "Birds" in capsys.readouterr().out
    assert main(["labels", W, "list", "--images"]) == 0
    assert "a/img_0000.png" in capsys.readouterr().out


def test_labels_run_and_head_options(ws_run):
    ws, run_id = ws_run
    W = str(ws.path)
    assert main(["labels", W, "--head", "6", "rename", "5", "Fine"]) == 0
    assert main(["labels", W, "rename", "5", "Finer", "--head", "6", "--run", str(run_id)]) == 0
    assert Labels(ws, head=6).cluster_names()[5] == "Finer"
    assert Labels(ws, head=3).history() == []


def test_labels_carry(ws_run, capsys):
    ws, run1 = ws_run
    Labels(ws, run1).rename(0, "Cats")
    run2 = add_run(ws, heads=(3, 6), seed=0)           # same clusters: identity match
    assert main(["labels", str(ws.path), "--run", str(run2), "carry", "--from", str(run1)]) == 0
    assert "carry-over" in capsys.readouterr().out
    assert Labels(ws, run2).cluster_names()[0] == "Cats"


def test_labels_carry_lists_overwritten_edits(ws_run, capsys):
    ws, run1 = ws_run
    Labels(ws, run1).rename(0, "Cats")
    run2 = add_run(ws, heads=(3, 6), seed=0)           # same clusters: identity match
    Labels(ws, run2).rename(0, "Kittens")
    capsys.readouterr()
    assert main(["labels", str(ws.path), "--run", str(run2), "carry", "--from", str(run1)]) == 0
    out = capsys.readouterr().out
    assert f"overwrote 1 earlier edit(s) of run {run2}" in out
    assert "cluster 0: name 'Kittens' -> 'Cats'" in out
    assert main(["labels", str(ws.path), "--run", str(run2), "undo"]) == 0
    assert Labels(ws, run2).cluster_names()[0] == "Kittens"


def test_labels_delete(ws_run, capsys):
    ws, _ = ws_run
    W = str(ws.path)
    assert main(["labels", W, "rename", "1", "Cats"]) == 0
    assert main(["labels", W, "move", "--to-label", "Cats", "3", "4"]) == 0
    assert main(["labels", W, "exclude", "4"]) == 0
    assert main(["labels", W, "create", "Fish"]) == 0
    before = Labels(ws).final_table()
    capsys.readouterr()
    assert main(["labels", W, "delete", "Cats"]) == 0
    assert "done (history" in capsys.readouterr().out
    assert main(["labels", W, "delete", "Fish"]) == 0
    lab = Labels(ws)
    assert lab.cluster_names()[1] == "cluster_1"
    assert "Cats" not in lab.label_names() and "Fish" not in lab.label_names()
    df = lab.final_table()
    assert df.loc[3, "label"] == f"cluster_{df.loc[3, 'predicted_cluster']}"
    assert df.loc[4, "excluded"]
    assert [e.op for e in lab.history()][-2:] == ["delete_label", "delete_label"]
    assert main(["labels", W, "undo", "--steps", "2"]) == 0
    assert "undo: delete_label {'name': 'Cats'}" in capsys.readouterr().out
    pd.testing.assert_frame_equal(Labels(ws).final_table(), before)


@pytest.mark.parametrize("argv,fragment", [
    (["rename", "7", "x"], "unknown cluster 7"),
    (["rename", "1", "   "], "empty"),
    (["exclude", "999"], "999"),
    (["move", "--to-label", "x", "no/such.png"], "no/such.png"),
    (["create", "cluster_0"], "already exists"),
    (["merge", "1"], "two"),
    (["delete", "Nope"], "unknown label 'Nope'"),
    (["delete", "cluster_1"], "default name of cluster 1"),
])
def test_labels_user_errors_exit_2(ws_run, capsys, argv, fragment):
    ws, _ = ws_run
    assert main(["labels", str(ws.path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and fragment in err and len(err.splitlines()) == 1
    assert Labels(ws).history() == []


def test_missing_workspace_and_bad_usage(tmp_path, capsys):
    assert main(["labels", str(tmp_path / "nope"), "list"]) == 2
    assert "no workspace" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["labels", str(tmp_path), "frobnicate"])
    assert exc.value.code == 2


def test_export_commands(ws_run, tmp_path, capsys):
    ws, _ = ws_run
    Labels(ws).rename(0, "=cmd")
    Labels(ws).exclude([1])
    W = str(ws.path)
    assert main(["export", W, "--csv", str(tmp_path / "l.csv"), "--parquet",
                 str(tmp_path / "l.parquet"), "--jsonl", str(tmp_path / "l.jsonl")]) == 0
    rows = list(csv.DictReader((tmp_path / "l.csv").open(encoding="utf-8")))
    assert list(rows[0]) == ["path", "label", "cluster", "confidence", "margin", "head", "edited"]
    assert len(rows) == 19 and "'=cmd" in {r["label"] for r in rows}
    assert len(pd.read_parquet(tmp_path / "l.parquet")) == 19
    assert len((tmp_path / "l.jsonl").read_text().splitlines()) == 19
    assert main(["export", W, "--csv", str(tmp_path / "all.csv"), "--include-excluded"]) == 0
    rows = list(csv.DictReader((tmp_path / "all.csv").open(encoding="utf-8")))
    assert len(rows) == 20 and rows[0]["excluded"] == "true" and rows[1]["excluded"] == "false"
    assert main(["export", W, "--csv", str(tmp_path / "h6.csv"), "--head", "6"]) == 0
    rows = list(csv.DictReader((tmp_path / "h6.csv").open(encoding="utf-8")))
    assert len(rows) == 20 and {r["head"] for r in rows} == {"6"}   # edits are per head
    tree = tmp_path / "tree"
    assert main(["export", W, "--imagefolder", str(tree), "--link", "sym"]) == 0
    assert json.loads((tree / "mapping.json").read_text())["link"] == "sym"
    capsys.readouterr()
    assert main(["export", W, "--imagefolder", str(tree)]) == 2          # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["export", W, "--imagefolder", str(tree), "--overwrite"]) == 0
    assert main(["export", W]) == 2                                         # no target
    assert "needs a target" in capsys.readouterr().err
    assert main(["export", W, "--csv", str(tmp_path / "x.csv"), "--head", "4"]) == 2
    # an image folder whose default workspace does not exist is an error, not a new workspace
    assert main(["export", str(ws.root), "--csv", str(tmp_path / "y.csv")]) == 2


@pytest.mark.slow  # subprocesses
def test_module_entry_point_exit_codes(ws_run, tmp_path):
    ws, _ = ws_run

    def run(*args):
        return subprocess.run([sys.executable, "-m", "selfclassifier_core", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)

    p = run("labels", str(ws.path), "rename", "0", "Zebras")
    assert p.returncode == 0, p.stderr
    p = run("labels", str(ws.path), "rename", "9", "x")
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:")
    p = run("export", str(ws.path), "--csv", str(tmp_path / "o.csv"))
    assert p.returncode == 0 and "Zebras" in (tmp_path / "o.csv").read_text()
