"""selfclassifier — the app: auto-group an image folder, browse and fix the groups, export labels.

    streamlit run app/main.py                                   # the bundled demo images
    streamlit run app/main.py -- --folder PATH [--workspace WS] # any folder

The server listens on 127.0.0.1 only (``.streamlit/config.toml``); to expose it on purpose add
``--server.address 0.0.0.0``. This file is the frame around the screens: it opens the session's
folder (:mod:`app.session`), draws the sidebar (:mod:`app.sidebar`) and runs the page chosen in
the menu (``st.navigation``), one file per screen under ``app/screens/``. Pages are thin: the
work is done by ``selfclassifier_core``.

The folder is not called ``pages/``: Streamlit takes a ``pages/`` folder next to the entry script
for an old-style multipage app and can run a page file from it without this script (on the
first run of a server process, and on every run under ``AppTest``).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import session, sidebar, ui  # noqa: E402

# (page file, title, URL path); the URL path is also the slug of the old ``?page=`` links
SCREENS = (
    ("screens/folder_training.py", "Folder & training", "folder"),
    ("screens/clusters.py", "Clusters", "clusters"),
    ("screens/review.py", "Review", "review"),
    ("screens/map.py", "Map", "map"),
    ("screens/neighbours.py", "Neighbours", "neighbours"),
    ("screens/export.py", "Export", "export"),
)


def pages() -> dict[str, st.Page]:
    """The screens by URL path; the first is the default, served at the app's root URL."""
    return {slug: st.Page(file, title=title, url_path=slug, default=i == 0)
            for i, (file, title, slug) in enumerate(SCREENS)}


def follow_old_link(by_slug: dict[str, st.Page]) -> None:
    """A link from before the page menu (``/?page=clusters``) lands on that page."""
    slug = st.query_params.get("page")
    if slug is None:
        return
    if slug in by_slug:
        st.switch_page(by_slug[slug])  # reruns on that page, the query parameter dropped
    del st.query_params["page"]        # an unknown slug: stay on the page asked for


def open_failed(exc: Exception) -> None:
    """The folder or its workspace cannot be opened: say why, offer the demo instead."""
    st.error(ui.esc(f"Cannot open {st.session_state.folder}: {ui.error_in_words(exc)}"))
    st.session_state.open_error = ui.error_in_words(exc)
    if st.button("Back to the demo images"):
        session.open_folder(str(session.DEMO_FOLDER))
        st.rerun()


def main() -> None:
    st.set_page_config(page_title="selfclassifier", page_icon=":material/folder_open:",
                       layout="wide")  # a Material icon: no emoji catalogue to load (30 ms)
    session.init_session()
    by_slug = pages()
    page = st.navigation(list(by_slug.values()))
    follow_old_link(by_slug)
    try:
        ctx = session.context()
    except Exception as exc:  # noqa: BLE001 - shown in words, the person can pick another folder
        open_failed(exc)
        return
    sidebar.render(ctx)
    ui.show_flash()
    try:
        page.run()
    except Exception as exc:  # noqa: BLE001 - in words on the page; details folded away
        ui.show_error(exc)


main()
