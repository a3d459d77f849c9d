"""selfclassifier — the app: auto-group an image folder, browse and fix the groups, export labels.

    streamlit run app/main.py                                   # the bundled demo images
    streamlit run app/main.py -- --folder PATH [--workspace WS] # any folder

The server listens on 127.0.0.1 only (``.streamlit/config.toml``); to expose it on purpose add
``--server.address 0.0.0.0``. Pages are thin: the work is done by ``selfclassifier_core``.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import state  # noqa: E402
from app.views import clusters, export, map_view, neighbours, training  # noqa: E402
from selfclassifier_core.store import recent  # noqa: E402

PAGES = {
    "Folder & training": training.render,
    "Clusters": clusters.render,
    "Map": map_view.render,
    "Neighbours": neighbours.render,
    "Export": export.render,
}
SLUGS = {name: name.split()[0].lower() for name in PAGES}


def sidebar(ctx: state.Context) -> str:
    sb = st.sidebar
    sb.title("selfclassifier")
    # ---- page
    if "page" not in st.session_state:
        wanted = st.query_params.get("page")
        st.session_state.page = next((n for n, s in SLUGS.items() if s == wanted),
                                     "Folder & training")
    page = sb.radio("Screen", list(PAGES), key="page")
    st.query_params["page"] = SLUGS[page]

    # ---- folder
    with sb.expander("Image folder", expanded=bool(st.session_state.get("open_error"))):
        st.caption(f"Now: `{ctx.folder}`")
        with st.form("open_folder", border=False):
            folder = st.text_input("Folder path", value=str(ctx.folder), key="folder_input")
            ws = st.text_input("Workspace (optional)", value="", key="workspace_input",
                               help="Where the tool keeps its database, thumbnails and runs. "
                                    "Empty: a default place under ~/.selfclassifier.")
            if st.form_submit_button("Open folder"):
                state.open_folder(folder, ws or None)
                st.rerun()
        items = [e for e in recent.load_recent() if e["folder"] != str(ctx.folder.resolve())]
        if items:
            choice = st.selectbox("Recent folders", range(len(items)),
                                  format_func=lambda i: items[i]["folder"], key="recent_pick")
            if st.button("Open recent", key="open_recent"):
                state.open_folder(items[choice]["folder"], items[choice].get("workspace"))
                st.rerun()
        if st.button("Open the demo images", key="open_demo"):
            state.open_folder(str(state.DEMO_FOLDER))
            st.rerun()
    if st.session_state.get("open_error"):
        sb.error(st.session_state.open_error)

    # ---- run and granularity
    runs = state.done_runs(ctx.ws)
    if ctx.run is not None:
        by_id = {r.id: r for r in runs}
        sb.selectbox("Run", list(by_id), key="run_id",
                     format_func=lambda i: f"run {i} · {by_id[i].mode} · "
                                           f"{'/'.join(map(str, by_id[i].heads)) or '?'} classes")
        heads = state.available_heads(ctx.run)
        if len(heads) > 1:
            sb.select_slider("Granularity (number of classes)", options=heads, key="head",
                             help="Each head of the model groups the images at another "
                                  "granularity; switching is instant.")
        else:
            sb.caption(f"{heads[0]} classes")
        lab = state.labels(ctx)
        hist = lab.history()
        applied = [e for e in hist if e.state == "applied"]
        undone = [e for e in hist if e.state == "undone"]
        c1, c2 = sb.columns(2)
        if c1.button("↶ Undo", key="undo", disabled=not applied, width="stretch",
                     help=f"Undo: {applied[-1].op}" if applied else "Nothing to undo"):
            entry = lab.undo()
            if entry:
                state.flash(f"Undid {entry.op}.", "info")
            st.rerun()
        if c2.button("↷ Redo", key="redo", disabled=not undone, width="stretch",
                     help=f"Redo: {undone[0].op}" if undone else "Nothing to redo"):
            entry = lab.redo()
            if entry:
                state.flash(f"Redid {entry.op}.", "info")
            st.rerun()
        sb.caption(f"{len(applied)} edit(s) saved in the workspace; every change is written "
                   "to disk immediately.")
    sb.caption(f"Workspace: `{ctx.ws.path}`")
    if not st.get_option("server.address"):
        sb.warning("This server listens on every network interface. Start it with "
                   "`--server.address 127.0.0.1` unless you meant to share it.")
    return page


def main() -> None:
    st.set_page_config(page_title="selfclassifier", page_icon="🗂️", layout="wide")
    state.init_session()
    try:
        ctx = state.context()
    except Exception as exc:  # noqa: BLE001 - shown in words, the person can pick another folder
        st.error(state.esc(f"Cannot open {st.session_state.folder}: {state.error_in_words(exc)}"))
        st.session_state.open_error = state.error_in_words(exc)
        if st.button("Back to the demo images"):
            state.open_folder(str(state.DEMO_FOLDER))
            st.rerun()
        return
    page = sidebar(ctx)
    state.show_flash()
    try:
        PAGES[page](ctx)
    except Exception as exc:  # noqa: BLE001 - in words on the page; details folded away
        state.show_error(exc)


main()
