"""Auto-group: a folder opened without any run starts the default grouping in the background.

The same job as "Start training" (:func:`selfclassifier_core.workflows.jobs.start_training`) with
the default grouping's options (:func:`selfclassifier_core.training.recipes.default_run_options`),
so it shows the same progress and can be cancelled. It starts only when the workspace has no run
at all — a run that failed or was cancelled is the person's to resume or restart — only once per
folder in a session, and never when the person has turned it off (the sidebar switch, saved as
the ``auto_group`` setting).
"""
from __future__ import annotations

import streamlit as st

from app import ui
from app.session import Context
from selfclassifier_core.store.settings import get_setting, set_setting
from selfclassifier_core.workflows import jobs

SWITCH_KEY = "auto_group"


def enabled() -> bool:
    return bool(get_setting("auto_group"))


def switch(where=st.sidebar) -> None:
    """The sidebar switch; remembered across sessions."""
    where.toggle("Group new folders automatically", value=enabled(), key=SWITCH_KEY,
                 on_change=lambda: set_setting("auto_group", bool(st.session_state[SWITCH_KEY])),
                 help="A folder opened without any run starts the default grouping in the "
                      "background at once (you can cancel it, or train with other settings).")


def maybe_start(ctx: Context, n_images: int) -> int | None:
    """Start the default grouping of ``ctx``'s folder if it should (see the module); returns
    the new run's id, else None."""
    tried = st.session_state.setdefault("auto_grouped", set())
    key = str(ctx.ws.path)
    if key in tried or n_images == 0 or not enabled():
        return None
    tried.add(key)
    if ctx.ws.list_runs():
        return None
    from selfclassifier_core.training.recipes import default_run_options

    try:
        run_id = jobs.start_training(ctx.folder, ctx.ws, default_run_options(n_images))
    except Exception as exc:  # noqa: BLE001 - in words; the form is still there
        ui.show_error(exc, "Grouping could not start")
        return None
    st.session_state.watch_run = run_id
    ui.flash(f"Grouping this folder in the background (run {run_id}). You can leave this page; "
             "it keeps going. Turn off “Group new folders automatically” in the sidebar to "
             "choose the settings first.", "info")
    return run_id
