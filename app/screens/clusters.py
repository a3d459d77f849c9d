"""Screen 2 — Clusters: a card per group, open one to fix it image by image.

A card is a *label*: one cluster of the chosen head, several clusters merged under one name, or
a label the person created by moving images. Every edit goes straight to the workspace database
through :class:`selfclassifier_core.curation.labels.Labels`; the screen re-reads it afterwards.
"""
from __future__ import annotations

import math
from pathlib import PurePosixPath

import numpy as np
import streamlit as st

from app import caches, session, ui
from app.caches import LabelView
from selfclassifier_core.curation.final import LabelGroup
from app.session import Context
from app.ui import NEW_LABEL, NEW_LABEL_PROMPT

CARD_COLUMNS = 4
CARDS_PER_PAGE = 24
STRIP = 6
GRID_COLUMNS = 8
PAGE_SIZES = (24, 48, 96)
DELETE_HELP = ("Deleting a label removes the name: clusters named so get their default names "
               "back (cluster_03 style) and images given it return to their cluster. Undo "
               "brings it back.")


def render(ctx: Context) -> None:
    if ctx.run is None:
        st.header("Clusters")
        st.info("No finished training run in this workspace yet. Start one on the "
                "**Folder & training** screen; the groups appear here when it is done.")
        return
    lab = ctx.labels()
    view = caches.label_view(ctx, lab)
    # made while the page draws, for the screens opened next (1M: the basis ~0.1 s; the table
    # ~0.1 s and pandas' first import ~0.3 s, which Clusters itself never waits for)
    caches.review_basis(ctx, wait=False, view=view)
    caches.label_table(view, wait=False)
    opened = st.session_state.get("open_label")
    if opened is not None and opened in view.groups:
        _detail(ctx, lab, view, opened)
    else:
        st.session_state.pop("open_label", None)
        _overview(ctx, lab, view)


# --------------------------------------------------------------------------- actions
def _renamed(ctx: Context, rename, name: str) -> str | None:
    """Run ``rename(labels)`` giving a label ``name``; the note to add when that merged it
    with an existing label ("" when not), or None after saying why it was refused."""
    lab = ctx.labels()
    existing = set(lab.label_names())
    try:
        rename(lab)
    except ValueError as exc:
        ui.flash(ui.error_in_words(exc), "error")
        return None
    return " (merged with the existing label of that name)" if name in existing else ""


def _rename(ctx: Context, old: str, key: str) -> None:
    new = st.session_state.get(key, "")
    if new.strip() == old or not new.strip():
        if not new.strip():
            ui.flash("A label name cannot be empty.", "error")
        return
    merged = _renamed(ctx, lambda lab: lab.rename_label(old, new), new.strip())
    if merged is None:
        return
    ui.flash(f"Renamed “{old}” to “{new.strip()}”{merged}.")
    if st.session_state.get("open_label") == old:
        st.session_state.open_label = " ".join(new.split())


def _merge(ctx: Context, names: list[str], target: str) -> None:
    """Merge the selected labels into ``target`` (empty: the first of them), one undo step."""
    target = target.strip() or names[0]
    try:
        ctx.labels().merge_labels(names, target)
    except ValueError as exc:
        ui.flash(ui.error_in_words(exc), "error")
        return
    ui.flash(f"Merged {len(names)} groups into “{target}”.")


def _move(ctx: Context, ids: list[int], target: str, new_name: str) -> None:
    name = new_name if target == NEW_LABEL else target
    if not name.strip():
        ui.flash(NEW_LABEL_PROMPT, "error")
        return
    try:
        ctx.labels().move_to_label(ids, name)
    except ValueError as exc:
        ui.flash(ui.error_in_words(exc), "error")
        return
    ui.flash(f"Moved {len(ids)} image(s) to “{name.strip()}”.")


def _delete(ctx: Context, names: list[str]) -> None:
    """Delete labels, one undoable operation each; errors are reported together."""
    lab = ctx.labels()
    deleted, errors = [], []
    for n in names:
        try:
            lab.delete_label(n)
            deleted.append(n)
        except ValueError as exc:
            errors.append(ui.error_in_words(exc))
    done = (f"Deleted {', '.join(f'“{n}”' for n in deleted)}." if deleted else "")
    if errors:
        ui.flash(" ".join([done, *errors]).strip(), "error")
    else:
        ui.flash(done + (" Undo brings it back." if len(deleted) == 1 else
                         " Undo brings them back one at a time."))


def _use_suggestion(ctx: Context, cluster: int, name: str) -> None:
    """Rename a cluster to a suggested name: an ordinary rename, one undo step."""
    merged = _renamed(ctx, lambda lab: lab.rename(cluster, name), name)
    if merged is None:
        return
    ui.flash(f"Renamed cluster {cluster} to “{name}”{merged}; undo takes it back.")


def _suggestions(ctx: Context) -> dict | None:
    """The suggested names of the head's clusters when the person asks for them and the run
    has a text tower (a fast run on a CLIP/SigLIP backbone), else None."""
    if caches.text_support(ctx) is not None:
        return None
    if not st.toggle("Suggest names", key="cl_suggest",
                     help="Names for each group from the backbone's text tower: the ImageNet-1k "
                          "classes, scored by CLIP's zero-shot probability (softmax over the "
                          "1,000 names). Click one to rename the group; undo takes it back."):
        return None
    try:
        return caches.name_suggestions(ctx)
    except Exception as exc:  # noqa: BLE001 - in words
        ui.show_error(exc, "Names could not be suggested")
        return None


def _exclude(ctx: Context, ids: list[int], include: bool = False) -> None:
    lab = ctx.labels()
    (lab.include if include else lab.exclude)(ids)
    ui.flash(f"{'Included' if include else 'Excluded'} {len(ids)} image(s)"
                + ("." if include else " — they are left out of the export (undo brings them "
                                        "back)."))


# --------------------------------------------------------------------------- overview
def _overview(ctx: Context, lab, view: LabelView) -> None:
    st.header("Clusters")
    groups = list(view.groups.values())
    st.caption(f"{len(groups)} groups · {sum(g.size for g in groups):,} images · "
               f"{sum(g.excluded for g in groups):,} excluded · head of {ctx.head} classes "
               "(change the granularity in the sidebar)")
    c1, c2, c3 = st.columns([2, 1, 1])
    query = c1.text_input("Filter by name", key="cl_filter", placeholder="type to filter…")
    sort = c2.selectbox("Sort by", ["size", "confidence (low first)", "name"], key="cl_sort")
    show_empty = c3.toggle("Show empty groups", key="cl_empty")
    suggested = _suggestions(ctx)
    shown = _shown(groups, query, sort, show_empty)

    # merge bar: reads the card checkboxes of the previous interaction
    sel_keys = {name: f"mg|{view.marker}|{name}" for name in view.groups}
    chosen = [n for n, k in sel_keys.items() if st.session_state.get(k)]
    if chosen:
        with st.container(border=True):
            st.markdown(f"**{len(chosen)} selected:** " + ", ".join(ui.esc(n) for n in chosen))
            m1, m2 = st.columns([3, 1])
            target = m1.text_input("Name of the merged group", value=chosen[0],
                                   key=f"merge_name|{view.marker}")
            if m2.button("Merge selected", type="primary", disabled=len(chosen) < 2,
                         key="merge_btn"):
                _merge(ctx, chosen, target)
                st.rerun()
            d1, d2 = st.columns([3, 1])
            sure = d1.checkbox(f"Yes, delete the {len(chosen)} selected label(s)",
                               key=f"del_sel_ok|{view.marker}|" + "\x1f".join(chosen),
                               help=DELETE_HELP)  # a new selection asks again
            if d2.button("Delete selected", disabled=not sure, key="delete_sel_btn"):
                _delete(ctx, chosen)
                st.rerun()

    pages = max(1, math.ceil(len(shown) / CARDS_PER_PAGE))
    page = 1
    if pages > 1:
        page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="cl_page")
    part = shown[(page - 1) * CARDS_PER_PAGE: page * CARDS_PER_PAGE]
    strips = {g.name: view.members.get(g.name, np.zeros(0, np.int64))[::-1][:STRIP]
              for g in part}
    thumbs = caches.thumbs(ctx, [int(i) for ids in strips.values() for i in ids])
    cols = st.columns(CARD_COLUMNS)
    for i, group in enumerate(part):
        with cols[i % CARD_COLUMNS].container(border=True):
            _card(ctx, view, group, [thumbs[int(j)] for j in strips[group.name]],
                  sel_keys[group.name], suggested)


def _shown(groups: list[LabelGroup], query: str, sort: str, show_empty: bool
           ) -> list[LabelGroup]:
    """The groups to show as cards: empty ones only when asked, names containing ``query``
    (any case), by size (largest first), confidence (lowest first, empty groups last) or
    name; ties keep the label-name order."""
    if not show_empty:
        groups = [g for g in groups if g.size > 0]
    if query:
        groups = [g for g in groups if query.casefold() in g.name.casefold()]
    if sort == "size":
        return sorted(groups, key=lambda g: -g.size)
    if sort.startswith("confidence"):
        return sorted(groups, key=lambda g: (math.isnan(g.mean_confidence),
                                             0.0 if math.isnan(g.mean_confidence)
                                             else g.mean_confidence))
    return sorted(groups, key=lambda g: g.name)


def _card(ctx, view, group: LabelGroup, thumb_paths: list[str], sel_key: str,
          suggested: dict | None = None) -> None:
    name = group.name
    key = f"rn|{view.marker}|{name}"
    st.text_input("Name", value=name, key=key, on_change=_rename, args=(ctx, name, key),
                  label_visibility="collapsed", help="Rename: type and press Enter")
    conf = group.mean_confidence
    clusters = group.clusters
    where = (f"cluster {clusters[0]}" if len(clusters) == 1 else
             f"clusters {', '.join(map(str, clusters))}" if clusters else "your label")
    st.caption(f"**{group.size:,}** images · confidence "
               f"{'—' if conf != conf else f'{conf:.2f}'} · {where}"
               + (f" · {group.excluded} excluded" if group.excluded else ""))
    if thumb_paths:
        st.image(thumb_paths, width=44)
    else:
        st.caption("(empty)")
    if suggested is not None and len(clusters) == 1:  # a merged group: rename it by hand
        c = int(clusters[0])
        for j, (sname, score) in enumerate(suggested.get(c, [])):
            st.button(f"{ui.esc(sname)} · {score:.2f}", key=f"sg|{view.marker}|{c}|{j}",
                      type="tertiary", on_click=_use_suggestion, args=(ctx, c, sname),
                      help=f"Suggested name (CLIP zero-shot probability {score:.2f}): click "
                           "to rename the group")
    a, b = st.columns([1, 1])
    a.checkbox("select", key=sel_key, help="Select groups to merge them")
    if b.button("Open", key=f"open|{name}", width="stretch"):
        st.session_state.open_label = name
        st.session_state.pop("grid_page", None)
        st.rerun()


# --------------------------------------------------------------------------- one group
def _detail(ctx: Context, lab, view: LabelView, name: str) -> None:
    top = st.columns([1, 6])
    if top[0].button("← All groups", key="back"):
        st.session_state.pop("open_label", None)
        st.rerun()
    top[1].subheader(ui.esc(name))
    key = f"rn_detail|{view.marker}|{name}"
    st.text_input("Rename this group", value=name, key=key, on_change=_rename,
                  args=(ctx, name, key))
    with st.expander("Delete this label"):
        st.caption(DELETE_HELP)
        d1, d2 = st.columns([3, 1])
        sure = d1.checkbox(f"Yes, delete “{ui.esc(name)}”",
                           key=f"del_ok|{view.marker}|{name}")
        if d2.button("Delete label", disabled=not sure, key="delete_btn"):
            _delete(ctx, [name])
            st.rerun()

    c1, c2, c3 = st.columns([2, 1, 1])
    show = c1.segmented_control("Show", ["In this group", "Excluded"], default="In this group",
                                key="grid_show")
    least = c2.toggle("Least confident first", key="least_first",
                      help="Uncertain images first: where the model most likely erred.")
    size = c3.selectbox("Per page", PAGE_SIZES, index=1, key="grid_size")
    excluded_view = show == "Excluded"
    ids = (view.excluded if excluded_view else view.members).get(name, np.zeros(0, np.int64))
    if not least:
        ids = ids[::-1]
    n = len(ids)
    pages = max(1, math.ceil(n / size))
    page = st.number_input(f"Page (of {pages}) · {n:,} images", 1, pages, 1, key="grid_page") \
        if pages > 1 else 1
    page_ids = [int(i) for i in ids[(page - 1) * size: page * size]]
    sel_prefix = f"img|{view.marker}|"

    def select_page(value: bool) -> None:
        for i in page_ids:
            st.session_state[f"{sel_prefix}{i}"] = value

    selected = [i for i in page_ids if st.session_state.get(f"{sel_prefix}{i}")]
    names = view.names

    with st.container(border=True):
        a1, a2, a3, a4 = st.columns([2, 2, 1, 1])
        a1.markdown(f"**{len(selected)}** of {len(page_ids)} on this page selected")
        a3.button("Select page", on_click=select_page, args=(True,), key="sel_all")
        a4.button("Clear", on_click=select_page, args=(False,), key="sel_none")
        if excluded_view:
            if a2.button("Include again", disabled=not selected, key="include_btn"):
                _exclude(ctx, selected, include=True)
                st.rerun()
        else:
            m1, m2, m3, m4 = st.columns([2, 2, 1, 1])
            targets = [t for t in names if t != name] + [NEW_LABEL]
            target = m1.selectbox("Move selected to", targets, key="move_target")
            new_name = m2.text_input("New label name", key="move_new",
                                     disabled=target != NEW_LABEL)
            if m3.button("Move", disabled=not selected, key="move_btn", type="primary"):
                _move(ctx, selected, target, new_name)
                st.rerun()
            if m4.button("Exclude", disabled=not selected, key="exclude_btn",
                         help="Junk or outliers: left out of the export"):
                _exclude(ctx, selected)
                st.rerun()

    if not page_ids:
        st.info("No images here.")
        return
    thumbs = caches.thumbs(ctx, page_ids)
    labels = view.labels
    conf = labels.confidence[labels.rows(page_ids)]
    paths = labels.paths(page_ids)
    cols = st.columns(GRID_COLUMNS)
    for j, i in enumerate(page_ids):
        with cols[j % GRID_COLUMNS]:
            st.image(thumbs[i], width="stretch")
            st.checkbox(f"{conf[j]:.2f} · {ui.esc(PurePosixPath(str(paths[j])).name[:18])}",
                        key=f"{sel_prefix}{i}", help=ui.esc(paths[j]))


if __name__ == "__main__":  # run as a page by st.navigation (app/main.py)
    render(session.current())
