"""One image in a side panel: the picture, its label, confidence and margin, its nearest
neighbours — shown next to whatever was clicked (a point on the map, a row of a table)."""
from __future__ import annotations

from pathlib import PurePosixPath

import streamlit as st

from app import caches, ui
from app.session import Context

PANEL_NEIGHBOURS = 6
PANEL_COLUMNS = 3


def show(ctx: Context, image_id: int, where=st) -> None:
    """Draw the panel of catalog image ``image_id`` into ``where`` (a column or a container)."""
    table = caches.label_view(ctx).table
    paths = caches.image_paths(ctx)
    image_id = int(image_id)
    with where.container(border=True):
        st.markdown(f"**{ui.esc(PurePosixPath(str(paths.get(image_id, image_id))).name)}**")
        st.image(str(ctx.ws.abspath(paths[image_id])) if image_id in paths.index
                 else caches.thumbs(ctx, [image_id])[image_id], width="stretch")
        if image_id in table.index:
            row = table.loc[image_id]
            st.caption(f"label **{ui.esc(row['label'])}** · confidence {row['confidence']:.2f}"
                       + (f" · margin {row['margin']:.2f}" if "margin" in row else "")
                       + (" · excluded" if bool(row.get("excluded")) else ""))
        st.caption(ui.esc(str(paths.get(image_id, ""))))
        _neighbours(ctx, image_id, table, paths)


def _neighbours(ctx: Context, image_id: int, table, paths) -> None:
    try:
        index = caches.neighbor_index(ctx)
        result = index.search(image_id, PANEL_NEIGHBOURS) if index.contains(image_id) else None
    except Exception as exc:  # noqa: BLE001 - the panel still shows the image
        st.caption(f"No neighbours: {ui.esc(ui.error_in_words(exc))}")
        return
    if result is None or not len(result):
        st.caption("No neighbours for this image in the run.")
        return
    st.markdown("Nearest neighbours")
    ids = [int(i) for i in result["image_id"]]
    thumbs = caches.thumbs(ctx, ids)
    cols = st.columns(PANEL_COLUMNS)
    for j, (i, sim) in enumerate(zip(ids, result["similarity"].to_numpy())):
        label = table.at[i, "label"] if i in table.index else "—"
        cols[j % PANEL_COLUMNS].image(thumbs[i], width="stretch",
                                      caption=f"{sim:.2f} · {str(label)[:12]}")
