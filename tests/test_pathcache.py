"""The catalog's id -> path map: kept in memory and, for the next process, in a snapshot file;
either is extended with new rows, read again in full when rows went, and never trusted from
another database or a damaged file."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from selfclassifier_core.curation import pathcache
from workspace_fixtures import make_workspace_with_run


@pytest.fixture
def ws(tmp_path):
    ws, _run = make_workspace_with_run(tmp_path, n_images=30, n_unreadable=2,
                                       write_images=False)
    return ws


def catalog(ws, fresh_process=True):
    """``cached_catalog`` as a new process would call it (nothing in memory)."""
    if fresh_process:
        pathcache._CATALOG_CACHE.clear()
    conn = ws.connect()
    try:
        conn.execute("BEGIN")
        ids, paths, usable = pathcache.cached_catalog(ws, conn)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return ids, paths.to_pylist(), usable.tolist()


def from_sql(ws):
    with ws._conn() as conn:
        rows = conn.execute("SELECT id, path, status FROM images ORDER BY id").fetchall()
    return (np.array([r[0] for r in rows], np.int64), [r[1] for r in rows],
            [r[2] == "ok" for r in rows])


def same(got, want):
    return np.array_equal(got[0], want[0]) and got[1] == want[1] and got[2] == want[2]


@pytest.fixture
def reads(monkeypatch):
    """The path queries made: ``"all"`` or ``"new"`` (rows after the cached ones)."""
    seen = []
    real = pathcache._rows

    def spy(conn, where, args):
        seen.append("new" if args and args[0] > 0 else "all")
        return real(conn, where, args)

    monkeypatch.setattr(pathcache, "_rows", spy)
    return seen


def add_image(ws, path, status="ok"):
    with ws.transaction() as conn:
        conn.execute("INSERT INTO images (path, status) VALUES (?, ?)", (path, status))


def test_a_new_process_reads_the_snapshot_instead_of_every_path(ws, reads):
    want = from_sql(ws)
    assert same(catalog(ws), want) and reads == ["all"]
    assert (ws.cache_dir / pathcache.SNAPSHOT).is_file()
    assert same(catalog(ws), want) and reads == ["all"]          # snapshot current: no query
    assert same(catalog(ws, fresh_process=False), want) and reads == ["all"]


def test_a_snapshot_is_extended_with_new_rows_and_read_again_when_rows_went(ws, reads):
    catalog(ws)
    add_image(ws, "later/a.png")
    add_image(ws, "later/b.png", status="unreadable")
    assert same(catalog(ws), from_sql(ws)) and reads == ["all", "new"]
    assert same(catalog(ws), from_sql(ws)) and reads == ["all", "new"]  # written again
    with ws.transaction() as conn:
        conn.execute("DELETE FROM images WHERE path = 'later/a.png'")
    assert same(catalog(ws), from_sql(ws)) and reads == ["all", "new", "all"]
    with ws.transaction() as conn:                 # a status change: no path to read
        conn.execute("UPDATE images SET status = 'missing' WHERE id = 1")
    got = catalog(ws)
    assert same(got, from_sql(ws)) and got[2][0] is False and reads[-1] == "all"


def test_paths_of_any_script_and_length_come_back_as_written(ws, reads):
    """Read from the database (made into Arrow by hand, through buffers), from the snapshot,
    and extended: the paths are the database's, letter for letter."""
    for path in ("fotos/café ü/日本 1.png", "x" * 600 + ".jpg", "emoji/😀.png"):
        add_image(ws, path)
    want = from_sql(ws)
    assert same(catalog(ws), want)                           # from the database
    assert same(catalog(ws), want)                           # from the snapshot
    add_image(ws, "ελληνικά/ω.png")
    got = catalog(ws)
    assert same(got, from_sql(ws)) and got[1][-1] == "ελληνικά/ω.png" and reads[-1] == "new"
    ids, paths, _ = pathcache._CATALOG_CACHE[str(ws.db_path.resolve())][2]
    assert pathcache.paths_at(paths, [len(ids) - 1, 0]) == ["ελληνικά/ω.png", want[1][0]]


def test_a_snapshot_of_another_database_or_a_damaged_one_is_not_used(ws, reads, caplog):
    want = from_sql(ws)
    catalog(ws)
    snapshot = ws.cache_dir / pathcache.SNAPSHOT
    with ws.transaction() as conn:                 # as if the database were made anew
        conn.execute("UPDATE meta SET value = '1.5' WHERE key = 'created'")
    assert same(catalog(ws), want) and reads == ["all", "all"]
    snapshot.write_bytes(b"not an arrow file")
    with caplog.at_level(logging.WARNING, logger=pathcache.__name__):
        assert same(catalog(ws), want)
    assert reads == ["all", "all", "all"] and "not used" in caplog.text
    assert same(catalog(ws), want) and len(reads) == 3             # written again, whole


def test_a_workspace_that_cannot_be_written_still_answers(ws, reads, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(pathcache, "atomic_open", refuse)
    assert same(catalog(ws), from_sql(ws))
    assert not (ws.cache_dir / pathcache.SNAPSHOT).exists()
