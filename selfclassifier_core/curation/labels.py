"""The labels a person edits on top of a run's clusters: names, moves, exclusions, undo/redo.

State (per run and head, stored in the workspace database):

- a *name* for each cluster; ``cluster_03`` style by default (zero-padded to the width of the
  head size); only names that differ from the default are stored;
- per-image *overrides*: moved to another cluster (follows that cluster's name, also after later
  renames), given a label name (sticks to that name), and/or *excluded* (junk, outlier);
- *created labels*: names made before any image or cluster has them.

A label is its name: clusters that share a name are one label in every export. That is what
:meth:`Labels.merge` does (and what renaming a cluster to a name in use does): the model's cluster
ids are kept, so a merge can be undone, or split again by renaming one of the clusters.
:meth:`Labels.cluster_summary` reports clusters that share a name. :meth:`Labels.delete_label`
removes a name everywhere: clusters carrying it get their default names back, images given it
fall back to their cluster. :meth:`Labels.move_to_label` moves images to a label by its name (to
its cluster when a single cluster carries it, so they follow later renames).

Every operation is one ``BEGIN IMMEDIATE`` transaction that reads the current state, writes the
change and appends a history row holding, for every key it touched, the value before and after.
Undo writes the *before* values of the newest applied row, redo the *after* values of the oldest
undone one; a new operation discards the undone rows (the redo stack). Because the state is read
inside the transaction and only the touched keys are written, two processes editing the same
workspace never lose each other's edits; a killed process loses at most the operation in flight.
The history is shared by everyone editing the same run and head: undo takes back the newest
operation, whoever made it.

Columns of :meth:`Labels.final_table` (indexed by image id):

- ``path`` relative POSIX path; ``label`` the final label name;
- ``cluster`` the cluster the image belongs to after edits (its predicted cluster, the cluster it
  was moved to, or for an image given a label name the lowest cluster currently carrying that
  name; ``<NA>`` if none does); ``predicted_cluster`` the model's cluster;
- ``confidence``, ``margin`` the model's (for its predicted cluster); ``head`` the class count;
- ``edited`` True if the person changed this image individually (moved or excluded; renames and
  merges of whole clusters do not set it); ``excluded`` True if excluded.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..store.predictions import load_predictions
from ..store.workspace import Workspace, WorkspaceError

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
CREATE TABLE IF NOT EXISTS label_history (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id  INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    head    INTEGER NOT NULL,
    time    REAL NOT NULL,
    op      TEXT NOT NULL,
    args    TEXT NOT NULL,                 -- JSON of the operation's arguments
    changes TEXT NOT NULL,                 -- JSON {names|overrides|created: [[key, before, after]]}
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


@dataclass(frozen=True)
class HistoryEntry:
    id: int
    time: float
    op: str
    args: dict[str, Any]
    state: str               # applied | undone | discarded
    changes: int             # how many keys (clusters, images, labels) it changed


@dataclass
class CarryOverReport:
    """What :func:`carry_over` did; ``str(report)`` is a readable summary."""
    from_run: int
    to_run: int
    from_head: int
    to_head: int
    shared_images: int
    matched: list[dict[str, Any]] = field(default_factory=list)  # old, new, overlap, sizes, name
    unmatched_old: list[dict[str, Any]] = field(default_factory=list)  # old, name, size
    unmatched_new: list[int] = field(default_factory=list)
    names_copied: dict[int, str] = field(default_factory=dict)   # new cluster -> name
    overrides_carried: int = 0
    overrides_dropped: int = 0      # images of the old overrides missing from the new run
    labels_created: list[str] = field(default_factory=list)
    # edits of the new run that were there before and were replaced (undo brings them back):
    names_overwritten: list[dict[str, Any]] = field(default_factory=list)  # cluster, before, after
    overrides_overwritten: list[dict[str, Any]] = field(default_factory=list)  # image_id, ...
    history_id: int | None = None

    SHOWN = 10   # overwritten edits listed one by one in ``str(report)``; the rest are counted

    def __str__(self) -> str:
        lines = [f"carry-over run {self.from_run} (head {self.from_head}) -> run {self.to_run} "
                 f"(head {self.to_head}): {self.shared_images} images in both runs"]
        for m in self.matched:
            lines.append(f"  cluster {m['old']} -> {m['new']}: overlap {m['overlap']} "
                         f"(old size {m['old_size']}, new size {m['new_size']})"
                         + (f", name {m['name']!r} copied" if m.get("copied") else ""))
        for u in self.unmatched_old:
            lines.append(f"  old cluster {u['old']} ({u['name']!r}, {u['size']} images) "
                         "has no match; its name was not carried")
        if self.unmatched_new:
            lines.append(f"  new clusters without a match: {self.unmatched_new}")
        lines.append(f"  {len(self.names_copied)} names copied, {self.overrides_carried} image "
                     f"edits carried, {self.overrides_dropped} dropped (images not in the new run)")
        if self.labels_created:
            lines.append(f"  labels created: {self.labels_created}")
        n_over = len(self.names_overwritten) + len(self.overrides_overwritten)
        if n_over:
            lines.append(f"  overwrote {n_over} earlier edit(s) of run {self.to_run} "
                         "(undo brings them back):")
            shown = [f"    cluster {o['cluster']}: name {o['before']!r} -> {o['after']!r}"
                     for o in self.names_overwritten]
            shown += [f"    image {o['image_id']}: {_describe_override(o['before'])} -> "
                      f"{_describe_override(o['after'])}" for o in self.overrides_overwritten]
            lines += shown[:self.SHOWN]
            if len(shown) > self.SHOWN:
                lines.append(f"    ... and {len(shown) - self.SHOWN} more")
        return "\n".join(lines)


def _describe_override(value: dict[str, Any] | None) -> str:
    """A per-image edit in words: ``moved to cluster 3``, ``label 'Birds', excluded``."""
    if value is None:
        return "no edit"
    parts = []
    if value["cluster"] is not None:
        parts.append(f"moved to cluster {value['cluster']}")
    if value["label"] is not None:
        parts.append(f"label {value['label']!r}")
    if value["excluded"]:
        parts.append("excluded")
    return ", ".join(parts)


def _override_dict(value: list[Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"cluster": value[0], "label": value[1], "excluded": bool(value[2])}


class _Ops:
    """Accumulates the changes of one operation: ``{kind: {key: (before, after)}}``."""

    def __init__(self) -> None:
        self.changes: dict[str, dict[Any, list[Any]]] = {"names": {}, "overrides": {},
                                                          "created": {}}

    def set(self, kind: str, key: Any, before: Any, after: Any) -> None:
        if kind in self.changes and key in self.changes[kind]:
            self.changes[kind][key][1] = after
        else:
            self.changes[kind][key] = [before, after]

    def to_json(self) -> dict[str, list[list[Any]]]:
        return {kind: [[k, b, a] for k, (b, a) in d.items() if b != a]
                for kind, d in self.changes.items()}


def _count(changes: dict[str, list]) -> int:
    return sum(len(v) for v in changes.values())


class Labels:
    """The editable labels of one run and head.

    Args:
        workspace: the workspace.
        run_id: the run (default: the newest finished run).
        head: the head's class count (default: the run's main head).
    """

    def __init__(self, workspace: Workspace, run_id: int | None = None, head: int | None = None):
        self.workspace = workspace
        run = workspace.resolve_run(run_id)
        self.run_id = run.id
        try:
            preds = load_predictions(run.dir, embeddings=False)
        except FileNotFoundError as exc:
            raise WorkspaceError(f"run {run.id} has no predictions yet; run `predict` on it "
                                 f"({exc})") from exc
        if head is None:
            head = run.main_head if run.main_head in preds.heads else preds.head_sizes[0]
        head = int(head)
        if head not in preds.heads:
            raise ValueError(f"run {run.id} has no head with {head} classes; its heads are "
                             f"{preds.head_sizes}")
        self.head = head
        hp = preds.heads[head]
        self.image_ids = np.asarray(preds.image_ids, np.int64)
        self.predicted = np.asarray(hp.cluster, np.int64)
        self.confidence = np.asarray(hp.confidence, np.float32)
        self.margin = np.asarray(hp.margin, np.float32)
        self._defaults = [default_name(c, head) for c in range(head)]
        with workspace._conn() as conn:
            have = conn.execute("SELECT count(*) FROM sqlite_master WHERE type='table' AND name "
                                "IN ('label_names', 'label_overrides', 'label_created', "
                                "'label_history')").fetchone()[0]
        if have < 4:  # take the write lock only when the tables are missing
            with workspace.transaction() as conn:
                ensure_schema(conn)

    def __repr__(self) -> str:
        return f"Labels(run={self.run_id}, head={self.head}, images={len(self.image_ids)})"

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
        pos = np.clip(np.searchsorted(self.image_ids, ids), 0, max(len(self.image_ids) - 1, 0))
        bad = ids[(self.image_ids[pos] != ids) if len(self.image_ids) else slice(None)]
        if len(bad):
            shown = ", ".join(str(int(b)) for b in bad[:10]) + (" ..." if len(bad) > 10 else "")
            raise ValueError(f"unknown image id(s) {shown}: not in run {self.run_id}")
        return ids

    def _predicted_of(self, ids: np.ndarray) -> np.ndarray:
        return self.predicted[np.searchsorted(self.image_ids, ids)]

    # ------------------------------------------------------------------ state access (in a txn)
    def _key(self) -> tuple[int, int]:
        return (self.run_id, self.head)

    def _names(self, conn) -> dict[int, str]:
        return {int(r[0]): r[1] for r in conn.execute(
            "SELECT cluster, name FROM label_names WHERE run_id=? AND head=?", self._key())}

    def _name_of(self, conn, cluster: int) -> str:
        row = conn.execute("SELECT name FROM label_names WHERE run_id=? AND head=? AND cluster=?",
                           (*self._key(), cluster)).fetchone()
        return row[0] if row else self._defaults[cluster]

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
        else:  # pragma: no cover - programming error
            raise ValueError(f"unknown change kind {kind!r}")

    def _current(self, conn, kind: str, keys: list[Any]) -> dict[Any, Any]:
        if kind == "names":
            names = self._names(conn)
            return {k: names.get(int(k)) for k in keys}
        if kind == "overrides":
            ov = self._overrides(conn, keys)
            return {k: ov.get(int(k)) for k in keys}
        created = set(self._created(conn))
        return {k: (k in created) for k in keys}

    def _commit(self, conn, op: str, args: dict[str, Any], ops: _Ops) -> int | None:
        """Write the changes of ``ops`` and their history row; None if nothing changed."""
        changes = ops.to_json()
        if not _count(changes):
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

    def _set_override(self, ops: _Ops, image_id: int, before: list | None, cluster: int | None,
                      label: str | None, excluded: int) -> None:
        after = None if cluster is None and label is None and not excluded else \
            [cluster, label, int(excluded)]
        ops.set("overrides", int(image_id), before, after)

    # ------------------------------------------------------------------ operations
    def rename(self, cluster: int, name: str) -> int | None:
        """Name a cluster. A name another cluster or label has merges them in the export.

        Returns the history id (None if the name was already that).
        """
        c = self._check_cluster(cluster)
        name = normalize_name(name)
        with self.workspace.transaction() as conn:
            ops = _Ops()
            before = self._names(conn).get(c)
            ops.set("names", c, before, None if name == self._defaults[c] else name)
            return self._commit(conn, "rename", {"cluster": c, "name": name}, ops)

    def merge(self, clusters: Sequence[int], into: int | None = None,
              name: str | None = None) -> int | None:
        """Give several clusters one label name.

        The name is ``name`` if given, else the current name of ``into`` (default: the first of
        ``clusters``). The clusters keep their ids (so the merge can be undone or split again);
        every image of them gets the shared label. Returns the history id.
        """
        if isinstance(clusters, (int, np.integer)):
            clusters = [clusters]
        cs = [self._check_cluster(c) for c in clusters]
        if into is not None:
            into = self._check_cluster(into)
            if into not in cs:
                cs.append(into)
        cs = list(dict.fromkeys(cs))
        if len(cs) < 2:
            raise ValueError(f"merge needs at least two different clusters, got {list(clusters)!r}")
        new_name = normalize_name(name) if name is not None else None
        with self.workspace.transaction() as conn:
            names = self._names(conn)
            if new_name is None:
                src = into if into is not None else cs[0]
                new_name = names.get(src, self._defaults[src])
            ops = _Ops()
            for c in cs:
                ops.set("names", c, names.get(c), None if new_name == self._defaults[c]
                        else new_name)
            return self._commit(conn, "merge", {"clusters": cs, "into": into, "name": new_name},
                                ops)

    def move(self, image_ids: Iterable[int], cluster: int | None = None,
             label: str | None = None) -> int | None:
        """Move images to a cluster (they follow its name) or give them a label name.

        Exactly one of ``cluster`` / ``label`` is required; a new label name is created on the
        fly. Moving includes excluded images again. Moving an image back to its predicted
        cluster removes the edit. Returns the history id.
        """
        if (cluster is None) == (label is None):
            raise ValueError("move needs exactly one of cluster=... or label=...")
        ids = self._check_images(image_ids)
        c = self._check_cluster(cluster) if cluster is not None else None
        lab = normalize_name(label) if label is not None else None
        with self.workspace.transaction() as conn:
            return self._move(conn, ids, c, lab)

    def move_to_label(self, image_ids: Iterable[int], name: str) -> int | None:
        """Move images to the label called ``name``, an existing one or a new one.

        When exactly one cluster carries the name, the images are moved to that cluster, so
        they keep following it when it is renamed later; otherwise (a name of several merged
        clusters, of a created label, of images only, or a new name) they are given the name.
        The name is looked up in the same transaction that writes the move, so an edit made
        meanwhile by someone else is taken into account. Undo takes it back like
        :meth:`move`. Returns the history id (None if nothing changed).
        """
        ids = self._check_images(image_ids)
        name = normalize_name(name)
        with self.workspace.transaction() as conn:
            names = self._names(conn)
            carriers = [c for c in range(self.head) if names.get(c, self._defaults[c]) == name]
            if len(carriers) == 1:
                return self._move(conn, ids, carriers[0], None)
            return self._move(conn, ids, None, name)

    def _move(self, conn, ids: np.ndarray, c: int | None, lab: str | None) -> int | None:
        """Write a move of checked ``ids`` to cluster ``c`` or label ``lab`` (in a transaction)."""
        predicted = self._predicted_of(ids)
        current = self._overrides(conn, ids)
        ops = _Ops()
        for i, p in zip(ids.tolist(), predicted.tolist()):
            tc = None if (c is None or c == p) else c
            self._set_override(ops, i, current.get(i), tc, lab, 0)
        args = {"image_ids": ids.tolist(), "cluster": c, "label": lab}
        return self._commit(conn, "move", args, ops)

    def create_label(self, name: str) -> int | None:
        """Make a new, empty label (ValueError if a cluster or label already has the name)."""
        name = normalize_name(name)
        with self.workspace.transaction() as conn:
            if name in self._label_names(conn):
                raise ValueError(f"label {name!r} already exists")
            ops = _Ops()
            ops.set("created", name, False, True)
            return self._commit(conn, "create_label", {"name": name}, ops)

    def rename_label(self, old: str, new: str) -> int | None:
        """Rename a label everywhere: clusters carrying it, images given it, created labels."""
        old_n = normalize_name(old)
        new_n = normalize_name(new)
        with self.workspace.transaction() as conn:
            if old_n not in self._label_names(conn):
                raise ValueError(f"unknown label {old!r}")
            ops = _Ops()
            names = self._names(conn)
            for c in range(self.head):
                if names.get(c, self._defaults[c]) == old_n:
                    ops.set("names", c, names.get(c), None if new_n == self._defaults[c]
                            else new_n)
            for r in conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                                  "WHERE run_id=? AND head=? AND label=?", (*self._key(), old_n)):
                ops.set("overrides", int(r[0]), [r[1], r[2], int(r[3])],
                        [r[1], new_n, int(r[3])])
            if old_n in self._created(conn):
                ops.set("created", old_n, True, False)
                ops.set("created", new_n, new_n in self._created(conn), True)
            return self._commit(conn, "rename_label", {"old": old_n, "new": new_n}, ops)

    def delete_label(self, name: str) -> int | None:
        """Delete a label name: created labels lose it, clusters carrying it get their default
        names back, images given it individually fall back to their cluster.

        Images moved to a cluster that carried the name stay in that cluster (and so take its
        default name); excluded images stay excluded. Clusters of a deleted merge are split
        again. Raises ValueError for an unknown name, and for a name that is only the default
        name of a cluster (a cluster always has a name: rename it instead). Returns the
        history id.
        """
        name_n = normalize_name(name)
        with self.workspace.transaction() as conn:
            if name_n not in self._label_names(conn):
                raise ValueError(f"unknown label {name!r}: no cluster, image or created label "
                                 "has that name")
            ops = _Ops()
            names = self._names(conn)
            for c, stored in names.items():
                if stored == name_n:
                    ops.set("names", c, stored, None)
            for r in conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                                  "WHERE run_id=? AND head=? AND label=?", (*self._key(), name_n)):
                self._set_override(ops, int(r[0]), [r[1], r[2], int(r[3])], None, None,
                                   int(r[3]))
            if name_n in self._created(conn):
                ops.set("created", name_n, True, False)
            if not _count(ops.to_json()):
                c = self._defaults.index(name_n)
                raise ValueError(f"label {name_n!r} is the default name of cluster {c}; there "
                                 "is nothing to delete (rename the cluster instead)")
            return self._commit(conn, "delete_label", {"name": name_n}, ops)

    def exclude(self, image_ids: Iterable[int]) -> int | None:
        """Mark images as excluded (junk/outlier): left out of exports unless asked for."""
        return self._set_excluded(image_ids, 1)

    def include(self, image_ids: Iterable[int]) -> int | None:
        """Take images out of the excluded set again (their moves, if any, stay)."""
        return self._set_excluded(image_ids, 0)

    def _set_excluded(self, image_ids: Iterable[int], flag: int) -> int | None:
        ids = self._check_images(image_ids)
        with self.workspace.transaction() as conn:
            current = self._overrides(conn, ids)
            ops = _Ops()
            for i in ids.tolist():
                cur = current.get(i)
                cl, lab = (cur[0], cur[1]) if cur else (None, None)
                self._set_override(ops, i, cur, cl, lab, flag)
            return self._commit(conn, "exclude" if flag else "include",
                                {"image_ids": ids.tolist()}, ops)

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
        with self.workspace.transaction() as conn:
            row = conn.execute("SELECT * FROM label_history WHERE run_id=? AND head=? AND "
                               "state='applied' ORDER BY id DESC LIMIT 1", self._key()).fetchone()
            if row is None:
                return None
            self._apply_entry(conn, row, side=0, expect=1)
            conn.execute("UPDATE label_history SET state='undone' WHERE id=?", (row["id"],))
            return self._entry(row, "undone")

    def redo(self) -> HistoryEntry | None:
        """Apply again the oldest undone operation; returns it, or None if there is none."""
        with self.workspace.transaction() as conn:
            row = conn.execute("SELECT * FROM label_history WHERE run_id=? AND head=? AND "
                               "state='undone' ORDER BY id ASC LIMIT 1", self._key()).fetchone()
            if row is None:
                return None
            self._apply_entry(conn, row, side=1, expect=0)
            conn.execute("UPDATE label_history SET state='applied' WHERE id=?", (row["id"],))
            return self._entry(row, "applied")

    @staticmethod
    def _entry(row, state: str | None = None) -> HistoryEntry:
        return HistoryEntry(id=int(row["id"]), time=float(row["time"]), op=row["op"],
                            args=json.loads(row["args"]), state=state or row["state"],
                            changes=_count(json.loads(row["changes"])))

    def history(self, include_discarded: bool = False) -> list[HistoryEntry]:
        """Operations, oldest first: ``applied`` ones, then ``undone`` ones (the redo stack)."""
        with self.workspace._conn() as conn:
            rows = conn.execute(
                "SELECT * FROM label_history WHERE run_id=? AND head=?"
                + ("" if include_discarded else " AND state != 'discarded'") + " ORDER BY id",
                self._key()).fetchall()
        return [self._entry(r) for r in rows]

    def can_undo(self) -> bool:
        return any(e.state == "applied" for e in self.history())

    def can_redo(self) -> bool:
        return any(e.state == "undone" for e in self.history())

    # ------------------------------------------------------------------ read side
    def _label_names(self, conn) -> list[str]:
        names = self._names(conn)
        out = [names.get(c, self._defaults[c]) for c in range(self.head)]
        out += self._created(conn)
        out += sorted(r[0] for r in conn.execute(
            "SELECT DISTINCT label FROM label_overrides WHERE run_id=? AND head=? "
            "AND label IS NOT NULL", self._key()))
        return list(dict.fromkeys(out))

    def cluster_names(self) -> dict[int, str]:
        """``{cluster: name}`` for every cluster of the head."""
        with self.workspace._conn() as conn:
            names = self._names(conn)
        return {c: names.get(c, self._defaults[c]) for c in range(self.head)}

    def label_names(self) -> list[str]:
        """Every label name: cluster names (cluster order), created labels, image labels."""
        with self.workspace._conn() as conn:
            return self._label_names(conn)

    def _state(self):
        """One consistent snapshot (a read transaction): names, overrides, created, catalog."""
        conn = self.workspace.connect()
        try:
            conn.execute("BEGIN")
            names = self._names(conn)
            ov = conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                              "WHERE run_id=? AND head=? ORDER BY image_id",
                              self._key()).fetchall()
            created = self._created(conn)
            cat_ids, cat_paths, usable = _catalog_paths(self.workspace, conn)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return names, ov, created, (cat_ids, cat_paths, usable)

    def final_table(self):
        """The final labels: one row per usable image with a prediction (see module docs)."""
        import pandas as pd

        names, ov, _created, cat = self._state()
        name_arr = np.array([names.get(c, self._defaults[c]) for c in range(self.head)],
                            dtype=object)
        first_cluster: dict[str, int] = {}
        for c, n in enumerate(name_arr):
            first_cluster.setdefault(n, c)
        n = len(self.image_ids)
        cluster = self.predicted.copy()
        label = name_arr[cluster] if n else np.array([], dtype=object)
        has_cluster = np.ones(n, dtype=bool)
        edited = np.zeros(n, dtype=bool)
        excluded = np.zeros(n, dtype=bool)
        if ov:
            oid = np.fromiter((r[0] for r in ov), np.int64, len(ov))
            pos = np.searchsorted(self.image_ids, oid)
            ok = (pos < n) & (self.image_ids[np.clip(pos, 0, max(n - 1, 0))] == oid)
            ov = [r for r, k in zip(ov, ok) if k]
            pos = pos[ok]
            ocl = np.fromiter((-1 if r[1] is None else r[1] for r in ov), np.int64, len(ov))
            olab = np.array([r[2] for r in ov], dtype=object)
            oexc = np.fromiter((r[3] for r in ov), np.int64, len(ov)).astype(bool)
            mc = ocl >= 0
            cluster[pos[mc]] = ocl[mc]
            label[pos[mc]] = name_arr[ocl[mc]]
            ml = np.array([v is not None for v in olab], dtype=bool)
            if ml.any():
                label[pos[ml]] = olab[ml]
                lc = np.array([first_cluster.get(v, -1) for v in olab[ml]], dtype=np.int64)
                cluster[pos[ml]] = lc
                has_cluster[pos[ml]] = lc >= 0
            edited[pos] = mc | ml | oexc
            excluded[pos] = oexc
        cat_ids, cat_paths, cat_ok = cat
        cpos = np.clip(np.searchsorted(cat_ids, self.image_ids), 0, max(len(cat_ids) - 1, 0))
        usable = ((cat_ids[cpos] == self.image_ids) & cat_ok[cpos] if len(cat_ids)
                  else np.zeros(n, bool))
        if not usable.all():
            log.info("run %s: %d predicted images are no longer usable in the catalog; left out",
                     self.run_id, int((~usable).sum()))
        cl = pd.array(np.where(has_cluster, cluster, 0), dtype="Int64")
        cl[~has_cluster] = pd.NA
        df = pd.DataFrame({
            "path": pd.array(cat_paths[cpos] if len(cat_ids) else np.array([""] * n, object),
                             dtype="str"),
            "label": pd.array(label, dtype="str"),
            "cluster": cl,
            "confidence": self.confidence,
            "margin": self.margin,
            "head": np.full(n, self.head, dtype=np.int64),
            "edited": edited,
            "excluded": excluded,
            "predicted_cluster": self.predicted,
        }, index=pd.Index(self.image_ids, name="id"))
        return df[usable]

    def cluster_summary(self, by: str = "cluster"):
        """Sizes and mean confidences, excluded images left out.

        ``by="cluster"``: one row per cluster (index ``cluster``) with ``name``, ``size``,
        ``mean_confidence``, ``excluded`` (count), ``label_size`` (images with that name in the
        whole export) and ``shared_with`` (other clusters with the same name; a name shared with
        other clusters or with moved images means they are one label in the export).
        ``by="label"``: one row per label name (index ``label``) with ``size``,
        ``mean_confidence``, ``excluded``, ``clusters`` (cluster ids carrying the name).
        """
        import pandas as pd

        if by not in ("cluster", "label"):
            raise ValueError(f"by must be 'cluster' or 'label', got {by!r}")
        df = self.final_table()
        kept = df[~df["excluded"]]
        names = self.cluster_names()
        by_name: dict[str, list[int]] = {}
        for c, n in names.items():
            by_name.setdefault(n, []).append(c)
        if by == "label":
            g = kept.groupby("label", sort=False)["confidence"]
            labels = self.label_names()
            out = pd.DataFrame(index=pd.Index(labels, name="label", dtype="str"))
            out["size"] = g.size().reindex(out.index, fill_value=0).astype(int)
            out["mean_confidence"] = g.mean().reindex(out.index).astype(float)
            out["excluded"] = (df[df["excluded"]].groupby("label").size()
                               .reindex(out.index, fill_value=0).astype(int))
            out["clusters"] = [by_name.get(n, []) for n in out.index]
            return out
        valid = kept[kept["cluster"].notna()]
        g = valid.groupby(valid["cluster"].astype(np.int64))["confidence"]
        idx = pd.RangeIndex(self.head, name="cluster")
        out = pd.DataFrame(index=idx)
        out["name"] = pd.array([names[c] for c in idx], dtype="str")
        out["size"] = g.size().reindex(idx, fill_value=0).astype(int)
        out["mean_confidence"] = g.mean().reindex(idx).astype(float)
        exc = df[df["excluded"] & df["cluster"].notna()]
        out["excluded"] = (exc.groupby(exc["cluster"].astype(np.int64)).size()
                           .reindex(idx, fill_value=0).astype(int))
        label_sizes = kept.groupby("label").size()
        out["label_size"] = [int(label_sizes.get(names[c], 0)) for c in idx]
        out["shared_with"] = [[o for o in by_name[names[c]] if o != c] for c in idx]
        return out


# ---------------------------------------------------------------------- catalog cache
_CATALOG_CACHE: dict[str, tuple[np.ndarray, np.ndarray]] = {}
_CATALOG_LOCK = threading.Lock()


def _catalog_paths(workspace: Workspace, conn) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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


# ---------------------------------------------------------------------- carry-over
def carry_over(workspace: Workspace, from_run: int, to_run: int, head: int | None = None,
               from_head: int | None = None) -> CarryOverReport:
    """Carry the labels of an earlier run to a new one, matching clusters by shared images.

    Old and new clusters (the models' predictions) are matched one-to-one with the Hungarian
    method (``scipy.optimize.linear_sum_assignment``) on the count of images they share; pairs
    sharing no image stay unmatched. Names of matched clusters that the person had set are
    copied; per-image edits of images present in both runs are copied (a move to an old cluster
    becomes a move to its matched new cluster, or to the old cluster's name if it has no match);
    created labels are copied. Edits the new run already had on those clusters and images are
    replaced; the report lists each one it replaced (``names_overwritten``,
    ``overrides_overwritten``). Everything is one operation in the new run's history (undo takes
    it all back, replaced edits included) and is described in the returned report (also logged).

    Args:
        head: the new run's head (default: its main head).
        from_head: the old run's head (default: the same class count if the old run has it,
            else its main head).
    """
    from scipy.optimize import linear_sum_assignment

    if int(from_run) == int(to_run):
        raise ValueError(f"carry-over needs two different runs, got {from_run} twice")
    new = Labels(workspace, to_run, head)
    if from_head is None:
        old_preds = load_predictions(workspace.resolve_run(from_run).dir, embeddings=False)
        from_head = new.head if new.head in old_preds.heads else None
    old = Labels(workspace, from_run, from_head)

    shared, oi, ni = np.intersect1d(old.image_ids, new.image_ids, return_indices=True)
    oc, nc = old.predicted[oi], new.predicted[ni]
    overlap = np.zeros((old.head, new.head), dtype=np.int64)
    np.add.at(overlap, (oc, nc), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    old_sizes = np.bincount(oc, minlength=old.head)
    new_sizes = np.bincount(nc, minlength=new.head)
    report = CarryOverReport(int(old.run_id), int(new.run_id), old.head, new.head, len(shared))
    mapping: dict[int, int] = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        if overlap[r, c] > 0:
            mapping[r] = c
    with workspace.transaction() as conn:
        ensure_schema(conn)
        old_names = old._names(conn)
        new_names = new._names(conn)
        ops = _Ops()
        for r in range(old.head):
            name = old_names.get(r, old._defaults[r])
            if r in mapping:
                c = mapping[r]
                copied = r in old_names
                report.matched.append({"old": r, "new": c, "overlap": int(overlap[r, c]),
                                       "old_size": int(old_sizes[r]),
                                       "new_size": int(new_sizes[c]), "name": name,
                                       "copied": copied})
                if copied:
                    report.names_copied[c] = name
                    ops.set("names", c, new_names.get(c),
                            None if name == new._defaults[c] else name)
            else:
                report.unmatched_old.append({"old": r, "name": name, "size": int(old_sizes[r])})
        report.unmatched_new = sorted(set(range(new.head)) - set(mapping.values()))

        old_ov = conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                              "WHERE run_id=? AND head=?", old._key()).fetchall()
        shared_set = set(shared.tolist())
        carried = [r for r in old_ov if int(r[0]) in shared_set]
        report.overrides_dropped = len(old_ov) - len(carried)
        current = new._overrides(conn, [int(r[0]) for r in carried])
        new_pred = dict(zip(new.image_ids.tolist(), new.predicted.tolist()))
        for image_id, ocl, olab, oexc in carried:
            image_id = int(image_id)
            cl, lab = None, olab
            if ocl is not None:
                if int(ocl) in mapping:
                    cl = mapping[int(ocl)]
                    if cl == new_pred[image_id]:
                        cl = None
                else:
                    lab = old_names.get(int(ocl), old._defaults[int(ocl)])
            new._set_override(ops, image_id, current.get(image_id), cl, lab, int(oexc))
            report.overrides_carried += 1
        existing = set(new._label_names(conn))
        for name in old._created(conn):
            if name not in existing:
                ops.set("created", name, False, True)
                report.labels_created.append(name)
        changes = ops.to_json()
        by_key = itemgetter(0)
        report.names_overwritten = [
            {"cluster": int(c), "before": before,
             "after": new._defaults[int(c)] if after is None else after}
            for c, before, after in sorted(changes["names"], key=by_key) if before is not None]
        report.overrides_overwritten = [
            {"image_id": int(i), "before": _override_dict(before), "after": _override_dict(after)}
            for i, before, after in sorted(changes["overrides"], key=by_key)
            if before is not None]
        args = {"from_run": report.from_run, "from_head": report.from_head,
                "matched": {str(k): v for k, v in mapping.items()}}
        report.history_id = new._commit(conn, "carry_over", args, ops)
    log.info("%s", report)
    return report
