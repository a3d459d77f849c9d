"""Screen 1 — Folder & training: what the scan found, training settings, live progress."""
from __future__ import annotations

import time

import streamlit as st

from app import autogroup, caches, session, training_form, ui
from app.run_summary import render_summary
from app.session import Context
from selfclassifier_core.catalog.summary import CatalogSummary, catalog_summary
from selfclassifier_core.workflows import jobs

POLL_S = 1.0


def render(ctx: Context) -> None:
    st.header("Folder & training")
    summary = _scan_section(ctx)
    if autogroup.maybe_start(ctx, summary.usable) is not None:
        st.rerun()
    st.divider()
    watched = _watched_run(ctx)
    if watched is not None:
        _progress_section(ctx, watched)
        st.divider()
    elif ctx.run is not None:       # a run trained elsewhere (the command line, a past session)
        render_summary(ctx, ctx.run.id)
        st.divider()
    _settings_section(ctx, summary.usable)
    _runs_table(ctx)
    if ctx.run is not None:  # what every other screen starts from, made while this one is read
        caches.label_view(ctx, wait=False)  # (a million images: ~0.3 s of arrays, no pandas)


# --------------------------------------------------------------------------- scan
def _scan(ctx: Context, retry_unreadable: bool = False) -> None:
    from selfclassifier_core.catalog.scanner import scan

    bar = st.progress(0.0, text="Reading the images…")

    def progress(done: int, total: int) -> None:
        bar.progress(done / total if total else 1.0, text=f"Reading the images… {done:,}/{total:,}")

    try:
        scan(ctx.folder, ctx.ws, progress=progress, retry_unreadable=retry_unreadable)
    except Exception as exc:  # noqa: BLE001 - shown in words
        ui.show_error(exc, "The folder could not be scanned")
    finally:
        bar.empty()


def _scan_section(ctx: Context) -> CatalogSummary:
    """What the scan found (the folder is scanned first when it never was); returns it."""
    st.subheader("Folder")
    st.caption(f"`{ctx.folder}` — never written to. Workspace: `{ctx.ws.path}`")
    summary = catalog_summary(ctx.ws)
    if summary.last_scan is None and not summary.usable:
        _scan(ctx)
        summary = catalog_summary(ctx.ws)
    counts = summary.counts
    c1, c2, c3, c4 = st.columns([1, 1, 1, 1])
    c1.metric("Usable images", f"{summary.usable:,}")
    c2.metric("Unreadable", f"{counts['unreadable']:,}")
    c3.metric("Ignored files", f"{summary.ignored:,}",
              help="Files that are not images (by extension) and hidden files.")
    if c4.button("Rescan folder", help="Pick up new, changed and deleted files (only changed "
                                       "files are read again)."):
        _scan(ctx)
        st.rerun()
    if summary.unreadable:
        with st.expander(f"Unreadable images ({counts['unreadable']:,}) and why",
                         expanded=len(summary.unreadable) <= 10):
            st.dataframe({"file": [f for f, _ in summary.unreadable],
                          "reason": [r for _, r in summary.unreadable]},
                         hide_index=True, width="stretch")
            if st.button("Read these files again", key="retry_unreadable",
                         help="A rescan reads only new and changed files; this also reads the "
                              "unreadable ones again (after a slow network share, say)."):
                _scan(ctx, retry_unreadable=True)
                st.rerun()
    if summary.skipped:
        with st.expander(f"Skipped paths ({len(summary.skipped):,})"):
            st.dataframe({"path": [p for p, _ in summary.skipped],
                          "reason": [r for _, r in summary.skipped]},
                         hide_index=True)
    if counts["missing"]:
        st.caption(f"{counts['missing']:,} files seen earlier are gone from the folder.")
    return summary


# --------------------------------------------------------------------------- settings / start
def _settings_section(ctx: Context, n: int) -> None:
    """The training form for a folder of ``n`` usable images; starts a background run."""
    st.subheader("Train")
    active = jobs.active_run(ctx.ws)
    options = training_form.settings_form(n, disabled=active is not None or n == 0)
    if n == 0:
        st.info("This folder has no usable images yet.")
    if active is not None:
        st.caption(f"Run {active} is training; cancel it to start another.")
    if options is None:
        return
    try:
        run_id = jobs.start_training(ctx.folder, ctx.ws, options)
    except Exception as exc:  # noqa: BLE001 - in words
        ui.show_error(exc, "Training could not start")
        return
    st.session_state.watch_run = run_id
    ui.flash(f"Training run {run_id} started in the background. You can leave this page; "
             "it keeps going.", "success")
    st.rerun()


# --------------------------------------------------------------------------- progress
def _watched_run(ctx: Context) -> int | None:
    """The run to show progress for: one that is training, else the one started last here."""
    active = jobs.active_run(ctx.ws)
    if active is not None:
        st.session_state.watch_run = active
        return active
    runs = ctx.ws.list_runs()
    wanted = st.session_state.get("watch_run")
    if wanted is not None and any(r.id == wanted for r in runs):
        return wanted
    started = jobs.started_runs(ctx.ws)
    return started[-1] if started else None


def _progress_section(ctx: Context, run_id: int) -> None:
    st.subheader(f"Run {run_id}")
    now = jobs.job_status(ctx.ws, run_id)
    done = now.status == "done"
    if done:  # drawn once, outside the polling fragment: a finished run's summary is fixed
        st.success(f"Run {run_id} is done: open **Clusters** to see the groups.")
        render_summary(ctx, run_id)
    # Poll only while the job runs; the fragment reruns alone, not the whole page.
    st.fragment(run_every=POLL_S if now.alive else None)(_progress_body)(
        ctx, run_id, now.alive, done)


def _progress_body(ctx: Context, run_id: int, was_alive: bool, was_done: bool) -> None:
    st_ = jobs.job_status(ctx.ws, run_id)
    p = st_.progress
    if (was_alive and not st_.alive) or (not was_done and st_.status == "done"):
        # finished while we watched: rerun the whole app so the new run shows everywhere
        # (the sidebar's run picker, the other screens)
        st.rerun(scope="app")
    status = st_.status
    if st_.alive and st_.cancel_requested:
        st.warning("Cancelling… the run stops after a clean checkpoint.")
    elif status == "done":  # its message and summary are above the fragment
        if st_.alive:
            st.caption("Preparing the neighbour index and the map in the background, so those "
                       "screens open at once…")
    elif status == "failed":
        st.error(f"Run {run_id} failed: {ui.esc(st_.message or 'no message')}")
    elif status == "cancelled":
        st.warning(f"Run {run_id} was cancelled. Resume continues from its last checkpoint.")
    elif status == "interrupted":  # its process is gone (killed, machine restarted)
        then = ("Resume (below) continues it from its last checkpoint." if st_.can_resume
                else "Start it again from the form above." if st_.mode == "fast"
                else "It has no checkpoint to resume from: start a new run.")
        why = (st_.message or "").removeprefix("interrupted: ")
        st.warning(f"Run {run_id} was interrupted: {ui.esc(why)}. {then}")
    elif status in ("running", "created"):
        phase = p.get("phase") or p.get("status") or status
        st.info(f"Training in the background ({phase}). Progress updates every second; "
                "reloading the page is safe.")
    if status == "done":
        with st.expander("How the training went"):
            _training_details(ctx, run_id, st_)
    else:
        _training_details(ctx, run_id, st_)


PHASE_WORDS = {"features": "Embedding the images", "training": "Training",
               "predicting": "Predicting every image", "scanning": "Reading the folder"}


def _training_details(ctx: Context, run_id: int, st_: jobs.JobStatus) -> None:
    """The live numbers of a run (step, loss, speed, time left), its loss chart, its buttons."""
    p, status = st_.progress, st_.status
    epochs = p.get("epochs") or 0
    epoch = p.get("epoch") or 0
    steps, step = p.get("steps") or 0, p.get("step") or 0
    phase = p.get("phase")
    eta = p.get("eta_s")
    left = (f" · about {_duration(eta)} left" if isinstance(eta, (int, float)) and eta > 0
            else "")
    if st_.alive and phase and phase != "training" and p.get("total"):
        done, total = int(p.get("done") or 0), int(p["total"])
        st.progress(min(1.0, done / total), text=f"{PHASE_WORDS.get(phase, phase)}: "
                                                  f"{done:,} of {total:,} images{left}")
    elif st_.alive and steps:
        st.progress(min(1.0, step / steps), text=f"Training: step {step:,} of {steps:,}{left}")
    c = st.columns(5)
    c[0].metric("Epoch", f"{epoch}" + (f" / {epochs}" if epochs else ""))
    c[1].metric("Loss", f"{p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else "—")
    c[2].metric("Images / s", f"{p['images_per_s']:.0f}"
                if isinstance(p.get("images_per_s"), (int, float)) else "—")
    c[3].metric("Time left", _duration(eta) if isinstance(eta, (int, float)) and st_.alive
                else "—")
    in_use = p.get("classes_in_use") or {}
    c[4].metric("Classes in use", " / ".join(f"{v}" for v in in_use.values()) or "—",
                help="How many distinct classes each head predicts right now "
                     f"(heads {', '.join(in_use) or '—'}).")
    _loss_chart(st_)
    b1, b2, _ = st.columns([1, 1, 4])
    if st_.alive and status != "done" and not st_.cancel_requested and b1.button(
            "Cancel training", key=f"cancel_{run_id}"):
        jobs.cancel(ctx.ws, run_id)
        st.rerun(scope="fragment")
    if st_.alive and st_.cancel_requested and b1.button(
            "Stop now", key=f"kill_{run_id}",
            help="Kill the training process at once (the last epoch's checkpoint is kept)."):
        jobs.cancel(ctx.ws, run_id, force=True)
        st.rerun(scope="fragment")
    if st_.can_resume and b2.button("Resume", key=f"resume_{run_id}", type="primary"):
        try:
            jobs.resume(ctx.ws, run_id)
        except Exception as exc:  # noqa: BLE001
            ui.show_error(exc, "Could not resume")
        else:
            st.rerun(scope="app")
    if st_.log_tail:
        with st.expander("Log (last lines)", expanded=status in ("failed", "interrupted")):
            st.code(st_.log_tail, language=None)


def _loss_chart(st_: jobs.JobStatus) -> None:
    import plotly.graph_objects as go

    rows = [s for s in st_.stats if isinstance(s.get("loss"), (int, float))]
    live = st_.progress
    fig = go.Figure()
    if rows:
        fig.add_trace(go.Scatter(x=[s.get("epoch", i + 1) for i, s in enumerate(rows)],
                                 y=[s["loss"] for s in rows], mode="lines+markers",
                                 name="loss per epoch"))
    if st_.alive and isinstance(live.get("loss"), (int, float)):
        steps = live.get("steps") or 0
        x = (live.get("epoch") or 0) + ((live.get("step") or 0) / steps if steps else 0)
        fig.add_trace(go.Scatter(x=[x], y=[live["loss"]], mode="markers", name="now",
                                 marker=dict(size=10, symbol="diamond")))
    if not fig.data:
        return
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), title="Loss",
                      xaxis_title="epoch", yaxis_title="loss", showlegend=False)
    st.plotly_chart(fig, key=f"loss_{st_.run_id}")


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h else f"{m}m {s:02d}s"


def _runs_table(ctx: Context) -> None:
    runs = ctx.ws.list_runs()
    if not runs:
        return
    # drawn only while open: folded it costs nothing (a first table imports pandas, ~0.3 s)
    with st.expander(f"All runs ({len(runs)})", key="runs_table", on_change="rerun") as box:
        if not box.open:
            return
        st.dataframe([{
            "run": r.id, "status": r.status, "mode": r.mode,
            "classes": "/".join(map(str, r.heads)), "started": time.strftime(
                "%Y-%m-%d %H:%M", time.localtime(r.created)),
            "minutes": round((r.finished - r.created) / 60, 1) if r.finished else None,
            "message": r.summary or ""} for r in reversed(runs)], hide_index=True,
            width="stretch")


if __name__ == "__main__":  # run as a page by st.navigation (app/main.py)
    render(session.current())
