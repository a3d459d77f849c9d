"""Screen 3 — Map: the run's embeddings in 2-D (UMAP), coloured by label; lasso to fix many."""
from __future__ import annotations

from collections.abc import Mapping

import streamlit as st

from app import caches, image_panel, session, ui
from app.caches import LabelView
from app.session import Context
from app.ui import NEW_LABEL, NEW_LABEL_PROMPT

MAX_SHOWN = 60
MAX_POINTS = 200_000


def selected_ids(event) -> list[int]:
    """Image ids of the points selected in the chart (``custom_data`` carries the id)."""
    if not event:
        return []
    sel = event["selection"] if isinstance(event, Mapping) else getattr(event, "selection", None)
    if not sel:
        return []
    points = sel["points"] if isinstance(sel, Mapping) else getattr(sel, "points", [])
    out = []
    for p in points or []:
        cd = p.get("customdata", p.get("custom_data")) if isinstance(p, Mapping) else None
        if cd is None:
            continue
        value = cd[0] if isinstance(cd, (list, tuple)) else cd
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            continue
    return list(dict.fromkeys(out))


def render(ctx: Context) -> None:
    import plotly.express as px

    st.header("Map")
    if ctx.run is None:
        st.info("The map appears after a training run has finished.")
        return
    try:
        points = caches.map_points(ctx)
    except Exception as exc:  # noqa: BLE001 - in words
        ui.show_error(exc, "The map could not be computed")
        return
    view = caches.label_view(ctx)
    table = view.table
    df = points.join(table[["label", "confidence", "path", "excluded"]], how="inner")
    show_excluded = st.toggle("Show excluded images", key="map_excluded")
    if not show_excluded:
        df = df[~df["excluded"]]
    if len(df) > MAX_POINTS:
        df = df.sample(MAX_POINTS, random_state=0)
        st.caption(f"Showing a random {MAX_POINTS:,} of the images.")
    df = df.reset_index()
    fig = px.scatter(df, x="x", y="y", color="label", custom_data=["id"],
                     hover_data={"path": True, "label": True, "confidence": ":.2f", "x": False,
                                 "y": False, "id": False}, render_mode="webgl",
                     category_orders={"label": sorted(df["label"].unique())},
                     color_discrete_sequence=px.colors.qualitative.Dark24
                     + px.colors.qualitative.Light24)
    fig.update_traces(marker=dict(size=6 if len(df) < 5000 else 3, opacity=0.8))
    fig.update_layout(dragmode="lasso", height=620, margin=dict(l=0, r=0, t=10, b=0),
                      legend=dict(itemsizing="constant", title="label"),
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    st.caption("Click a point to see its image and neighbours beside the map; drag a lasso or "
               "a box around points to select many (double-click clears).")
    chart, panel = st.columns([3, 1])
    with chart:
        event = st.plotly_chart(fig, key=f"map|{ctx.key}|{view.marker}", on_select="rerun",
                                selection_mode=("points", "box", "lasso"))
    ids = [i for i in selected_ids(event) if i in table.index]
    if len(ids) == 1:
        image_panel.show(ctx, ids[0], panel)
    else:
        panel.caption("Click a point to see the image, its label and its nearest neighbours "
                      "here.")
    if not ids:
        return
    _selection(ctx, view, ids)


def _selection(ctx: Context, view: LabelView, ids: list[int]) -> None:
    table = view.table
    sub = table.loc[ids]
    st.subheader(f"{len(ids):,} selected")
    counts = sub["label"].value_counts()
    st.caption(" · ".join(f"{ui.esc(k)}: {v}" for k, v in counts.head(8).items()))
    shown = ids[:MAX_SHOWN]
    thumbs = caches.thumbs(ctx, shown)
    st.image([thumbs[i] for i in shown], width=72,
             caption=[str(table.at[i, "label"])[:14] for i in shown])
    if len(ids) > MAX_SHOWN:
        st.caption(f"… and {len(ids) - MAX_SHOWN:,} more.")
    names = list(view.summary.index)
    with st.form(f"map_action|{view.marker}", border=True):
        c1, c2, c3 = st.columns([2, 2, 1])
        target = c1.selectbox("Label all selected as", names + [NEW_LABEL], key="map_target")
        new_name = c2.text_input("New label name", key="map_new")
        apply = c3.form_submit_button("Apply label", type="primary")
        exclude = c3.form_submit_button("Exclude all")
    if not (apply or exclude):
        return
    try:
        if exclude:
            ctx.labels().exclude(ids)
            message = f"Excluded {len(ids)} image(s)."
        else:
            name = new_name if target == NEW_LABEL else target
            if not name.strip():
                raise ValueError(NEW_LABEL_PROMPT)
            ctx.labels().move_to_label(ids, name)
            message = f"Labelled {len(ids)} image(s) as “{' '.join(name.split())}”."
    except ValueError as exc:
        st.error(ui.error_in_words(exc))
        return
    ui.flash(message)
    st.rerun()


if __name__ == "__main__":  # run as a page by st.navigation (app/main.py)
    render(session.current())
