"""One step from a folder to groups: what the app's auto-group and ``selfclassifier group`` do.

1. scan the folder (incrementally);
2. train the default grouping (:func:`~selfclassifier_core.training.recipes.default_run_options`:
   fast mode on offline pretrained weights when installed, else scratch with a time budget) —
   unless the workspace already has a finished run, which is used as it is (``retrain`` trains
   a new one anyway);
3. prepare what the screens open instantly (:func:`prepare_views`: the FAISS neighbour index and
   the UMAP map, cached in the run directory).

A reused run is never re-predicted behind the person's back (that could move images between the
groups they have named): images added since are counted in :attr:`GroupResult.new_images`, and
the caller says how to include them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..catalog.scanner import ScanReport, scan
from ..store.predictions import load_predictions
from ..store.progress import Progress
from ..store.runfiles import ProgressFn
from ..store.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["VIEWS", "GroupResult", "group", "prepare_views"]

VIEWS = ("neighbors", "map")  # what prepare_views can build, in this order


@dataclass
class GroupResult:
    workspace: Workspace
    run_id: int | None            # None when nothing could be grouped (cancelled before a run)
    status: str                   # done | cancelled
    reused: bool                  # a finished run was there: nothing was trained
    scan: ScanReport
    options: dict = field(default_factory=dict)     # what the new run was trained with
    new_images: int = 0           # usable images a reused run has no prediction for
    prepared: dict[str, float] = field(default_factory=dict)  # view -> seconds


def prepare_views(workspace: Workspace, run_id: int, views: Sequence[str] = VIEWS,
                  progress: Callable[[str], Progress | None] | None = None) -> dict[str, float]:
    """Build ``views`` of run ``run_id`` (``"neighbors"``: the FAISS index, ``"map"``: the 2-D
    map), each cached in the run directory; returns the seconds each took. A view that fails is
    logged and left out: the app computes it on demand instead. ``progress(view)`` may return
    a ``progress(done, total)`` callback for that view."""
    bad = set(views) - set(VIEWS)
    if bad:
        raise ValueError(f"unknown view(s) {sorted(bad)}; valid: {', '.join(VIEWS)}")
    took: dict[str, float] = {}
    for view in views:
        t0 = time.perf_counter()
        report = progress(view) if progress is not None else None
        try:
            if view == "neighbors":
                from ..curation.neighbors import NeighborIndex  # faiss: only when asked

                NeighborIndex.for_run(workspace, run_id, progress=report)
            else:
                from ..curation.projection import run_map  # umap: only when asked

                run_map(workspace, run_id, progress=report)
        except Exception as exc:  # noqa: BLE001 - the screens compute it on demand instead
            log.warning("could not prepare %s for run %s: %s", view, run_id, exc)
            continue
        took[view] = time.perf_counter() - t0
    return took


def group(folder: str | os.PathLike, workspace: Workspace | str | os.PathLike | None = None, *,
          retrain: bool = False, views: Sequence[str] = VIEWS,
          progress: ProgressFn | None = None, scan_progress: Progress | None = None,
          view_progress: Callable[[str], Progress | None] | None = None,
          should_stop: Callable[[], bool] | None = None) -> GroupResult:
    """Scan ``folder``, group it with the default recipe (or use its finished run), prepare the
    views. ``progress`` gets the training run's progress records, ``scan_progress`` the scan's
    ``(done, total)``, ``view_progress(view)`` a callback for each view.

    Raises:
        ValueError: the folder has no usable image.
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace.for_folder(folder, workspace)
    report = scan(folder, ws, progress=scan_progress)
    run = None if retrain else ws.latest_run("done")
    if run is not None:
        predicted = set(load_predictions(run.dir).image_ids.tolist())
        new = sum(1 for image_id, _ in ws.usable_images() if image_id not in predicted)
        log.info("run %d is already done in %s: reused, nothing trained", run.id, ws.path)
        result = GroupResult(ws, run.id, "done", True, report, dict(run.config), new)
    else:
        if report.usable == 0:
            raise ValueError(f"{folder} has no usable images to group (see the scan report)")
        from ..training.recipes import default_run_options  # torch: only when it trains
        from .pipeline import train

        options = default_run_options(report.usable)
        trained = train(None, ws, progress=progress, should_stop=should_stop, **options)
        result = GroupResult(ws, trained.run_id, trained.status, False, report, options)
    if result.status == "done" and views:
        result.prepared = prepare_views(ws, result.run_id, views, view_progress)
    return result
