"""The summary of a finished run: how good the grouping is and what to do next.

:func:`render_summary` draws :func:`selfclassifier_core.curation.summary.run_summary` (the
numbers and the rule for the suggested granularity are defined there): the groups of every
head, for the head chosen in the sidebar its low-margin share, balance, nesting and the
histograms of its group sizes and confidences, the suggested granularity with a button that
switches the sidebar to it, and buttons for the next steps.
"""
from __future__ import annotations

import streamlit as st

from app import ui
from app.session import Context
from selfclassifier_core.curation.summary import (LOW_MARGIN, HeadSummary, RunSummary,
                                                  run_summary)
from selfclassifier_core.store.workspace import WorkspaceError

# the screens the next-step buttons open (paths as app/main.py registers them)
CLUSTERS_PAGE = "screens/clusters.py"
EXPORT_PAGE = "screens/export.py"


def render_summary(ctx: Context, run_id: int | None = None) -> None:
    """Draw the summary of ``run_id`` (default: the run open in the sidebar, else the newest)."""
    if run_id is None and ctx.run is not None:
        run_id = ctx.run.id
    try:
        summary = run_summary(ctx.ws, run_id)
    except (WorkspaceError, FileNotFoundError) as exc:
        st.warning(ui.esc(f"No summary yet: {ui.error_in_words(exc)}"))
        return
    on_sidebar = ctx.run is not None and ctx.run.id == summary.run_id
    classes = [h.classes for h in summary.heads]
    chosen = ctx.head if on_sidebar and ctx.head in classes else summary.suggested
    head = summary.head(chosen)

    st.subheader(f"Run {summary.run_id}: {summary.images:,} images grouped")
    cols = st.columns(len(summary.heads))
    for col, h in zip(cols, summary.heads):
        col.metric(f"Groups of the {h.classes}-class head", h.groups,
                   help=f"{h.groups} of the head's {h.classes} classes hold images"
                        + (" (the main head: the class count asked for)"
                           if h.classes == summary.main_head else ""))
    _head_metrics(head)
    _charts(ctx, summary, head)
    _suggestion(ctx, summary, on_sidebar)
    _next_steps(summary, chosen)


def _head_metrics(head: HeadSummary) -> None:
    st.markdown(f"**The {head.classes}-class head** (the granularity chosen in the sidebar)")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Low margin", f"{head.low_margin:.0%}",
              help=f"Images whose top-1 probability beats the second by less than {LOW_MARGIN}: "
                   "near ties, worth a second look.")
    c2.metric("Balance", f"{head.balance:.2f}",
              help="Normalised entropy of the class sizes: 1.00 when every class holds as many "
                   "images, lower when a few groups take most images or classes stay empty.")
    c3.metric("Nesting" + (f" in the {head.coarser}-class head" if head.coarser else ""),
              f"{head.agreement:.0%}" if head.agreement is not None else "—",
              help="Share of images that lie in their group's most common group of the next "
                   "coarser head: 100% when the finer groups only split the coarser ones.")
    c4.metric("Median confidence", f"{head.median_confidence:.2f}",
              help="The model's top-1 probability, median over the images.")
    if head.excluded:
        st.caption(f"{head.excluded:,} image(s) you excluded are counted in: the numbers "
                   "describe the model's grouping.")


def _charts(ctx: Context, summary: RunSummary, head: HeadSummary) -> None:
    import plotly.graph_objects as go

    layout = dict(height=260, margin=dict(l=10, r=10, t=30, b=10), showlegend=False,
                  bargap=0.05)
    left, right = st.columns(2)
    sizes = go.Figure(go.Histogram(x=list(head.sizes), name="groups"))
    sizes.update_layout(title="Group sizes", xaxis_title="images in a group",
                        yaxis_title="groups", **layout)
    left.plotly_chart(sizes, key=f"sum_sizes|{ctx.ws.path}|{summary.run_id}|{head.classes}")
    edges = HeadSummary.bin_edges()
    conf = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=list(head.confidence_hist),
                            width=edges[1] - edges[0], name="images"))
    conf.update_layout(title="Confidence", xaxis_title="top-1 probability",
                       yaxis_title="images", xaxis_range=[0, 1], **layout)
    right.plotly_chart(conf, key=f"sum_conf|{ctx.ws.path}|{summary.run_id}|{head.classes}")


def _switch_to(run_id: int, head: int) -> None:
    """Button callback (runs before the sidebar's widgets are drawn): show ``head`` of the run."""
    st.session_state["run_id"] = run_id
    st.session_state["head"] = head


def _suggestion(ctx: Context, summary: RunSummary, on_sidebar: bool) -> None:
    k = summary.suggested
    st.info(f"**Start with {k} classes**: {ui.esc(summary.reason)}.")
    here = on_sidebar and ctx.head == k
    if st.button(f"Show {k} classes" if not here else f"Showing {k} classes",
                 key=f"sum_switch|{summary.run_id}", disabled=here,
                 on_click=_switch_to, args=(summary.run_id, k),
                 help="Switches the sidebar's granularity to the suggested head."):
        st.rerun()  # redraw the sidebar too (within a fragment a click reruns only that)


def _next_steps(summary: RunSummary, head: int) -> None:
    """Buttons to the Clusters and Export screens, showing this run at ``head``."""
    st.markdown("**Next**: look at the groups, name and fix them, then export the labels.")
    c1, c2 = st.columns(2)
    pick = dict(on_click=_switch_to, args=(summary.run_id, head))
    if c1.button("Open Clusters", key=f"sum_clusters|{summary.run_id}", type="primary", **pick):
        st.switch_page(CLUSTERS_PAGE)
    if c2.button("Export", key=f"sum_export|{summary.run_id}", **pick):
        st.switch_page(EXPORT_PAGE)
