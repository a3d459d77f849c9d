"""The catalog's id -> path map, cached per database, for :meth:`~.labels.Labels.final_table`."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..store.database import catalog_changes
from ..store.workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

# database -> (catalog change counter, object paths, the answer) as last read
_CATALOG_CACHE: dict[str, tuple[str | None, np.ndarray, tuple]] = {}
_CATALOG_LOCK = threading.Lock()


def cached_catalog(workspace: Workspace, conn) -> tuple[np.ndarray, "pd.arrays.StringArray",
                                                         np.ndarray]:
    """``(ids, paths, usable)`` of the whole catalog, ids ascending; ``paths`` is a pandas
    string array (index it with positions; shared: do not change it).

    Reading 100k paths from SQLite costs most of a second on a slow CPU, so the id -> path map is
    cached per database and extended with new rows: catalog ids are never reused and an image's
    path never changes (a new path is a new row). Rows deleted or a smaller count than cached
    trigger a full reload. While the database's catalog change counter (kept by its triggers,
    :data:`~selfclassifier_core.store.database.TRIGGERS`) stands still, the last answer is
    returned as it is (a million images: 0.2 s of counting and reading saved per call); read it
    in the caller's read transaction for an answer consistent with the caller's other reads.
    """
    import pandas as pd

    key = str(Path(workspace.db_path).resolve())
    changes = catalog_changes(conn)
    empty = (None, np.zeros(0, object), (np.zeros(0, np.int64),))
    with _CATALOG_LOCK:
        last, paths, answer = _CATALOG_CACHE.get(key, empty)
    if changes is not None and last == changes:
        return answer
    ids = answer[0]
    max_id, count = conn.execute("SELECT max(id), count(*) FROM images").fetchone()
    max_id = int(max_id or 0)
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
    usable = np.ones(len(ids), dtype=bool)
    bad = np.fromiter((r[0] for r in conn.execute("SELECT id FROM images WHERE status != 'ok'")),
                      np.int64)
    if len(bad) and len(ids):
        usable[np.searchsorted(ids, bad)] = False
    answer = (ids, pd.array(paths, dtype="str"), usable)
    with _CATALOG_LOCK:
        _CATALOG_CACHE[key] = (changes, paths, answer)
    return answer
