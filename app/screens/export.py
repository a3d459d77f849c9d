"""Screen 5 — Export: the final table, counts per label, CSV download, ImageFolder tree."""
from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import caches, image_panel, session, ui
from app.session import Context

PREVIEW_ROWS = 1000


def _selected_rows(event) -> list[int]:
    """Row positions selected in a dataframe (``on_select``), as a mapping or an object."""
    sel = event.get("selection") if isinstance(event, dict) else getattr(event, "selection", None)
    if not sel:
        return []
    rows = sel.get("rows") if isinstance(sel, dict) else getattr(sel, "rows", None)
    return [int(r) for r in rows or []]


def render(ctx: Context) -> None:
    from selfclassifier_core.curation import export

    st.header("Export")
    if ctx.run is None:
        st.info("Export becomes possible after a training run has finished.")
        return
    include = st.toggle("Include excluded images (with excluded=true)", key="exp_excluded")
    shown = caches.export_view(ctx, include, PREVIEW_ROWS)  # once per label version
    counts, preview = shown.counts, shown.preview
    c1, c2 = st.columns([3, 2])
    with c1:
        st.markdown(f"**Final table** — {shown.rows:,} rows, {len(counts):,} labels "
                    f"(run {ctx.run.id}, head of {ctx.head} classes)")
        event = st.dataframe(preview, width="stretch", height=420, key="exp_table",
                             on_select="rerun", selection_mode="single-row")
        st.caption("Click a row to see its image and neighbours."
                   + (f" Showing the first {PREVIEW_ROWS:,} rows; the export has all."
                      if shown.rows > PREVIEW_ROWS else ""))
    rows = _selected_rows(event)
    with c2:
        if rows and rows[0] < len(preview):
            image_panel.show(ctx, int(preview.index[rows[0]]))
        st.markdown("**Images per label**")
        st.dataframe(counts, hide_index=True, width="stretch", height=420, key="exp_counts")

    st.subheader("Download")
    ws, run_id, head = ctx.ws, ctx.run.id, ctx.head
    st.download_button(
        "Download labels CSV", type="primary", key="exp_csv",
        data=lambda: export.build_csv_bytes(ws, run_id, head, include_excluded=include),
        file_name=f"labels-run{run_id}-k{head}.csv", mime="text/csv", on_click="ignore")
    st.caption("Columns: path, label, cluster, confidence, margin, head, edited"
               + (", excluded" if include else "") + ". Cells that a spreadsheet would run "
               "as a formula are neutralised.")

    st.subheader("Write an ImageFolder tree")
    default = ctx.ws.exports_dir / f"imagefolder-run{run_id}-k{head}"
    with st.form("imagefolder"):
        out = st.text_input("Output folder (outside the image folder)", value=str(default),
                            key="exp_out")
        c1, c2 = st.columns(2)
        link = c1.radio("Files", ["copy", "hard", "sym"], horizontal=True, key="exp_link",
                        format_func={"copy": "copy", "hard": "hard links",
                                     "sym": "symbolic links"}.get)
        overwrite = c2.checkbox("Replace an earlier export there", key="exp_overwrite")
        go = st.form_submit_button("Write folders")
    if go:
        try:
            with (st.spinner("Writing the ImageFolder tree…"),
                  caches.progress_bar("Placing the images", "images") as progress):
                report = export.export_imagefolder(
                    ctx.ws, Path(out).expanduser(), run_id, head, link=link,
                    overwrite=overwrite, include_excluded=include, progress=progress)
        except Exception as exc:  # noqa: BLE001 - in words
            ui.show_error(exc, "The folders could not be written")
            return
        st.success(f"Wrote {ui.esc(report)}")
        if report.missing:
            st.warning(f"{len(report.missing)} source image(s) were missing and not exported.")


if __name__ == "__main__":  # run as a page by st.navigation (app/main.py)
    render(session.current())
