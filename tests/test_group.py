"""The one-step path: ``group FOLDER`` (scan, the default grouping or the run already there, the
neighbour index, the map, a summary) and the default grouping's options."""
from __future__ import annotations

import importlib.util

import pytest

from selfclassifier_core.cli import main
from selfclassifier_core.curation.neighbors import INDEX_FILE
from selfclassifier_core.curation.projection import MAP_FILE
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.store.workspace import Workspace
from selfclassifier_core.training import recipes
from selfclassifier_core.workflows import group as group_mod
from train_fixtures import FAST, make_folder

# a run of a few seconds standing in for the default grouping (which may be a minute of scratch)
TINY = dict(FAST, mode="scratch", classes=2, epochs=1, batch_size=8)


def test_default_grouping_is_fast_mode_on_offline_weights(monkeypatch):
    monkeypatch.setattr(recipes, "offline_weights", lambda: True)
    assert recipes.default_run_options(500) == {"mode": "fast", "backbone": "efficientnet_lite0",
                                                "pretrained": "imagenet"}


def test_default_grouping_without_weights_is_scratch_with_a_budget(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert recipes.offline_weights() is False
    assert recipes.default_run_options(2000) == {"mode": "scratch", "minutes": 1.0}
    assert recipes.default_run_options(2001) == {"mode": "scratch", "minutes": 10.0}


def test_group_of_an_empty_folder_says_so(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["group", str(tmp_path / "empty"), "--workspace", str(tmp_path / "ws")]) == 2
    assert "no usable images" in capsys.readouterr().err


@pytest.mark.slow  # trains
def test_group_then_group_again_reuses_the_run(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(recipes, "default_run_options", lambda n: dict(TINY))
    folder = make_folder(tmp_path / "imgs", n=16)
    ws_path = tmp_path / "ws"
    assert main(["group", str(folder), "--workspace", str(ws_path)]) == 0
    out = capsys.readouterr().out
    ws = Workspace.open(ws_path)
    [run] = ws.list_runs()
    assert run.status == "done" and "run 1 done" in out
    assert len(load_predictions(run.dir).image_ids) == 16          # broken.png left out
    assert (run.dir / INDEX_FILE).exists()                          # the neighbour index
    assert (run.dir / MAP_FILE).exists()                            # the map
    assert "the neighbour index is ready" in out and "the map is ready" in out
    assert "Start with" in out and "export the labels:" in out      # the summary, next commands

    make_folder(tmp_path / "imgs" / "more", n=2, seed=5)            # two images added since
    assert main(["group", str(folder), "--workspace", str(ws_path)]) == 0
    out = capsys.readouterr().out
    assert [r.id for r in ws.list_runs()] == [1]                    # nothing trained again
    assert "reused, nothing trained" in out
    assert "2 image(s) added since then have no group yet" in out
    assert "--retrain" in out
