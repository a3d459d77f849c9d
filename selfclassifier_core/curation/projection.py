"""The 2-D map of a run: UMAP (umap-learn) of its embeddings, seeded and cached per run.

Above ``max_fit`` points (default 50,000) UMAP is fitted on a seeded sample and the other points
are placed with ``transform`` in chunks, so the map of a big folder costs about as much as the
map of 50,000 images plus a fast pass over the rest. Fewer points than UMAP can work with
(``n < n_neighbors + 2``) are placed by PCA to 2-D instead; a single point sits at the origin.

:func:`run_map` caches the result as ``runs/<id>/umap.npy`` with ``umap.json`` holding the key
(embeddings file size and mtime, number of points, parameters); a change in any of them makes it
recompute.
"""
from __future__ import annotations

import json
import logging
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..store.fsutil import atomic_open, atomic_write_json
from ..store.predictions import load_run_embeddings
from ..store.progress import Progress
from ..store.workspace import Workspace, as_workspace

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

MAP_FILE = "umap.npy"
MAP_KEY_FILE = "umap.json"
MAP_FORMAT = 1                 # bump when the recipe changes so old caches are recomputed
TRANSFORM_CHUNK = 20_000


def _import_umap():
    try:
        import umap
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the 2-D map needs umap-learn: `pip install umap-learn`") from exc
    return umap


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows onto their first two principal components (zero-padded), ``float32 [n, 2]``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros((x.shape[0], 2), np.float32)
    if x.shape[0] < 2:
        return out
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    comps = vt[:2]
    proj = centred @ comps.T
    out[:, :proj.shape[1]] = proj
    return out


def umap_2d(embeddings: np.ndarray, seed: int = 0, n_neighbors: int = 15, min_dist: float = 0.1,
            max_fit: int = 50_000, progress: Progress | None = None) -> np.ndarray:
    """2-D UMAP coordinates of ``embeddings`` (rows L2-normalised first), ``float32 [n, 2]``.

    Args:
        embeddings: ``[n, D]`` array (any float dtype, may be memory-mapped).
        seed: fixes the result (UMAP then runs single-threaded, about 2x slower).
        n_neighbors, min_dist: UMAP parameters.
        max_fit: fit on at most this many points (a seeded sample); the rest are transformed.
        progress: ``progress(done, total)`` in points placed.

    Tiny inputs: ``n == 0`` gives ``[0, 2]``, ``n == 1`` a zero row, and
    ``n < n_neighbors + 2`` falls back to PCA to 2-D (UMAP's graph needs more points).
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array [n, D], got shape {x.shape}")
    if n_neighbors < 2:
        raise ValueError(f"n_neighbors must be >= 2, got {n_neighbors}")
    if not 0.0 <= min_dist:
        raise ValueError(f"min_dist must be >= 0, got {min_dist}")
    if max_fit < n_neighbors + 2:
        raise ValueError(f"max_fit must be at least n_neighbors + 2 = {n_neighbors + 2}, "
                         f"got {max_fit}")
    n = x.shape[0]
    if n == 0:
        if progress:
            progress(0, 0)
        return np.zeros((0, 2), np.float32)
    if n < n_neighbors + 2:
        log.info("only %d points (< n_neighbors + 2 = %d): placing them by PCA instead of UMAP",
                 n, n_neighbors + 2)
        out = pca_2d(_normalize(x))
        if progress:
            progress(n, n)
        return out

    umap = _import_umap()
    reducer = umap.UMAP(n_components=2, n_neighbors=n_neighbors, min_dist=min_dist,
                        metric="euclidean", random_state=seed, transform_seed=seed,
                        n_jobs=1, low_memory=True, verbose=False)  # seeded: one thread
    if progress:
        progress(0, n)
    if n <= max_fit:
        out = np.asarray(reducer.fit_transform(_normalize(x)), dtype=np.float32)
        if progress:
            progress(n, n)
        return out

    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, size=max_fit, replace=False))
    rest = np.setdiff1d(np.arange(n), fit_idx, assume_unique=True)
    log.info("UMAP: fitting on %d of %d points, transforming the rest", max_fit, n)
    out = np.empty((n, 2), np.float32)
    out[fit_idx] = reducer.fit_transform(_normalize(x[fit_idx]))
    done = max_fit
    if progress:
        progress(done, n)
    for start in range(0, len(rest), TRANSFORM_CHUNK):
        idx = rest[start:start + TRANSFORM_CHUNK]
        out[idx] = reducer.transform(_normalize(x[idx]))
        done += len(idx)
        if progress:
            progress(done, n)
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


def run_map(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
            progress: Progress | None = None, *, seed: int = 0, n_neighbors: int = 15,
            min_dist: float = 0.1, max_fit: int = 50_000,
            recompute: bool = False) -> "pd.DataFrame":
    """The run's 2-D map as a DataFrame indexed by image id (``id``) with float32 ``x``, ``y``.

    Loaded from ``runs/<id>/umap.npy`` when its key matches the current embeddings file and the
    parameters; computed with :func:`umap_2d` and saved (atomically) otherwise. ``workspace``
    is a :class:`Workspace` or its directory (a path). ``progress(done, total)`` counts points
    placed (the fit places its sample at once, then the rest come in chunks; a saved map
    reports ``(n, n)``).
    """
    import pandas as pd

    workspace = as_workspace(workspace)
    run, image_ids, embeddings, emb_identity = load_run_embeddings(workspace, run_id)
    n = len(image_ids)
    key: dict[str, Any] = {
        "format": MAP_FORMAT, "embeddings": emb_identity, "n": n,
        "params": {"seed": seed, "n_neighbors": n_neighbors, "min_dist": float(min_dist),
                   "max_fit": max_fit},
    }
    map_path, key_path = run.dir / MAP_FILE, run.dir / MAP_KEY_FILE
    xy = None
    if not recompute and map_path.exists() and key_path.exists():
        try:
            if json.loads(key_path.read_text()) == key:
                xy = np.load(map_path)
                if xy.shape != (n, 2):
                    xy = None
        except Exception as exc:  # noqa: BLE001 - a damaged cache is recomputed, not fatal
            log.warning("ignoring unreadable map cache in %s: %s", run.dir, exc)
            xy = None
    if xy is None:
        log.info("computing the 2-D map of run %s (%d points)", run.id, n)
        xy = umap_2d(embeddings, seed=seed, n_neighbors=n_neighbors, min_dist=min_dist,
                     max_fit=max_fit, progress=progress)
        # Key removed first and written last: a crash in between never pairs a key with
        # the wrong coordinates.
        key_path.unlink(missing_ok=True)
        with atomic_open(map_path, "wb") as fh:
            np.save(fh, xy.astype(np.float32))
        atomic_write_json(key_path, key)
    elif progress:
        progress(n, n)
    return pd.DataFrame({"x": xy[:, 0].astype(np.float32), "y": xy[:, 1].astype(np.float32)},
                        index=pd.Index(np.asarray(image_ids, np.int64), name="id"))


# --------------------------------------------------------------------------- selections
def in_polygon(xy: np.ndarray, xs, ys, order: np.ndarray | None = None) -> np.ndarray:
    """Which points lie inside the polygon with vertices ``(xs[i], ys[i])`` (closed by itself),
    by the even-odd rule: a boolean mask over the rows of ``xy`` (``[n, 2]``).

    A point on the polygon's lower or left edge counts as inside, one on its upper or right
    edge as outside (the half-open rule: adjacent polygons never share a point). Each edge
    visits only the points whose ``y`` it spans, found in the points sorted by ``y`` (pass that
    ``order``, ``np.argsort(xy[:, 1])``, to reuse it), so a lasso over a million points costs
    about a pass over the points per time the outline crosses their row, not one per vertex.
    """
    xy = np.asarray(xy)
    xs, ys = np.asarray(xs, np.float64).ravel(), np.asarray(ys, np.float64).ravel()
    if xs.shape != ys.shape:
        raise ValueError(f"a polygon needs as many x as y values, got {len(xs)} and {len(ys)}")
    inside = np.zeros(len(xy), dtype=bool)
    if len(xs) < 3 or not len(xy):
        return inside
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    order = np.argsort(y, kind="stable") if order is None else order
    y_sorted = y[order]
    for x1, y1, x2, y2 in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
        if y1 == y2:  # a horizontal edge crosses no row
            continue
        lo, hi = np.searchsorted(y_sorted, (min(y1, y2), max(y1, y2)), side="left")
        rows = order[lo:hi]                  # min(y1, y2) <= y < max(y1, y2)
        crossing = x1 + (y[rows] - y1) * (x2 - x1) / (y2 - y1)
        rows = rows[x[rows] < crossing]      # the edge is to the right of the point
        inside[rows] = ~inside[rows]
    return inside


def in_selection(xy: np.ndarray, boxes=(), lassos=(), order: np.ndarray | None = None
                 ) -> np.ndarray:
    """Which points lie in any of the chart's selections: ``boxes`` as ``{"x": [x0, x1], "y":
    [y0, y1]}`` (edges included) and ``lassos`` as ``{"x": [...], "y": [...]}`` outlines (see
    :func:`in_polygon`), in the map's coordinates, as a Plotly chart reports them. Selecting by
    shape, not by the points drawn, finds every point of a map that is shown as a sample."""
    xy = np.asarray(xy)
    mask = np.zeros(len(xy), dtype=bool)
    for box in boxes or ():
        (x0, x1), (y0, y1) = sorted(map(float, box["x"])), sorted(map(float, box["y"]))
        mask |= ((xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1))
    for lasso in lassos or ():
        if order is None:
            order = np.argsort(xy[:, 1], kind="stable")
        mask |= in_polygon(xy, lasso["x"], lasso["y"], order)
    return mask
