"""The catalog's id -> path map, cached per database, for :meth:`~.labels.Labels.final_table`."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ..store.workspace import Workspace

_CATALOG_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_CATALOG_LOCK = threading.Lock()


def cached_catalog(workspace: Workspace, conn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, paths, usable)`` of the whole catalog, ids ascending.

    Reading 100k paths from SQLite costs most of a second on a slow CPU, so the id -> path map is
    cached per database and extended with new rows: catalog ids are never reused and an image's
    path never changes (a new path is a new row). Rows deleted or a smaller count than cached
    trigger a full reload. Which images are usable is read every time (only the others' ids).
    """
    key = str(Path(workspace.db_path).resolve())
    max_id, count = conn.execute("SELECT max(id), count(*) FROM images").fetchone()
    max_id = int(max_id or 0)
    with _CATALOG_LOCK:
        ids, paths = _CATALOG_CACHE.get(key, (np.zeros(0, np.int64), np.zeros(0, object)))
    have = int(ids[-1]) if len(ids) else 0
    if max_id > have:
        rows = conn.execute("SELECT id, path FROM images WHERE id > ? ORDER BY id",
                            (have,)).fetchall()
        ids = np.concatenate([ids, np.fromiter((r[0] for r in rows), np.int64, len(rows))])
        paths = np.concatenate([paths, np.array([r[1] for r in rows] + [None], object)[:-1]])
    if len(ids) != count or max_id < have:
        rows = conn.execute("SELECT id, path FROM images ORDER BY id").fetchall()
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        paths = np.array([r[1] for r in rows] + [None], object)[:-1]
    with _CATALOG_LOCK:
        _CATALOG_CACHE[key] = (ids, paths)
    usable = np.ones(len(ids), dtype=bool)
    bad = np.fromiter((r[0] for r in conn.execute("SELECT id FROM images WHERE status != 'ok'")),
                      np.int64)
    if len(bad) and len(ids):
        usable[np.searchsorted(ids, bad)] = False
    return ids, paths, usable
