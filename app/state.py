"""Session and cache glue between the pages and the core.

Everything the person changes goes straight to the workspace database through the core; the
session only remembers *what they are looking at* (folder, workspace, run, head, page, selection).
Heavy read-only objects (predictions, the FAISS index, map points, the catalog's paths) are cached
per server process with ``st.cache_resource`` / ``st.cache_data``, keyed by the workspace path, the
run id and the modification time of the file they come from, so a re-training or a re-scan is
picked up and nothing stale is shown.
"""
from __future__ import annotations

import argparse
import string
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING
from pathlib import Path

import streamlit as st

from selfclassifier_core.store import recent
from selfclassifier_core.store.predictions import EMBEDDINGS_FILE, PREDICTIONS_FILE
from selfclassifier_core.store.workspace import RunInfo, Workspace, WorkspaceError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

REPO = Path(__file__).resolve().parent.parent
DEMO_FOLDER = REPO / "assets" / "demo"
THUMB = 128


# --------------------------------------------------------------------------- start-up arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``streamlit run app/main.py -- --folder PATH --workspace WS`` (both optional)."""
    if argv is None:
        # Under `streamlit run` argv[0] is this app's script; elsewhere (pytest) ignore argv.
        argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith("main.py") else []
    parser = argparse.ArgumentParser(prog="streamlit run app/main.py --", add_help=False)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--workspace", default=None)
    args, _ = parser.parse_known_args(argv)
    return args


@dataclass
class Context:
    """What the pages work on: the folder, its workspace, the chosen run and head."""

    folder: Path
    ws: Workspace
    run: RunInfo | None
    head: int | None

    @property
    def key(self) -> str:
        """A prefix for widget keys that changes with the workspace, run and head."""
        return f"{self.ws.path}|{self.run.id if self.run else 0}|{self.head or 0}"


def init_session() -> None:
    """First run of a session: the folder from the command line, else the demo."""
    ss = st.session_state
    if "folder" not in ss:
        args = parse_args()
        ss.folder = str(Path(args.folder).expanduser()) if args.folder else str(DEMO_FOLDER)
        ss.workspace = str(Path(args.workspace).expanduser()) if args.workspace else None
        ss.open_error = None


def open_folder(folder: str, workspace: str | None = None) -> None:
    """Switch the session to another folder (checked first; errors shown in words)."""
    folder = folder.strip()
    path = Path(folder).expanduser()
    if not path.is_dir():
        st.session_state.open_error = f"{folder!s} is not a folder that exists on this machine."
        return
    st.session_state.folder = str(path)
    st.session_state.workspace = workspace or None
    st.session_state.open_error = None
    for key in ("run_id", "head", "open_cluster"):
        st.session_state.pop(key, None)


@st.cache_resource(show_spinner=False)
def _workspace(folder: str, workspace: str | None) -> Workspace:
    return Workspace.for_folder(folder, workspace)


def context() -> Context:
    """The current folder/workspace/run/head; the workspace is opened (created) on first use."""
    ss = st.session_state
    ws = _workspace(ss.folder, ss.workspace)
    if ss.get("_remembered") != (ss.folder, str(ws.path)):
        try:
            recent.remember(ss.folder, ws.path)
        except OSError:  # a read-only home must not stop the app
            pass
        ss._remembered = (ss.folder, str(ws.path))
    runs = [r for r in ws.list_runs() if r.status == "done" and
            (r.dir / PREDICTIONS_FILE).exists()]
    run = None
    if runs:
        wanted = ss.get("run_id")
        run = next((r for r in runs if r.id == wanted), runs[-1])
        ss.run_id = run.id
    head = None
    if run is not None:
        heads = available_heads(run)
        head = ss.get("head") if ss.get("head") in heads else (
            run.main_head if run.main_head in heads else heads[0])
        ss.head = head
    return Context(Path(ss.folder), ws, run, head)


def done_runs(ws: Workspace) -> list[RunInfo]:
    return [r for r in ws.list_runs() if r.status == "done" and (r.dir / PREDICTIONS_FILE).exists()]


def available_heads(run: RunInfo) -> list[int]:
    heads = list(run.heads or [])
    if not heads:
        heads = predictions(str(run.dir)).head_sizes
    return sorted(int(h) for h in heads)


# --------------------------------------------------------------------------- cached core objects
def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


@st.cache_resource(show_spinner=False, max_entries=4)
def _predictions(run_dir: str, mtime: float):
    from selfclassifier_core.store.predictions import load_predictions

    return load_predictions(run_dir)


def predictions(run_dir: str):
    """The run's predictions (embeddings memory-mapped), cached per file version."""
    return _predictions(run_dir, _mtime(Path(run_dir) / PREDICTIONS_FILE))


@st.cache_resource(show_spinner="Building the neighbour index…", max_entries=4)
def _neighbor_index(ws_path: str, run_id: int, mtime: float):
    from selfclassifier_core.curation.neighbors import NeighborIndex

    return NeighborIndex.for_run(Workspace.open(ws_path), run_id)


def neighbor_index(ctx: Context):
    return _neighbor_index(str(ctx.ws.path), ctx.run.id, _mtime(ctx.run.dir / EMBEDDINGS_FILE))


@st.cache_data(show_spinner="Computing the 2-D map (UMAP)…", max_entries=4)
def _map_points(ws_path: str, run_id: int, mtime: float):
    from selfclassifier_core.curation.projection import run_map

    return run_map(Workspace.open(ws_path), run_id)


def map_points(ctx: Context):
    return _map_points(str(ctx.ws.path), ctx.run.id, _mtime(ctx.run.dir / EMBEDDINGS_FILE))


@st.cache_data(show_spinner=False, max_entries=4)
def _image_paths(ws_path: str, version: str):
    return Workspace.open(ws_path).image_table("ok")["path"]


def image_paths(ws: Workspace):
    """Series id -> relative path of usable images, cached per catalog version."""
    return _image_paths(str(ws.path), _scan_marker(ws))


def _scan_marker(ws: Workspace) -> str:
    with ws.connect() as conn:
        row = conn.execute("SELECT MAX(id), MAX(finished) FROM scans").fetchone()
        n = conn.execute("SELECT COUNT(*), MAX(id) FROM images").fetchone()
    conn.close()
    return f"{row[0]}:{row[1]}:{n[0]}:{n[1]}"


def thumbs(ctx: Context, image_ids) -> dict[int, str]:
    """Thumbnail file paths of a page of images (made once, cached in the workspace)."""
    from selfclassifier_core.catalog.thumbnails import ensure_thumbnails

    return {i: str(p) for i, p in ensure_thumbnails(ctx.ws, list(image_ids), THUMB).items()}


def labels(ctx: Context):
    """A fresh view of the person's edits for the current run and head (read from the DB)."""
    from selfclassifier_core.curation.labels import Labels

    return Labels(ctx.ws, ctx.run.id, ctx.head)


def edit_marker(lab) -> str:
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
def _label_view(ws_path: str, run_id: int, head: int, marker: str, preds_mtime: float,
                scan: str) -> LabelView:
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


def label_view(ctx: Context, lab=None) -> LabelView:
    """Cached per edit marker: read fresh from the database whenever anything changed."""
    lab = lab or labels(ctx)
    return _label_view(str(ctx.ws.path), ctx.run.id, ctx.head, edit_marker(lab),
                       _mtime(ctx.run.dir / PREDICTIONS_FILE), _scan_marker(ctx.ws))


# --------------------------------------------------------------------------- small helpers
_MD_SPECIAL = set(string.punctuation)


def esc(text: object) -> str:
    """User text (a label name) made inert for Streamlit markdown and widget labels.

    Every ASCII punctuation character is backslash-escaped (valid CommonMark), so ``<b>``,
    ``[link](x)``, ``**``, ``:red[x]`` and ``$math$`` show as typed; line breaks become spaces.
    """
    s = " ".join(str(text).split())
    return "".join("\\" + c if c in _MD_SPECIAL else c for c in s)


def flash(message: str, kind: str = "success") -> None:
    """Show ``message`` once after the next rerun (e.g. "renamed")."""
    st.session_state["_flash"] = (kind, message)


def show_flash() -> None:
    item = st.session_state.pop("_flash", None)
    if item:
        kind, message = item
        getattr(st, kind)(esc(message))  # messages quote label names: shown as typed


def error_in_words(exc: BaseException) -> str:
    """A one-line message for the person; no traceback."""
    if isinstance(exc, (WorkspaceError, ValueError, FileNotFoundError, KeyError, PermissionError,
                        NotADirectoryError)):
        msg = str(exc).strip("'\"")
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return msg or type(exc).__name__


def show_error(exc: BaseException, what: str | None = None) -> None:
    """An error in words, the technical details folded away (for a bug report)."""
    import traceback

    st.error((f"{what}: " if what else "") + esc(error_in_words(exc)))
    with st.expander("Technical details"):
        st.code("".join(traceback.format_exception(exc))[-4000:], language=None)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
