"""The workspace: one directory holding everything the tool writes for one image folder.

Layout::

    <workspace>/
      workspace.db        SQLite (WAL): meta, images (the catalog), scans, runs, labels
      runs/<id>/          one training run: checkpoint.pt, config.json, stats.jsonl,
                          progress.json, predictions.npz, embeddings.npy,
                          neighbors.faiss (+ ids, key), umap.npy (+ key)
      features/           fast-mode feature caches (float16, memory-mapped)
      thumbnails/         thumbnails, made once
      cache/              what is kept to start faster (catalog-paths.arrow: the catalog's
                          ids and paths, for the next process)
      exports/            default place for exports

The image folder itself is never written to. The default location is
``$SELFCLASSIFIER_HOME/workspaces/<folder-name>-<hash>`` with ``SELFCLASSIFIER_HOME``
defaulting to ``~/.selfclassifier``; ``--workspace`` / ``SELFCLASSIFIER_WORKSPACE`` override it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from shlex import quote
from typing import Any, Callable, Iterator

from . import database, liveness
from .database import SCHEMA_VERSION
from .fsutil import is_within

log = logging.getLogger(__name__)

DB_NAME = "workspace.db"
HOME_ENV = "SELFCLASSIFIER_HOME"
WORKSPACE_ENV = "SELFCLASSIFIER_WORKSPACE"

RUN_STATUSES = ("created", "running", "done", "failed", "cancelled")  # stored
INTERRUPTED = "interrupted"  # read, never stored: created/running and its process is gone
CONTINUATION_STATUSES = ("failed", "cancelled", "running")  # stored; "interrupted" is read

class WorkspaceError(Exception):
    """A workspace cannot be opened or used; the message says why in words."""


class RunBusyError(WorkspaceError):
    """Another live process trains the run (the message names its pid and host)."""


@dataclass(frozen=True)
class RunInfo:
    """One row of the ``runs`` table.

    ``message`` is the run's own message (an error, a cancellation, the time budget);
    ``continuation`` is set only on a ``done`` run whose last ``--resume`` failed, was
    cancelled or was interrupted: ``{"status": "failed" | "cancelled" | "interrupted", "reason":
    str | None, "at": unix time}`` (``at`` is None for a record moved over from a schema-1
    workspace); while a finished run is being continued the stored record is ``{"status":
    "running", "at", "was": {"finished", "message", "config"}}``, and once that continuation's
    process is gone the run reads as the finished run it was, its continuation ``interrupted``.
    Show people :attr:`summary`, which puts both into words.

    ``status`` is the stored one, except ``interrupted``: the database says ``created`` or
    ``running`` but the process recorded as training the run is gone
    (:func:`~selfclassifier_core.store.liveness.gone_reason`); that is decided each time the run
    is read, so it cannot go stale, and ``interrupted`` then says why and what to do next.
    """

    id: int
    created: float
    finished: float | None
    status: str
    mode: str
    config: dict[str, Any]
    heads: list[int]
    main_head: int | None
    message: str | None
    dir: Path
    continuation: dict[str, Any] | None = None
    interrupted: str | None = None

    @property
    def refit_of(self) -> int | None:
        """The run whose labels this run learned from (a refit), or None."""
        value = self.config.get("refit_of") if isinstance(self.config, dict) else None
        return int(value) if value is not None else None

    @property
    def summary(self) -> str | None:
        """What to show a person about the run in one line: which run it refits, why it is
        interrupted and how to go on, its message, then what happened to its continuation, if
        it did not finish (None when there is nothing to say)."""
        refit = f"refit of run {self.refit_of}" if self.refit_of is not None else None
        parts = [p for p in (refit, self.interrupted, self.message,
                             continuation_text(self.continuation)) if p]
        return "; ".join(parts) or None


def continuation_text(continuation: dict[str, Any] | None) -> str | None:
    """The words for a :attr:`RunInfo.continuation` record (None for None)."""
    if not continuation or continuation.get("status") == "running":  # it says so itself
        return None
    if continuation.get("status") == "cancelled":
        return "continuing it was cancelled; --resume goes on from its checkpoint"
    if continuation.get("status") == INTERRUPTED:
        return (f"continuing it was interrupted ({continuation.get('reason')}); --resume goes on "
                "from its last checkpoint")
    reason = continuation.get("reason")
    return "continuing it failed" + (f" ({reason})" if reason else "")


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".selfclassifier").expanduser()


def default_workspace_for(folder: str | os.PathLike) -> Path:
    """Where the workspace of ``folder`` lives when none is given."""
    env = os.environ.get(WORKSPACE_ENV)
    if env:
        return Path(env).expanduser()
    folder = Path(folder).expanduser().resolve()
    digest = hashlib.sha1(str(folder).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    name = re.sub(r"[^\w.-]+", "_", folder.name, flags=re.UNICODE).strip("._") or "root"
    return default_home() / "workspaces" / f"{name[:40]}-{digest}"


def as_workspace(workspace: "Workspace | str | os.PathLike") -> "Workspace":
    """A :class:`Workspace` from itself or its directory: every public function that works on
    a workspace accepts both."""
    return workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)


class Workspace:
    """A workspace directory and its SQLite database.

    Use :meth:`open` (existing or new workspace) or :meth:`for_folder`. Connections come from
    :meth:`connect`; each call returns a new connection, so threads and processes never share one.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.db_path = self.path / DB_NAME

    # ----------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | os.PathLike, *, root: str | os.PathLike | None = None,
             create: bool = False) -> "Workspace":
        """Open the workspace at ``path``.

        Args:
            path: the workspace directory.
            root: the image folder it belongs to; recorded on creation, checked afterwards.
            create: make the directory and database if missing (otherwise a missing workspace
                is an error).
        """
        path = Path(path).expanduser()
        if root is not None:
            root = Path(root).expanduser().resolve()
            if is_within(path, root):
                raise WorkspaceError(
                    f"workspace {path} lies inside the image folder {root}; choose a workspace "
                    "outside it (the image folder is never written to)")
            if is_within(root, path):
                raise WorkspaceError(
                    f"the image folder {root} lies inside the workspace {path}; choose a "
                    "workspace outside it (the tool writes into its workspace)")
        if path.exists() and not path.is_dir():
            raise WorkspaceError(f"workspace path {path} exists and is not a directory")
        if not (path / DB_NAME).exists():
            if not create:
                raise WorkspaceError(f"no workspace at {path} (missing {DB_NAME}); run `scan` or "
                                     "`train` on an image folder first")
            path.mkdir(parents=True, exist_ok=True)
            cls(path)._create_db(root)
        ws = cls(path)
        ws._init_db(root)
        ws._remove_stale_creations()
        return ws

    @classmethod
    def for_folder(cls, folder: str | os.PathLike,
                   workspace: str | os.PathLike | None = None) -> "Workspace":
        """Open (creating if needed) the workspace of an image folder."""
        folder = Path(folder).expanduser()
        ws_path = Path(workspace).expanduser() if workspace else default_workspace_for(folder)
        return cls.open(ws_path, root=folder, create=True)

    def _create_db(self, root: Path | None) -> None:
        """Make ``workspace.db`` in one piece, safe when several processes create it at once.

        The database is built under a temporary name of this process's own (WAL mode, the whole
        schema, checkpointed into the file), then hard-linked to ``workspace.db``; the link fails
        if another process got there first, and its database is used. So nobody ever opens a
        half-made database, none has to switch a shared one to WAL (SQLite does not retry that),
        and a creator killed half-way leaves only its temporary file, never ``workspace.db``.
        Where the file system has no hard links the caller creates it in place instead
        (:meth:`_init_db`, which is safe too, but a creator killed before its first commit leaves
        an empty ``workspace.db``, made up on the next open).
        """
        tmp = self.path / f".{DB_NAME}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            try:
                conn = database.connect(tmp, 30.0)
                try:
                    self._init_db(root, conn)
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything into the file
                finally:
                    conn.close()
            except sqlite3.DatabaseError as exc:  # e.g. the directory is not writable
                raise WorkspaceError(f"cannot create workspace database {self.db_path}: "
                                     f"{exc}") from exc
            try:
                os.link(tmp, self.db_path)
            except FileExistsError:
                log.debug("workspace %s: created by another process at the same time", self.path)
            except OSError as exc:  # no hard links here (some network and FAT file systems)
                log.debug("workspace %s: no hard link (%s); creating the database in place",
                          self.path, exc)
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{tmp}{suffix}").unlink(missing_ok=True)

    def _remove_stale_creations(self) -> None:
        """Remove the temporary databases (and their WAL files) of creators that were killed
        half-way (:meth:`_create_db`): those whose process is gone. A live creator's are kept."""
        pattern = re.compile(
            rf"^\.{re.escape(DB_NAME)}\.(\d+)-[0-9a-f]+\.tmp(-wal|-shm|-journal)?$")
        try:
            entries = list(self.path.iterdir())
        except OSError:
            return
        for entry in entries:
            m = pattern.match(entry.name)
            if m and not liveness.process_alive(int(m.group(1))):
                try:
                    entry.unlink()
                    log.info("workspace %s: removed %s, left by a creator that was killed",
                             self.path, entry.name)
                except OSError as exc:
                    log.debug("cannot remove %s: %s", entry, exc)

    def _init_db(self, root: Path | None, conn: sqlite3.Connection | None = None) -> None:
        """Check the schema version and bring the database to the current schema (creating it
        when new), in one ``BEGIN IMMEDIATE`` transaction, on ``conn`` or a new connection."""
        try:
            with self.transaction(conn) as conn:
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table'")}
                version = SCHEMA_VERSION  # a new database is made at the current schema
                if "meta" in tables:
                    row = conn.execute(
                        "SELECT value FROM meta WHERE key='schema_version'").fetchone()
                    version = int(row[0]) if row else 0
                    if version > SCHEMA_VERSION:
                        raise WorkspaceError(
                            f"{self.db_path} was written by a newer version of selfclassifier "
                            f"(schema {version}; this version reads up to {SCHEMA_VERSION}). "
                            "Upgrade selfclassifier or use another workspace.")
                elif tables:
                    raise WorkspaceError(f"{self.db_path} is not a selfclassifier workspace "
                                         f"database (tables: {', '.join(sorted(tables))})")
                for stmt in database.SCHEMA.split(";"):
                    if stmt.strip():
                        conn.execute(stmt)
                for stmt in database.TRIGGERS:
                    conn.execute(stmt)
                if version < SCHEMA_VERSION:
                    database.migrate(conn, version)
                    log.info("workspace %s: schema %d -> %d", self.path, version, SCHEMA_VERSION)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                             (str(SCHEMA_VERSION),))
                conn.execute("INSERT OR IGNORE INTO meta VALUES ('created', ?)", (str(time.time()),))
                if root is not None:
                    old = conn.execute("SELECT value FROM meta WHERE key='root'").fetchone()
                    if old is None:
                        conn.execute("INSERT INTO meta VALUES ('root', ?)", (str(root),))
                    elif Path(old[0]) != root:
                        log.warning("workspace %s was made for %s; now used for %s",
                                    self.path, old[0], root)
                        conn.execute("UPDATE meta SET value=? WHERE key='root'", (str(root),))
        except sqlite3.DatabaseError as exc:  # corrupt file, not a database, locked for too long
            raise WorkspaceError(f"cannot open workspace database {self.db_path}: {exc}. "
                                 "Move it aside to start a fresh workspace.") from exc

    # ----------------------------------------------------------------- database
    def connect(self, timeout: float = 30.0) -> sqlite3.Connection:
        """A new connection: WAL mode, foreign keys on, rows as :class:`sqlite3.Row`.

        The connection is in autocommit mode (``isolation_level=None``); use
        :meth:`transaction` for grouped writes.
        """
        try:
            return database.connect(self.db_path, timeout)
        except sqlite3.DatabaseError as exc:
            raise WorkspaceError(f"cannot open workspace database {self.db_path}: {exc}. "
                                 "Move it aside to start a fresh workspace.") from exc

    @contextmanager
    def transaction(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT`` (``ROLLBACK`` on error) on a new or given connection.

        IMMEDIATE takes the write lock up front, so two processes editing the same workspace
        serialise instead of failing half-way.
        """
        own = conn is None
        conn = conn or self.connect()
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise WorkspaceError(f"workspace database {self.db_path} is busy or unwritable "
                                     f"({exc}); is another process holding it?") from exc
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back by itself (disk full, I/O)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            if own:
                conn.close()

    # ----------------------------------------------------------------- meta
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        with self._conn() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def root(self) -> Path | None:
        """The image folder this workspace belongs to (as last recorded)."""
        value = self.get_meta("root")
        return Path(value) if value else None

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = self.connect()
        try:
            yield conn
        finally:
            conn.close()

    # ----------------------------------------------------------------- directories
    @property
    def runs_dir(self) -> Path:
        return self.path / "runs"

    def run_dir(self, run_id: int) -> Path:
        return self.runs_dir / str(int(run_id))

    @property
    def features_dir(self) -> Path:
        return self.path / "features"

    @property
    def thumbnails_dir(self) -> Path:
        return self.path / "thumbnails"

    @property
    def cache_dir(self) -> Path:
        return self.path / "cache"

    @property
    def exports_dir(self) -> Path:
        return self.path / "exports"

    # ----------------------------------------------------------------- catalog queries
    def image_table(self, status: str | None = "ok"):
        """The catalog as a pandas DataFrame indexed by image id (only ``status`` rows if given)."""
        import pandas as pd

        sql = "SELECT * FROM images" + (" WHERE status=?" if status else "") + " ORDER BY id"
        with self._conn() as conn:
            df = pd.read_sql_query(sql, conn, params=(status,) if status else None)
        return df.set_index("id")

    def usable_images(self) -> list[tuple[int, str]]:
        """``(id, relative path)`` of every image with status ``ok``, ordered by id."""
        with self._conn() as conn:
            return [(r[0], r[1]) for r in conn.execute(
                "SELECT id, path FROM images WHERE status='ok' ORDER BY id")]

    def image_sides(self) -> list[int]:
        """The longest side (px) of every usable image whose size is known."""
        with self._conn() as conn:
            return [r[0] for r in conn.execute(
                "SELECT MAX(width, height) FROM images WHERE status='ok' AND width IS NOT NULL "
                "AND height IS NOT NULL")]

    def abspath(self, relpath: str) -> Path:
        root = self.root
        if root is None:
            raise WorkspaceError(f"workspace {self.path} has no image folder recorded")
        return root / relpath

    def catalog_version(self) -> str:
        """A string that changes whenever the set of usable images or any of them changes: a
        hash of every usable image's id, size and modification time (remembered:
        :meth:`catalog_memo`; a million images: ~1 s once per change, then ~1 ms)."""
        def compute(conn: sqlite3.Connection) -> str:
            h = hashlib.sha1()
            for row in conn.execute(
                    "SELECT id, bytes, mtime_ns FROM images WHERE status='ok' ORDER BY id"):
                h.update(f"{row[0]}:{row[1]}:{row[2]};".encode())
            return h.hexdigest()[:16]

        return self.catalog_memo("catalog_version", compute)

    def catalog_memo(self, name: str, compute: Callable[[sqlite3.Connection], str]) -> str:
        """``compute(conn)``, a non-empty string made from the catalog, remembered in ``meta``
        under ``name`` next to the change counter the database's triggers keep
        (:data:`~selfclassifier_core.store.database.TRIGGERS`): computed once per change of
        the catalog (an image added, removed, or its status, size or time changed); every
        other call is one read. The counter and the rows are read in one snapshot, and the
        value is kept only if the counter has not moved since."""
        with self._conn() as conn:
            conn.execute("BEGIN")  # the counter and the rows from one snapshot
            try:
                changes = database.catalog_changes(conn)
                memo = conn.execute("SELECT value FROM meta WHERE key=?", (name,)).fetchone()
                at, _, remembered = (memo[0] if memo else "").partition(":")
                if changes is not None and remembered and at == changes:
                    return remembered
                value = compute(conn)
            finally:
                conn.execute("COMMIT")
            if changes is None:
                return value
            try:
                with self.transaction(conn) as tx:  # only if nothing changed meanwhile
                    tx.execute("INSERT OR REPLACE INTO meta SELECT ?, ? WHERE "
                               "(SELECT value FROM meta WHERE key=?) = ?",
                               (name, f"{changes}:{value}", database.CATALOG_CHANGES, changes))
            except (WorkspaceError, sqlite3.OperationalError) as exc:  # read-only: not kept
                log.debug("workspace %s: %s not remembered (%s)", self.path, name, exc)
        return value

    # ----------------------------------------------------------------- runs
    def create_run(self, mode: str, config: dict[str, Any], heads: list[int] | None = None,
                   main_head: int | None = None) -> int:
        """Insert a run row (status ``created``), make its directory, return its id."""
        with self.transaction() as conn:
            cur = conn.execute(
                "INSERT INTO runs (created, status, mode, config, heads, main_head) "
                "VALUES (?, 'created', ?, ?, ?, ?)",
                (time.time(), mode, json.dumps(config, default=str),
                 json.dumps(heads) if heads is not None else None, main_head))
            run_id = int(cur.lastrowid)
        self.run_dir(run_id).mkdir(parents=True, exist_ok=True)
        return run_id

    def update_run(self, run_id: int, **fields: Any) -> None:
        """Update columns of a run: status, finished, heads, main_head, message, config, mode,
        continuation (a dict as in :class:`RunInfo`, or None to clear it)."""
        allowed = {"status", "finished", "heads", "main_head", "message", "config", "mode",
                   "continuation"}
        bad = set(fields) - allowed
        if bad:
            raise ValueError(f"unknown run field(s): {sorted(bad)}")
        if "status" in fields and fields["status"] not in RUN_STATUSES:
            raise ValueError(f"run status must be one of {RUN_STATUSES}, got {fields['status']!r}")
        cont = fields.get("continuation")
        if cont is not None and (not isinstance(cont, dict)
                                 or cont.get("status") not in CONTINUATION_STATUSES):
            raise ValueError("run continuation must be None or a dict with status in "
                             f"{CONTINUATION_STATUSES}, got {cont!r}")
        values = {k: (json.dumps(v, default=str)
                      if k in ("heads", "config") or (k == "continuation" and v is not None)
                      else v)
                  for k, v in fields.items()}
        if values.get("status") in ("done", "failed", "cancelled") and "finished" not in values:
            values["finished"] = time.time()
        sets = ", ".join(f"{k}=?" for k in values)
        with self.transaction() as conn:
            conn.execute(f"UPDATE runs SET {sets} WHERE id=?", (*values.values(), int(run_id)))

    def _run_from_row(self, row: sqlite3.Row) -> RunInfo:
        run = RunInfo(id=row["id"], created=row["created"], finished=row["finished"],
                      status=row["status"], mode=row["mode"], config=json.loads(row["config"]),
                      heads=json.loads(row["heads"]) if row["heads"] else [],
                      main_head=row["main_head"], message=row["message"],
                      dir=self.run_dir(row["id"]),
                      continuation=json.loads(row["continuation"]) if row["continuation"]
                      else None)
        if run.status not in ("created", "running"):
            return run
        record = liveness.recorded_process(run.dir)  # None: no process was started for it
        why = liveness.gone_reason(record) if record is not None else None
        if why is None:
            return run
        was = (run.continuation or {}).get("was")
        if (run.continuation or {}).get("status") == "running" and isinstance(was, dict):
            # a finished run whose continuation died: the finished run, as it was
            return replace(run, status="done", finished=was.get("finished"),
                           message=was.get("message"), config=was.get("config") or run.config,
                           continuation={"status": INTERRUPTED, "reason": why,
                                         "at": run.continuation.get("at")})
        return replace(run, status=INTERRUPTED,
                       interrupted=f"interrupted: {why}; {self._go_on(run)}")

    def _go_on(self, run: RunInfo) -> str:
        """What to do with an interrupted run, in words: the resume command (scratch,
        finetune), start it again (fast mode), or predict again (a folder predicted with a run
        of another workspace)."""
        source = run.config.get("source")
        if isinstance(source, dict) and "workspace" in source:
            return (f"predict the folder again: python -m selfclassifier_core predict "
                    f"{quote(str(source['workspace']))} --run {source.get('run')} --folder "
                    f"{quote(str(self.root or 'FOLDER'))} --out-workspace {quote(str(self.path))}")
        if run.mode == "fast":
            return ("start it again (fast mode is not resumed; it re-runs in seconds from its "
                    "cached features)")
        folder = run.config.get("folder") or self.root or "FOLDER"
        return (f"continue it from its last checkpoint: python -m selfclassifier_core train "
                f"{quote(str(folder))} --workspace {quote(str(self.path))} --resume "
                f"--run {run.id}")

    def get_run(self, run_id: int) -> RunInfo:
        with self._conn() as conn:
            row = conn.execute("SELECT * FROM runs WHERE id=?", (int(run_id),)).fetchone()
        if row is None:
            raise WorkspaceError(f"no run {run_id} in workspace {self.path}")
        return self._run_from_row(row)

    def list_runs(self) -> list[RunInfo]:
        with self._conn() as conn:
            rows = conn.execute("SELECT * FROM runs ORDER BY id").fetchall()
        return [self._run_from_row(r) for r in rows]

    def latest_run(self, status: str | None = "done") -> RunInfo | None:
        """The newest run (with ``status`` if given), or None."""
        runs = [r for r in self.list_runs() if status is None or r.status == status]
        return runs[-1] if runs else None

    def resolve_run(self, run_id: int | None = None) -> RunInfo:
        """The given run, or the newest finished one; a clear error if there is none."""
        if run_id is not None:
            return self.get_run(run_id)
        run = self.latest_run("done")
        if run is None:
            raise WorkspaceError(f"workspace {self.path} has no finished training run yet; "
                                 "run `train` first")
        return run

    def __repr__(self) -> str:
        return f"Workspace({str(self.path)!r})"
