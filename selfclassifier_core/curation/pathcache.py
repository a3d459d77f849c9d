"""The catalog's id -> path map, cached per database, for :meth:`~.labels.Labels.final_table`.

Reading a million paths from SQLite takes about 1.5 s on a slow CPU, so the map is kept in
memory per database and, for the next process, in a snapshot file in the workspace
(:data:`SNAPSHOT`, an Arrow IPC file: ids and paths, read in ~10 ms). Either is extended with
the rows added since: catalog ids are never reused (AUTOINCREMENT) and an image's path never
changes (a new path is a new row). Rows deleted, or fewer rows than cached, trigger a full
read. A snapshot carries the database's creation time and change counter; one from another
database, or one that cannot be read, is ignored and written again.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..store.database import catalog_changes
from ..store.fsutil import atomic_open
from ..store.ids import find_ids
from ..store.workspace import Workspace

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

log = logging.getLogger(__name__)

SNAPSHOT = "catalog-paths.arrow"  # in Workspace.cache_dir

# database -> (catalog change counter, paths as an Arrow array, the answer) as last read
_CATALOG_CACHE: dict[str, tuple[str | None, "pa.Array", tuple]] = {}
_CATALOG_LOCK = threading.Lock()


def cached_catalog(workspace: Workspace, conn) -> tuple[np.ndarray, "pa.Array", np.ndarray]:
    """``(ids, paths, usable)`` of the whole catalog, ids ascending; ``paths`` is an Arrow
    string array (take from it by position; pandas is not needed to read it).

    While the database's catalog change counter (kept by its triggers,
    :data:`~selfclassifier_core.store.database.TRIGGERS`) stands still, the last answer is
    returned as it is (a million images: 0.2 s of counting and reading saved per call); read it
    in the caller's read transaction for an answer consistent with the caller's other reads.
    """
    import pyarrow as pa

    key = str(Path(workspace.db_path).resolve())
    changes = catalog_changes(conn)
    with _CATALOG_LOCK:
        cached = _CATALOG_CACHE.get(key)
    if cached is not None and changes is not None and cached[0] == changes:
        return cached[2]
    created = _created(conn)
    if cached is not None:
        ids, paths = cached[2][0], cached[1]
    else:
        ids, paths, at = _read_snapshot(workspace, created)
        if changes is not None and at == changes:  # the snapshot is current: no query at all
            return _keep(key, changes, ids, paths, _usable(conn, ids))
    read = False
    max_id, count = conn.execute("SELECT max(id), count(*) FROM images").fetchone()
    max_id = int(max_id or 0)
    have = int(ids[-1]) if len(ids) else 0
    if max_id > have:
        new_ids, new_paths = _rows(conn, "WHERE id > ?", (have,))
        ids = np.concatenate([ids, new_ids])
        paths = pa.concat_arrays([paths, new_paths])
        read = True
    if len(ids) != count or max_id < have:
        ids, paths = _rows(conn, "", ())
        read = True
    answer = _keep(key, changes, ids, paths, _usable(conn, ids))
    if read and changes is not None and created is not None:
        _write_snapshot(workspace, created, changes, ids, paths)
    return answer


def catalog_rows(catalog: tuple, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, usable)`` of image ``ids`` in a :func:`cached_catalog` answer: each id's
    row (clipped into range: meaningful only where ``usable``) and whether it is a usable
    image of the catalog."""
    cat_ids, _paths, cat_ok = catalog
    pos, found = find_ids(cat_ids, ids)
    return pos, found & (cat_ok[pos] if len(cat_ok) else found)


def take_paths(paths: "pa.Array", positions: np.ndarray) -> "pa.Array":
    """The paths at ``positions`` of a :func:`cached_catalog` answer's ``paths``."""
    return paths.take(_arrow_int64s(positions))


def paths_at(paths: "pa.Array", positions: np.ndarray) -> list[str]:
    """:func:`take_paths` as Python strings (a page of them)."""
    return take_paths(paths, positions).to_pylist()


# pyarrow imports pandas (~0.3 s) in ``pa.array`` and ``to_numpy``: numbers and strings cross
# between Python, numpy and Arrow through their buffers instead, so reading the catalog (from
# the snapshot or the database), writing its snapshot and taking a page's paths do not (the
# Clusters screen at a million images needs no pandas).
def _arrow_int64s(values: np.ndarray) -> "pa.Array":
    """An Arrow int64 array of ``values``."""
    import pyarrow as pa

    values = np.ascontiguousarray(values, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _arrow_strings(values: list[str]) -> "pa.Array":
    """An Arrow large_string array of ``values`` (UTF-8 text, as SQLite gives it)."""
    import pyarrow as pa

    data = "".join(values).encode()
    lengths = np.fromiter(map(len, values), np.int64, len(values))
    if len(data) != lengths.sum():  # not all ASCII: each value's length in bytes
        lengths = np.fromiter((len(v.encode()) for v in values), np.int64, len(values))
    offsets = np.zeros(len(values) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.Array.from_buffers(pa.large_string(), len(values),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _int64s(column: "pa.Array") -> np.ndarray:
    """The values of an Arrow int64 array without nulls, as numpy (no copy)."""
    if column.null_count:
        raise ValueError("ids with nulls")
    if not len(column):
        return np.zeros(0, np.int64)
    return np.frombuffer(column.buffers()[1], np.int64, len(column), column.offset * 8)


def _keep(key: str, changes: str | None, ids: np.ndarray, paths, usable: np.ndarray) -> tuple:
    answer = (ids, paths, usable)
    with _CATALOG_LOCK:
        _CATALOG_CACHE[key] = (changes, paths, answer)
    return answer


def _rows(conn, where: str, args: tuple) -> tuple[np.ndarray, "pa.Array"]:
    rows = conn.execute(f"SELECT id, path FROM images {where} ORDER BY id", args).fetchall()
    ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    return ids, _arrow_strings([r[1] for r in rows])


def _usable(conn, ids: np.ndarray) -> np.ndarray:
    usable = np.ones(len(ids), dtype=bool)
    bad = np.fromiter((r[0] for r in conn.execute("SELECT id FROM images WHERE status != 'ok'")),
                      np.int64)
    if len(bad) and len(ids):
        usable[np.searchsorted(ids, bad)] = False
    return usable


def _created(conn) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key='created'").fetchone()
    return None if row is None else str(row[0])


def _read_snapshot(workspace: Workspace, created: str | None):
    """``(ids, paths, change counter)`` of the workspace's snapshot; empty and None when there
    is none, it is from another database or it cannot be read."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    empty = (np.zeros(0, np.int64), pa.nulls(0, pa.large_string()), None)  # not pa.array
    path = workspace.cache_dir / SNAPSHOT
    if created is None or not path.exists():
        return empty
    try:
        # memory-mapped: the first read in a process costs ~10 ms instead of ~0.4 s (Linux
        # keeps the mapped file while a newer snapshot replaces it; where the platform refuses
        # to replace a mapped file, the newer one is not written and the database is read)
        table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("created") != created:
            return empty
        ids = _int64s(table.column("id").combine_chunks())
        paths = table.column("path").combine_chunks()
        if paths.type != pa.large_string():  # (a cast imports pyarrow.compute: ~0.04 s)
            paths = paths.cast(pa.large_string())
        if len(ids) > 1 and not (np.diff(ids) > 0).all():
            raise ValueError("ids not ascending")
        return ids, paths, meta.get("changes")
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        log.warning("catalog snapshot %s not used (%s); it will be written again", path, exc)
        return empty


def _write_snapshot(workspace: Workspace, created: str, changes: str, ids: np.ndarray,
                    paths) -> None:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.table({"id": _arrow_int64s(ids), "path": paths},
                     metadata={"created": created, "changes": changes})
    try:
        with atomic_open(workspace.cache_dir / SNAPSHOT, "wb") as fh:
            with ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table)
    except OSError as exc:  # a read-only workspace: the next process reads the database
        log.debug("catalog snapshot not written (%s)", exc)
