"""Labels: every operation with undo/redo, validation, crash safety, two writers, carry-over."""
from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from selfclassifier_core.curation.labels import Labels, carry_over, default_name
from selfclassifier_core.store.predictions import load_predictions
from workspace_fixtures import add_run, cluster_assignments, make_workspace_with_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws_run(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=30, heads=(3, 12), seed=0,
                                   write_images=False, n_unreadable=2)


def labels_by_id(lab: Labels) -> dict[int, str]:
    df = lab.final_table()
    return dict(zip(df.index.tolist(), df["label"].tolist()))


def ids_in(ws, run_id, head, cluster):
    preds = load_predictions(ws.run_dir(run_id), embeddings=False)
    hp = preds.heads[head]
    return [int(i) for i in preds.image_ids[hp.cluster == cluster]]


# ---------------------------------------------------------------------- defaults and reading
def test_defaults_and_final_table(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    assert (lab.run_id, lab.head) == (run_id, 3)
    assert lab.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2"}
    assert Labels(ws, head=12).cluster_names()[3] == "cluster_03"
    assert default_name(7, 100) == "cluster_007"
    df = lab.final_table()
    assert list(df.columns[:8]) == ["path", "label", "cluster", "confidence", "margin", "head",
                                    "edited", "excluded"]
    # unreadable catalog rows (ids 31, 32) have no prediction and are not in the table
    assert df.index.tolist() == list(range(1, 31))
    expected = cluster_assignments(30, 3, seed=0)
    assert df["cluster"].tolist() == expected.tolist()
    assert df["label"].tolist() == [f"cluster_{c}" for c in expected]
    assert df.loc[1, "path"] == "a/img_0000.png" and df.loc[2, "path"] == "b/img_0001.png"
    assert (df["head"] == 3).all() and not df["edited"].any() and not df["excluded"].any()


def test_unknown_head_and_run(ws_run):
    ws, _ = ws_run
    with pytest.raises(ValueError, match="5"):
        Labels(ws, head=5)
    from selfclassifier_core.store.workspace import WorkspaceError
    with pytest.raises(WorkspaceError):
        Labels(ws, run_id=99)


def test_predictions_are_read_at_first_use_not_for_the_history(ws_run, monkeypatch):
    import selfclassifier_core.curation.labelstate as labelstate

    ws, run_id = ws_run
    Labels(ws, head=3).rename(0, "cats")
    reads = []
    real = labelstate.load_predictions
    monkeypatch.setattr(labelstate, "load_predictions",
                        lambda *a, **k: reads.append(1) or real(*a, **k))
    lab = Labels(ws, head=3)
    assert [e.op for e in lab.history()] == ["rename"] and lab.can_undo() and reads == []
    lab.undo()                             # a rename's undo needs no prediction either
    assert lab.cluster_names()[0] == "cluster_0" and reads == []
    lab.move([1, 2], cluster=1)            # checks the ids against the run's: reads them
    assert len(reads) == 1
    expected = cluster_assignments(30, 3, seed=0)
    expected[:2] = 1                       # images 1 and 2, moved
    assert lab.final_table()["cluster"].tolist() == expected.tolist()
    assert len(reads) == 1                 # read once, then kept
    given = Labels(ws, head=3, predictions=real(ws.run_dir(run_id)))   # the caller's copy
    assert given.final_table()["cluster"].tolist() == expected.tolist() and len(reads) == 1
    asked = []                                                         # or its way to get it
    lazy = Labels(ws, head=3, predictions=lambda: asked.append(1) or real(ws.run_dir(run_id)))
    assert lazy.edit_marker() and asked == []
    assert lazy.final_table()["cluster"].tolist() == expected.tolist()
    lazy.final_table()
    assert asked == [1] and len(reads) == 1


def test_the_edit_marker_changes_with_every_edit_undo_and_redo(ws_run):
    ws, _ = ws_run
    lab, other = Labels(ws, head=3), Labels(ws, head=12)
    seen = [lab.edit_marker()]
    lab.rename(0, "cats")
    seen.append(lab.edit_marker())
    lab.undo()
    seen.append(lab.edit_marker())
    lab.redo()
    seen.append(lab.edit_marker())
    lab.undo()
    lab.rename(1, "dogs")                  # the undone rename is discarded, one op is added
    seen.append(lab.edit_marker())
    assert all(a != b for a, b in zip(seen, seen[1:])), seen  # each step changes it
    assert seen[3] == seen[1] and len(set(seen)) == 4         # a redo is the renamed state again
    assert Labels(ws, head=3).edit_marker() == seen[-1]      # another object, same state
    assert other.edit_marker() == "0.0.0"                    # the other head: untouched


def test_image_no_longer_usable_left_out(ws_run):
    ws, _ = ws_run
    with ws.transaction() as conn:
        conn.execute("UPDATE images SET status='missing' WHERE id=5")
    df = Labels(ws).final_table()
    assert 5 not in df.index and len(df) == 29


# ---------------------------------------------------------------------- operations + undo/redo
def test_rename_undo_redo(ws_run):
    ws, _ = ws_run
    lab = Labels(ws)
    members = ids_in(ws, lab.run_id, 3, 1)
    assert lab.rename(1, "  Katzen 🐱 ") is not None
    assert lab.cluster_names()[1] == "Katzen 🐱"
    got = labels_by_id(lab)
    assert all(got[i] == "Katzen 🐱" for i in members)
    assert not lab.final_table()["edited"].any()   # renames are not per-image edits
    assert lab.rename(1, "Katzen 🐱") is None       # no change, no history row
    lab.rename(1, "Cats")
    assert lab.undo().op == "rename"
    assert lab.cluster_names()[1] == "Katzen 🐱"
    lab.undo()
    assert lab.cluster_names()[1] == "cluster_1"
    assert lab.undo() is None
    lab.redo()
    lab.redo()
    assert lab.cluster_names()[1] == "Cats"
    assert lab.redo() is None


@pytest.mark.parametrize("bad", ["", "   ", "\t\n", None, 3])
def test_bad_names_rejected(ws_run, bad):
    lab = Labels(ws_run[0])
    with pytest.raises(ValueError):
        lab.rename(0, bad)
    with pytest.raises(ValueError):
        lab.create_label(bad)
    with pytest.raises(ValueError):
        lab.move([1], label=bad)
    assert lab.history() == []


def test_unknown_clusters_and_images_named(ws_run):
    lab = Labels(ws_run[0])
    with pytest.raises(ValueError, match="7"):
        lab.rename(7, "x")
    with pytest.raises(ValueError, match="-1"):
        lab.merge([0, -1])
    with pytest.raises(ValueError, match="999"):
        lab.move([1, 999], cluster=0)
    with pytest.raises(ValueError, match="31"):   # unreadable image: no prediction
        lab.exclude([31])
    with pytest.raises(ValueError, match="exactly one"):
        lab.move([1], cluster=0, label="x")
    with pytest.raises(ValueError):
        lab.move([1])
    with pytest.raises(ValueError, match="two"):
        lab.merge([1, 1])
    assert lab.history() == []


def test_merge_shares_name_and_undo(ws_run):
    ws, _ = ws_run
    lab = Labels(ws)
    lab.rename(2, "Dogs")
    lab.merge([0, 2], into=2)
    names = lab.cluster_names()
    assert names[0] == names[2] == "Dogs" and names[1] == "cluster_1"
    df = lab.final_table()
    members = set(ids_in(ws, lab.run_id, 3, 0)) | set(ids_in(ws, lab.run_id, 3, 2))
    assert set(df.index[df["label"] == "Dogs"]) == members
    # cluster ids are kept (the model's); the summary reports the shared name
    summ = lab.cluster_summary()
    assert summ.loc[0, "shared_with"] == [2] and summ.loc[2, "shared_with"] == [0]
    assert summ.loc[0, "label_size"] == len(members)
    by_label = lab.cluster_summary(by="label")
    assert by_label.loc["Dogs", "size"] == len(members)
    assert by_label.loc["Dogs", "clusters"] == [0, 2]
    lab.merge([0, 1], name="Animals")
    assert set(lab.cluster_names().values()) == {"Animals", "Dogs"}
    lab.undo()
    lab.undo()
    assert lab.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "Dogs"}
    lab.redo()
    assert lab.cluster_names()[0] == "Dogs"


def test_rename_to_existing_name_merges_in_summary(ws_run):
    lab = Labels(ws_run[0])
    lab.rename(0, "cluster_1")
    summ = lab.cluster_summary()
    assert summ.loc[1, "shared_with"] == [0]
    assert lab.cluster_summary("label").loc["cluster_1", "clusters"] == [0, 1]
    assert "cluster_0" not in lab.label_names()


def test_move_to_cluster_follows_renames(ws_run):
    ws, _ = ws_run
    lab = Labels(ws)
    img = ids_in(ws, lab.run_id, 3, 0)[0]
    lab.move([img], cluster=2)
    row = lab.final_table().loc[img]
    assert (row["cluster"], row["label"], row["predicted_cluster"]) == (2, "cluster_2", 0)
    assert row["edited"]
    lab.rename(2, "Birds")
    assert lab.final_table().loc[img, "label"] == "Birds"
    summ = lab.cluster_summary()
    assert summ.loc[2, "size"] == len(ids_in(ws, lab.run_id, 3, 2)) + 1
    assert summ.loc[0, "size"] == len(ids_in(ws, lab.run_id, 3, 0)) - 1
    # moving back to its own cluster removes the edit
    lab.move([img], cluster=0)
    row = lab.final_table().loc[img]
    assert row["label"] == "cluster_0" and not row["edited"]
    lab.undo()
    assert lab.final_table().loc[img, "cluster"] == 2
    lab.undo()   # the rename
    lab.undo()   # the move
    row = lab.final_table().loc[img]
    assert row["cluster"] == 0 and not row["edited"]


def test_move_to_label_new_and_existing(ws_run):
    ws, _ = ws_run
    lab = Labels(ws)
    lab.rename(1, "Cats")
    lab.move([1, 2], label="Cats")         # an existing name: joins cluster 1's label
    lab.move([3], label=" Zebras ")        # a new name
    df = lab.final_table()
    assert df.loc[1, "label"] == df.loc[2, "label"] == "Cats"
    assert df.loc[1, "cluster"] == 1
    assert df.loc[3, "label"] == "Zebras" and df["cluster"].isna()[3]
    assert df.loc[[1, 2, 3], "edited"].all()
    assert "Zebras" in lab.label_names()
    assert lab.cluster_summary("label").loc["Zebras", "size"] == 1
    lab.undo()
    assert "Zebras" not in lab.label_names()
    assert lab.final_table().loc[3, "edited"] == np.False_


def test_move_to_label_of_one_cluster_follows_its_renames(ws_run):
    ws, _ = ws_run
    lab = Labels(ws)
    lab.rename(1, "Cats")
    imgs = ids_in(ws, lab.run_id, 3, 0)[:2]
    lab.move_to_label(imgs, " Cats ")      # carried by cluster 1 only: moved to that cluster
    df = lab.final_table()
    assert df.loc[imgs, "cluster"].tolist() == [1, 1]
    assert df.loc[imgs, "label"].tolist() == ["Cats", "Cats"] and df.loc[imgs, "edited"].all()
    lab.rename(1, "Felines")               # a cluster move follows the cluster's later names
    assert lab.final_table().loc[imgs, "label"].tolist() == ["Felines", "Felines"]
    assert "Cats" not in lab.label_names()
    [entry] = [e for e in lab.history() if e.args.get("image_ids") == imgs]
    assert entry.op == "move" and (entry.args["cluster"], entry.args["label"]) == (1, None)
    lab.move_to_label(imgs, "cluster_0")   # back to their own cluster's name: no edit left
    df = lab.final_table()
    assert df.loc[imgs, "label"].tolist() == ["cluster_0"] * 2 and not df.loc[imgs, "edited"].any()


def test_move_to_label_shared_created_or_new_name_gives_the_name(ws_run):
    ws, _ = ws_run
    lab = Labels(ws)
    lab.merge([0, 2], name="animals")      # one name, two clusters: the name is given
    lab.create_label("Empty one")
    img = ids_in(ws, lab.run_id, 3, 1)
    lab.move_to_label(img[:1], "animals")
    lab.move_to_label(img[1:2], "Empty one")
    lab.move_to_label(img[2:3], "Zebras")  # a new label
    df = lab.final_table()
    assert df.loc[img[:3], "label"].tolist() == ["animals", "Empty one", "Zebras"]
    assert df.loc[img[0], "cluster"] == 0  # the lowest cluster carrying the name
    assert df["cluster"].isna()[img[1]] and df["cluster"].isna()[img[2]]
    lab.rename(2, "birds")                 # a given name sticks to the name, not a cluster
    assert lab.final_table().loc[img[0], "label"] == "animals"
    # undo takes each back, newest first; redo applies it again
    lab.undo()                             # the rename
    lab.undo()
    assert "Zebras" not in lab.label_names()
    assert lab.final_table().loc[img[2], "label"] == "cluster_1"
    lab.redo()
    assert lab.final_table().loc[img[2], "label"] == "Zebras"


def test_move_to_label_refuses_bad_input_and_writes_nothing(ws_run):
    lab = Labels(ws_run[0])
    with pytest.raises(ValueError, match="empty"):
        lab.move_to_label([1], "   ")
    with pytest.raises(ValueError, match="unknown image id"):
        lab.move_to_label([1, 999], "Cats")
    with pytest.raises(ValueError, match="no image ids"):
        lab.move_to_label([], "Cats")
    assert lab.history() == [] and not lab.final_table()["edited"].any()


def test_create_label_and_rename_label(ws_run):
    lab = Labels(ws_run[0])
    lab.create_label("Empty one")
    assert lab.label_names()[-1] == "Empty one"
    assert lab.cluster_summary("label").loc["Empty one", "size"] == 0
    with pytest.raises(ValueError, match="already exists"):
        lab.create_label("Empty one ")
    with pytest.raises(ValueError, match="already exists"):
        lab.create_label("cluster_0")
    lab.move([4, 5], label="Empty one")
    lab.rename(2, "Empty one")
    lab.rename_label("Empty one", "Full")
    assert lab.cluster_names()[2] == "Full"
    df = lab.final_table()
    assert df.loc[4, "label"] == df.loc[5, "label"] == "Full"
    assert "Empty one" not in lab.label_names() and "Full" in lab.label_names()
    lab.undo()
    assert lab.cluster_names()[2] == "Empty one"
    assert lab.final_table().loc[4, "label"] == "Empty one"
    lab.undo(), lab.undo(), lab.undo()
    assert "Empty one" not in lab.label_names()


def test_exclude_include(ws_run):
    lab = Labels(ws_run[0])
    lab.move([7], label="Keep")
    lab.exclude([6, 7, 8])
    df = lab.final_table()
    assert df.loc[[6, 7, 8], "excluded"].all() and df.loc[[6, 7, 8], "edited"].all()
    assert df.loc[7, "label"] == "Keep"
    summ = lab.cluster_summary("label")
    assert summ["size"].sum() == 30 - 3 and summ["excluded"].sum() == 3
    lab.include([6, 7])
    df = lab.final_table()
    assert not df.loc[6, "excluded"] and not df.loc[6, "edited"]
    assert not df.loc[7, "excluded"] and df.loc[7, "label"] == "Keep" and df.loc[7, "edited"]
    assert df.loc[8, "excluded"]
    lab.undo()
    assert lab.final_table().loc[[6, 7], "excluded"].all()
    lab.undo()
    assert not lab.final_table()["excluded"].any()
    # moving an excluded image includes it again
    lab.exclude([9])
    lab.move([9], label="Back")
    assert not lab.final_table().loc[9, "excluded"]


def test_new_op_after_undo_clears_redo(ws_run):
    lab = Labels(ws_run[0])
    lab.rename(0, "a")
    lab.rename(0, "b")
    lab.undo()
    assert [e.state for e in lab.history()] == ["applied", "undone"]
    lab.rename(1, "c")
    assert lab.redo() is None
    assert [e.op for e in lab.history()] == ["rename", "rename"]
    assert [e.args["name"] for e in lab.history(include_discarded=True)] == ["a", "b", "c"]
    assert lab.cluster_names()[0] == "a"


def test_many_undo_redo_steps_restore_each_state(ws_run):
    lab = Labels(ws_run[0])
    rng = random.Random(1)

    def state():
        df = lab.final_table()
        return dict(zip(df.index, zip(df["label"], df["excluded"])))

    snapshots = [state()]
    for step in range(16):
        kind = step % 4
        if kind == 0:
            hid = lab.rename(rng.randrange(3), f"name{step}")
        elif kind == 1:
            hid = lab.move(rng.sample(range(1, 31), 3), cluster=rng.randrange(3))
        elif kind == 2:
            hid = lab.move(rng.sample(range(1, 31), 2), label=f"lab{step}")
        else:
            hid = lab.exclude(rng.sample(range(1, 31), 4))
        if hid is not None:
            snapshots.append(state())
        else:
            assert state() == snapshots[-1]
    n = len(lab.history())
    assert n == len(snapshots) - 1 >= 12
    for k in range(n, 0, -1):
        lab.undo()
        assert state() == snapshots[k - 1]
    assert lab.undo() is None
    for k in range(1, n + 1):
        lab.redo()
        assert state() == snapshots[k]


def test_heads_are_independent(ws_run):
    ws, _ = ws_run
    a, b = Labels(ws, head=3), Labels(ws, head=12)
    a.rename(0, "coarse")
    b.rename(0, "fine")
    assert a.cluster_names()[0] == "coarse" and b.cluster_names()[0] == "fine"
    b.undo()
    assert a.cluster_names()[0] == "coarse" and b.cluster_names()[0] == "cluster_00"


def test_final_table_with_thousands_of_edits(tmp_path):
    """Moves to a label, to a cluster and exclusions, by the thousand (its speed at 100,000
    images: benchmarks/curation_speed.py)."""
    ws, _ = make_workspace_with_run(tmp_path, n_images=5_000, heads=(50,), write_images=False)
    lab = Labels(ws)
    lab.move(list(range(1, 1001)), label="Moved")
    lab.exclude(list(range(1001, 1401)))
    lab.move(list(range(1801, 2401)), cluster=3)
    df = lab.final_table()
    assert len(df) == 5_000
    assert (df.loc[1:1000, "label"] == "Moved").all()
    assert df.loc[1001:1400, "excluded"].all() and not df.loc[1401:, "excluded"].any()
    assert (df.loc[1801:2400, "cluster"] == 3).all()
    assert (df.loc[1801:2400, "label"] == lab.cluster_names()[3]).all()
    moved = df.loc[1801:2400]            # a move into its own predicted cluster is no edit
    assert df.loc[1:1400, "edited"].all()
    assert (moved["edited"] == (moved["predicted_cluster"] != 3)).all()
    untouched = df.loc[2401:]
    assert not untouched["edited"].any()
    assert (untouched["cluster"] == untouched["predicted_cluster"]).all()


# ---------------------------------------------------------------------- two writers
def test_two_objects_interleaving_lose_nothing(ws_run):
    ws, _ = ws_run
    a, b = Labels(ws), Labels(ws)      # both created before any edit
    a.rename(0, "from A")
    b.rename(1, "from B")
    a.move([1, 2], label="A-label")
    b.move([3, 4], label="B-label")
    b.exclude([5])
    a.exclude([6])
    a.rename(2, "A again")
    fresh = Labels(ws)
    assert fresh.cluster_names() == {0: "from A", 1: "from B", 2: "A again"}
    df = fresh.final_table()
    assert df.loc[1, "label"] == "A-label" and df.loc[3, "label"] == "B-label"
    assert df.loc[[5, 6], "excluded"].all()
    assert len(fresh.history()) == 7
    # b undoes the newest operation, which a made: the history is shared
    assert b.undo().args == {"cluster": 2, "name": "A again"}
    assert a.cluster_names()[2] == "cluster_2"


_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfclassifier_core.store.workspace import Workspace
    from selfclassifier_core.curation.labels import Labels
    ws = Workspace.open(sys.argv[1])
    parity = int(sys.argv[2])
    lab = Labels(ws)
    go = Path(sys.argv[3])
    while not go.exists():
        time.sleep(0.01)
    for i in range(1, 41):
        if i % 2 != parity:
            continue
        lab.move([i], label=f"w{parity}-{i}")
        if i <= 12:
            lab.rename(i, f"name-{i}")
""")


@pytest.mark.slow  # processes
def test_two_processes_lose_nothing(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=40, heads=(13,), write_images=False)
    Labels(ws)  # create the tables
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(script), str(ws.path), str(p), str(go)],
                              env=env, stderr=subprocess.PIPE) for p in (0, 1)]
    time.sleep(0.5)
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    lab = Labels(ws)
    df = lab.final_table()
    assert df["label"].tolist() == [f"w{i % 2}-{i}" for i in range(1, 41)]
    names = lab.cluster_names()
    assert [names[i] for i in range(1, 13)] == [f"name-{i}" for i in range(1, 13)]
    assert len(lab.history()) == 40 + 12


# ---------------------------------------------------------------------- crash safety
_CRASHER = textwrap.dedent("""
    import random, sys
    from selfclassifier_core.store.workspace import Workspace
    from selfclassifier_core.curation.labels import Labels
    ws = Workspace.open(sys.argv[1])
    lab = Labels(ws)
    print("ready", flush=True)
    step = 0
    while True:
        kind, args = OPS(step)
        if kind == "rename":
            lab.rename(*args)
        elif kind == "move_cluster":
            lab.move(args[0], cluster=args[1])
        elif kind == "move_label":
            lab.move(args[0], label=args[1])
        elif kind == "exclude":
            lab.exclude(args[0])
        elif kind == "include":
            lab.include(args[0])
        elif kind == "undo":
            lab.undo()
        elif kind == "redo":
            lab.redo()
        print(step, flush=True)
        step += 1
""")

N_CRASH, K_CRASH = 400, 5


def crash_ops(step: int):
    """The deterministic operation sequence of the crash test (shared with the child)."""
    import random as _r
    rng = _r.Random(step)
    kind = ["rename", "move_cluster", "move_label", "exclude", "include", "undo", "redo",
            "move_cluster", "exclude"][step % 9]
    ids = sorted(rng.sample(range(1, N_CRASH + 1), rng.choice([1, 5, 150])))
    if kind == "rename":
        return kind, (rng.randrange(K_CRASH), f"n{step}")
    if kind == "move_cluster":
        return kind, (ids, rng.randrange(K_CRASH))
    if kind == "move_label":
        return kind, (ids, f"L{step % 7}")
    if kind in ("exclude", "include"):
        return kind, (ids,)
    return kind, ()


def model_after(n_ops: int, predicted: dict[int, int]):
    """Expected {id: (label, excluded)} after the first n_ops operations (independent model)."""
    names = {c: f"cluster_{c}" for c in range(K_CRASH)}
    ov: dict[int, tuple] = {}
    undo_stack, redo_stack = [], []

    def snapshot():
        return (dict(names), dict(ov))

    for step in range(n_ops):
        kind, args = crash_ops(step)
        if kind == "undo":
            if undo_stack:
                redo_stack.append(snapshot())
                names, ov = undo_stack.pop()
            continue
        if kind == "redo":
            if redo_stack:
                undo_stack.append(snapshot())
                names, ov = redo_stack.pop()
            continue
        before = snapshot()
        if kind == "rename":
            names[args[0]] = args[1]
        elif kind in ("move_cluster", "move_label"):
            for i in args[0]:
                if kind == "move_cluster":
                    c = None if args[1] == predicted[i] else args[1]
                    new = (c, None, False)
                else:
                    new = (None, args[1], False)
                if new == (None, None, False):
                    ov.pop(i, None)
                else:
                    ov[i] = new
        else:
            flag = kind == "exclude"
            for i in args[0]:
                c, lab, _ = ov.get(i, (None, None, False))
                if (c, lab, flag) == (None, None, False):
                    ov.pop(i, None)
                else:
                    ov[i] = (c, lab, flag)
        if snapshot() != before:
            undo_stack.append(before)
            redo_stack.clear()
    out = {}
    for i, p in predicted.items():
        c, lab, exc = ov.get(i, (None, None, False))
        out[i] = (lab if lab is not None else names[c if c is not None else p], exc)
    return out


@pytest.mark.slow  # killed processes
def test_crash_at_random_moments_keeps_db_consistent(tmp_path):
    rng = random.Random(42)
    src = "import random\n" + "N_CRASH, K_CRASH = %d, %d\n" % (N_CRASH, K_CRASH)
    import inspect
    src += inspect.getsource(crash_ops).replace("def crash_ops", "def OPS")
    script = tmp_path / "crasher.py"
    script.write_text(src + _CRASHER)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for attempt in range(3):
        ws, run_id = make_workspace_with_run(tmp_path / f"t{attempt}", n_images=N_CRASH,
                                             heads=(K_CRASH,), write_images=False)
        predicted = dict(zip(range(1, N_CRASH + 1),
                             cluster_assignments(N_CRASH, K_CRASH, 0).tolist()))
        proc = subprocess.Popen([sys.executable, str(script), str(ws.path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout.readline().strip() == b"ready"
        # kill at a random moment after a random number of operations (independent of speed)
        target, last = rng.randrange(5, 60), -1
        while last < target:
            line = proc.stdout.readline()
            assert line, proc.stderr.read().decode()
            last = int(line)
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()
        lines = out.decode().split()
        done = (int(lines[-1]) if lines else last) + 1

        conn = sqlite3.connect(ws.db_path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        lab = Labels(ws)
        df = lab.final_table()
        got = dict(zip(df.index.tolist(), zip(df["label"].tolist(),
                                              df["excluded"].astype(bool).tolist())))
        # every reported operation is there and at most the one in flight beyond it
        candidates = [model_after(done, predicted), model_after(done + 1, predicted)]
        assert got in candidates, f"state after kill matches neither {done} nor {done + 1} ops"
        _check_history_replays_to_state(ws, run_id)


def _check_history_replays_to_state(ws, run_id):
    """Replaying the 'after' side of every applied history row from scratch gives the state."""
    conn = sqlite3.connect(ws.db_path)
    names, ov, created = {}, {}, {}
    for (changes,) in conn.execute("SELECT changes FROM label_history WHERE run_id=? AND "
                                   "state='applied' ORDER BY id", (run_id,)):
        ch = json.loads(changes)
        for key, _before, after in ch["names"]:
            names[key] = after
        for key, _before, after in ch["overrides"]:
            ov[key] = after
        for key, _before, after in ch["created"]:
            created[key] = after
    db_names = {r[0]: r[1] for r in conn.execute(
        "SELECT cluster, name FROM label_names WHERE run_id=?", (run_id,))}
    db_ov = {r[0]: [r[1], r[2], r[3]] for r in conn.execute(
        "SELECT image_id, cluster, label, excluded FROM label_overrides WHERE run_id=?",
        (run_id,))}
    conn.close()
    assert {k: v for k, v in names.items() if v is not None} == db_names
    assert {k: v for k, v in ov.items() if v is not None} == db_ov


# ---------------------------------------------------------------------- delete
def snapshot(lab: Labels):
    """Everything a person sees of the labels: the final table, cluster and label names."""
    return lab.final_table(), lab.cluster_names(), lab.label_names()


def assert_same_state(a, b) -> None:
    pd.testing.assert_frame_equal(a[0], b[0])
    assert a[1:] == b[1:]


def test_delete_renamed_cluster_name(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    lab.rename(1, "Cats")
    lab.rename(2, "Dogs")
    in_c1 = ids_in(ws, run_id, 3, 1)
    hid = lab.delete_label(" Cats ")             # normalised like every name
    assert isinstance(hid, int)
    assert lab.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "Dogs"}
    assert "Cats" not in lab.label_names()
    df = lab.final_table()
    assert set(df.loc[in_c1, "label"]) == {"cluster_1"}
    assert not df["edited"].any()
    assert lab.history()[-1].op == "delete_label" and lab.history()[-1].args == {"name": "Cats"}


def test_delete_created_empty_label(ws_run):
    lab = Labels(ws_run[0])
    lab.create_label("Fish")
    before = lab.final_table()
    assert lab.delete_label("Fish") is not None
    assert "Fish" not in lab.label_names()
    assert lab.label_names() == ["cluster_0", "cluster_1", "cluster_2"]
    assert "Fish" not in lab.cluster_summary("label").index
    pd.testing.assert_frame_equal(lab.final_table(), before)
    lab.undo()
    assert lab.label_names()[-1] == "Fish"


def test_delete_label_given_to_images(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    predicted = dict(zip(lab.image_ids.tolist(), lab.predicted.tolist()))
    lab.move([4, 5, 6], label="Birds")
    lab.exclude([5])
    moved = next(i for i in range(7, 31) if predicted[i] != 2)
    lab.rename(2, "Birds")                       # a cluster carries the name too
    lab.move([moved], cluster=2)                 # moved into that cluster: follows its name
    lab.delete_label("Birds")
    df = lab.final_table()
    for i in (4, 5, 6):                          # back to their predicted cluster
        assert df.loc[i, "cluster"] == predicted[i]
        assert df.loc[i, "label"] == f"cluster_{predicted[i]}"
    assert df.loc[5, "excluded"] and df.loc[5, "edited"]       # exclusion kept
    assert not df.loc[[4, 6], "edited"].any() and not df.loc[[4, 6], "excluded"].any()
    assert df.loc[moved, "cluster"] == 2 and df.loc[moved, "label"] == "cluster_2"
    assert df.loc[moved, "edited"]
    assert "Birds" not in set(df["label"]) and "Birds" not in lab.label_names()


def test_delete_merged_clusters_sharing_a_name(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    lab.merge([0, 2], name="animals")
    lab.move([3], label="animals")
    assert lab.cluster_summary().loc[0, "shared_with"] == [2]
    lab.delete_label("animals")
    assert lab.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2"}
    summary = lab.cluster_summary()
    assert summary["shared_with"].tolist() == [[], [], []]
    df = lab.final_table()
    expected = cluster_assignments(30, 3, seed=0)
    assert df["label"].tolist() == [f"cluster_{c}" for c in expected]
    assert not df["edited"].any()


def test_delete_undo_redo_restore_exact_state(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    lab.merge([0, 1], name="Pets")
    lab.move([4, 5], label="Pets")
    lab.exclude([5, 9])
    lab.create_label("Later")
    lab.rename_label("Later", "Pets ")           # a created label of the same name
    lab.rename(2, "Other")
    before = snapshot(lab)
    lab.delete_label("Pets")
    after = snapshot(lab)
    assert after[1] == {0: "cluster_0", 1: "cluster_1", 2: "Other"}
    assert "Pets" not in after[2]
    entry = lab.undo()
    assert entry.op == "delete_label" and entry.state == "undone"
    assert_same_state(snapshot(lab), before)
    lab.redo()
    assert_same_state(snapshot(lab), after)
    lab.undo()
    assert_same_state(snapshot(Labels(ws, run_id)), before)   # as a fresh reader sees it


def test_delete_unknown_or_default_name_is_refused(ws_run):
    lab = Labels(ws_run[0])
    lab.rename(0, "Cats")
    with pytest.raises(ValueError, match="unknown label 'Dogs'"):
        lab.delete_label("Dogs")
    with pytest.raises(ValueError, match="unknown label 'cluster_0'"):
        lab.delete_label("cluster_0")            # cluster 0 is called Cats now
    with pytest.raises(ValueError, match="default name of cluster 1"):
        lab.delete_label("cluster_1")
    with pytest.raises(ValueError, match="empty"):
        lab.delete_label("  ")
    assert [e.op for e in lab.history()] == ["rename"]
    # a default name another cluster was renamed to: that cluster gets its own name back
    lab.rename(0, "cluster_1")
    lab.delete_label("cluster_1")
    assert lab.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2"}


def test_export_after_delete(ws_run, tmp_path):
    from selfclassifier_core.curation import export

    ws, run_id = ws_run
    lab = Labels(ws)
    lab.rename(1, "Cats")
    lab.move([2, 3], label="Cats")
    lab.exclude([3])
    lab.delete_label("Cats")
    out = tmp_path / "labels.csv"
    export.export_csv(ws, out, run_id)
    text = out.read_text()
    assert "Cats" not in text
    table = export.export_table(ws, run_id)
    expected = cluster_assignments(30, 3, seed=0)
    assert 3 not in table.index                  # still excluded
    assert table.loc[2, "label"] == f"cluster_{expected[1]}"
    assert len(table) == 29 and set(table["label"]) == {"cluster_0", "cluster_1", "cluster_2"}


# ---------------------------------------------------------------------- merging labels
def test_merge_labels_is_one_undoable_operation(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    lab.merge([0, 1], name="Pets")
    lab.move([4, 5], label="Pets")               # given the name of two merged clusters
    lab.move([7, 8], label="Odd")                # a label of images only
    lab.create_label("Later")                    # a label of nothing yet
    before = snapshot(lab)
    pets_or_odd = set(before[0].index[before[0]["label"].isin(["Pets", "Odd"])])
    ops = len(lab.history())
    hid = lab.merge_labels(["Pets", "Odd", "Later"], "Animals")
    assert isinstance(hid, int) and len(lab.history()) == ops + 1
    assert lab.history()[-1].op == "merge_labels"
    after = snapshot(lab)
    assert after[1] == {0: "Animals", 1: "Animals", 2: "cluster_2"}
    assert not {"Pets", "Odd", "Later"} & set(after[2]) and "Animals" in after[2]
    assert set(after[0].index[after[0]["label"] == "Animals"]) == pets_or_odd
    assert lab.cluster_summary("label").loc["Animals", "clusters"] == [0, 1]
    entry = lab.undo()                           # one undo takes all of it back
    assert entry.op == "merge_labels"
    assert_same_state(snapshot(lab), before)
    lab.redo()
    assert_same_state(snapshot(Labels(ws, run_id)), after)


def test_merge_labels_takes_a_label_without_clusters(ws_run):
    ws, run_id = ws_run
    lab = Labels(ws)
    strays = [i for i in range(1, 31) if i not in ids_in(ws, run_id, 3, 1)][:2]
    lab.move(strays, label="Strays")
    lab.merge_labels(["cluster_1", "Strays"], into="Strays")
    assert lab.cluster_names() == {0: "cluster_0", 1: "Strays", 2: "cluster_2"}
    by_label = lab.cluster_summary("label")
    assert by_label.loc["Strays", "clusters"] == [1]
    assert by_label.loc["Strays", "size"] == len(ids_in(ws, run_id, 3, 1)) + 2
    lab.merge_labels("Strays", into="cluster_2")  # joins another label; one name alone is fine
    table = lab.final_table()
    assert set(table.loc[strays, "label"]) == {"cluster_2"}
    assert set(table.loc[strays, "cluster"]) == {1}   # the lowest cluster of that name now
    assert lab.cluster_names()[1] == "cluster_2" and "Strays" not in lab.label_names()


def test_merge_labels_refuses_unknown_or_empty_names(ws_run):
    lab = Labels(ws_run[0])
    lab.rename(0, "Cats")
    with pytest.raises(ValueError, match="unknown label 'Dogs'"):
        lab.merge_labels(["Cats", "Dogs"], "Pets")
    with pytest.raises(ValueError, match="empty"):
        lab.merge_labels(["Cats", "cluster_1"], "  ")
    with pytest.raises(ValueError, match="at least one label"):
        lab.merge_labels([], "Pets")
    assert [e.op for e in lab.history()] == ["rename"]
    assert lab.cluster_names() == {0: "Cats", 1: "cluster_1", 2: "cluster_2"}


# ---------------------------------------------------------------------- carry-over
def test_carry_over_with_permuted_clusters(tmp_path):
    ws, run1 = make_workspace_with_run(tmp_path, n_images=60, heads=(4,), write_images=False)
    old_cl = cluster_assignments(60, 4, 0)
    perm = np.array([2, 0, 3, 1])
    new_cl = perm[old_cl].astype(np.int32)
    new_cl[0] = (new_cl[0] + 1) % 4            # the new model disagrees on one image
    # the new run lacks image 60 and has no image the old one lacked
    run2 = add_run(ws, heads=(4,), seed=5, image_ids=range(1, 60),
                   clusters={4: new_cl[:59]})
    old = Labels(ws, run1)
    old.rename(0, "Cats")
    old.rename(1, "Dogs")
    moved = next(i for i in range(2, 60) if old_cl[i - 1] != 2)
    old.move([moved], cluster=2)
    old.move([10], label="Birds")
    old.exclude([11, 60])
    old.create_label("Fish")

    report = carry_over(ws, run1, run2)
    pairs = {m["old"]: m["new"] for m in report.matched}
    assert pairs == {c: int(perm[c]) for c in range(4)}
    assert report.unmatched_old == [] and report.unmatched_new == []
    assert report.names_copied == {int(perm[0]): "Cats", int(perm[1]): "Dogs"}
    assert moved not in (10, 11)
    assert report.overrides_carried == 3 and report.overrides_dropped == 1
    assert report.labels_created == ["Fish"]
    assert report.shared_images == 59
    assert "Cats" in str(report)

    new = Labels(ws, run2)
    assert new.cluster_names()[int(perm[0])] == "Cats"
    assert new.cluster_names()[int(perm[2])] == f"cluster_{perm[2]}"
    df = new.final_table()
    assert df.loc[moved, "cluster"] == perm[2]
    assert df.loc[10, "label"] == "Birds"
    assert df.loc[11, "excluded"]
    assert "Fish" in new.label_names()
    assert [e.op for e in new.history()] == ["carry_over"]
    new.undo()
    assert new.cluster_names() == {c: f"cluster_{c}" for c in range(4)}
    assert not new.final_table()["edited"].any() and "Fish" not in new.label_names()
    assert Labels(ws, run1).cluster_names()[0] == "Cats"   # the old run is untouched


def test_carry_over_keeps_confirmed_images_confirmed_with_their_label(tmp_path):
    ws, run1 = make_workspace_with_run(tmp_path, n_images=60, heads=(4,), write_images=False)
    old_cl = cluster_assignments(60, 4, 0)
    perm = np.array([2, 0, 3, 1])
    new_cl = perm[old_cl].astype(np.int32)
    new_cl[0] = (new_cl[0] + 1) % 4            # the new model puts image 1 elsewhere
    run2 = add_run(ws, heads=(4,), seed=5, image_ids=range(1, 60), clusters={4: new_cl[:59]})
    old = Labels(ws, run1)
    old.rename(int(old_cl[0]), "Cats")
    old.move([7], label="Birds")
    old.confirm([1, 5, 7, 60])                 # 60 is not in the new run
    report = carry_over(ws, run1, run2)
    assert (report.confirmations_carried, report.confirmed_moved,
            report.confirmations_dropped) == (3, 1, 1)
    assert "3 confirmed images carried (1 moved to keep their label), 1 dropped" in str(report)
    new = Labels(ws, run2)
    assert new.confirmed_ids().tolist() == [1, 5, 7]
    df = new.final_table()
    assert df.loc[1, "cluster"] == perm[old_cl[0]] and df.loc[1, "label"] == "Cats"
    assert df.loc[1, "edited"]                  # moved back to the label it was confirmed in
    assert df.loc[5, "cluster"] == new_cl[4] and not df.loc[5, "edited"]
    assert df.loc[7, "label"] == "Birds"
    new.undo()                                  # one operation: the confirmations go with it
    assert new.confirmed_ids().tolist() == []


def _two_clusters_become_one(tmp_path):
    """A 4-cluster run and a new 3-cluster run in which old clusters 2 and 3 are one."""
    ws, run1 = make_workspace_with_run(tmp_path, n_images=40, heads=(4,), write_images=False)
    old_cl = cluster_assignments(40, 4, 0)
    new_cl = np.minimum(old_cl, 2).astype(np.int32)
    run2 = add_run(ws, heads=(3,), seed=3, clusters={3: new_cl})
    return ws, run1, run2, old_cl, Labels(ws, run1)


def test_carry_over_of_a_confirmed_image_in_an_unmatched_cluster(tmp_path):
    ws, run1, run2, old_cl, old = _two_clusters_become_one(tmp_path)
    in2, in3 = (int(np.flatnonzero(old_cl == c)[0]) + 1 for c in (2, 3))
    old.confirm([in2, in3])
    report = carry_over(ws, run1, run2)
    (unmatched,) = report.unmatched_old
    gone = in2 if unmatched["old"] == 2 else in3
    kept = in3 if gone == in2 else in2
    assert report.confirmations_dropped == 1     # unnamed and unmatched: no label to keep
    assert Labels(ws, run2).confirmed_ids().tolist() == [kept]
    # named, the name is kept as the image's label
    Labels(ws, run2).undo()
    old.rename(unmatched["old"], "Rare")
    carry_over(ws, run1, run2)
    new = Labels(ws, run2)
    assert new.confirmed_ids().tolist() == sorted([in2, in3])
    assert new.final_table().loc[gone, "label"] == "Rare"


def test_carry_over_reports_unmatched(tmp_path):
    ws, run1, run2, old_cl, old = _two_clusters_become_one(tmp_path)
    for c, n in enumerate(["a", "b", "c", "d"]):
        old.rename(c, n)
    img3 = int(np.flatnonzero(old_cl == 3)[0]) + 1
    img2 = int(np.flatnonzero(old_cl == 2)[0]) + 1
    old.move([img2], cluster=3)                   # moved into the cluster that will not match
    report = carry_over(ws, run1, run2)
    assert len(report.matched) == 3 and report.unmatched_new == []
    (unmatched,) = report.unmatched_old
    assert unmatched["old"] in (2, 3) and unmatched["size"] == int((old_cl == unmatched["old"]).sum())
    assert "no match" in str(report)
    new = Labels(ws, run2)
    row = new.final_table().loc[img2]
    assert row["label"] == "d"        # the edit keeps its final label either way
    assert new.final_table().loc[img3, "cluster"] == 2


def test_carry_over_lists_overwritten_edits_and_undo_restores_them(tmp_path):
    ws, run1 = make_workspace_with_run(tmp_path, n_images=40, heads=(4,), write_images=False)
    old_cl = cluster_assignments(40, 4, 0)
    perm = np.array([1, 3, 0, 2])
    run2 = add_run(ws, heads=(4,), seed=5, clusters={4: perm[old_cl].astype(np.int32)})
    old = Labels(ws, run1)
    old.rename(0, "Cats")
    old.move([5], label="Birds")
    old.exclude([6])
    new = Labels(ws, run2)
    new.rename(int(perm[0]), "Kittens")          # replaced by "Cats"
    new.rename(int(perm[1]), "Mine")             # old cluster 1 has no name: kept
    new.move([5], label="Zebras")                # replaced by "Birds"
    new.move([7], label="Kept")                  # the old run has no edit of image 7: kept
    before = new.final_table(), new.cluster_names(), new.label_names()

    report = carry_over(ws, run1, run2)
    assert report.names_overwritten == [
        {"cluster": int(perm[0]), "before": "Kittens", "after": "Cats"}]
    assert report.overrides_overwritten == [
        {"image_id": 5, "before": {"cluster": None, "label": "Zebras", "excluded": False},
         "after": {"cluster": None, "label": "Birds", "excluded": False}}]
    text = str(report)
    assert "overwrote 2 earlier edit(s) of run" in text
    assert f"cluster {perm[0]}: name 'Kittens' -> 'Cats'" in text
    assert "image 5: label 'Zebras' -> label 'Birds'" in text
    assert "Mine" not in text and "image 6" not in text   # new edits, nothing overwritten
    assert new.cluster_names()[int(perm[1])] == "Mine"
    assert new.final_table().loc[7, "label"] == "Kept"

    new.undo()
    pd.testing.assert_frame_equal(new.final_table(), before[0])
    assert (new.cluster_names(), new.label_names()) == before[1:]
    new.redo()
    assert new.cluster_names()[int(perm[0])] == "Cats"


def test_carry_over_report_without_and_with_many_overwrites():
    from selfclassifier_core.curation.labels import CarryOverReport

    report = CarryOverReport(1, 2, 3, 3, 10)
    assert "overwrote" not in str(report)
    report.overrides_overwritten = [
        {"image_id": i, "before": {"cluster": 1, "label": None, "excluded": True},
         "after": None} for i in range(1, 14)]
    text = str(report)
    assert "overwrote 13 earlier edit(s) of run 2" in text
    assert "image 1: moved to cluster 1, excluded -> no edit" in text
    assert "image 10:" in text and "image 11:" not in text
    assert "... and 3 more" in text
