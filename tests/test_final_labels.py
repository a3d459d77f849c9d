"""The final labels as arrays: each label's counts and members and a page's paths, made
without pandas, checked against plain pandas over the table and against the catalog."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from selfclassifier_core.curation.final import FinalLabels, least_confident_first
from selfclassifier_core.curation.labels import Labels
from workspace_fixtures import make_workspace_with_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws_run(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=30, heads=(3, 12), seed=0,
                                   write_images=False, n_unreadable=2)


def _edited(ws) -> Labels:
    """Every kind of edit: a rename, a merge by name, images moved to a cluster and given a
    new name, a created label with no images, exclusions (one of a moved image)."""
    lab = Labels(ws)
    lab.rename(0, "cats")
    lab.rename(2, "cats")                    # clusters 0 and 2 are one label
    lab.move([1, 2], 1)
    lab.move_to_label([3, 4, 5], "odd ones")
    lab.create_label("empty for now")
    lab.exclude([4, 7, 8])
    return lab


def _groups_by_pandas(lab: Labels) -> pd.DataFrame:
    """What each label counts, by a group-by over the final table."""
    df = lab.final_table()
    kept = df[~df["excluded"]]
    g = kept.groupby("label")["confidence"]
    out = pd.DataFrame(index=pd.Index(lab.label_names(), name="label"))
    out["size"] = g.size().reindex(out.index, fill_value=0)
    out["mean_confidence"] = g.mean().reindex(out.index).astype(float)
    out["excluded"] = df[df["excluded"]].groupby("label").size().reindex(out.index,
                                                                         fill_value=0)
    return out


def test_groups_count_each_label_as_a_group_by_of_the_table_does(ws_run):
    ws, _run = ws_run
    lab = _edited(ws)
    labels = lab.final_labels()
    want = _groups_by_pandas(lab)
    groups = labels.groups()
    assert [g.name for g in groups] == want.index.tolist() == list(labels.names)
    assert [g.size for g in groups] == want["size"].tolist()
    assert [g.excluded for g in groups] == want["excluded"].tolist()
    np.testing.assert_allclose([g.mean_confidence for g in groups],
                               want["mean_confidence"].to_numpy(), rtol=1e-6)
    by_name = {g.name: g for g in groups}
    assert by_name["cats"].clusters == (0, 2) and by_name["cluster_1"].clusters == (1,)
    assert by_name["odd ones"].clusters == () and by_name["odd ones"].excluded == 1
    empty = by_name["empty for now"]
    assert (empty.size, empty.excluded, empty.clusters) == (0, 0, ())
    assert empty.mean_confidence != empty.mean_confidence      # NaN: no images
    summary = lab.cluster_summary(by="label", table=labels)
    assert summary.index.tolist() == want.index.tolist()
    assert summary["size"].tolist() == want["size"].tolist()
    assert summary.loc["cats", "clusters"] == [0, 2]


def test_codes_name_each_row_as_the_table_does(ws_run):
    ws, _run = ws_run
    lab = _edited(ws)
    labels, df = lab.final_labels(), lab.final_table()
    assert labels.ids.tolist() == df.index.tolist()
    assert [labels.names[c] for c in labels.codes] == df["label"].tolist()
    assert labels.cluster.tolist() == df["cluster"].fillna(-1).astype(int).tolist()
    assert labels.excluded.tolist() == df["excluded"].tolist()


def test_a_page_s_paths_and_confidences_without_the_table(ws_run):
    ws, _run = ws_run
    with ws.transaction() as conn:          # rows of the catalog no longer usable: left out
        conn.execute("UPDATE images SET status='missing' WHERE id IN (5, 9)")
    lab = Labels(ws)
    labels, df = lab.final_labels(), lab.final_table()
    assert 5 not in labels.ids and 9 not in labels.ids and len(labels) == len(df) == 28
    with ws._conn() as conn:
        catalog = dict(conn.execute("SELECT id, path FROM images").fetchall())
    page = [30, 6, 10, 1]
    assert labels.paths(page) == [catalog[i] for i in page] == df.loc[page, "path"].tolist()
    assert labels.confidence[labels.rows(page)].tolist() == df.loc[page, "confidence"].tolist()
    with pytest.raises(ValueError, match=r"image id\(s\) 5, 31 are not among"):
        labels.rows([1, 5, 31])


NO_PANDAS = r"""
import sys
sys.path.insert(0, sys.argv[1])
from selfclassifier_core.curation.labels import Labels
labels = Labels(sys.argv[2]).final_labels()
print(len(labels.groups()), len(labels.members()[0]), labels.paths([1, 30]),
      "pandas" in sys.modules)
labels.frame()
print("pandas" in sys.modules)
"""


@pytest.mark.slow  # a fresh interpreter
@pytest.mark.parametrize("catalog", ["snapshot", "rows added since", "no snapshot"])
def test_the_groups_and_a_page_need_no_pandas(ws_run, catalog):
    """What the Clusters screen reads of the labels: in a new process, the arrays, the groups,
    the members and a page's paths are read without importing pandas (~0.3 s at a server's
    first Clusters page), whether the catalog comes from the snapshot an earlier process
    wrote, from it and the rows added since, or from the database alone (the snapshot then
    written); the table imports it."""
    from selfclassifier_core.curation.pathcache import SNAPSHOT

    ws, _run = ws_run
    here = _edited(ws).final_labels()        # as a process before: the snapshot is written
    if catalog == "rows added since":
        with ws.transaction() as conn:
            conn.execute("INSERT INTO images (path, status) VALUES ('c/new.png', 'ok')")
    elif catalog == "no snapshot":
        (ws.cache_dir / SNAPSHOT).unlink()
    want = f"{len(here.groups())} {len(here.members()[0])} {['a/img_0000.png', 'b/img_0029.png']}"
    done = subprocess.run([sys.executable, "-c", NO_PANDAS, str(REPO), str(ws.path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == [want + " False", "True"]
    assert (ws.cache_dir / SNAPSHOT).exists()


def test_the_table_is_made_once_and_shared(ws_run):
    ws, _run = ws_run
    labels = Labels(ws).final_labels()
    assert labels.frame() is labels.frame() and labels.groups() is labels.groups()


def test_some_rows_taken_make_the_table_s_rows(ws_run):
    """A queue's few rows, taken in their order, are the whole table's rows (a catalog with
    rows no longer usable too: their paths are found through the row map)."""
    ws, _run = ws_run
    lab = _edited(ws)
    with ws.transaction() as conn:
        conn.execute("UPDATE images SET status='missing' WHERE id=2")
    labels = lab.final_labels()
    rows = np.array([7, 0, 3, len(labels) - 1, 3])
    pd.testing.assert_frame_equal(labels.take(rows).frame(), labels.frame().iloc[rows])
    assert labels.take(np.zeros(0, np.int64)).frame().empty


# ---------------------------------------------------------------------- members
def _arrays(n: int, names: list[str], seed: int) -> FinalLabels:
    rng = np.random.default_rng(seed)
    codes = rng.permutation(np.resize(np.arange(len(names)), n)).astype(np.int32)  # all used
    zeros = np.zeros(n, np.int64)
    return FinalLabels(
        run_id=1, head=len(names), ids=np.sort(rng.choice(10 * n, n, replace=False)),
        names=tuple(names), codes=codes, cluster=zeros, predicted=zeros,
        confidence=rng.choice([0.1, 0.3, 0.5, 0.9], n).astype(np.float32),  # many ties
        margin=np.zeros(n, np.float32), edited=np.zeros(n, bool),
        excluded=rng.random(n) < 0.2, confirmed=np.zeros(n, bool),
        cluster_names=tuple(names), catalog_paths=None)


def _reference(labels: FinalLabels) -> tuple[dict, dict]:
    """Plain pandas: a stable sort by label, exclusion and confidence (ties keep id order)."""
    table = pd.DataFrame({"label": np.array(labels.names)[labels.codes],
                          "confidence": labels.confidence, "excluded": labels.excluded},
                         index=labels.ids)
    ordered = table.sort_values(["label", "excluded", "confidence"], kind="stable")
    members, excluded = {}, {}
    for (label, exc), ids in ordered.groupby(["label", "excluded"], sort=False).groups.items():
        (excluded if exc else members)[label] = list(ids)
    return members, excluded


@pytest.mark.parametrize("names", [["a", "b", "c", "d"],
                                   [f"l{i}" for i in range(16_500)]])  # past a 16-bit key
def test_members_of_each_label_least_confident_first_apart_from_the_excluded(names):
    labels = _arrays(17_000, names, seed=len(names))
    want_members, want_excluded = _reference(labels)
    order = np.argsort(labels.confidence, kind="stable")
    for members, excluded in (labels.members(), labels.members(order)):
        assert {k: v.tolist() for k, v in members.items()} == want_members
        assert {k: v.tolist() for k, v in excluded.items()} == want_excluded


def test_least_confident_first_is_a_stable_sort_at_a_65535th():
    conf = np.array([0.5, 0.2, 0.5, 0.9, 0.2 + 1e-6, 0.0, 1.0, 0.2 - 1e-4], np.float32)
    # 0.2 and 0.2 + 1e-6 round alike (rows 1, 4 keep their order); 0.2 - 1e-4 comes before
    assert least_confident_first(conf).tolist() == [5, 7, 1, 4, 0, 2, 3, 6]
    rng = np.random.default_rng(0)
    many = rng.random(100_000).astype(np.float32)
    order = least_confident_first(many)
    assert sorted(order.tolist()) == list(range(100_000))
    assert (np.diff(many[order]) > -1 / 65535).all()          # sorted, to the key's step
