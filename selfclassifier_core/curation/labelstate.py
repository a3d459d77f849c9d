"""How the labels of a run and head are stored, and the plumbing every edit goes through.

Owns the label tables (``ensure_schema``), the rules for names (``normalize_name``,
``default_name``), one operation's change set (:class:`ChangeSet`), the history rows with undo and
redo (:class:`HistoryEntry`), and :class:`LabelStore`: one run and head loaded from the workspace,
its state read and written inside a transaction. :class:`~.labels.Labels` (the operations a person
makes) and :func:`~.carry.carry_over` build on it.

Every operation is one ``BEGIN IMMEDIATE`` transaction that reads the current state, writes the
change and appends a history row holding, for every key it touched, the value before and after.
Undo writes the *before* values of the newest applied row, redo the *after* values of the oldest
undone one; a new operation discards the undone rows (the redo stack). Because the state is read
inside the transaction and only the touched keys are written, two processes editing the same
workspace never lose each other's edits; a killed process loses at most the operation in flight.
The history is shared by everyone editing the same run and head: undo takes back the newest
operation, whoever made it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import time
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..store.ids import find_ids, shown_ids
from ..store.predictions import Predictions, load_predictions, prediction_heads
from ..store.workspace import Workspace, WorkspaceError, as_workspace

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 1000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS label_names (
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    head    INTEGER NOT NULL,
    cluster INTEGER NOT NULL,
    name    TEXT NOT NULL,
    PRIMARY KEY (run_id, head, cluster)
);
CREATE TABLE IF NOT EXISTS label_overrides (
    run_id   INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    head     INTEGER NOT NULL,
    image_id INTEGER NOT NULL,
    cluster  INTEGER,                      -- moved to this cluster (NULL: not moved to a cluster)
    label    TEXT,                         -- given this label name (NULL: none)
    excluded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run_id, head, image_id),
    CHECK (cluster IS NULL OR label IS NULL)
);
CREATE TABLE IF NOT EXISTS label_created (
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    head   INTEGER NOT NULL,
    name   TEXT NOT NULL,
    PRIMARY KEY (run_id, head, name)
);
CREATE TABLE IF NOT EXISTS label_confirmed (
    run_id   INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    head     INTEGER NOT NULL,
    image_id INTEGER NOT NULL,             -- the person checked the image's label: it is right
    PRIMARY KEY (run_id, head, image_id)
);
CREATE TABLE IF NOT EXISTS label_history (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    head    INTEGER NOT NULL,
    time    REAL NOT NULL,
    op      TEXT NOT NULL,
    args    TEXT NOT NULL,                 -- JSON of the operation's arguments
    changes TEXT NOT NULL,                 -- JSON {names|overrides|created|confirmed:
                                           --        [[key, before, after]]}
    state   TEXT NOT NULL CHECK (state IN ('applied', 'undone', 'discarded'))
);
CREATE INDEX IF NOT EXISTS label_history_stack ON label_history(run_id, head, state, id);
"""


def ensure_schema(conn) -> None:
    """Create the labels tables if missing (call inside a transaction)."""
    for stmt in _SCHEMA.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def normalize_name(name: Any) -> str:
    """A label name as stored: NFC-normalised, surrounding whitespace stripped.

    Raises ValueError for a non-string, an empty or whitespace-only name, or one longer than
    ``MAX_NAME_CHARS``.
    """
    if not isinstance(name, str):
        raise ValueError(f"label name must be text, got {name!r}")
    clean = unicodedata.normalize("NFC", name).strip()
    if not clean:
        raise ValueError(f"label name {name!r} is empty; give a name with visible characters")
    if len(clean) > MAX_NAME_CHARS:
        raise ValueError(f"label name {clean[:40]!r}... is {len(clean)} characters long "
                         f"(at most {MAX_NAME_CHARS})")
    return clean


def default_name(cluster: int, head: int) -> str:
    """``cluster_03`` style: zero-padded to the number of digits of the head size."""
    return f"cluster_{int(cluster):0{len(str(int(head)))}d}"


def label_order(cluster_names: Sequence[str], created: Sequence[str],
                given: Iterable[str]) -> list[str]:
    """Every label name once, in the order every list of labels shows: the cluster names
    (cluster order), the labels the person created, then the names given to images (sorted)."""
    return list(dict.fromkeys([*cluster_names, *created, *sorted(set(given))]))


@dataclass(frozen=True)
class HistoryEntry:
    """One operation in the history of a run and head (see :meth:`LabelStore.history`)."""

    id: int
    time: float
    op: str
    args: dict[str, Any]
    state: str               # applied | undone | discarded
    changes: int             # how many keys (clusters, images, labels) it changed


class ChangeSet:
    """Accumulates the changes of one operation: ``{kind: {key: (before, after)}}``.

    Kinds: ``names`` (cluster -> stored name, None for the default), ``overrides`` (image id ->
    ``[cluster, label, excluded]``, None for no edit), ``created`` (name -> created or not),
    ``confirmed`` (image id -> confirmed or not).
    """

    KINDS = ("names", "overrides", "created", "confirmed")

    def __init__(self) -> None:
        self.changes: dict[str, dict[Any, list[Any]]] = {k: {} for k in self.KINDS}

    def set(self, kind: str, key: Any, before: Any, after: Any) -> None:
        if kind in self.changes and key in self.changes[kind]:
            self.changes[kind][key][1] = after
        else:
            self.changes[kind][key] = [before, after]

    def to_json(self) -> dict[str, list[list[Any]]]:
        return {kind: [[k, b, a] for k, (b, a) in d.items() if b != a]
                for kind, d in self.changes.items()}


def count_changes(changes: dict[str, list]) -> int:
    """How many keys a :meth:`ChangeSet.to_json` (or a history row's ``changes``) touches."""
    return sum(len(v) for v in changes.values())


class LabelStore:
    """The stored label state of one run and head: loading, checking, reading and writing it,
    and the history (undo, redo). :class:`~.labels.Labels` adds the operations.

    Args:
        workspace: the workspace, or its directory (a path).
        run_id: the run (default: the newest finished run).
        head: the head's class count (default: the run's main head).
        predictions: the run's predictions, when the caller has them (the app keeps one copy
            per run, its embeddings memory-mapped for the review queue), or a function that
            returns them, called at first use; by default they are read from the run
            directory at first use.
    """

    def __init__(self, workspace: Workspace | str | os.PathLike, run_id: int | None = None,
                 head: int | None = None,
                 predictions: Predictions | Callable[[], Predictions] | None = None):
        workspace = as_workspace(workspace)
        self.workspace = workspace
        run = workspace.resolve_run(run_id)
        self.run_id = run.id
        self._run_dir = run.dir
        self._loaded = predictions
        if isinstance(predictions, Predictions):  # the run's, loaded already
            heads = predictions.head_sizes
        else:
            try:
                heads = prediction_heads(run.dir)  # the arrays are read when first needed
            except FileNotFoundError as exc:
                raise WorkspaceError(f"run {run.id} has no predictions yet; run `predict` on "
                                     f"it ({exc})") from exc
        if head is None:
            head = run.main_head if run.main_head in heads else heads[0]
        head = int(head)
        if head not in heads:
            raise ValueError(f"run {run.id} has no head with {head} classes; its heads are "
                             f"{heads}")
        self.head = head
        self._defaults = [default_name(c, head) for c in range(head)]
        with workspace._conn() as conn:
            have = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name "
                                "IN ('label_names', 'label_overrides', 'label_created', "
                                "'label_confirmed', 'label_history')").fetchone()[0]
        if have < 5:  # take the write lock only when the tables are missing
            with workspace.transaction() as conn:
                ensure_schema(conn)

    # ------------------------------------------------------------------ the run's predictions
    def run_predictions(self, embeddings: bool = True) -> Predictions:
        """The run's predictions: the copy (or the function returning it) given to the
        constructor, else read now (``embeddings``: memory-mapped with them)."""
        preds = self._loaded
        if preds is None:
            return load_predictions(self._run_dir, embeddings=embeddings)
        return preds if isinstance(preds, Predictions) else preds()

    @functools.cached_property
    def _predictions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The head's ``(image_ids, predicted, confidence, margin)``, read once, at first use
        (a million images: ~0.1 s; the history and the undo buttons never need them)."""
        preds = self.run_predictions(embeddings=False)
        hp = preds.heads[self.head]
        return (np.asarray(preds.image_ids, np.int64), np.asarray(hp.cluster, np.int64),
                np.asarray(hp.confidence, np.float32), np.asarray(hp.margin, np.float32))

    @property
    def image_ids(self) -> np.ndarray:
        """Ids of the images the run predicted, ascending."""
        return self._predictions[0]

    @property
    def predicted(self) -> np.ndarray:
        """The head's cluster of each image (aligned with :attr:`image_ids`)."""
        return self._predictions[1]

    @property
    def confidence(self) -> np.ndarray:
        return self._predictions[2]

    @property
    def margin(self) -> np.ndarray:
        return self._predictions[3]

    # ------------------------------------------------------------------ validation
    def _check_cluster(self, cluster: Any) -> int:
        if isinstance(cluster, (bool, np.bool_)):
            raise ValueError(f"cluster must be an integer, got {cluster!r}")
        if isinstance(cluster, (int, np.integer)):
            c = int(cluster)
        elif isinstance(cluster, str) and cluster.strip().lstrip("-").isdigit():
            c = int(cluster)
        else:
            raise ValueError(f"cluster must be an integer, got {cluster!r}")
        if not 0 <= c < self.head:
            raise ValueError(f"unknown cluster {cluster!r}: head {self.head} has clusters "
                             f"0..{self.head - 1}")
        return c

    def _check_images(self, image_ids: Iterable[Any]) -> np.ndarray:
        if isinstance(image_ids, (int, np.integer)):
            image_ids = [image_ids]
        try:
            ids = np.unique(np.asarray([int(i) for i in image_ids], dtype=np.int64))
        except (TypeError, ValueError):
            raise ValueError(f"image ids must be integers, got {list(image_ids)!r}") from None
        if len(ids) == 0:
            raise ValueError("no image ids given")
        _pos, found = find_ids(self.image_ids, ids)
        if not found.all():
            raise ValueError(f"unknown image id(s) {shown_ids(ids[~found])}: not in run "
                             f"{self.run_id}")
        return ids

    def _predicted_of(self, ids: np.ndarray) -> np.ndarray:
        return self.predicted[np.searchsorted(self.image_ids, ids)]

    # ------------------------------------------------------------------ state access (in a txn)
    def _key(self) -> tuple[int, int]:
        return (self.run_id, self.head)

    def _names(self, conn) -> dict[int, str]:
        return {int(r[0]): r[1] for r in conn.execute(
            "SELECT cluster, name FROM label_names WHERE run_id=? AND head=?", self._key())}

    def _overrides(self, conn, ids: Sequence[int]) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            q = ("SELECT image_id, cluster, label, excluded FROM label_overrides WHERE run_id=? "
                 f"AND head=? AND image_id IN ({','.join('?' * len(chunk))})")
            for r in conn.execute(q, (*self._key(), *chunk)):
                out[int(r[0])] = [r[1], r[2], int(r[3])]
        return out

    def _created(self, conn) -> list[str]:
        return [r[0] for r in conn.execute(
            "SELECT name FROM label_created WHERE run_id=? AND head=? ORDER BY rowid",
            self._key())]

    def _confirmed(self, conn, ids: Sequence[int] | None = None) -> set[int]:
        """Confirmed image ids (of ``ids`` when given)."""
        q = "SELECT image_id FROM label_confirmed WHERE run_id=? AND head=?"
        if ids is None:
            return {int(r[0]) for r in conn.execute(q, self._key())}
        out: set[int] = set()
        ids = [int(i) for i in ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            out.update(int(r[0]) for r in conn.execute(
                q + f" AND image_id IN ({','.join('?' * len(chunk))})", (*self._key(), *chunk)))
        return out

    def _label_names(self, conn) -> list[str]:
        """Every label name (:func:`label_order`)."""
        names = self._names(conn)
        given = [r[0] for r in conn.execute(
            "SELECT DISTINCT label FROM label_overrides WHERE run_id=? AND head=? "
            "AND label IS NOT NULL", self._key())]
        return label_order([names.get(c, self._defaults[c]) for c in range(self.head)],
                           self._created(conn), given)

    # ------------------------------------------------------------------ writing (in a txn)
    def _write(self, conn, kind: str, key: Any, value: Any) -> None:
        rh = self._key()
        if kind == "names":
            if value is None:
                conn.execute("DELETE FROM label_names WHERE run_id=? AND head=? AND cluster=?",
                             (*rh, int(key)))
            else:
                conn.execute("INSERT OR REPLACE INTO label_names VALUES (?, ?, ?, ?)",
                             (*rh, int(key), value))
        elif kind == "overrides":
            if value is None:
                conn.execute("DELETE FROM label_overrides WHERE run_id=? AND head=? "
                             "AND image_id=?", (*rh, int(key)))
            else:
                conn.execute("INSERT OR REPLACE INTO label_overrides VALUES (?, ?, ?, ?, ?, ?)",
                             (*rh, int(key), value[0], value[1], int(value[2])))
        elif kind == "created":
            if value:
                conn.execute("INSERT OR IGNORE INTO label_created VALUES (?, ?, ?)", (*rh, key))
            else:
                conn.execute("DELETE FROM label_created WHERE run_id=? AND head=? AND name=?",
                             (*rh, key))
        elif kind == "confirmed":
            if value:
                conn.execute("INSERT OR IGNORE INTO label_confirmed VALUES (?, ?, ?)",
                             (*rh, int(key)))
            else:
                conn.execute("DELETE FROM label_confirmed WHERE run_id=? AND head=? "
                             "AND image_id=?", (*rh, int(key)))
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown change kind {kind!r}")

    def _current(self, conn, kind: str, keys: list[Any]) -> dict[Any, Any]:
        if kind == "names":
            names = self._names(conn)
            return {k: names.get(int(k)) for k in keys}
        if kind == "overrides":
            ov = self._overrides(conn, keys)
            return {k: ov.get(int(k)) for k in keys}
        if kind == "confirmed":
            confirmed = self._confirmed(conn, keys)
            return {k: (int(k) in confirmed) for k in keys}
        created = set(self._created(conn))
        return {k: (k in created) for k in keys}

    def _commit(self, conn, op: str, args: dict[str, Any], ops: ChangeSet) -> int | None:
        """Write the changes of ``ops`` and their history row; None if nothing changed."""
        changes = ops.to_json()
        if not count_changes(changes):
            log.debug("%s %s changed nothing", op, args)
            return None
        for kind, items in changes.items():
            for key, _before, after in items:
                self._write(conn, kind, key, after)
        conn.execute("UPDATE label_history SET state='discarded' WHERE run_id=? AND head=? "
                     "AND state='undone'", self._key())
        cur = conn.execute(
            "INSERT INTO label_history (run_id, head, time, op, args, changes, state) "
            "VALUES (?, ?, ?, ?, ?, ?, 'applied')",
            (*self._key(), time.time(), op, json.dumps(args, ensure_ascii=False),
             json.dumps(changes, ensure_ascii=False)))
        return int(cur.lastrowid)

    def _set_override(self, ops: ChangeSet, image_id: int, before: list | None,
                      cluster: int | None, label: str | None, excluded: int) -> None:
        after = None if cluster is None and label is None and not excluded else \
            [cluster, label, int(excluded)]
        ops.set("overrides", int(image_id), before, after)

    # ------------------------------------------------------------------ undo / redo / history
    def _apply_entry(self, conn, row, side: int, expect: int) -> None:
        """Write side (0 before, 1 after) of a history row after checking the other side holds."""
        changes = json.loads(row["changes"])
        for kind, items in changes.items():
            keys = [k for k, *_ in items]
            cur = self._current(conn, kind, keys)
            for key, *vals in items:
                if cur[key] != vals[expect]:
                    raise WorkspaceError(
                        f"label history {row['id']} ({row['op']}) does not match the current "
                        f"state of {kind} {key!r}; the workspace database was changed outside "
                        "selfclassifier")
            for key, *vals in items:
                self._write(conn, kind, key, vals[side])

    def undo(self) -> HistoryEntry | None:
        """Take back the newest applied operation; returns it, or None if there is none."""
        return self._step(undo=True)

    def redo(self) -> HistoryEntry | None:
        """Apply again the oldest undone operation; returns it, or None if there is none."""
        return self._step(undo=False)

    def _step(self, undo: bool) -> HistoryEntry | None:
        """Undo (write the *before* side of the newest applied row) or redo (the *after* side
        of the oldest undone row), and move that row to the other stack."""
        have, becomes, order = ("applied", "undone", "DESC") if undo else \
            ("undone", "applied", "ASC")
        with self.workspace.transaction() as conn:
            row = conn.execute("SELECT * FROM label_history WHERE run_id=? AND head=? AND "
                               f"state=? ORDER BY id {order} LIMIT 1",
                               (*self._key(), have)).fetchone()
            if row is None:
                return None
            self._apply_entry(conn, row, side=0 if undo else 1, expect=1 if undo else 0)
            conn.execute("UPDATE label_history SET state=? WHERE id=?", (becomes, row["id"]))
            return self._entry(row, becomes)

    @staticmethod
    def _entry(row, state: str | None = None) -> HistoryEntry:
        return HistoryEntry(id=int(row["id"]), time=float(row["time"]), op=row["op"],
                            args=json.loads(row["args"]), state=state or row["state"],
                            changes=count_changes(json.loads(row["changes"])))

    def history(self, include_discarded: bool = False) -> list[HistoryEntry]:
        """Operations, oldest first: ``applied`` ones, then ``undone`` ones (the redo stack)."""
        with self.workspace._conn() as conn:
            rows = conn.execute(
                "SELECT * FROM label_history WHERE run_id=? AND head=?"
                + ("" if include_discarded else " AND state != 'discarded'") + " ORDER BY id",
                self._key()).fetchall()
        return [self._entry(r) for r in rows]

    def edit_marker(self) -> str:
        """A string that changes whenever anyone edits, undoes or redoes the labels of this run
        and head (one aggregate query, however long the history): a cache key."""
        with self.workspace._conn() as conn:
            n, last, applied = conn.execute(
                "SELECT COUNT(*), COALESCE(MAX(id), 0), COALESCE(SUM(state = 'applied'), 0) "
                "FROM label_history WHERE run_id=? AND head=? AND state != 'discarded'",
                self._key()).fetchone()
        return f"{n}.{last}.{applied}"

    def can_undo(self) -> bool:
        return any(e.state == "applied" for e in self.history())

    def can_redo(self) -> bool:
        return any(e.state == "undone" for e in self.history())
