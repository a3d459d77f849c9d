"""Caches of read-only core objects, shared by every session of the server process.

Heavy objects (the open workspace, predictions, the FAISS index, map points, near-duplicate
groups, the label view (with the images' paths) and what the Map, Review and Export screens
make from it, the text tower of a CLIP backbone, the images' CLIP embeddings and the suggested
cluster names) are cached with ``st.cache_resource`` (objects used
in place) or ``st.cache_data`` (frames and lists, copied out). Each is keyed by the workspace
path, the run id and a version of what it is made from (the modification time of the run file,
the catalog version, the label edit marker), so a re-training, a re-scan or an edit is picked
up and nothing stale is shown.

What takes long the first time (the neighbour index, near-duplicates, the map, thumbnails) shows
what it is doing: a spinner with the step's name and, once the core reports counts, a progress
bar with the time left (:func:`progress_bar`). Those are built outside the cached function
(:class:`_Slot`): Streamlit replays whatever a cached function drew on every later hit. The build
runs in a thread of its own, so a click that reruns the page does not stop it: the page shows
the same build's progress again, in every window that waits for it.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import streamlit as st

from selfclassifier_core.store.predictions import EMBEDDINGS_FILE, PREDICTIONS_FILE
from selfclassifier_core.store.progress import Progress, TimeLeft, format_seconds
from selfclassifier_core.store.workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import pandas as pd

    from app.session import Context
    from selfclassifier_core.curation.final import FinalLabels, LabelGroup
    from selfclassifier_core.curation.labels import Labels

THUMB = 128
BAR_EVERY_S = 0.25  # a progress bar is redrawn at most this often


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


# --------------------------------------------------------------------------- progress
@contextmanager
def progress_bar(what: str, unit: str = "") -> Iterator[Progress]:
    """A ``progress(done, total)`` callback drawn as ``st.progress`` where it is called: the
    step's name, the count and the time left. Nothing is drawn until a report says something is
    left to do (cached thumbnails show nothing); the bar is removed at the end."""
    slot: Any = None
    left = TimeLeft()
    last = 0.0

    def progress(done: int, total: int) -> None:
        nonlocal slot, last
        seconds = left(done, total)
        if slot is None and done >= total:
            return
        now = time.monotonic()
        if slot is not None and now - last < BAR_EVERY_S and done < total:
            return
        if slot is None:
            slot = st.empty()
        last = now
        text = f"{what}… {done:,}/{total:,} {unit}".rstrip()
        if seconds is not None and done < total:
            text += f" · about {format_seconds(seconds)} left"
        slot.progress(min(1.0, done / total) if total else 1.0, text=text)

    try:
        yield progress
    finally:
        if slot is not None:
            slot.empty()


class _Build(threading.Thread):
    """One attempt at building a slot's value: ``build(progress)`` in a thread of its own,
    its last ``(done, total)`` in :attr:`counts`."""

    def __init__(self, build: Callable[[Progress], Any], what: str):
        super().__init__(name=f"build: {what}", daemon=True)
        self.build = build
        self.counts: tuple[int, int] | None = None
        self.ok, self.value, self.error = False, None, None

    def run(self) -> None:
        try:
            self.value = self.build(self._report)
            self.ok = True
        except BaseException as exc:  # noqa: BLE001 - raised in the pages that wait for it
            self.error = exc

    def _report(self, done: int, total: int) -> None:
        self.counts = (done, total)


@dataclass
class _Slot:
    """A value built once per cache key, outside the cached function that keys it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    build: _Build | None = None


def _built(slot: _Slot, what: str, unit: str, build: Callable[[Progress], Any],
           wait: bool = True) -> Any:
    """The slot's value. The first call starts ``build(progress)`` in a thread; every call made
    while it runs shows a spinner and its progress. A failed build is raised in the pages that
    waited for it, and the next call tries again. ``wait=False`` only starts the build (when
    it is not running or done) and returns None until it is done: a page warms what the
    person is likely to ask for next."""
    attempt = slot.build
    if attempt is not None and attempt.ok:
        return attempt.value
    with slot.lock:
        attempt = slot.build
        if attempt is None or not (attempt.ok or attempt.is_alive()):
            attempt = slot.build = _Build(build, what)
            attempt.start()
    if not wait:
        return attempt.value if attempt.ok else None
    with st.spinner(f"{what}…"), progress_bar(what, unit) as progress:
        while attempt.is_alive():
            if attempt.counts is not None:
                progress(*attempt.counts)
            attempt.join(BAR_EVERY_S)
    if not attempt.ok:
        raise attempt.error or RuntimeError(f"{what} failed")
    return attempt.value


@st.cache_resource(show_spinner=False)
def workspace(folder: str, ws_path: str | None) -> Workspace:
    """The workspace of an image folder, opened (created) once per server process."""
    return Workspace.for_folder(folder, ws_path)


# --------------------------------------------------------------------------- run files
@st.cache_resource(show_spinner=False, max_entries=4)
def _predictions(run_dir: str, mtime: int):
    from selfclassifier_core.store.predictions import load_predictions

    return load_predictions(run_dir)


def predictions(run_dir: str):
    """The run's predictions (embeddings memory-mapped), cached per file version."""
    return _predictions(run_dir, _mtime(Path(run_dir) / PREDICTIONS_FILE))


@st.cache_resource(show_spinner=False, max_entries=4)
def _neighbor_index(ws_path: str, run_id: int, mtime: int) -> _Slot:
    return _Slot()


def neighbor_index(ctx: Context, wait: bool = True):
    """The run's neighbour index, cached per embeddings file version (``wait=False``: start
    opening it in the background, None until it is open)."""
    from selfclassifier_core.curation.neighbors import NeighborIndex

    ws, run_id = ctx.ws, ctx.run.id
    slot = _neighbor_index(str(ws.path), run_id, _mtime(ctx.run.dir / EMBEDDINGS_FILE))
    return _built(slot, "Opening the neighbour index (built once per run)", "images",
                  lambda progress: NeighborIndex.for_run(ws, run_id, progress=progress), wait)


@st.cache_resource(show_spinner=False, max_entries=8)
def _duplicate_groups(ws_path: str, run_id: int, mtime: int, threshold: float) -> _Slot:
    return _Slot()


def duplicate_groups(ctx: Context, threshold: float) -> list[list[int]]:
    """Groups of near-duplicate image ids at a similarity threshold, per embeddings version
    (shared: do not change the lists)."""
    index = neighbor_index(ctx)
    slot = _duplicate_groups(str(ctx.ws.path), ctx.run.id,
                             _mtime(ctx.run.dir / EMBEDDINGS_FILE), float(threshold))
    return _built(slot, "Comparing every image with its nearest neighbours", "images",
                  lambda progress: index.duplicates(threshold, progress=progress))


@st.cache_resource(show_spinner=False, max_entries=4)
def _map_points(ws_path: str, run_id: int, mtime: int) -> _Slot:
    return _Slot()


def map_version(ctx: Context) -> int:
    """What :func:`map_points` is keyed by: the embeddings file's version."""
    return _mtime(ctx.run.dir / EMBEDDINGS_FILE)


def map_points(ctx: Context):
    """The run's 2-D map points (a frame indexed by image id; shared: do not change it), per
    embeddings version."""
    from selfclassifier_core.curation.projection import run_map

    ws, run_id = ctx.ws, ctx.run.id
    slot = _map_points(str(ws.path), run_id, map_version(ctx))
    return _built(slot, "Computing the 2-D map (UMAP, once per run)", "points",
                  lambda progress: run_map(ws, run_id, progress=progress))


# --------------------------------------------------------------------------- text (CLIP)
def text_support(ctx: Context) -> str | None:
    """None when the run can search by text and suggest names (a fast run on a CLIP/SigLIP
    backbone whose weights are here), else why not in one line (cheap: builds nothing)."""
    from selfclassifier_core.inference.text import text_support as support

    return support(ctx.ws, ctx.run.id)


@st.cache_resource(show_spinner=False, max_entries=2)
def _text_model(backbone: str, pretrained: str, mtime: int) -> _Slot:
    return _Slot()


def text_model(ctx: Context):
    """The text tower of the run's backbone, loaded once per backbone and weights (shared by
    every run made with them)."""
    from selfclassifier_core.inference.text import load_text_model, text_source

    backbone, pretrained = text_source(ctx.run)
    slot = _text_model(backbone, pretrained, _mtime(Path(pretrained).expanduser()))
    return _built(slot, f"Loading the text tower of {backbone} (once)", "",
                  lambda progress: load_text_model(backbone, pretrained))


@st.cache_resource(show_spinner=False, max_entries=4)
def _text_images(ws_path: str, run_id: int, catalog: str) -> _Slot:
    return _Slot()


def text_images(ctx: Context):
    """The run's images in CLIP space (its feature cache), per catalog version."""
    from selfclassifier_core.inference.text import image_embeddings

    ws, run_id = ctx.ws, ctx.run.id
    slot = _text_images(str(ws.path), run_id, ctx.catalog_version)
    return _built(slot, "Reading the images' CLIP embeddings", "images",
                  lambda progress: image_embeddings(ws, run_id, progress=progress))


@st.cache_resource(show_spinner=False, max_entries=8)
def _name_suggestions(ws_path: str, run_id: int, head: int, preds_mtime: int,
                      catalog: str) -> _Slot:
    return _Slot()


def name_suggestions(ctx: Context) -> dict[int, list[tuple[str, float]]]:
    """Suggested names of every cluster of the run's head (the model's clusters, so label edits
    do not change them), made once per run and head (shared: do not change them)."""
    from selfclassifier_core.curation.names import suggest_names

    model, images = text_model(ctx), text_images(ctx)
    ws, run_id, head = ctx.ws, ctx.run.id, ctx.head
    slot = _name_suggestions(str(ws.path), run_id, head,
                             _mtime(ctx.run.dir / PREDICTIONS_FILE), ctx.catalog_version)
    return _built(slot, "Suggesting names for the groups (the vocabulary is embedded once)",
                  "names", lambda progress: suggest_names(ws, run_id, head, model=model,
                                                          images=images, progress=progress))


# --------------------------------------------------------------------------- catalog
def image_paths(ctx: Context):
    """Series id -> relative path of the run's images: the label view's column (read once per
    label version; shared: do not change it)."""
    return label_view(ctx).table["path"]


def thumbs(ctx: Context, image_ids) -> dict[int, str]:
    """Thumbnail file paths of a page of images (made once, cached in the workspace); a bar
    shows while missing ones are made."""
    from selfclassifier_core.catalog.thumbnails import ensure_thumbnails

    with progress_bar("Making thumbnails", "images") as progress:
        made = ensure_thumbnails(ctx.ws, list(image_ids), THUMB, progress=progress)
    return {i: str(p) for i, p in made.items()}


# --------------------------------------------------------------------------- labels
@dataclass
class LabelView:
    """The final labels of a run and head for the browsing screens: the arrays
    (:class:`~selfclassifier_core.curation.final.FinalLabels`), each label's counts and
    members. The pandas table is made from them when a screen first asks for it (Review, Map,
    Export; the Clusters screen never does: at a million images it shows its groups without
    pandas' import)."""

    labels: "FinalLabels"
    groups: dict[str, "LabelGroup"]  # label name -> counts, in label-name order
    members: dict                    # label -> image ids (not excluded), least confident first
    excluded: dict                   # label -> excluded image ids
    marker: str
    key: tuple = ()                  # what it was made from: keys what is made from it
    table_slot: _Slot = field(default_factory=_Slot)

    @property
    def table(self) -> "pd.DataFrame":
        """:meth:`~selfclassifier_core.curation.labels.Labels.final_table`, made once per label
        version (shared: do not change it)."""
        return label_table(self)

    @property
    def names(self) -> list[str]:
        """Every label name, in label-name order."""
        return list(self.groups)


# per label version (every edit makes one; about 100 MB at a million images): the newest few
@st.cache_resource(show_spinner=False, max_entries=4)
def _label_view(ws_path: str, run_id: int, head: int, marker: str, preds_mtime: int,
                catalog: str) -> _Slot:
    return _Slot()


def _make_label_view(ws_path: str, run_id: int, head: int, marker: str, preds_mtime: int,
                     catalog: str) -> LabelView:
    from selfclassifier_core.curation.labels import Labels

    ws = Workspace.open(ws_path)
    lab = Labels(ws, run_id, head, predictions=predictions(str(ws.run_dir(run_id))))
    labels = lab.final_labels()
    order = _confidence_order(ws_path, run_id, head, preds_mtime, catalog, labels.confidence)
    members, excluded = labels.members(order)
    return LabelView(labels, {g.name: g for g in labels.groups()}, members, excluded, marker,
                     (ws_path, run_id, head, marker, preds_mtime, catalog))


@st.cache_resource(show_spinner=False, max_entries=4)
def _confidence_order(ws_path: str, run_id: int, head: int, preds_mtime: int, catalog: str,
                      _confidence) -> "np.ndarray":
    """The label rows, least confident first: no edit changes them, so every label version of
    a run shares one sort."""
    from selfclassifier_core.curation.final import least_confident_first

    return least_confident_first(_confidence)


def label_view(ctx: Context, lab: Labels | None = None, wait: bool = True) -> LabelView | None:
    """Cached per edit marker: read fresh from the database whenever anything changed
    (``wait=False``: start making it in the background, None until made)."""
    lab = lab or ctx.labels()
    key = (str(ctx.ws.path), ctx.run.id, ctx.head, lab.edit_marker(),
           _mtime(ctx.run.dir / PREDICTIONS_FILE), ctx.catalog_version)
    return _built(_label_view(*key), "Reading the final labels", "",
                  lambda progress: _make_label_view(*key), wait)


def label_table(view: LabelView, wait: bool = True) -> "pd.DataFrame | None":
    """The view's pandas table, made once per label version in a thread of its own
    (``wait=False``: start making it, None until made; pandas' first import is part of it,
    ~0.3 s)."""
    return _built(view.table_slot, "Making the table of final labels", "",
                  lambda progress: view.labels.frame(), wait)


# --------------------------------------------------------------------------- review
@dataclass
class ReviewView:
    """What the Review screen shows for one label version: the counts of what the person told
    us (:func:`~selfclassifier_core.curation.feedback.read_feedback`) and the queue. Only the
    counts are kept: the feedback's arrays hold a name per image (about 90 MB at a million)."""

    n_checked: int
    n_named: int
    n_excluded: int
    queue: "pd.DataFrame"


@st.cache_resource(show_spinner=False, max_entries=4)
def _review_basis(ws_path: str, run_id: int, head: int, preds_mtime: int, catalog: str
                  ) -> _Slot:
    return _Slot()


def review_basis(ctx: Context, wait: bool = True, view: LabelView | None = None):
    """What the review queue needs from the run that no edit changes
    (:func:`~selfclassifier_core.curation.review.review_basis`), made once per run, head and
    catalog version (``wait=False``: start making it in the background, None until made);
    ``view``: the :func:`label_view` the page has already."""
    from selfclassifier_core.curation.review import review_basis as make

    lab = ctx.labels()
    view = view or label_view(ctx, lab)
    slot = _review_basis(str(ctx.ws.path), ctx.run.id, ctx.head,
                         _mtime(ctx.run.dir / PREDICTIONS_FILE), ctx.catalog_version)
    return _built(slot, "Reading the run for the review queue (once per run)", "",
                  lambda progress: make(lab, view.labels), wait)


@st.cache_resource(show_spinner="Choosing the images to review…", max_entries=4)
def _review(view_key: tuple, size: int, _lab: Labels, _view: LabelView, _basis) -> ReviewView:
    from selfclassifier_core.curation.feedback import read_feedback
    from selfclassifier_core.curation.review import review_queue

    fb = read_feedback(_lab, _view.labels)
    return ReviewView(fb.n_checked, fb.n_named, fb.n_excluded,
                      review_queue(_lab, size, final=_view.labels, basis=_basis, feedback=fb))


def review(ctx: Context, size: int, lab: Labels | None = None) -> ReviewView:
    """The Review screen's counts and queue of ``size`` images, made once per label version
    (any edit makes a new one; shared: do not change it) from the run's
    :func:`review_basis`, made once."""
    lab = lab or ctx.labels()
    view = label_view(ctx, lab)
    return _review(view.key, int(size), lab, view, review_basis(ctx, view=view))


# --------------------------------------------------------------------------- export
@dataclass
class ExportView:
    """What the Export screen shows for one label version: the first rows of the export, the
    images per label and the row count (the download builds the whole file when clicked)."""

    preview: "pd.DataFrame"
    counts: "pd.DataFrame"
    rows: int


@st.cache_resource(show_spinner="Building the final table…", max_entries=4)
def _export_view(view_key: tuple, include_excluded: bool, preview_rows: int,
                 _view: LabelView) -> ExportView:
    from selfclassifier_core.curation.formats import export_table

    table = export_table(None, include_excluded=include_excluded, table=_view.table)
    counts = (table.groupby("label").size().sort_values(ascending=False)
              .rename("images").reset_index())
    return ExportView(table.head(preview_rows), counts, len(table))


def export_view(ctx: Context, include_excluded: bool, preview_rows: int) -> ExportView:
    """The Export screen's preview and counts, made once per label version (shared)."""
    view = label_view(ctx)
    return _export_view(view.key, bool(include_excluded), int(preview_rows), view)
