"""The sidebar below the page menu: the image folder, the run and granularity, undo and redo."""
from __future__ import annotations

import streamlit as st

from app import autogroup, session, ui
from app.session import Context
from selfclassifier_core.store import recent


def render(ctx: Context) -> None:
    """Draw the sidebar of every page for the current context."""
    sb = st.sidebar
    sb.title("selfclassifier")
    with sb.expander("Image folder", expanded=bool(st.session_state.get("open_error"))):
        _folder_picker(ctx)
    if st.session_state.get("open_error"):
        sb.error(st.session_state.open_error)
    autogroup.switch(sb)
    if ctx.run is not None:
        _run_picker(ctx)
        _undo_redo(ctx)
    sb.caption(f"Workspace: `{ctx.ws.path}`")
    if not st.get_option("server.address"):
        sb.warning("This server listens on every network interface. Start it with "
                   "`--server.address 127.0.0.1` unless you meant to share it.")


def _folder_picker(ctx: Context) -> None:
    st.caption(f"Now: `{ctx.folder}`")
    with st.form("open_folder", border=False):
        folder = st.text_input("Folder path", value=str(ctx.folder), key="folder_input")
        ws = st.text_input("Workspace (optional)", value="", key="workspace_input",
                           help="Where the tool keeps its database, thumbnails and runs. "
                                "Empty: a default place under ~/.selfclassifier.")
        if st.form_submit_button("Open folder"):
            session.open_folder(folder, ws or None)
            _show_folder()
    items = [e for e in recent.load_recent() if e["folder"] != str(ctx.folder.resolve())]
    if items:
        choice = st.selectbox("Recent folders", range(len(items)),
                              format_func=lambda i: items[i]["folder"], key="recent_pick")
        if st.button("Open recent", key="open_recent"):
            session.open_folder(items[choice]["folder"], items[choice].get("workspace"))
            _show_folder()
    if st.button("Open the demo images", key="open_demo"):
        session.open_folder(str(session.DEMO_FOLDER))
        _show_folder()


def _show_folder() -> None:
    """After opening a folder: its Folder & training screen (what the scan found, the grouping
    that starts on its own); the same screen reruns if it is open already."""
    if st.session_state.get("open_error"):
        st.rerun()
    st.switch_page("screens/folder_training.py")


def _run_picker(ctx: Context) -> None:
    sb = st.sidebar
    by_id = {r.id: r for r in session.done_runs(ctx.ws)}
    sb.selectbox("Run", list(by_id), key="run_id",
                 format_func=lambda i: f"run {i} · {by_id[i].mode} · "
                                       f"{'/'.join(map(str, by_id[i].heads)) or '?'} classes"
                                       + (f" · refit of run {by_id[i].refit_of}"
                                          if by_id[i].refit_of is not None else ""))
    heads = session.available_heads(ctx.run)
    if len(heads) > 1:
        # a radio, not a slider: every head's class count is in view, not just the ends
        sb.radio("Granularity (number of classes)", options=heads, key="head", horizontal=True,
                 help="Each head of the model groups the images at another "
                      "granularity; switching is instant.")
    else:
        sb.caption(f"{heads[0]} classes")


def _undo_redo(ctx: Context) -> None:
    sb = st.sidebar
    lab = ctx.labels()
    hist = lab.history()
    applied = [e for e in hist if e.state == "applied"]
    undone = [e for e in hist if e.state == "undone"]
    c1, c2 = sb.columns(2)
    if c1.button("↶ Undo", key="undo", disabled=not applied, width="stretch",
                 help=f"Undo: {applied[-1].op}" if applied else "Nothing to undo"):
        entry = lab.undo()
        if entry:
            ui.flash(f"Undid {entry.op}.", "info")
        st.rerun()
    if c2.button("↷ Redo", key="redo", disabled=not undone, width="stretch",
                 help=f"Redo: {undone[0].op}" if undone else "Nothing to redo"):
        entry = lab.redo()
        if entry:
            ui.flash(f"Redid {entry.op}.", "info")
        st.rerun()
    sb.caption(f"{len(applied)} edit(s) saved in the workspace; every change is written "
               "to disk immediately.")
