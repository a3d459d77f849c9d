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
:meth:`Labels.merge_labels` gives several labels one name. :meth:`Labels.confirm` marks images
whose label the person checked and found right (a refit learns from them as from moved images).

Every operation is one transaction with one history row, so one undo takes back exactly one
operation, whoever made it. The tables, the history and undo/redo are in
:mod:`~selfclassifier_core.curation.labelstate`; carrying labels to a new run is
:func:`~selfclassifier_core.curation.carry.carry_over` (importable from here as before).

Columns of :meth:`Labels.final_table` (indexed by image id):

- ``path`` relative POSIX path; ``label`` the final label name;
- ``cluster`` the cluster the image belongs to after edits (its predicted cluster, the cluster it
  was moved to, or for an image given a label name the lowest cluster currently carrying that
  name; ``<NA>`` if none does); ``predicted_cluster`` the model's cluster;
- ``confidence``, ``margin`` the model's (for its predicted cluster); ``head`` the class count;
- ``edited`` True if the person changed this image individually (moved or excluded; renames and
  merges of whole clusters do not set it); ``excluded`` True if excluded; ``confirmed`` True if
  the person checked that its label is right (:meth:`Labels.confirm`).
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import numpy as np

from ..store.ids import find_ids
from .carry import CarryOverReport, carry_over
from .final import FinalLabels, LabelGroup
from .labelstate import (MAX_NAME_CHARS, ChangeSet, HistoryEntry, LabelStore, count_changes,
                         default_name, ensure_schema, label_order, normalize_name)
from .pathcache import cached_catalog, catalog_rows

__all__ = ["Labels", "FinalLabels", "LabelGroup", "LabelStore", "HistoryEntry",
           "CarryOverReport", "carry_over", "default_name", "normalize_name", "ensure_schema",
           "MAX_NAME_CHARS"]

log = logging.getLogger(__name__)


class Labels(LabelStore):
    """The editable labels of one run and head.

    Args:
        workspace: the workspace, or its directory (a path).
        run_id: the run (default: the newest finished run).
        head: the head's class count (default: the run's main head).
    """

    def __repr__(self) -> str:
        return f"Labels(run={self.run_id}, head={self.head}, images={len(self.image_ids)})"

    # ------------------------------------------------------------------ operations
    def rename(self, cluster: int, name: str) -> int | None:
        """Name a cluster. A name another cluster or label has merges them in the export.

        Returns the history id (None if the name was already that).
        """
        c = self._check_cluster(cluster)
        name = normalize_name(name)
        with self.workspace.transaction() as conn:
            ops = ChangeSet()
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
            ops = ChangeSet()
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
        ops = ChangeSet()
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
            ops = ChangeSet()
            ops.set("created", name, False, True)
            return self._commit(conn, "create_label", {"name": name}, ops)

    def rename_label(self, old: str, new: str) -> int | None:
        """Rename a label everywhere: clusters carrying it, images given it, created labels."""
        old_n = normalize_name(old)
        new_n = normalize_name(new)
        with self.workspace.transaction() as conn:
            if old_n not in self._label_names(conn):
                raise ValueError(f"unknown label {old!r}")
            ops = ChangeSet()
            self._relabel(conn, ops, [old_n], new_n)
            return self._commit(conn, "rename_label", {"old": old_n, "new": new_n}, ops)

    def merge_labels(self, names: Sequence[str], into: str) -> int | None:
        """Give several labels the one name ``into``, as one operation (one undo takes it back).

        A label is a name: carried by several clusters (merged), by one, or by none (a label made
        by moving images, or a created one). Every cluster carrying one of ``names`` is named
        ``into``, images given one of them individually are given ``into``, and created labels
        among them become ``into``. ``into`` may be one of ``names``, another label (they join
        it) or a new name. Raises ValueError naming an unknown label of ``names``, and for an
        empty ``into`` or no names. Returns the history id (None if nothing changed).
        """
        if isinstance(names, str):
            names = [names]
        into_n = normalize_name(into)
        wanted = list(dict.fromkeys(normalize_name(n) for n in names))
        if not wanted:
            raise ValueError("merge_labels needs at least one label name, got none")
        with self.workspace.transaction() as conn:
            known = set(self._label_names(conn))
            for raw in names:
                if normalize_name(raw) not in known:
                    raise ValueError(f"unknown label {raw!r}: no cluster, image or created "
                                     "label has that name")
            ops = ChangeSet()
            self._relabel(conn, ops, wanted, into_n)
            return self._commit(conn, "merge_labels", {"names": wanted, "into": into_n}, ops)

    def _relabel(self, conn, ops: ChangeSet, old_names: Sequence[str], new: str) -> None:
        """Add to ``ops``: clusters, images given a name and created labels called one of
        ``old_names`` (normalised) are called ``new`` instead."""
        olds = set(old_names)
        names = self._names(conn)
        for c in range(self.head):
            if names.get(c, self._defaults[c]) in olds:
                ops.set("names", c, names.get(c), None if new == self._defaults[c] else new)
        for old in old_names:
            for r in conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                                  "WHERE run_id=? AND head=? AND label=?", (*self._key(), old)):
                ops.set("overrides", int(r[0]), [r[1], r[2], int(r[3])], [r[1], new, int(r[3])])
        created = self._created(conn)
        renamed = [old for old in old_names if old in created]
        for old in renamed:
            ops.set("created", old, True, False)
        if renamed:
            ops.set("created", new, new in created, True)

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
            ops = ChangeSet()
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
            if not count_changes(ops.to_json()):
                c = self._defaults.index(name_n)
                raise ValueError(f"label {name_n!r} is the default name of cluster {c}; there "
                                 "is nothing to delete (rename the cluster instead)")
            return self._commit(conn, "delete_label", {"name": name_n}, ops)

    def confirm(self, image_ids: Iterable[int]) -> int | None:
        """Mark images as checked: their current label is right (what a refit learns from).

        Confirming is about the image's label as it is now, moved or not; a later move gives
        the image its new label and it stays checked. Raises ValueError for an excluded image
        (include it first: an excluded image has no label to confirm). Returns the history id
        (None if they were all confirmed already).
        """
        ids = self._check_images(image_ids)
        with self.workspace.transaction() as conn:
            excluded = [i for i, ov in self._overrides(conn, ids).items() if ov[2]]
            if excluded:
                shown = ", ".join(str(i) for i in sorted(excluded)[:10])
                raise ValueError(f"image(s) {shown} are excluded; include them before "
                                 "confirming their label")
            return self._set_confirmed(conn, ids, True)

    def unconfirm(self, image_ids: Iterable[int]) -> int | None:
        """Take the check mark off images again (their label is not changed)."""
        ids = self._check_images(image_ids)
        with self.workspace.transaction() as conn:
            return self._set_confirmed(conn, ids, False)

    def _set_confirmed(self, conn, ids: np.ndarray, flag: bool) -> int | None:
        have = self._confirmed(conn, ids)
        ops = ChangeSet()
        for i in ids.tolist():
            ops.set("confirmed", i, i in have, flag)
        return self._commit(conn, "confirm" if flag else "unconfirm",
                            {"image_ids": ids.tolist()}, ops)

    def confirmed_ids(self) -> np.ndarray:
        """The confirmed image ids, sorted."""
        with self.workspace._conn() as conn:
            return np.array(sorted(self._confirmed(conn)), dtype=np.int64)

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
            confirmed = self._confirmed(conn, ids) if flag else set()
            ops = ChangeSet()
            for i in ids.tolist():
                cur = current.get(i)
                cl, lab = (cur[0], cur[1]) if cur else (None, None)
                self._set_override(ops, i, cur, cl, lab, flag)
                if i in confirmed:  # an excluded image has no label to be right about
                    ops.set("confirmed", i, True, False)
            return self._commit(conn, "exclude" if flag else "include",
                                {"image_ids": ids.tolist()}, ops)


    # ------------------------------------------------------------------ read side
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
        """One consistent snapshot (a read transaction): names, overrides, created, confirmed,
        catalog."""
        conn = self.workspace.connect()
        try:
            conn.execute("BEGIN")
            names = self._names(conn)
            ov = conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                              "WHERE run_id=? AND head=? ORDER BY image_id",
                              self._key()).fetchall()
            created = self._created(conn)
            confirmed = np.array(sorted(self._confirmed(conn)), dtype=np.int64)
            catalog = cached_catalog(self.workspace, conn)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return names, ov, created, confirmed, catalog

    def final_labels(self) -> FinalLabels:
        """The final labels as arrays (:class:`~.final.FinalLabels`): one row per usable image
        with a prediction, each label a code into the label names. What
        :meth:`final_table` is made from, without pandas."""
        names, ov, created, confirmed_ids, cat = self._state()
        cluster_names = [names.get(c, self._defaults[c]) for c in range(self.head)]
        label_names = label_order(cluster_names, created, (r[2] for r in ov if r[2] is not None))
        code_of = {name: i for i, name in enumerate(label_names)}
        cluster_code = np.array([code_of[name] for name in cluster_names], np.int32)
        first_cluster: dict[str, int] = {}
        for c, name in enumerate(cluster_names):
            first_cluster.setdefault(name, c)
        ids, n = self.image_ids, len(self.image_ids)
        cluster = self.predicted.copy()
        edited = np.zeros(n, dtype=bool)
        excluded = np.zeros(n, dtype=bool)
        if ov:
            oid = np.fromiter((r[0] for r in ov), np.int64, len(ov))
            pos, ok = find_ids(ids, oid)
            ov = [r for r, k in zip(ov, ok) if k]
            pos = pos[ok]
            ocl = np.fromiter((-1 if r[1] is None else r[1] for r in ov), np.int64, len(ov))
            ml = np.fromiter((r[2] is not None for r in ov), bool, len(ov))
            oexc = np.fromiter((r[3] for r in ov), np.int64, len(ov)).astype(bool)
            mc = (ocl >= 0) & ~ml
            cluster[pos[mc]] = ocl[mc]
            # an image given a label name: the lowest cluster carrying that name, else none
            cluster[pos[ml]] = [first_cluster.get(r[2], -1) for r, m in zip(ov, ml) if m]
            edited[pos] = (ocl >= 0) | ml | oexc
            excluded[pos] = oexc
        code = cluster_code[np.maximum(cluster, 0)]
        if ov and ml.any():
            code[pos[ml]] = [code_of[r[2]] for r, m in zip(ov, ml) if m]
        cat_ids, cat_paths, cat_ok = cat
        path_rows = None
        if np.array_equal(cat_ids, ids):  # the usual case: row i is the catalog's row i
            usable = cat_ok
        else:
            path_rows, usable = catalog_rows(cat, ids)
        confirmed = np.zeros(n, dtype=bool)  # a few ids among a million: found by bisection
        at, found = find_ids(ids, confirmed_ids)
        confirmed[at[found]] = True
        confirmed &= ~excluded
        columns = dict(ids=ids, codes=code, cluster=cluster, predicted=self.predicted,
                       confidence=self.confidence, margin=self.margin, edited=edited,
                       excluded=excluded, confirmed=confirmed)
        if not usable.all():
            log.info("run %s: %d predicted images are no longer usable in the catalog; left out",
                     self.run_id, int((~usable).sum()))
            columns = {k: v[usable] for k, v in columns.items()}
            path_rows = (np.arange(n) if path_rows is None else path_rows)[usable]
        return FinalLabels(self.run_id, self.head, names=tuple(label_names),
                           cluster_names=tuple(cluster_names), catalog_paths=cat_paths,
                           path_rows=path_rows, **columns)

    def final_table(self):
        """The final labels: one row per usable image with a prediction (see module docs)."""
        return self.final_labels().frame()

    def cluster_summary(self, by: str = "cluster", table=None):
        """Sizes and mean confidences, excluded images left out.

        ``by="cluster"``: one row per cluster (index ``cluster``) with ``name``, ``size``,
        ``mean_confidence``, ``excluded`` (count), ``label_size`` (images with that name in the
        whole export) and ``shared_with`` (other clusters with the same name; a name shared with
        other clusters or with moved images means they are one label in the export).
        ``by="label"``: one row per label name (index ``label``) with ``size``,
        ``mean_confidence``, ``excluded``, ``clusters`` (cluster ids carrying the name).
        ``table`` reuses what was just read: a :meth:`final_table` for ``by="cluster"``, the
        :meth:`final_labels` for ``by="label"`` (counted without pandas:
        :meth:`FinalLabels.groups`).
        """
        import pandas as pd

        if by not in ("cluster", "label"):
            raise ValueError(f"by must be 'cluster' or 'label', got {by!r}")
        if by == "label":
            labels = self.final_labels() if table is None else table
            if not isinstance(labels, FinalLabels):
                raise TypeError("cluster_summary(by='label') reuses final_labels(), not "
                                f"{type(labels).__name__}")
            groups = labels.groups()
            out = pd.DataFrame(index=pd.Index([g.name for g in groups], name="label",
                                              dtype="str"))
            out["size"] = np.array([g.size for g in groups], dtype=int)
            out["mean_confidence"] = np.array([g.mean_confidence for g in groups], float)
            out["excluded"] = np.array([g.excluded for g in groups], dtype=int)
            out["clusters"] = [list(g.clusters) for g in groups]
            return out
        df = self.final_table() if table is None else table
        kept = df[~df["excluded"]]
        names = self.cluster_names()
        by_name: dict[str, list[int]] = {}
        for c, n in names.items():
            by_name.setdefault(n, []).append(c)
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
