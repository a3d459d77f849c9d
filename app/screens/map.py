"""Screen 3 — Map: the run's embeddings in 2-D (UMAP), coloured by label; lasso to fix many."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from app import caches, image_panel, session, ui
from app.caches import LabelView
from app.session import Context
from app.ui import NEW_LABEL, NEW_LABEL_PROMPT
from selfclassifier_core.curation.projection import in_selection

MAX_SHOWN = 60
MAX_POINTS = 200_000   # drawn at most; a lasso or box still selects every image inside it
HOVER_PATHS = 20_000   # file names in the hover text up to this many points drawn


@dataclass
class MapFigure:
    """The map as drawn for one run, head, label version and toggle: the figure (a sample when
    there are more than :data:`MAX_POINTS` points) and every point it stands for."""

    figure: Any
    ids: np.ndarray          # every image on the map (excluded ones only when shown), by id
    xy: np.ndarray           # their coordinates, float32 [n, 2]
    drawn: int

    @cached_property
    def by_y(self) -> np.ndarray:
        return np.argsort(self.xy[:, 1], kind="stable")

    def inside(self, boxes, lassos) -> list[int]:
        """Ids of every image inside the selections (not only the points drawn)."""
        return self.ids[in_selection(self.xy, boxes, lassos, self.by_y)].tolist()


@st.cache_resource(show_spinner="Drawing the map…", max_entries=4)
def _figure(view_key: tuple, points_version: int, show_excluded: bool, _points,
            _view: LabelView) -> MapFigure:
    """Built once per label view, map version and toggle: a rerun (a click, a selection)
    only sends it. One WebGL trace per label, numbers as typed arrays (not JSON lists)."""
    import plotly.express as px
    import plotly.graph_objects as go

    colours = px.colors.qualitative.Dark24 + px.colors.qualitative.Light24

    table = _view.table
    df = _points.join(table[["label", "confidence", "path", "excluded"]], how="inner")
    if not show_excluded:
        df = df[~df["excluded"].to_numpy()]
    ids = df.index.to_numpy(np.int64)
    xy = df[["x", "y"]].to_numpy(np.float32)
    drawn = np.arange(len(df))
    if len(df) > MAX_POINTS:
        drawn = np.sort(np.random.default_rng(0).choice(len(df), MAX_POINTS, replace=False))
    labels = df["label"].to_numpy()[drawn]
    codes, names = pd.factorize(labels, sort=True)
    custom = np.column_stack([ids[drawn], df["confidence"].to_numpy(np.float64)[drawn]])
    paths = df["path"].to_numpy()[drawn] if len(drawn) <= HOVER_PATHS else None
    size = 6 if len(drawn) < 5000 else 3
    traces = []
    for code in range(len(names)):
        rows = np.flatnonzero(codes == code)
        traces.append(go.Scattergl(
            x=xy[drawn[rows], 0], y=xy[drawn[rows], 1], mode="markers", name=str(names[code]),
            customdata=custom[rows], text=None if paths is None else paths[rows],
            hovertemplate=("<b>%{fullData.name}</b><br>confidence %{customdata[1]:.2f}"
                           + ("<br>%{text}" if paths is not None else "") + "<extra></extra>"),
            marker=dict(size=size, opacity=0.8, color=colours[code % len(colours)])))
    fig = go.Figure(traces)
    fig.update_layout(dragmode="lasso", height=620, margin=dict(l=0, r=0, t=10, b=0),
                      legend=dict(itemsizing="constant", title="label"),
                      xaxis=dict(visible=False), yaxis=dict(visible=False))
    return MapFigure(fig, ids, xy, len(drawn))


def _selection_of(event) -> Mapping:
    if not event:
        return {}
    sel = event["selection"] if isinstance(event, Mapping) else getattr(event, "selection", None)
    return sel or {}


def selected_ids(event, shown: MapFigure | None = None, known=None) -> list[int]:
    """Image ids the person selected in the chart: every image inside a box or lasso (of
    ``shown``, all its points, drawn or not), else the points clicked (``custom_data`` carries
    the id), only those in ``known`` when given (an event can outlive the labels it saw)."""
    sel = _selection_of(event)
    boxes, lassos = sel.get("box") or [], sel.get("lasso") or []
    if shown is not None and (boxes or lassos):
        return shown.inside(boxes, lassos)
    out = []
    for p in sel.get("points") or []:
        cd = p.get("customdata", p.get("custom_data")) if isinstance(p, Mapping) else None
        if cd is None:
            continue
        value = cd[0] if isinstance(cd, (list, tuple)) else cd
        try:
            out.append(int(value))
        except (TypeError, ValueError):
            continue
    return [i for i in dict.fromkeys(out) if known is None or i in known]


def render(ctx: Context) -> None:
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
    show_excluded = st.toggle("Show excluded images", key="map_excluded")
    shown = _figure(view.key, caches.map_version(ctx), show_excluded, points, view)
    if shown.drawn < len(shown.ids):
        st.caption(f"Showing a random {shown.drawn:,} of the {len(shown.ids):,} images; a "
                   "lasso or a box selects every image inside it, shown or not.")
    st.caption("Click a point to see its image and neighbours beside the map; drag a lasso or "
               "a box around points to select many (double-click clears).")
    chart, panel = st.columns([3, 1])
    with chart:
        event = st.plotly_chart(shown.figure, key=f"map|{ctx.key}|{view.marker}",
                                on_select="rerun", selection_mode=("points", "box", "lasso"))
    ids = selected_ids(event, shown, table.index)
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
    names = view.names
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
