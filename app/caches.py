"""Caches of read-only core objects, shared by every session of the server process.

Heavy objects (the open workspace, predictions, the FAISS index, map points, near-duplicate
groups, the catalog's paths, the label view) are cached with ``st.cache_resource`` (objects used
in place) or ``st.cache_data`` (frames and lists, copied out). Each is keyed by the workspace
path, the run id and a version of what it is made from (the modification time of the run file,
the catalog version, the label edit marker), so a re-training, a re-scan or an edit is picked
up and nothing stale is shown.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import streamlit as st

from selfclassifier_core.store.predictions import EMBEDDINGS_FILE, PREDICTIONS_FILE
from selfclassifier_core.store.workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from app.session import Context
    from selfclassifier_core.curation.labels import Labels

THUMB = 128


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@st.cache_resource(show_spinner=False)
def workspace(folder: str, ws_path: str | None) -> Workspace:
    """The workspace of an image folder, opened (created) once per server process."""
    return Workspace.for_folder(folder, ws_path)


# --------------------------------------------------------------------------- run files
@st.cache_resource(show_spinner=False, max_entries=4)
def _predictions(run_dir: str, mtime: int):
    from selfclassifier_core.store.predictions import load_predictions

    return load_predictions(run_dir)


def predictions(run_dir: str):
    """The run's predictions (embeddings memory-mapped), cached per file version."""
    return _predictions(run_dir, _mtime(Path(run_dir) / PREDICTIONS_FILE))


@st.cache_resource(show_spinner="Building the neighbour index…", max_entries=4)
def _neighbor_index(ws_path: str, run_id: int, mtime: int):
    from selfclassifier_core.curation.neighbors import NeighborIndex

    return NeighborIndex.for_run(Workspace.open(ws_path), run_id)


def neighbor_index(ctx: Context):
    """The run's neighbour index, cached per embeddings file version."""
    return _neighbor_index(str(ctx.ws.path), ctx.run.id, _mtime(ctx.run.dir / EMBEDDINGS_FILE))


@st.cache_data(show_spinner="Looking for near-duplicates…", max_entries=8)
def _duplicate_groups(ws_path: str, run_id: int, mtime: int, threshold: float):
    from selfclassifier_core.curation.neighbors import NeighborIndex

    return NeighborIndex.for_run(Workspace.open(ws_path), run_id).duplicates(threshold)


def duplicate_groups(ctx: Context, threshold: float) -> list[list[int]]:
    """Groups of near-duplicate image ids at a similarity threshold, per embeddings version."""
    return _duplicate_groups(str(ctx.ws.path), ctx.run.id,
                             _mtime(ctx.run.dir / EMBEDDINGS_FILE), float(threshold))


@st.cache_data(show_spinner="Computing the 2-D map (UMAP)…", max_entries=4)
def _map_points(ws_path: str, run_id: int, mtime: int):
    from selfclassifier_core.curation.projection import run_map

    return run_map(Workspace.open(ws_path), run_id)


def map_points(ctx: Context):
    """The run's 2-D map points (a frame indexed by image id), per embeddings version."""
    return _map_points(str(ctx.ws.path), ctx.run.id, _mtime(ctx.run.dir / EMBEDDINGS_FILE))


# --------------------------------------------------------------------------- catalog
@st.cache_data(show_spinner=False, max_entries=4)
def _image_paths(ws_path: str, version: str):
    return Workspace.open(ws_path).image_table("ok")["path"]


def image_paths(ctx: Context):
    """Series id -> relative path of usable images, cached per catalog version."""
    return _image_paths(str(ctx.ws.path), ctx.catalog_version)


def thumbs(ctx: Context, image_ids) -> dict[int, str]:
    """Thumbnail file paths of a page of images (made once, cached in the workspace)."""
    from selfclassifier_core.catalog.thumbnails import ensure_thumbnails

    return {i: str(p) for i, p in ensure_thumbnails(ctx.ws, list(image_ids), THUMB).items()}


# --------------------------------------------------------------------------- labels
def edit_marker(lab: Labels) -> str:
    """Changes whenever anyone edits (or undoes/redoes) the labels of this run and head."""
    hist = lab.history()
    applied = sum(e.state == "applied" for e in hist)
    return f"{len(hist)}.{hist[-1].id if hist else 0}.{applied}"


@dataclass
class LabelView:
    """The final labels of a run and head, with per-label members, for the browsing screens."""

    table: "pd.DataFrame"            # Labels.final_table()
    summary: "pd.DataFrame"          # Labels.cluster_summary(by="label")
    members: dict                    # label -> image ids (not excluded), least confident first
    excluded: dict                   # label -> excluded image ids
    marker: str


@st.cache_resource(show_spinner=False, max_entries=8)
def _label_view(ws_path: str, run_id: int, head: int, marker: str, preds_mtime: int,
                catalog: str) -> LabelView:
    import numpy as np

    from selfclassifier_core.curation.labels import Labels

    lab = Labels(Workspace.open(ws_path), run_id, head)
    table = lab.final_table()
    summary = lab.cluster_summary(by="label")
    order = np.argsort(table["confidence"].to_numpy(), kind="stable")
    t = table.iloc[order]
    members, excluded = {}, {}
    for (label, exc), ids in t.groupby(["label", "excluded"], sort=False).groups.items():
        (excluded if exc else members)[label] = np.asarray(ids, dtype=np.int64)
    return LabelView(table, summary, members, excluded, marker)


def label_view(ctx: Context, lab: Labels | None = None) -> LabelView:
    """Cached per edit marker: read fresh from the database whenever anything changed."""
    lab = lab or ctx.labels()
    return _label_view(str(ctx.ws.path), ctx.run.id, ctx.head, edit_marker(lab),
                       _mtime(ctx.run.dir / PREDICTIONS_FILE), ctx.catalog_version)
