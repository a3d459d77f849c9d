"""Screen 4 — Neighbours: the images most similar to one image (from the folder or uploaded),
the images nearest a text (a fast run on a CLIP/SigLIP backbone), and groups of
near-duplicates."""
from __future__ import annotations

import math
from pathlib import PurePosixPath

import streamlit as st

from app import caches, session, ui
from app.session import Context

PICK_COLUMNS = 8
PICK_PAGE = 32
RESULT_COLUMNS = 6
MAX_GROUPS = 30


def render(ctx: Context) -> None:
    st.header("Neighbours")
    if ctx.run is None:
        st.info("Neighbours appear after a training run has finished.")
        return
    similar, by_text, dups = st.tabs(["Similar images", "Search by text", "Near-duplicates"])
    with similar:
        _similar(ctx)
    with by_text:
        _by_text(ctx)
    with dups:
        _duplicates(ctx)


def _pick(image_id: int) -> None:
    st.session_state.nn_query = int(image_id)
    st.session_state.pop("nn_upload_used", None)


def _similar(ctx: Context) -> None:
    paths = caches.image_paths(ctx)  # the run's images: every one is in its neighbour index
    caches.neighbor_index(ctx, wait=False)  # opens while the person picks (a million: ~1 s)
    k = st.slider("How many neighbours", 1, 50, 12, key="nn_k")
    left, right = st.columns([1, 1])
    with left:
        st.markdown("**Pick an image**")
        query = st.text_input("File name contains", key="nn_filter",
                              placeholder="e.g. cat or 2024/05")
        ids = paths.index.to_numpy()
        if query:
            ids = paths.index[paths.str.contains(query, case=False, regex=False)].to_numpy()
        pages = max(1, math.ceil(len(ids) / PICK_PAGE))
        page = st.number_input(f"Page (of {pages}) · {len(ids):,} images", 1, pages, 1,
                               key="nn_page") if pages > 1 else 1
        page_ids = [int(i) for i in ids[(page - 1) * PICK_PAGE: page * PICK_PAGE]]
        thumbs = caches.thumbs(ctx, page_ids)
        cols = st.columns(PICK_COLUMNS)
        for j, i in enumerate(page_ids):
            with cols[j % PICK_COLUMNS]:
                st.image(thumbs[i], width="stretch")
                st.button("Pick", key=f"nn_pick_{i}", on_click=_pick, args=(i,),
                          help=ui.esc(paths.get(i, "")), width="stretch")
    with right:
        st.markdown("**…or upload one**")
        upload = st.file_uploader("Image file (kept in memory, never saved)",
                                  type=["png", "jpg", "jpeg", "webp", "bmp", "gif", "tif",
                                        "tiff"], key="nn_upload")
        if upload is not None and st.session_state.get("nn_upload_used") != upload.file_id:
            st.session_state.nn_upload_used = upload.file_id
            st.session_state.pop("nn_query", None)
    if upload is not None and st.session_state.get("nn_query") is None:
        st.image(upload.getvalue(), width=128, caption="uploaded image")
        try:
            index = caches.neighbor_index(ctx)
            with st.spinner("Embedding the uploaded image with the run's model…"):
                result = index.search_file(upload.getvalue(), k)
        except Exception as exc:  # noqa: BLE001 - in words
            ui.show_error(exc, "The uploaded image could not be searched")
            return
        _results(ctx, result, paths)
        return
    qid = st.session_state.get("nn_query")
    index = caches.neighbor_index(ctx) if qid is not None else None
    if qid is None or not index.contains(int(qid)):
        st.caption("Pick an image (or upload one) to see its nearest neighbours.")
        return
    st.divider()
    q1, q2 = st.columns([1, 5])
    q1.image(caches.thumbs(ctx, [qid])[qid], width=128)
    table = caches.label_view(ctx).table
    q2.markdown(f"**Query:** {ui.esc(paths.get(qid, qid))}  \n"
                f"label {ui.esc(table.at[qid, 'label']) if qid in table.index else '—'}")
    result = index.search(int(qid), k)
    _results(ctx, result, paths)


def _results(ctx: Context, result, paths) -> None:
    ids = [int(i) for i in result["image_id"]]
    st.markdown(f"**{len(ids)} nearest neighbours**")
    _grid(ctx, ids, result["similarity"].to_numpy(), "similarity",
          [paths.get(i, i) for i in ids], again=True)


def _grid(ctx: Context, ids: list[int], scores, what: str, paths: list, again: bool) -> None:
    """Result images with their ``what`` score, label and file name (``again``: a button to
    look for the neighbours of each)."""
    table = caches.label_view(ctx).table
    thumbs = caches.thumbs(ctx, ids)
    cols = st.columns(RESULT_COLUMNS)
    for j, (i, path) in enumerate(zip(ids, paths)):
        with cols[j % RESULT_COLUMNS]:
            st.image(thumbs[i], width="stretch")
            label = table.at[i, "label"] if i in table.index else "—"
            st.caption(f"{what} {scores[j]:.3f}  \n{ui.esc(label)}  \n"
                       f"{ui.esc(PurePosixPath(str(path)).name[:24])}")
            if again:
                st.button("Neighbours of this", key=f"nn_again_{i}", on_click=_pick, args=(i,))


def _by_text(ctx: Context) -> None:
    """A text box: the images whose CLIP embedding is nearest the text's."""
    reason = caches.text_support(ctx)
    if reason is not None:
        st.info(ui.esc(reason))
        return
    query = st.text_input("Search by text, e.g. red sneakers", key="nn_text",
                          placeholder="e.g. red sneakers",
                          help="Compared with every image in the backbone's CLIP space "
                               "(cosine similarity of the text and image embeddings).")
    k = st.slider("How many images", 1, 50, 12, key="nn_text_k")
    if not query.strip():
        st.caption("Type what to look for; the nearest images show here, best first.")
        return
    from selfclassifier_core.inference.text import search_text

    try:
        model, images = caches.text_model(ctx), caches.text_images(ctx)
        result = search_text(ctx.ws, query, k, ctx.run.id, model=model, images=images)
    except Exception as exc:  # noqa: BLE001 - in words
        ui.show_error(exc, "The text could not be searched")
        return
    ids = [int(i) for i in result["image_id"]]
    st.markdown(f"**{len(ids)} images nearest “{ui.esc(query.strip())}”**")
    _grid(ctx, ids, result["score"].to_numpy(), "score", list(result["path"]), again=False)


def _duplicates(ctx: Context) -> None:
    threshold = st.slider("Similarity threshold", 0.80, 1.00, 0.98, 0.005, key="dup_threshold",
                          help="Cosine similarity of the run's embeddings; 1.0 is identical.")
    if not st.toggle("Find near-duplicates", key="dup_on"):
        st.caption("Turn on to search the whole folder (a k-nearest-neighbour pass).")
        return
    groups = caches.duplicate_groups(ctx, threshold)
    if not groups:
        st.success("No near-duplicates at this threshold.")
        return
    extra = sum(len(g) - 1 for g in groups)
    st.markdown(f"**{len(groups):,} groups**, {extra:,} images beyond the first of each group.")
    if st.button(f"Exclude all but the first of every group ({extra:,} images)",
                 key="dup_exclude"):
        ctx.labels().exclude([i for g in groups for i in g[1:]])
        ui.flash(f"Excluded {extra} near-duplicate image(s).")
        st.rerun()
    paths = caches.image_paths(ctx)
    shown = groups[:MAX_GROUPS]
    thumbs = caches.thumbs(ctx, [i for g in shown for i in g[:8]])
    for g in shown:
        with st.container(border=True):
            st.caption(f"{len(g)} images: " + ", ".join(
                ui.esc(PurePosixPath(str(paths.get(i, i))).name) for i in g[:8]))
            st.image([thumbs[i] for i in g[:8]], width=72)
    if len(groups) > MAX_GROUPS:
        st.caption(f"… and {len(groups) - MAX_GROUPS:,} more groups.")


if __name__ == "__main__":  # run as a page by st.navigation (app/main.py)
    render(session.current())
