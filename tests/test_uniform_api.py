"""Every public curation function that works on a workspace takes a Workspace or its path.

Each test calls one function with the :class:`Workspace`, with ``str(ws.path)`` and with a
``Path`` and checks that the three give the same result (fixture runs with made-up predictions:
no training; the map is made by its PCA path: no UMAP fit).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import pandas as pd
import pytest

from selfclassifier_core.curation.export import (build_csv_bytes, export_csv, export_imagefolder,
                                                 export_jsonl, export_parquet, export_table)
from selfclassifier_core.curation.labels import Labels, carry_over
from selfclassifier_core.curation.neighbors import NeighborIndex
from selfclassifier_core.curation.projection import run_map
from selfclassifier_core.store.workspace import Workspace, WorkspaceError
from workspace_fixtures import add_run, make_workspace_with_run

FORMS = {"str": lambda ws: str(ws.path), "Path": lambda ws: Path(ws.path)}

PUBLIC = [Labels.__init__, carry_over, export_table, build_csv_bytes, export_csv, export_parquet,
          export_jsonl, export_imagefolder, run_map, NeighborIndex.for_run]


@pytest.fixture
def ws_run(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=20, heads=(3, 6), seed=0)


@pytest.fixture(params=sorted(FORMS))
def form(request):
    """How the workspace is passed: ``str(ws.path)`` or a ``Path``."""
    return FORMS[request.param]


@pytest.mark.parametrize("fn", PUBLIC, ids=lambda f: f.__qualname__)
def test_signatures_say_a_path_is_accepted(fn):
    param = next(p for p in inspect.signature(fn).parameters.values() if p.name != "self")
    assert param.name == "workspace"
    assert "Workspace" in str(param.annotation) and "PathLike" in str(param.annotation)
    assert "path" in inspect.getdoc(fn if fn is not Labels.__init__ else Labels).lower()


def test_labels(ws_run, form):
    ws, run_id = ws_run
    lab = Labels(form(ws), run_id, head=6)
    assert isinstance(lab.workspace, Workspace)
    pd.testing.assert_frame_equal(lab.final_table(), Labels(ws, run_id, head=6).final_table())
    lab.rename(0, "Cats")                          # an edit made through the path ...
    assert Labels(ws, run_id, head=6).cluster_names()[0] == "Cats"   # ... is the workspace's


def test_a_path_without_a_workspace_is_a_workspace_error(tmp_path):
    with pytest.raises(WorkspaceError):
        Labels(tmp_path / "nowhere")


def test_carry_over(tmp_path, form):
    reports = []
    for name, as_given in (("ws", lambda ws: ws), ("form", form)):
        ws, run1 = make_workspace_with_run(tmp_path / name, n_images=20, heads=(3,),
                                           write_images=False)
        run2 = add_run(ws, heads=(3,), seed=1)
        Labels(ws, run1).rename(0, "Cats")
        Labels(ws, run1).move([1], label="Odd")
        reports.append(carry_over(as_given(ws), run1, run2))
        assert Labels(ws, run2).history()[-1].op == "carry_over"
    assert str(reports[1]) == str(reports[0])
    assert list(reports[0].names_copied.values()) == ["Cats"]
    assert reports[1].names_copied == reports[0].names_copied
    assert reports[1].overrides_carried == reports[0].overrides_carried == 1


def test_table_and_csv_bytes(ws_run, form):
    ws, run_id = ws_run
    Labels(ws).move([2], label="Odd")
    pd.testing.assert_frame_equal(export_table(form(ws), run_id, include_excluded=True),
                                  export_table(ws, run_id, include_excluded=True))
    assert build_csv_bytes(form(ws), run_id) == build_csv_bytes(ws, run_id)


def test_csv_parquet_jsonl_files(ws_run, tmp_path, form):
    ws, run_id = ws_run
    for write, read in ((export_csv, Path.read_bytes), (export_jsonl, Path.read_bytes),
                        (export_parquet, pd.read_parquet)):
        ref = write(ws, tmp_path / f"ref-{write.__name__}", run_id)
        got = write(form(ws), tmp_path / f"got-{write.__name__}", run_id)
        if write is export_parquet:
            pd.testing.assert_frame_equal(read(got), read(ref))
        else:
            assert read(got) == read(ref)


def test_csv_refuses_the_image_folder_also_given_a_path(ws_run, form):
    ws, _ = ws_run
    with pytest.raises(ValueError, match="inside the image folder"):
        export_csv(form(ws), ws.root / "labels.csv")


def test_imagefolder(ws_run, tmp_path, form):
    ws, run_id = ws_run
    ref = export_imagefolder(ws, tmp_path / "ref", run_id, link="sym")
    got = export_imagefolder(form(ws), tmp_path / "got", run_id, link="sym")
    assert (got.files, got.folders, got.missing) == (ref.files, ref.folders, ref.missing) \
        and got.files == 20
    mapping = [json.loads((d / "mapping.json").read_text()) for d in (tmp_path / "got",
                                                                       tmp_path / "ref")]
    assert mapping[0]["files"] == mapping[1]["files"]


def test_run_map(ws_run, form):
    ws, run_id = ws_run
    pca = {"n_neighbors": 30, "max_fit": 40}       # 20 points < n_neighbors + 2: PCA, no UMAP
    got = run_map(form(ws), run_id, **pca)
    pd.testing.assert_frame_equal(got, run_map(ws, run_id, recompute=True, **pca))
    assert got.shape == (20, 2)


def test_neighbor_index_for_run(ws_run, form):
    ws, run_id = ws_run
    index = NeighborIndex.for_run(form(ws), run_id, use_gpu=False)
    assert isinstance(index.workspace, Workspace) and index.run_id == run_id
    ref = NeighborIndex.for_run(ws, run_id, use_gpu=False, rebuild=True)
    pd.testing.assert_frame_equal(index.search(1, k=5), ref.search(1, k=5))
