"""The workspace's SQLite file: its schema, the migrations between schema versions, and
connections that survive several processes creating or opening one database at once.

:class:`~selfclassifier_core.store.workspace.Workspace` is the only user; other modules go
through it.
"""
from __future__ import annotations

import json
import random
import sqlite3
import time
from pathlib import Path

SCHEMA_VERSION = 2  # 2: runs.continuation

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS images (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,   -- AUTOINCREMENT: ids are never reused
    path       TEXT NOT NULL UNIQUE,                -- relative to the root, POSIX form
    bytes      INTEGER,
    mtime_ns   INTEGER,
    width      INTEGER,
    height     INTEGER,
    mode       TEXT,                                -- original PIL mode (before RGB conversion)
    status     TEXT NOT NULL CHECK (status IN ('ok', 'unreadable', 'missing')),
    reason     TEXT,                                -- human-readable, for unreadable images
    scanned_at REAL
);
CREATE INDEX IF NOT EXISTS images_status ON images(status);
CREATE TABLE IF NOT EXISTS scans (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    started  REAL NOT NULL,
    finished REAL,
    report   TEXT                                   -- JSON summary of the scan
);
CREATE TABLE IF NOT EXISTS runs (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    created   REAL NOT NULL,
    finished  REAL,
    status    TEXT NOT NULL CHECK (status IN ('created', 'running', 'done', 'failed', 'cancelled')),
    mode      TEXT NOT NULL,                        -- scratch | fast | finetune
    config    TEXT NOT NULL,                        -- JSON of the training options
    heads     TEXT,                                 -- JSON list of class counts, e.g. [10, 20, 40]
    main_head INTEGER,                              -- class count of the default head
    message   TEXT,                                 -- error or cancellation message
    continuation TEXT                               -- JSON, a done run whose continuation did
                                                    -- not finish: {"status", "reason", "at"}
);
"""

# Every change to the usable set of images bumps meta 'catalog_changes', whoever writes it, so
# Workspace.catalog_version() can tell in one read whether its remembered hash still holds.
# Created with IF NOT EXISTS on every open (no schema step: an older version keeps them working).
CATALOG_CHANGES = "catalog_changes"
_BUMP = f"UPDATE meta SET value = value + 1 WHERE key = '{CATALOG_CHANGES}';"
TRIGGERS = (
    f"INSERT OR IGNORE INTO meta VALUES ('{CATALOG_CHANGES}', '0')",
    f"CREATE TRIGGER IF NOT EXISTS images_added AFTER INSERT ON images BEGIN {_BUMP} END",
    f"CREATE TRIGGER IF NOT EXISTS images_removed AFTER DELETE ON images BEGIN {_BUMP} END",
    "CREATE TRIGGER IF NOT EXISTS images_changed AFTER UPDATE OF status, bytes, mtime_ns "
    "ON images WHEN OLD.status IS NOT NEW.status OR OLD.bytes IS NOT NEW.bytes "
    f"OR OLD.mtime_ns IS NOT NEW.mtime_ns BEGIN {_BUMP} END",
)


def catalog_changes(conn: sqlite3.Connection) -> str | None:
    """The catalog change counter (:data:`TRIGGERS`), None in a database without it."""
    row = conn.execute("SELECT value FROM meta WHERE key=?", (CATALOG_CHANGES,)).fetchone()
    return None if row is None else str(row[0])


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a database written at schema ``version`` up to :data:`SCHEMA_VERSION`, inside the
    caller's ``BEGIN IMMEDIATE`` transaction. Each step checks what is there, so a second
    process that opened the same old workspace at the same moment finds nothing left to do."""
    if version < 2:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        if "continuation" not in columns:
            conn.execute("ALTER TABLE runs ADD COLUMN continuation TEXT")
        _move_v1_continuation_notes(conn)


# schema 1 appended how a done run's continuation ended to its message, after this
_V1_NOTE = "continuing it "


def _move_v1_continuation_notes(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: the note schema 1 appended to a done run's ``message`` ("continuing it
    failed (why)" / "continuing it was cancelled; ...") becomes its ``continuation`` record, so a
    later continuation replaces it instead of adding a second one (the time is not known)."""
    rows = conn.execute("SELECT id, message FROM runs WHERE status='done' AND "
                        "instr(message, ?) > 0", (_V1_NOTE,)).fetchall()
    for run_id, message in rows:
        earlier, _, note = message.partition(_V1_NOTE)
        if note.startswith("was cancelled"):
            record = {"status": "cancelled", "reason": None, "at": None}
        elif note.startswith("failed"):
            reason = note[len("failed"):].strip()
            if reason.startswith("(") and reason.endswith(")"):
                reason = reason[1:-1]
            record = {"status": "failed", "reason": reason or None, "at": None}
        else:
            continue
        conn.execute("UPDATE runs SET message=?, continuation=? WHERE id=?",
                     (earlier.rstrip("; ") or None, json.dumps(record), run_id))


def connect(db_path: Path, timeout: float) -> sqlite3.Connection:
    """A connection to ``db_path`` in WAL mode, rows as :class:`sqlite3.Row`, autocommit (see
    :meth:`~selfclassifier_core.store.workspace.Workspace.connect`)."""
    conn = sqlite3.connect(db_path, timeout=timeout, isolation_level=None)
    try:
        conn.row_factory = sqlite3.Row
        _set_wal(conn, timeout)
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    except BaseException:
        conn.close()
        raise
    return conn


def _set_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried with a growing, jittered pause for up to ``timeout``
    seconds while the database is locked.

    Switching a database that is not in WAL mode yet needs an exclusive lock, and when another
    connection holds the write lock SQLite answers "database is locked" at once instead of
    waiting (its busy handler is skipped where waiting could deadlock): two processes opening
    a database that is not WAL yet would otherwise fail. On a WAL database this is a no-op.
    """
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_locked(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(2 * pause, 0.1)


def _is_locked(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # extended codes too
    return "locked" in str(exc) or "busy" in str(exc)
