"""curation.summary: a run's grouping in numbers, the suggested head, its text and `runs --run`.

Every run here is made with chosen clusters, confidences and margins, so each expected number
is worked out by hand (or counted in the test from the arrays it chose), never read back from
the code under test.
"""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import numpy as np
import pytest

import selfclassifier_core as sc
from selfclassifier_core.cli import main
from selfclassifier_core.curation.labels import Labels
from selfclassifier_core.curation.summary import (CONFIDENCE_BINS, LOW_MARGIN, MIN_AGREEMENT,
                                                  MIN_BALANCE, MIN_GROUP_IMAGES, agreement,
                                                  balance, format_summary, run_summary)
from selfclassifier_core.store.predictions import HeadPrediction, Predictions, save_predictions
from selfclassifier_core.store.workspace import Workspace, WorkspaceError
from workspace_fixtures import add_run, make_workspace_with_run


def _run(ws, clusters: dict[int, list[int]], confidence=None, margin=None, main_head=None):
    """A finished run over images 1..N with exactly these clusters (and confidence, margin)."""
    heads = list(clusters)
    n = len(next(iter(clusters.values())))
    conf = np.full(n, 0.9, np.float32) if confidence is None else np.asarray(confidence, np.float32)
    marg = np.full(n, 0.5, np.float32) if margin is None else np.asarray(margin, np.float32)
    run_id = ws.create_run("scratch", {}, heads, main_head or heads[0])
    save_predictions(ws.run_dir(run_id), Predictions(
        np.arange(1, n + 1, dtype=np.int64),
        {k: HeadPrediction(k, np.asarray(c, np.int32), conf, marg) for k, c in clusters.items()}))
    ws.update_run(run_id, status="done")
    return run_id


@pytest.fixture
def ws12(tmp_path):
    """A catalog of 12 usable images (ids 1..12) and 2 unreadable ones; its fixture run is 1."""
    ws, _ = make_workspace_with_run(tmp_path, n_images=12, heads=(2,), write_images=False,
                                    n_unreadable=2)
    return ws


# --------------------------------------------------------------------------- the numbers
def test_balance_and_agreement_by_hand():
    assert balance([5, 5, 5], 3) == pytest.approx(1.0)
    assert balance([12, 0, 0], 3) == pytest.approx(0.0)
    # p = (1/2, 1/4, 1/4, 0): H = 1.5 ln 2, log K = 2 ln 2
    assert balance([2, 1, 1, 0], 4) == pytest.approx(0.75)
    assert balance([7], 1) == 1.0
    coarse = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert agreement([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], coarse) == 1.0
    # fine 0: 3 of 3 in coarse 0; fine 1: images 3, 4 (coarse 0) and 11 (coarse 1): 2;
    # fine 2: image 5 (coarse 0), 6, 7 (coarse 1): 2; fine 3: 8, 9, 10 (coarse 1): 3
    assert agreement([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 1], coarse) == pytest.approx(10 / 12)
    with pytest.raises(ValueError, match="same images"):
        agreement([0, 1], [0])


def test_head_numbers_of_a_chosen_run(ws12):
    coarse = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]          # sizes 8, 4
    fine = [0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 1]            # sizes 3, 3, 3, 3 (group 1 straddles)
    conf = [0.07, 0.17, 0.22, 0.52, 0.52, 0.57, 0.92, 0.97, 1.0, 0.99, 0.32, 0.32]
    margin = [0.0, 0.05, 0.099, 0.1, 0.3, 0.3, 0.3, 0.5, 0.5, 0.5, 0.02, 0.6]
    run_id = _run(ws12, {2: coarse, 4: fine}, conf, margin)
    s = run_summary(ws12, run_id)
    assert (s.run_id, s.images, s.main_head, s.mode) == (run_id, 12, 2, "scratch")
    assert [h.classes for h in s.heads] == [2, 4]
    h2, h4 = s.head(2), s.head(4)
    assert (h2.groups, h2.sizes, h4.groups, h4.sizes) == (2, (8, 4), 4, (3, 3, 3, 3))
    # margins below 0.1: 0.0, 0.05, 0.099, 0.02 -> 4 of 12 (0.1 itself is not below)
    assert LOW_MARGIN == 0.1
    assert h2.low_margin == pytest.approx(4 / 12) and h4.low_margin == pytest.approx(4 / 12)
    p = [8 / 12, 4 / 12]
    assert h2.balance == pytest.approx(-sum(x * math.log(x) for x in p) / math.log(2))
    assert h4.balance == pytest.approx(1.0)
    assert (h2.coarser, h2.agreement) == (None, None)
    # fine 0: 3 in coarse 0; fine 1: images 3, 4 in coarse 0, 11 in coarse 1 -> 2;
    # fine 2: 3 in coarse 0; fine 3: 3 in coarse 1
    assert h4.coarser == 2 and h4.agreement == pytest.approx(11 / 12)
    # 20 bins of 0.05 (values kept off the edges: they are stored as float32): 0.07 -> bin 1,
    # 0.17 -> 3, 0.22 -> 4, 0.32 x2 -> 6, 0.52 x2 -> 10, 0.57 -> 11, 0.92 -> 18, 0.97, 0.99
    # and 1.0 -> 19 (the last bin includes 1.0)
    expected = [0] * CONFIDENCE_BINS
    for b in (1, 3, 4, 6, 6, 10, 10, 11, 18, 19, 19, 19):
        expected[b] += 1
    assert list(h2.confidence_hist) == expected
    assert h2.median_confidence == pytest.approx(0.52)
    assert h2.mean_confidence == pytest.approx(sum(conf) / 12, rel=1e-6)


def test_empty_classes_count_against_balance_not_groups(ws12):
    clusters = {4: [0] * 6 + [1] * 3 + [2] * 3}             # class 3 empty
    s = run_summary(ws12, _run(ws12, clusters))
    h = s.head(4)
    assert (h.groups, h.sizes) == (3, (6, 3, 3))
    # p = (1/2, 1/4, 1/4, 0) over K = 4
    assert h.balance == pytest.approx(0.75)


def test_only_usable_images_count_and_exclusions_are_reported(ws12):
    coarse = [0] * 6 + [1] * 6
    fine = [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    run_id = _run(ws12, {2: coarse, 4: fine})
    with ws12.transaction() as conn:           # image 1 has gone from the folder since
        conn.execute("UPDATE images SET status='missing' WHERE id=1")
    Labels(ws12, run_id, head=4).exclude([7, 8])
    s = run_summary(ws12, run_id)
    assert s.images == 11
    assert s.head(2).sizes == (6, 5) and s.head(4).sizes == (3, 3, 3, 2)
    assert (s.head(2).excluded, s.head(4).excluded) == (0, 2)      # counted in, reported beside
    assert s.head(4).agreement == 1.0


def test_the_numbers_are_remembered_until_the_predictions_or_the_catalog_change(
        ws12, monkeypatch, caplog):
    import selfclassifier_core.curation.summary as summary_module

    reads = []
    real = summary_module.load_predictions
    monkeypatch.setattr(summary_module, "load_predictions",
                        lambda *a, **k: reads.append(1) or real(*a, **k))
    run_id = _run(ws12, {2: [0] * 6 + [1] * 6})
    first = run_summary(ws12, run_id)
    assert first.head(2).sizes == (6, 6) and len(reads) == 1
    assert run_summary(ws12, run_id) == first and len(reads) == 1        # from the memo
    with ws12.transaction() as conn:                                     # the catalog changes
        conn.execute("UPDATE images SET status='missing' WHERE id=1")
    s = run_summary(ws12, run_id)
    assert (s.images, s.head(2).sizes, len(reads)) == (11, (6, 5), 2)
    # exclusions are no key: counted at each call, among the usable images only (1 is missing)
    Labels(ws12, run_id, head=2).exclude([1, 2])
    s = run_summary(ws12, run_id)
    assert (s.head(2).excluded, s.head(2).sizes, len(reads)) == (1, (6, 5), 2)
    path = ws12.run_dir(run_id) / "predictions.npz"                     # new predictions
    save_predictions(ws12.run_dir(run_id), Predictions(np.arange(1, 13, dtype=np.int64), {
        2: HeadPrediction(2, np.array([0] * 9 + [1] * 3, np.int32), np.full(12, 0.9, np.float32),
                          np.full(12, 0.5, np.float32))}))
    stat = path.stat()            # a rewrite within the clock's tick would keep the time
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    s = run_summary(ws12, run_id)
    assert (s.head(2).sizes, s.head(2).excluded, len(reads)) == ((8, 3), 1, 3)
    memo = ws12.cache_dir / summary_module.MEMO.format(run_id)
    memo.write_text("{not json")                                         # damaged: done again
    with caplog.at_level("WARNING"):
        assert run_summary(ws12, run_id) == s
    assert "not used" in caplog.text and len(reads) == 4
    assert json.loads(memo.read_text())["images"] == 11


def test_the_fixture_run_and_every_form_of_the_workspace(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=40, heads=(3, 6), write_images=False)
    s = run_summary(ws)                                     # default: the newest finished run
    assert s.run_id == run_id and s.images == 40
    assert s.head(3).sizes == (14, 13, 13) and s.head(6).sizes == (7, 7, 7, 7, 6, 6)
    assert run_summary(str(ws.path)) == s == run_summary(Path(ws.path), run_id)
    assert sc.run_summary is run_summary and sc.format_summary is format_summary
    assert s.folder == ws.root and s.workspace == ws.path


def test_errors_in_words(ws12):
    with pytest.raises(WorkspaceError, match="no run 99"):
        run_summary(ws12, 99)
    created = ws12.create_run("scratch", {}, [2], 2)
    with pytest.raises(WorkspaceError, match=f"run {created} is created"):
        run_summary(ws12, created)
    ws12.update_run(created, status="done")                # finished, but nothing predicted
    with pytest.raises(FileNotFoundError, match="no predictions.*run `predict` on it"):
        run_summary(ws12, created)
    empty = Workspace.open(ws12.path.parent / "empty-ws", create=True)
    with pytest.raises(WorkspaceError, match="no finished training run"):
        run_summary(empty)


# --------------------------------------------------------------------------- the suggestion
def _modulo(n: int, k: int) -> list[int]:
    return [i % k for i in range(n)]


def test_the_finest_sound_head_is_suggested(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=60, heads=(3,), write_images=False)
    # i % 12 lies inside i % 6, which lies inside i % 3: perfect nesting, 5 images per group
    run_id = add_run(ws, heads=(3, 6, 12), clusters={k: _modulo(60, k) for k in (3, 6, 12)})
    s = run_summary(ws, run_id)
    assert [h.agreement for h in s.heads] == [None, 1.0, 1.0]
    assert [h.balance for h in s.heads] == pytest.approx([1.0, 1.0, 1.0])
    assert MIN_GROUP_IMAGES == 5 and s.head(12).median_size == 5
    assert s.suggested == 12
    assert "finest" in s.reason and "100% in the 6-group head" in s.reason
    assert s.agreements == [(3, 6, 1.0), (6, 12, 1.0)]


def test_a_head_that_does_not_nest_is_passed_over(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=60, heads=(3,), write_images=False)
    coarse = _modulo(60, 3)
    fine = list(np.random.default_rng(5).permutation(_modulo(60, 6)))
    run_id = add_run(ws, heads=(3, 6), clusters={3: coarse, 6: fine})
    table: dict[tuple[int, int], int] = {}
    for f, c in zip(fine, coarse):
        table[f, c] = table.get((f, c), 0) + 1
    by_hand = sum(max(table.get((f, c), 0) for c in range(3)) for f in range(6)) / 60
    s = run_summary(ws, run_id)
    assert by_hand < MIN_AGREEMENT
    assert s.head(6).agreement == pytest.approx(by_hand)
    assert s.suggested == 3
    assert f"6-group head is passed over: its groups nest only {by_hand:.0%}" in s.reason


def test_unbalanced_and_tiny_heads_are_passed_over(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=40, heads=(2,), write_images=False)
    coarse = _modulo(40, 2)
    lopsided = [2, 3] + coarse[2:]        # sizes 19, 19, 1, 1; each class inside one coarse one
    tiny = _modulo(40, 20)                                 # nests in i % 2, 2 images per group
    run_id = add_run(ws, heads=(2, 4, 20), clusters={2: coarse, 4: lopsided, 20: tiny})
    s = run_summary(ws, run_id)
    p = np.array([19, 19, 1, 1]) / 40
    assert s.head(4).balance == pytest.approx(-(p * np.log(p)).sum() / np.log(4))
    assert s.head(4).agreement == 1.0 and s.head(4).median_size == 10
    assert s.head(4).balance < MIN_BALANCE
    # i % 20 against the 4-group head: groups {0, 20} and {1, 21} are split by the two images
    # moved to classes 2 and 3, each keeps 1 of its 2; the other 18 groups keep both: 38 / 40
    assert s.head(20).coarser == 4 and s.head(20).agreement == pytest.approx(38 / 40)
    assert s.head(20).median_size == 2
    assert s.suggested == 2
    assert "4-group head is passed over: its groups are unbalanced" in s.reason
    assert "20-group head is passed over: its median group holds 2 images" in s.reason


def test_no_sound_head_gives_the_main_head(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=12, heads=(3,), write_images=False)
    run_id = _run(ws, {3: [0] * 10 + [1, 2], 6: [0] * 10 + [1, 2]}, main_head=6)
    s = run_summary(ws, run_id)
    assert s.suggested == 6 and s.main_head == 6
    assert s.reason.startswith("no head passes the tests, so the main head")
    one = run_summary(ws, _run(ws, {3: [0] * 10 + [1, 2]}))
    assert one.suggested == 3 and "one head" in one.reason
    collapsed = run_summary(ws, _run(ws, {2: [1] * 12, 4: [3] * 12}))   # a model that collapsed
    assert [(h.groups, h.sizes, h.balance) for h in collapsed.heads] == [(1, (12,), 0.0)] * 2
    assert collapsed.suggested == 2 and collapsed.reason.endswith("every image in one group")
    row = format_summary(collapsed).splitlines()[2].split()
    assert row == ["2*", "1", "of", "2", "12/12/12", "0.90", "0%", "0.00", "-"]


# --------------------------------------------------------------------------- text and CLI
def _nested_run(tmp_path):
    """An older fixture run, then a run with i % 3 and i % 6, confidence 0.9, margins 0.5."""
    ws, first = make_workspace_with_run(tmp_path, n_images=60, heads=(3,), write_images=False)
    return ws, first, _run(ws, {3: _modulo(60, 3), 6: _modulo(60, 6)})


def test_format_summary_lines(tmp_path):
    ws, first, run_id = _nested_run(tmp_path)
    lines = format_summary(run_summary(ws, run_id)).splitlines()
    assert lines[0] == f"Run {run_id} (scratch): 60 images, 2 heads (* the main head)"
    table = [line.split() for line in lines[1:4]]
    assert table[0][0] == "head"
    # head, groups (of K), sizes max/median/min, median confidence, low margin, balance, nests
    assert table[1] == ["3*", "3", "of", "3", "20/20/20", "0.90", "0%", "1.00", "-"]
    assert table[2] == ["6", "6", "of", "6", "10/10/10", "0.90", "0%", "1.00", "100%", "in", "3"]
    start = next(line for line in lines if line.startswith("Start with "))
    assert start.startswith("Start with 6 groups: the finest head")
    assert lines[-4] == "Next:"
    app, labels, export = (line.split(":", 1)[1].strip() for line in lines[-3:])
    assert shlex.split(app) == ["streamlit", "run", "app/main.py", "--", "--folder", str(ws.root),
                                "--workspace", str(ws.path)]
    assert shlex.split(labels) == ["python", "-m", "selfclassifier_core", "labels", str(ws.path),
                                   "--head", "6", "list"]
    assert shlex.split(export) == ["python", "-m", "selfclassifier_core", "export", str(ws.path),
                                   "--head", "6", "--csv", "labels.csv"]
    # an older run: the commands name it; the main head suggested: no --head
    older = format_summary(run_summary(ws, first)).splitlines()
    assert shlex.split(older[-1].split(":", 1)[1])[4:] == [str(ws.path), "--run", str(first),
                                                           "--csv", "labels.csv"]


def test_format_summary_mentions_exclusions(tmp_path):
    ws, _first, run_id = _nested_run(tmp_path)
    Labels(ws, run_id, head=6).exclude([1, 2, 3])
    text = format_summary(run_summary(ws, run_id))
    assert "excluded by you (counted above): 3 in the 6-group head" in text


def test_runs_cli_prints_the_summary_of_a_run(tmp_path, capsys):
    ws, first, run_id = _nested_run(tmp_path)
    assert main(["runs", str(ws.path), "--run", str(run_id)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Run {run_id} (scratch): 60 images")
    assert "Start with 6 groups" in out and "export" in out.splitlines()[-1]
    assert main(["runs", str(ws.path)]) == 0                # the list, as before
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:3] == ["run", "status", "mode"] and len(listing) == 3
    assert main(["runs", str(ws.path), "--run", "99"]) == 2
    assert "no run 99" in capsys.readouterr().err
