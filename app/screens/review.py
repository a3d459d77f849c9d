"""Screen — Review: check the images whose answers teach the model most, then retrain with them.

The queue is :func:`selfclassifier_core.curation.review.review_queue` (the centre of every
sub-group first, then the parts of each group that no checked image covers, in proportion to
the group's size; never an image already checked). "Right" confirms an
image's label, a label picked under an image moves it there; both are ordinary undoable edits.
"Retrain with my corrections" starts a refit (:func:`selfclassifier_core.workflows.jobs.start_refit`)
in the background; when it is done the screen says how many images changed group and opens it.
"""
from __future__ import annotations

from pathlib import PurePosixPath

import streamlit as st

from app import caches, session, ui
from app.session import Context
from selfclassifier_core.curation.feedback import read_plan
from selfclassifier_core.workflows import jobs

COLUMNS = 6
SIZES = (12, 24, 48)
POLL_S = 1.0
KEEP = "—"


def render(ctx: Context) -> None:
    st.header("Review")
    if ctx.run is None:
        st.info("Reviewing starts once a training run has finished.")
        return
    lab = ctx.labels()
    st.caption("Each image below stands for many like it: first the centre of every "
               "sub-group, then what no checked image covers yet. Press **Right** when the "
               "label fits, or pick the right label. Your checks, names and merges teach the "
               "next refit, and each check speaks for its nearest images.")
    c1, c2, c3, c4 = st.columns(4)
    size = c4.selectbox("Images to review", SIZES, index=0, key="rv_size")
    shown = caches.review(ctx, size, lab)  # once per label version
    queue = shown.queue
    c1.metric("Checked", f"{shown.n_checked:,}")
    c2.metric("In groups you named", f"{shown.n_named:,}")
    c3.metric("Excluded", f"{shown.n_excluded:,}")
    _refit_section(ctx, shown)
    if queue.empty:
        st.success("Every usable image is checked or excluded.")
        return
    names = lab.label_names()
    ids = [int(i) for i in queue.index]
    b1, _ = st.columns([1, 3])
    if b1.button(f"All {len(ids)} shown are right", key="rv_all_right",
                 help="Confirm every image on this page that you did not move"):
        _confirm(ctx, ids)
        st.rerun()
    thumbs = caches.thumbs(ctx, ids)
    cols = st.columns(COLUMNS)
    for j, (image_id, row) in enumerate(queue.iterrows()):
        with cols[j % COLUMNS].container(border=True):
            st.image(thumbs[int(image_id)], width="stretch")
            st.caption(f"**{ui.esc(row['label'])}** · {row['confidence']:.2f} · "
                       f"{ui.esc(PurePosixPath(str(row['path'])).name[:22])}")
            st.button("✓ Right", key=f"rv_ok|{ctx.key}|{image_id}", on_click=_confirm,
                      args=(ctx, [int(image_id)]), width="stretch")
            key = f"rv_to|{ctx.key}|{image_id}"
            st.selectbox("Wrong? It is:", [KEEP] + [n for n in names if n != row["label"]],
                         key=key, on_change=_move, args=(ctx, int(image_id), key))


def _confirm(ctx: Context, ids: list[int]) -> None:
    try:
        hid = ctx.labels().confirm(ids)
    except ValueError as exc:
        ui.flash(ui.error_in_words(exc), "error")
        return
    if hid is not None:
        ui.flash(f"Confirmed {len(ids)} image(s).")


def _move(ctx: Context, image_id: int, key: str) -> None:
    name = st.session_state.get(key)
    if not name or name == KEEP:
        return
    try:
        ctx.labels().move_to_label([image_id], name)
    except ValueError as exc:
        ui.flash(ui.error_in_words(exc), "error")
        return
    ui.flash(f"Moved the image to “{name}”.")


# --------------------------------------------------------------------------- refit
def _refits_of(ctx: Context, run_id: int):
    return [r for r in ctx.ws.list_runs() if r.refit_of == run_id]


def _refit_section(ctx: Context, shown) -> None:
    with st.container(border=True):
        refits = _refits_of(ctx, ctx.run.id)
        latest = refits[-1] if refits else None
        if latest is not None:
            now = jobs.job_status(ctx.ws, latest.id)
            if now.alive or now.status in ("created", "running"):
                st.fragment(run_every=POLL_S)(_refit_progress)(ctx, latest.id)
                return
            if _open_once(ctx, latest.id, now):
                st.rerun()
            _refit_outcome(ctx, latest.id, now)
        nothing = shown.n_checked == 0 and shown.n_named == 0
        active = jobs.active_run(ctx.ws)
        if st.button("Retrain with my corrections", key="rv_refit", type="primary",
                     disabled=nothing or active is not None,
                     help="A new run learns from your names, moves and checks; this run "
                          "stays as it is." if not nothing else
                     "Name a group, move or confirm images first."):
            try:
                new_id = jobs.start_refit(ctx.ws, ctx.run.id)
            except Exception as exc:  # noqa: BLE001 - in words
                ui.show_error(exc, "The refit could not start")
                return
            st.session_state.watch_run = new_id
            ui.flash(f"Refit run {new_id} started in the background; it learns from "
                     f"{shown.n_checked} checked images and the names of your groups.")
            st.rerun()
        if active is not None:
            st.caption(f"Run {active} is training; the refit can start when it is done.")


def _open_once(ctx: Context, run_id: int, now) -> bool:
    """A refit started from this screen in this session and now done is opened once, with
    how many images changed group; True when it asked for the rerun that opens it."""
    opened = st.session_state.setdefault("rv_opened", [])
    if now.status != "done" or st.session_state.get("watch_run") != run_id or run_id in opened:
        return False
    opened.append(run_id)
    outcome = (read_plan(ctx.ws.run_dir(run_id)) or {}).get("applied") or {}
    st.session_state[session.OPEN_RUN] = run_id
    ui.flash(f"Refit run {run_id} is done and open: {outcome.get('changed', 0):,} of "
             f"{outcome.get('compared', 0):,} images changed group.")
    return True


def _refit_progress(ctx: Context, run_id: int) -> None:
    now = jobs.job_status(ctx.ws, run_id)
    if not now.alive and now.status not in ("created", "running"):
        st.rerun(scope="app")  # the whole page opens it (_refit_section)
    p = now.progress
    fraction = float(p.get("fraction") or 0.0)
    st.progress(min(1.0, fraction), text=f"Refit run {run_id}: {p.get('phase') or now.status}"
                                         f" ({fraction:.0%})")


def _refit_outcome(ctx: Context, run_id: int, now) -> None:
    if now.status != "done":
        st.warning(f"Refit run {run_id} {now.status}: {ui.esc(now.message or '')}")
        return
    outcome = (read_plan(ctx.ws.run_dir(run_id)) or {}).get("applied") or {}
    changed = outcome.get("changed")
    st.success(f"Refit run {run_id} is done"
               + (f": {changed:,} of {outcome.get('compared', 0):,} images changed group."
                  if changed is not None else "."))
    st.button(f"Open run {run_id}", key="rv_open_refit", on_click=_open_run, args=(run_id,))


def _open_run(run_id: int) -> None:
    st.session_state.run_id = run_id  # a callback: before the sidebar's run picker is drawn


if __name__ == "__main__":  # run as a page by st.navigation (app/main.py)
    render(session.current())
