"""What the person told us: confirm, the review queue, reading the labels, the refit's class plan,
the supervised term, targets and warm starts (no training here: tests/test_refit.py trains)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfclassifier_core.cli import main as cli_main
from selfclassifier_core.curation.feedback import (apply_refit_labels, plan_refit,
                                                   read_feedback, read_plan, save_plan)
from selfclassifier_core.curation.labels import Labels
from selfclassifier_core.curation.review import review_queue
from selfclassifier_core.engine.loss import SelfClassifierLoss, self_classifier_loss, \
    supervised_term
from selfclassifier_core.engine.model import ModelConfig, SelfClassifier, warm_start
from selfclassifier_core.store.checkpoint import CHECKPOINT_FILE, save_checkpoint
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.training.targets import Targets, load_targets, save_targets, \
    start_state
from workspace_fixtures import add_run, make_workspace_with_run


@pytest.fixture
def ws_run(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=60, heads=(3, 6), seed=1,
                                   write_images=False)


def clusters_of(ws, run_id, head=3):
    preds = load_predictions(ws.run_dir(run_id), embeddings=False)
    return dict(zip(preds.image_ids.tolist(), preds.heads[head].cluster.tolist()))


# ----------------------------------------------------------------------------- confirm
def test_confirm_marks_images_and_undo_redo_take_it_back(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    hid = lab.confirm([3, 5])
    assert hid is not None and lab.confirmed_ids().tolist() == [3, 5]
    df = lab.final_table()
    assert df.loc[[3, 5], "confirmed"].all() and not df.drop([3, 5])["confirmed"].any()
    assert lab.confirm([3]) is None           # already confirmed: nothing changed
    assert lab.history()[-1].op == "confirm"
    lab.undo()
    assert lab.confirmed_ids().tolist() == []
    lab.redo()
    assert lab.confirmed_ids().tolist() == [3, 5]
    lab.unconfirm([5])
    assert lab.confirmed_ids().tolist() == [3]
    lab.undo()
    assert lab.confirmed_ids().tolist() == [3, 5]


def test_confirm_refuses_excluded_images_and_exclude_clears_the_mark(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    lab.exclude([7])
    with pytest.raises(ValueError, match="7 are excluded"):
        lab.confirm([6, 7])
    assert lab.confirmed_ids().tolist() == []   # nothing written for 6 either
    lab.confirm([8])
    lab.exclude([8])
    assert lab.confirmed_ids().tolist() == []
    assert not lab.final_table().loc[8, "confirmed"]
    lab.undo()                                  # one undo: excluded and mark both back
    assert lab.confirmed_ids().tolist() == [8]
    assert not lab.final_table().loc[8, "excluded"]


def test_confirm_of_an_unknown_image_names_it(ws_run):
    ws, run = ws_run
    with pytest.raises(ValueError, match="unknown image id.*999"):
        Labels(ws, run).confirm([999])


# ----------------------------------------------------------------------------- the queue
def test_queue_never_offers_checked_or_excluded_images(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    q = review_queue(lab, 6)
    assert len(q) == 6 and q.index.is_unique
    first = q.index.tolist()
    lab.confirm(first[:3])
    lab.move_to_label(first[3:5], "elsewhere")
    lab.exclude(first[5:])
    q2 = review_queue(lab, 60)
    assert not set(first) & set(q2.index)
    assert len(q2) == 60 - 6 and q2.index.is_unique   # everything else, once
    lab.undo()                                   # the exclusion: that image can come back
    assert first[5] in review_queue(lab, 60).index


def _central(ws, run, ids):
    """For each finest-head group: its member nearest the group's mean embedding."""
    preds = load_predictions(ws.run_dir(run))
    x = np.asarray(preds.embeddings, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    fine = preds.heads[max(preds.head_sizes)].cluster
    out = {}
    for f in np.unique(fine):
        members = np.flatnonzero(fine == f)
        open_ = [m for m in members if preds.image_ids[m] in ids]
        centre = x[members].mean(0)
        out[int(f)] = int(preds.image_ids[open_[int(np.argmax(x[open_] @ centre))]])
    return out, dict(zip(preds.image_ids.tolist(), fine.tolist()))


def test_queue_offers_the_centre_of_every_sub_group_unchecked_ones_first(ws_run, monkeypatch):
    from selfclassifier_core.curation import review

    monkeypatch.setattr(review, "MIX", False)    # the central picks alone (the default)
    ws, run = ws_run
    lab = Labels(ws, run)
    ids = set(lab.image_ids.tolist())
    central, fine_of = _central(ws, run, ids)
    q = review_queue(lab, len(central))
    assert set(q.index) == set(central.values())  # one per group of the 6-class head
    # a group with a checked image waits until every other group had its turn
    lab.confirm([central[0]])
    left = ids - {central[0]}
    central2, _ = _central(ws, run, left)
    q2 = review_queue(lab, len(central) - 1).index.tolist()
    assert set(q2) == {v for f, v in central2.items() if f != 0}
    assert fine_of[review_queue(lab, len(central)).index[-1]] == 0


def test_queue_then_checks_each_group_in_proportion_to_its_size(ws_run, monkeypatch):
    from selfclassifier_core.curation import review

    monkeypatch.setattr(review, "MIX", False)
    ws, run = ws_run
    lab = Labels(ws, run)
    ids = set(lab.image_ids.tolist())
    central, fine_of = _central(ws, run, ids)
    lab.confirm(list(central.values()))           # every group has one checked image
    preds = load_predictions(ws.run_dir(run))
    x = np.asarray(preds.embeddings, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    row_of = dict(zip(preds.image_ids.tolist(), range(len(preds.image_ids))))
    sizes = {f: sum(1 for v in fine_of.values() if v == f) for f in central}
    q = review_queue(lab, 1).index.tolist()
    # the largest group is furthest below its share of the checks ...
    biggest = max(sizes, key=lambda f: (sizes[f], -f))
    assert fine_of[q[0]] == biggest
    # ... and gets the image that brings its members closest to a checked one
    members = [row_of[i] for i, f in fine_of.items() if f == biggest]
    near = x[members] @ x[row_of[central[biggest]]]
    open_ = [i for i, f in fine_of.items() if f == biggest and i != central[biggest]]
    gain = {i: np.maximum(x[members] @ x[row_of[i]] - near, 0).sum() for i in open_}
    assert q[0] == max(gain, key=gain.get)
    # many picks follow the group sizes: every group gets about its share
    lab.confirm(q)
    q = review_queue(lab, 24).index.tolist()
    total = len(ids)
    for f, size in sizes.items():
        have = 1 + (f == biggest) + sum(1 for i in q if fine_of[i] == f)
        assert abs(have - size * 31 / total) <= 1.5


def test_a_group_with_excluded_members_offers_the_centre_of_the_others(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    ids = set(lab.image_ids.tolist())
    central, fine_of = _central(ws, run, ids)
    preds = load_predictions(ws.run_dir(run))
    x = np.asarray(preds.embeddings, np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    row_of = dict(zip(preds.image_ids.tolist(), range(len(preds.image_ids))))
    group = [i for i, f in fine_of.items() if f == 0]
    # leave out the half of group 0 nearest its old centre: the centre moves to the rest
    near = sorted(group, key=lambda i: -float(x[row_of[i]] @ x[row_of[central[0]]]))
    gone, kept = near[:len(group) // 2], near[len(group) // 2:]
    lab.exclude(gone)
    centre = x[[row_of[i] for i in kept]].mean(0)
    expected = max(kept, key=lambda i: float(x[row_of[i]] @ centre))
    q = review_queue(lab, len(central)).index.tolist()
    assert expected in q and central[0] not in q
    assert not set(q) & set(gone)


def test_a_basis_kept_across_edits_gives_the_queue_a_fresh_one_gives(ws_run, tmp_path):
    from selfclassifier_core.curation.review import review_basis

    ws, run = ws_run
    lab = Labels(ws, run)
    basis = review_basis(lab)                    # made once, as the app keeps it
    other_ws, other_run = make_workspace_with_run(tmp_path / "other", n_images=30,
                                                  heads=(3, 6), seed=2, write_images=False)
    foreign = review_basis(Labels(other_ws, other_run))
    seen = []
    for step in range(4):
        fresh = review_queue(lab, 8)
        assert review_queue(lab, 8, basis=basis).equals(fresh)
        assert review_queue(lab, 8, basis=foreign).equals(fresh)   # other images: made again
        ids = fresh.index.tolist()
        seen += ids
        lab.confirm(ids[:4])
        lab.move_to_label(ids[4:6], lab.label_names()[(step + 1) % 3])
        lab.exclude(ids[6:])
    assert len(set(seen)) == len(seen) == 32     # no image offered twice


def test_centrality_is_each_image_s_cosine_to_its_group_mean_across_chunks():
    from selfclassifier_core.store.predictions import group_centrality

    rng = np.random.default_rng(0)
    emb = rng.normal(size=(250, 8)).astype(np.float16)
    groups = rng.integers(0, 7, size=250)
    groups[groups == 5] = 6                      # group 5 empty
    x = emb.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    want = np.array([x[i] @ x[groups == groups[i]].mean(0) for i in range(250)])
    for chunk in (1000, 37):                     # one pass, and chunks cutting groups apart
        got = group_centrality(emb, groups, 7, chunk=chunk)
        assert got.dtype == np.float32 and np.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="0..6"):
        group_centrality(emb, np.full(250, 7), 7)


def test_predictions_keep_the_finest_head_s_centrality_and_older_files_compute_it(ws_run):
    from selfclassifier_core.store.predictions import PREDICTIONS_FILE, group_centrality

    ws, run = ws_run
    preds = load_predictions(ws.run_dir(run))
    stored = preds.centrality
    want = group_centrality(np.asarray(preds.embeddings), preds.heads[6].cluster, 6)
    assert stored is not None and np.array_equal(stored, want)
    lab = Labels(ws, run)
    queue = review_queue(lab, 12)
    path = ws.run_dir(run) / PREDICTIONS_FILE    # a file written before centrality was kept
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "centrality"}
    np.savez(path, **arrays)
    assert load_predictions(ws.run_dir(run)).centrality is None
    assert review_queue(Labels(ws, run), 12).equals(queue)


def test_each_group_s_members_most_central_first_are_stored_and_kept_to_the_table(ws_run):
    from selfclassifier_core.curation.review import review_basis
    from selfclassifier_core.store.predictions import PREDICTIONS_FILE

    ws, run = ws_run
    preds = load_predictions(ws.run_dir(run))
    fine, centrality = preds.heads[6].cluster, preds.centrality
    n = len(fine)
    want = sorted(range(n), key=lambda r: (int(fine[r]), -float(centrality[r]), r))
    assert preds.central_order.tolist() == want
    lab = Labels(ws, run)
    final = lab.final_labels()
    assert review_basis(lab, final).by_centre.tolist() == want
    # labels without some images (rows of their own): the same order over the rows they have
    part = final.take(np.arange(0, len(final), 3))
    row_of = {int(i): r for r, i in enumerate(part.ids)}
    ids = preds.image_ids
    expected = [row_of[int(ids[r])] for r in want if int(ids[r]) in row_of]
    assert review_basis(lab, part).by_centre.tolist() == expected
    queue = review_queue(lab, 12)
    path = ws.run_dir(run) / PREDICTIONS_FILE    # a file written before the order was kept
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "central_order"}
    np.savez(path, **arrays)
    old = Labels(ws, run)
    assert load_predictions(ws.run_dir(run)).central_order is None
    assert review_basis(old, part).by_centre.tolist() == expected
    assert review_queue(old, 12).equals(queue)


def test_queue_weighs_a_sample_of_a_huge_group(ws_run, monkeypatch):
    from selfclassifier_core.curation import review

    ws, run = ws_run
    lab = Labels(ws, run)
    central, _ = _central(ws, run, set(lab.image_ids.tolist()))
    lab.confirm(list(central.values()))
    monkeypatch.setattr(review, "COVER_SAMPLE", 3)      # groups of ~10: members cut ...
    monkeypatch.setattr(review, "COVER_CANDIDATES", 2)  # ... and candidates
    q = review_queue(lab, 30)
    assert len(q) == 30 and q.index.is_unique
    assert not set(q.index) & set(central.values())


def test_queue_mixes_central_and_most_doubtful_images(ws_run, monkeypatch):
    from selfclassifier_core.curation import review

    ws, run = ws_run
    lab = Labels(ws, run)
    monkeypatch.setattr(review, "MIX", True)     # off by default: the central picks alone
    mixed = review_queue(lab, 6).index.tolist()
    monkeypatch.setattr(review, "MIX", False)
    central = review_queue(lab, 6).index.tolist()
    df = lab.final_table()
    assert mixed[0] == central[0]
    assert mixed[1] not in central[:1]
    assert mixed[1] in df.index                   # a doubtful pick of its own
    assert len(set(mixed) - set(central)) >= 2


def test_single_head_queue_takes_the_most_doubtful_image_of_each_cluster(tmp_path):
    ws, run = make_workspace_with_run(tmp_path, n_images=60, heads=(3,), seed=1,
                                      write_images=False)
    lab = Labels(ws, run)
    df = lab.final_table()
    q = review_queue(lab, 3, per_cluster=1)
    doubt = 1 - df["margin"].to_numpy(float)     # one head: nothing to disagree with
    assert sorted(q["cluster"].tolist()) == [0, 1, 2]
    for image_id, row in q.iterrows():
        in_cluster = df.index[df["cluster"] == row["cluster"]]
        best = in_cluster[np.argmax(doubt[df.index.get_indexer(in_cluster)])]
        assert image_id == best
    assert q["doubt"].tolist() == sorted(q["doubt"], reverse=True)   # most doubtful cluster first


def test_queue_rejects_bad_sizes(ws_run):
    ws, run = ws_run
    with pytest.raises(ValueError, match="n must be a positive integer"):
        review_queue(Labels(ws, run), 0)


def test_cli_next_lists_images_and_confirm_marks_them(ws_run, capsys):
    ws, run = ws_run
    assert cli_main(["labels", str(ws.path), "next", "-n", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    ids = [int(line.split("\t")[0]) for line in lines[1:]]
    assert len(ids) == 4 and "4 images to check" in lines[0]
    assert cli_main(["labels", str(ws.path), "confirm", *map(str, ids[:2])]) == 0
    assert Labels(ws, run).confirmed_ids().tolist() == sorted(ids[:2])
    capsys.readouterr()
    cli_main(["labels", str(ws.path), "next", "-n", "60"])
    again = [int(line.split("\t")[0]) for line in capsys.readouterr().out.splitlines()[1:]]
    assert not set(ids[:2]) & set(again)


# ----------------------------------------------------------------------------- reading, plan
def test_read_feedback_sorts_checked_named_and_excluded(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    cl = clusters_of(ws, run)
    in0 = [i for i, c in cl.items() if c == 0]
    in1 = [i for i, c in cl.items() if c == 1]
    lab.rename(0, "cats")
    lab.move(in1[:2], cluster=2)
    lab.confirm(in0[:3])
    lab.exclude(in0[3:4])
    fb = read_feedback(lab)
    by_id = dict(zip(fb.ids.tolist(), range(len(fb.ids))))
    assert sorted(fb.ids[fb.checked].tolist()) == sorted(in0[:3] + in1[:2])
    assert sorted(fb.ids[fb.named].tolist()) == sorted(in0[4:])
    assert fb.ids[fb.excluded].tolist() == in0[3:4]
    assert fb.label[by_id[in0[0]]] == "cats"
    assert fb.summary() == f"run {run} (head 3): 5 checked images, {len(in0) - 4} more in " \
                           "named clusters, 1 excluded"


def test_plan_merged_clusters_keep_their_classes_and_a_new_label_gets_one(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    cl = clusters_of(ws, run)
    in0, in1, in2 = ([i for i, c in cl.items() if c == k] for k in range(3))
    lab.merge([1, 0], name="animals")           # clusters 0 and 1: one label, both kept
    lab.move_to_label(in2[:4], "birds")         # a label no cluster carries
    lab.move_to_label(in2[4:7], "animals")      # moved into the merged label
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=0)
    assert plan.heads == [4, 6]                 # no class was freed: the main head grows
    assert plan.classes == {"animals": 0, "birds": 3, "cluster_2": 2}
    assert plan.names == {0: "animals", 1: "animals", 3: "birds"}
    t = plan.targets
    cls = dict(zip(t.image_ids.tolist(), t.classes[:, 0].tolist()))
    w = dict(zip(t.image_ids.tolist(), t.weights.tolist()))
    assert all(cls[i] == 3 and w[i] == 1 for i in in2[:4])
    assert all(cls[i] == 0 and w[i] == 0.25 for i in in0)  # named: each in its own cluster
    assert all(cls[i] == 1 and w[i] == 0.25 for i in in1)
    preds = load_predictions(ws.run_dir(run))  # a moved image: the nearest of the label's
    x = np.asarray(preds.embeddings, np.float32)
    centre = {k: x[np.isin(preds.image_ids, ids)].mean(0) for k, ids in ((0, in0), (1, in1))}
    for i in in2[4:7]:
        row = x[np.searchsorted(preds.image_ids, i)]
        assert cls[i] == max(centre, key=lambda k: row @ centre[k]) and w[i] == 1
    assert not set(in2[7:]) & set(cls)          # an untouched default cluster teaches nothing


def test_a_new_label_takes_over_the_merged_cluster_its_images_came_from(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    cl = clusters_of(ws, run)
    in0, in1, in2 = ([i for i, c in cl.items() if c == k] for k in range(3))
    lab.merge([0, 1], name="animals")
    lab.move_to_label(in1[:3] + in2[:1], "birds")   # most of them from cluster 1
    lab.move_to_label(in2[1:3], "fish")             # cluster 2 is its label's only one
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=0)
    assert plan.classes["birds"] == 1 and plan.classes["animals"] == 0
    assert plan.heads == [4, 6] and plan.classes["fish"] == 3   # nothing freed: grown
    assert plan.names == {0: "animals", 1: "birds", 3: "fish"}
    cls = dict(zip(plan.targets.image_ids.tolist(), plan.targets.classes[:, 0].tolist()))
    assert all(cls[i] == 0 for i in in1[3:])     # cluster 1's other images: still animals


def test_plan_grows_the_main_head_when_labels_outnumber_classes(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    cl = clusters_of(ws, run)
    ids = sorted(cl)
    lab.move_to_label(ids[:2], "new one")
    lab.move_to_label(ids[2:4], "new two")
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=0)
    assert plan.heads == [5, 6]                 # 3 clusters + 2 labels; 6 stays
    assert plan.source_heads == [3, 6]
    assert {plan.classes["new one"], plan.classes["new two"]} == {3, 4}
    # a grown size that equals another head's size is skipped (head sizes are distinct)
    lab.move_to_label(ids[4:6], "new three")
    lab.move_to_label(ids[6:8], "new four")
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=0)
    assert plan.heads == [8, 6]


def test_plan_other_heads_keep_finer_clusters_inside_a_label(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=12, heads=(2, 4), write_images=False)
    c2 = np.array([0] * 6 + [1] * 6)
    c4 = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    run = add_run(ws, heads=(2, 4), clusters={2: c2, 4: c4})
    lab = Labels(ws, run)
    lab.rename(0, "left")
    lab.rename(1, "right")
    ids = lab.image_ids
    lab.move([int(ids[6])], cluster=0)          # a 'right' image (finer cluster 2) moved left
    plan = plan_refit(read_feedback(lab), [2, 4], ws.run_dir(run), neighbours=0)
    fine = dict(zip(plan.targets.image_ids.tolist(), plan.targets.classes[:, 1].tolist()))
    for i, c in zip(ids.tolist(), c4.tolist()):
        if i != int(ids[6]):
            assert fine[i] == c                 # finer clusters owned by the label: kept
    assert fine[int(ids[6])] in (0, 1)          # moved: the largest finer cluster of 'left'


def test_plan_lends_checked_labels_to_nearest_neighbours(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    preds = load_predictions(ws.run_dir(run))
    emb = np.asarray(preds.embeddings, np.float32)
    ids = preds.image_ids
    lab.move_to_label([int(ids[0])], "special")
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=3,
                      neighbour_weight=0.5)
    near = np.argsort(-(emb @ emb[0]))[1:4]
    t = plan.targets
    pos = np.searchsorted(t.image_ids, ids[near])
    assert (t.classes[pos, 0] == plan.classes["special"]).all()
    assert np.allclose(t.weights[pos], 0.5)
    with pytest.raises(ValueError, match="neighbour_weight"):
        plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbour_weight=2)


def test_plan_lends_a_label_to_no_more_than_an_average_label_holds(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    ids = load_predictions(ws.run_dir(run)).image_ids
    lab.move_to_label([int(ids[0])], "special")     # one check, of one label
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=80)
    t = plan.targets
    special = t.classes[:, 0] == plan.classes["special"]
    assert int(special.sum()) == 1 + 60 // 4         # itself and 15 neighbours (60 images, 4 labels)
    assert np.allclose(t.weights[special & (t.weights < 1)], 0.5)


def test_plan_keeps_excluded_images_out(ws_run):
    ws, run = ws_run
    lab = Labels(ws, run)
    lab.rename(0, "x")
    in0 = [i for i, c in clusters_of(ws, run).items() if c == 0]
    lab.exclude(in0[:2])
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=0)
    assert plan.targets.excluded.tolist() == sorted(in0[:2])
    assert not np.isin(plan.targets.image_ids, in0[:2]).any()


# ----------------------------------------------------------------------------- labels of a refit
@pytest.mark.parametrize("earlier", ["npz", "json of an earlier release"])
def test_applying_a_refit_names_its_clusters_and_keeps_every_checked_image(ws_run, earlier):
    ws, run = ws_run
    lab = Labels(ws, run)
    cl = clusters_of(ws, run)
    lab.rename(0, "zero")
    lab.merge([1, 2], name="rest")
    wrong = [i for i, c in cl.items() if c == 1][:3]
    lab.move_to_label(wrong, "zero")            # three images fixed by hand
    lab.confirm([i for i, c in cl.items() if c == 0][:2])
    lab.exclude([i for i, c in cl.items() if c == 2][:1])
    lab.create_label("later")
    plan = plan_refit(read_feedback(lab), [3, 6], ws.run_dir(run), neighbours=0)
    # the new run's model: everything in cluster 0 but the first fixed image
    new_c = np.zeros(60, np.int32)
    new_c[np.searchsorted(lab.image_ids, wrong[0])] = 1
    new = add_run(ws, heads=(3, 6), clusters={3: new_c}, seed=1)
    save_plan(ws.run_dir(new), plan)
    stored = ws.run_dir(new) / "refit-labels.npz"
    with np.load(stored) as z:                  # the earlier run's labels, as the plan saw them
        labels = dict(zip(z["ids"].tolist(), z["names"][z["codes"]].tolist()))
    before = Labels(ws, run).final_table()["label"]
    assert labels == before.to_dict()
    if earlier != "npz":                        # kept in refit.json before this file existed
        record = json.loads((ws.run_dir(new) / "refit.json").read_text())
        record["labels"] = {"ids": list(labels), "label": list(labels.values())}
        (ws.run_dir(new) / "refit.json").write_text(json.dumps(record))
        stored.unlink()
    out = apply_refit_labels(ws, new)
    nl = Labels(ws, new)
    assert nl.cluster_names() == {0: "zero", 1: "rest", 2: "rest"}   # the merge: both kept
    df = nl.final_table()
    assert (df.loc[wrong, "label"] == "zero").all()   # the fixed one the model got wrong: moved
    assert df.loc[wrong[0], "edited"] and df.loc[wrong[1:], "confirmed"].all()
    excluded = [i for i, c in cl.items() if c == 2][:1]
    assert df.loc[excluded, "excluded"].all()
    assert "later" in nl.label_names()
    assert out["moved"] == 1 and out["confirmed"] == 4
    old = Labels(ws, run).final_table()
    kept = ~df["excluded"]
    assert out["changed"] == int((old["label"][kept] != df["label"][kept]).sum())
    assert apply_refit_labels(ws, new) == out             # once only
    assert read_plan(ws.run_dir(new))["applied"] == out
    nl.undo()                                             # one operation
    assert nl.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2"}
    with pytest.raises(ValueError, match="not a refit"):
        apply_refit_labels(ws, run)


# ----------------------------------------------------------------------------- the loss
def _logits(n=16, heads=(3, 6), views=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(n, k, generator=g, requires_grad=True) for _ in range(views)]
            for k in heads]


def test_loss_without_labels_is_exactly_the_self_classifier_loss():
    z = _logits()
    plain = self_classifier_loss(z)
    crit = SelfClassifierLoss()
    none = torch.full((16, 2), -1, dtype=torch.long)
    assert torch.equal(crit(z), plain)
    assert torch.equal(crit(z, targets=none), plain)
    assert torch.equal(crit(z, targets=none.clamp(min=0), weights=torch.zeros(16)), plain)
    assert torch.equal(crit(z, targets=none.clamp(min=0), supervised_weight=0.0), plain)


def test_supervised_term_is_the_weighted_cross_entropy_of_labelled_rows():
    z = _logits()
    t = torch.full((16, 2), -1, dtype=torch.long)
    t[:4, 0] = torch.tensor([0, 1, 2, 0])
    t[:4, 1] = torch.tensor([5, 4, 3, 2])
    w = torch.tensor([1.0, 0.5, 1.0, 0.25] + [1.0] * 12)
    expected = []
    for h in range(2):
        for v in range(2):
            logp = torch.log_softmax(z[h][v][:4].detach() / 0.1, dim=1)
            ce = -logp[torch.arange(4), t[:4, h]]
            expected.append((w[:4] * ce).sum() / w[:4].sum())
    got = supervised_term(z, t, w, row_tau=0.1)
    assert torch.allclose(got, torch.stack(expected).mean(), atol=1e-6)
    total = SelfClassifierLoss()(z, targets=t, weights=w, supervised_weight=2.0)
    assert torch.allclose(total, self_classifier_loss(z) + 2.0 * got, atol=1e-6)
    total.backward()                             # gradients reach the logits
    assert z[0][0].grad is not None and z[0][0].grad[:4].abs().sum() > 0


def test_supervised_term_checks_its_inputs():
    z = _logits()
    with pytest.raises(ValueError, match="one column per head"):
        supervised_term(z, torch.zeros(16, dtype=torch.long), torch.ones(16))
    with pytest.raises(ValueError, match="has 3 classes but a target is 5"):
        supervised_term(z, torch.full((16, 2), 5, dtype=torch.long), torch.ones(16))


# ----------------------------------------------------------------------------- targets, starts
def test_targets_round_trip_and_lookup(tmp_path):
    t = Targets([4, 8], [2, 5, 9], [[1, 3], [0, -1], [3, 7]], [1.0, 0.25, 0.5], [11])
    save_targets(tmp_path, t)
    back = load_targets(tmp_path)
    assert back.heads == [4, 8] and back.excluded.tolist() == [11]
    classes, weights = back.lookup(torch.tensor([9, 3, 2]))
    assert classes.tolist() == [[3, 7], [-1, -1], [1, 3]]
    assert weights.tolist() == [0.5, 0.0, 1.0]
    assert load_targets(tmp_path / "nothing") is None
    with pytest.raises(ValueError, match="head 4: target classes must lie in -1..3"):
        Targets([4], [1], [[4]], [1.0], [])


def test_warm_start_copies_weights_and_grows_a_head():
    torch.manual_seed(0)
    old = SelfClassifier(ModelConfig(backbone="convnet_small", image_size=32, heads=[3, 6],
                                     proj_hidden_dim=32))
    new = SelfClassifier(ModelConfig(backbone="convnet_small", image_size=32, heads=[5, 6],
                                     proj_hidden_dim=32))
    fresh_rows = new.heads.heads[0].weight[3:].detach().clone()
    untouched = warm_start(new, old.state_dict())
    assert untouched == ["heads.heads.0.weight"]
    assert torch.equal(new.heads.heads[0].weight[:3], old.heads.heads[0].weight)
    assert torch.equal(new.heads.heads[0].weight[3:], fresh_rows)
    assert torch.equal(new.heads.heads[1].weight, old.heads.heads[1].weight)
    assert torch.equal(new.projection.mlp[0].weight, old.projection.mlp[0].weight)


def test_start_state_puts_the_earlier_heads_in_the_new_order(tmp_path):
    ws, run = make_workspace_with_run(tmp_path, n_images=8, heads=(3, 6), write_images=False)
    model = SelfClassifier(ModelConfig(backbone="convnet_small", image_size=32, heads=[6, 3],
                                       proj_hidden_dim=32))
    save_checkpoint(ws.run_dir(run) / CHECKPOINT_FILE, model.checkpoint_dict())
    state = start_state(ws, run, [7, 6])         # 3 grew to 7 and comes first
    assert torch.equal(state["heads.heads.0.weight"], model.heads.heads[1].weight)
    assert torch.equal(state["heads.heads.1.weight"], model.heads.heads[0].weight)


def test_named_images_count_by_the_mode_of_the_run_refit(ws_run):
    from selfclassifier_core.curation.feedback import NAMED_WEIGHTS
    from selfclassifier_core.workflows.refit import prepare_refit

    ws, run = ws_run                               # a finished scratch run
    lab = Labels(ws, run)
    lab.rename(0, "animals")
    lab.confirm([int(lab.final_table().index[0])])
    named = int(read_feedback(lab).named.sum())
    weights = {}
    for mode in ("scratch", "fast"):
        with ws.transaction() as conn:
            conn.execute("UPDATE runs SET mode = ? WHERE id = ?", (mode, run))
        _new, plan, _opts = prepare_refit(ws, run, neighbours=0)
        weights[mode] = sorted(plan.targets.weights.tolist())
    assert weights["scratch"] == [1.0]             # a scratch refit: the checked image alone
    assert weights["fast"] == [NAMED_WEIGHTS["fast"]] * named + [1.0]
    assert 0 < NAMED_WEIGHTS["fast"] < 1
    _new, plan, _opts = prepare_refit(ws, run, neighbours=0, named_weight=0.5)  # asked for
    assert sorted(plan.targets.weights.tolist()) == [0.5] * named + [1.0]


def test_nearest_rows_in_chunks_match_a_full_search():
    from selfclassifier_core.curation.feedback import _nearest_rows

    rng = np.random.default_rng(3)
    emb = rng.normal(size=(50, 8)).astype(np.float16)       # stored as a run stores them
    pos = rng.permutation(50)[:37]                            # some rows, in another order
    queries = emb[pos[[0, 5, 36]]].astype(np.float32)
    full = queries @ emb[pos].astype(np.float32).T
    want = np.argsort(-full, axis=1, kind="stable")[:, :6]
    for chunk in (7, 37, 1000):                               # chunks that cut the rows apart
        sims, idx = _nearest_rows(emb, pos, queries, 6, chunk=chunk)
        assert idx.tolist() == want.tolist()
        assert np.allclose(sims, np.take_along_axis(full, want, 1))
        assert idx[:, 0].tolist() == [0, 5, 36]               # each query's own row first
    sims, idx = _nearest_rows(emb, pos, queries, 99, chunk=7)  # more asked than rows
    assert idx.shape == (3, 37) and sorted(idx[0].tolist()) == list(range(37))
