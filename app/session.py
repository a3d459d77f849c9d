"""What a person is looking at: the folder, its workspace, the run and head (the session state).

Everything the person changes goes straight to the workspace database through the core; the
session only remembers *what they are looking at* (folder, workspace, run, head, selection).
``app/main.py`` builds the :class:`Context` once per run with :func:`context`; the pages read it
with :func:`current`.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import streamlit as st

from app import caches
from selfclassifier_core.curation.labels import Labels
from selfclassifier_core.store import recent
from selfclassifier_core.store.predictions import PREDICTIONS_FILE
from selfclassifier_core.store.workspace import RunInfo, Workspace

REPO = Path(__file__).resolve().parent.parent
DEMO_FOLDER = REPO / "assets" / "demo"
_CONTEXT = "_context"
# what belongs to one folder: forgotten when another folder is opened
_PER_FOLDER = ("run_id", "head", "open_label")


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


# --------------------------------------------------------------------------- the context
@dataclass
class Context:
    """What the pages work on: the folder, its workspace, the chosen run and head."""

    folder: Path
    ws: Workspace
    run: RunInfo | None
    head: int | None
    _labels: Labels | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def key(self) -> str:
        """A prefix for widget keys that changes with the workspace, run and head."""
        return f"{self.ws.path}|{self.run.id if self.run else 0}|{self.head or 0}"

    @cached_property
    def catalog_version(self) -> str:
        """The catalog's version (:meth:`Workspace.catalog_version`), read once per app run."""
        return self.ws.catalog_version()

    def labels(self) -> Labels:
        """The person's edits for the current run and head. One per app run: a
        :class:`Labels` reads the edits from the database on every call, so it is never stale;
        the run's predictions come from the process's cache (:func:`caches.predictions`)."""
        if self._labels is None:
            run_dir = str(self.run.dir)  # the process's copy, read when first needed
            self._labels = Labels(self.ws, self.run.id, self.head,
                                  predictions=lambda: caches.predictions(run_dir))
        return self._labels


OPEN_RUN = "_open_run"  # session key: the run to show from the next app run on


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
    for key in _PER_FOLDER:
        st.session_state.pop(key, None)


def context() -> Context:
    """The current folder/workspace/run/head; the workspace is opened (created) on first use.

    Called by ``app/main.py`` once per run; the pages get the same object from :func:`current`.
    """
    ss = st.session_state
    ws = caches.workspace(ss.folder, ss.workspace)
    if ss.get("_remembered") != (ss.folder, str(ws.path)):
        try:
            recent.remember(ss.folder, ws.path)
        except OSError:  # a read-only home must not stop the app
            pass
        ss._remembered = (ss.folder, str(ws.path))
    runs = done_runs(ws)
    run = None
    if OPEN_RUN in ss:  # a screen asked to open a run (set before the run picker is drawn)
        ss.run_id = ss.pop(OPEN_RUN)
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
    ctx = Context(Path(ss.folder), ws, run, head)
    ss[_CONTEXT] = ctx
    return ctx


def current() -> Context:
    """The context ``app/main.py`` opened for this run (it runs before any page)."""
    return st.session_state[_CONTEXT]


def done_runs(ws: Workspace) -> list[RunInfo]:
    """Finished runs that have predictions, oldest first: the ones the screens can show."""
    return [r for r in ws.list_runs() if r.status == "done" and (r.dir / PREDICTIONS_FILE).exists()]


def available_heads(run: RunInfo) -> list[int]:
    """The class counts of a run's heads, ascending."""
    heads = list(run.heads or [])
    if not heads:
        heads = caches.predictions(str(run.dir)).head_sizes
    return sorted(int(h) for h in heads)
