"""Carrying a person's labels from an earlier run to a new one (:func:`carry_over`).

Old and new clusters are matched by the images they share; names, per-image edits, created
labels and confirmed images follow the match, as one operation in the new run's label history.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import numpy as np

from ..store.predictions import load_predictions
from ..store.workspace import Workspace, as_workspace
from .labelstate import ChangeSet, LabelStore, ensure_schema

log = logging.getLogger(__name__)


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
    confirmations_carried: int = 0  # confirmed images confirmed in the new run too
    confirmed_moved: int = 0        # of those, moved to keep the label they were confirmed in
    confirmations_dropped: int = 0  # not in the new run, excluded there, or no label to keep
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
        if self.confirmations_carried or self.confirmations_dropped:
            lines.append(f"  {self.confirmations_carried} confirmed images carried ("
                         f"{self.confirmed_moved} moved to keep their label), "
                         f"{self.confirmations_dropped} dropped")
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


@dataclass
class _Match:
    """Old and new clusters matched on the images both runs predicted."""
    shared: np.ndarray                   # image ids in both runs
    mapping: dict[int, int]              # old cluster -> new cluster (pairs sharing images)
    overlap: np.ndarray                  # [old head, new head] images shared
    old_sizes: np.ndarray
    new_sizes: np.ndarray


def carry_over(workspace: Workspace | str | os.PathLike, from_run: int, to_run: int,
               head: int | None = None, from_head: int | None = None) -> CarryOverReport:
    """Carry the labels of an earlier run to a new one, matching clusters by shared images.

    Old and new clusters (the models' predictions) are matched one-to-one with the Hungarian
    method (``scipy.optimize.linear_sum_assignment``) on the count of images they share; pairs
    sharing no image stay unmatched. Names of matched clusters that the person had set are
    copied; per-image edits of images present in both runs are copied (a move to an old cluster
    becomes a move to its matched new cluster, or to the old cluster's name if it has no match);
    created labels are copied; an image the person confirmed is confirmed in the new run too,
    with the label it was confirmed in: where the new run put it in another cluster than the
    match of its old one, it is moved there (or to the old cluster's name, when that cluster
    has no match and the person named it; unnamed, its confirmation is dropped). Edits the new
    run already had on those clusters and images are replaced; the report lists each one it
    replaced (``names_overwritten``, ``overrides_overwritten``). Everything is one operation in
    the new run's history (undo takes it all back, replaced edits included) and is described in
    the returned report (also logged).

    Args:
        workspace: the workspace, or its directory (a path).
        from_run: the earlier run, whose labels are carried.
        to_run: the new run, which gets them.
        head: the new run's head (default: its main head).
        from_head: the old run's head (default: the same class count if the old run has it,
            else its main head).
    """
    if int(from_run) == int(to_run):
        raise ValueError(f"carry-over needs two different runs, got {from_run} twice")
    workspace = as_workspace(workspace)
    new = LabelStore(workspace, to_run, head)
    if from_head is None:
        old_preds = load_predictions(workspace.resolve_run(from_run).dir, embeddings=False)
        from_head = new.head if new.head in old_preds.heads else None
    old = LabelStore(workspace, from_run, from_head)
    match = _match_clusters(old, new)
    report = CarryOverReport(int(old.run_id), int(new.run_id), old.head, new.head,
                             len(match.shared))
    with workspace.transaction() as conn:
        ensure_schema(conn)
        ops = ChangeSet()
        old_names = _carry_names(conn, old, new, match, ops, report)
        _carry_overrides(conn, old, new, match, old_names, ops, report)
        _carry_confirmed(conn, old, new, match, old_names, ops, report)
        _carry_created(conn, old, new, ops, report)
        _list_overwritten(new, ops, report)
        args = {"from_run": report.from_run, "from_head": report.from_head,
                "matched": {str(k): v for k, v in match.mapping.items()}}
        report.history_id = new._commit(conn, "carry_over", args, ops)
    log.info("%s", report)
    return report


def _match_clusters(old: LabelStore, new: LabelStore) -> _Match:
    """Pair old and new clusters one-to-one, most shared images first (Hungarian method)."""
    from scipy.optimize import linear_sum_assignment  # scipy only where carry-over runs

    shared, oi, ni = np.intersect1d(old.image_ids, new.image_ids, return_indices=True)
    oc, nc = old.predicted[oi], new.predicted[ni]
    overlap = np.zeros((old.head, new.head), dtype=np.int64)
    np.add.at(overlap, (oc, nc), 1)
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    mapping = {r: c for r, c in zip(rows.tolist(), cols.tolist()) if overlap[r, c] > 0}
    return _Match(shared, mapping, overlap, np.bincount(oc, minlength=old.head),
                  np.bincount(nc, minlength=new.head))


def _carry_names(conn, old: LabelStore, new: LabelStore, match: _Match, ops: ChangeSet,
                 report: CarryOverReport) -> dict[int, str]:
    """Copy the names the person set on old clusters to their matched new clusters; returns the
    old run's stored names."""
    old_names = old._names(conn)
    new_names = new._names(conn)
    for r in range(old.head):
        name = old_names.get(r, old._defaults[r])
        if r not in match.mapping:
            report.unmatched_old.append({"old": r, "name": name,
                                         "size": int(match.old_sizes[r])})
            continue
        c = match.mapping[r]
        copied = r in old_names
        report.matched.append({"old": r, "new": c, "overlap": int(match.overlap[r, c]),
                               "old_size": int(match.old_sizes[r]),
                               "new_size": int(match.new_sizes[c]), "name": name,
                               "copied": copied})
        if copied:
            report.names_copied[c] = name
            ops.set("names", c, new_names.get(c), None if name == new._defaults[c] else name)
    report.unmatched_new = sorted(set(range(new.head)) - set(match.mapping.values()))
    return old_names


def _carry_overrides(conn, old: LabelStore, new: LabelStore, match: _Match,
                     old_names: dict[int, str], ops: ChangeSet, report: CarryOverReport) -> None:
    """Copy the per-image edits of images in both runs: a move to an old cluster becomes a move
    to its matched new cluster (no edit when that is the image's new prediction), or to the old
    cluster's name when it has no match."""
    old_ov = conn.execute("SELECT image_id, cluster, label, excluded FROM label_overrides "
                          "WHERE run_id=? AND head=?", old._key()).fetchall()
    shared_set = set(match.shared.tolist())
    carried = [r for r in old_ov if int(r[0]) in shared_set]
    report.overrides_dropped = len(old_ov) - len(carried)
    current = new._overrides(conn, [int(r[0]) for r in carried])
    new_pred = dict(zip(new.image_ids.tolist(), new.predicted.tolist()))
    for image_id, ocl, olab, oexc in carried:
        image_id = int(image_id)
        cl, lab = None, olab
        if ocl is not None:
            if int(ocl) in match.mapping:
                cl = match.mapping[int(ocl)]
                if cl == new_pred[image_id]:
                    cl = None
            else:
                lab = old_names.get(int(ocl), old._defaults[int(ocl)])
        new._set_override(ops, image_id, current.get(image_id), cl, lab, int(oexc))
        report.overrides_carried += 1


def _carry_confirmed(conn, old: LabelStore, new: LabelStore, match: _Match,
                     old_names: dict[int, str], ops: ChangeSet, report: CarryOverReport) -> None:
    """Confirm in the new run the images the person confirmed in the old one, each with the
    label it was confirmed in (after :func:`_carry_overrides`: a carried edit already keeps
    it). An image the new run predicts in another cluster than the match of its old one is
    moved to that match, or to the old cluster's name when it has no match; an unnamed
    unmatched cluster leaves nothing to keep (dropped), as does an excluded image."""
    confirmed = sorted(old._confirmed(conn))
    shared_set = set(match.shared.tolist())
    kept = [i for i in confirmed if i in shared_set]
    report.confirmations_dropped = len(confirmed) - len(kept)
    if not kept:
        return
    already = new._confirmed(conn, kept)
    current = new._overrides(conn, kept)
    carried = ops.changes["overrides"]          # image -> [before, after] of the carried edits
    old_pred = dict(zip(old.image_ids.tolist(), old.predicted.tolist()))
    new_pred = dict(zip(new.image_ids.tolist(), new.predicted.tolist()))
    for image_id in kept:
        if image_id in carried:
            after = carried[image_id][1]
            if after is not None and after[2]:  # carried as excluded: nothing to confirm
                report.confirmations_dropped += 1
                continue
        else:
            before = current.get(image_id)
            if before is not None and before[2]:   # the new run excluded it
                report.confirmations_dropped += 1
                continue
            oc = old_pred[image_id]
            target = match.mapping.get(oc)
            if target is None and oc not in old_names:
                report.confirmations_dropped += 1
                continue
            cl = target if target is not None and target != new_pred[image_id] else None
            lab = old_names[oc] if target is None else None
            if (cl, lab) != (None, None) or before is not None:
                new._set_override(ops, image_id, before, cl, lab, 0)
            if cl is not None or lab is not None:
                report.confirmed_moved += 1
        ops.set("confirmed", image_id, image_id in already, True)
        report.confirmations_carried += 1


def _carry_created(conn, old: LabelStore, new: LabelStore, ops: ChangeSet,
                   report: CarryOverReport) -> None:
    """Copy the old run's created labels whose names the new run has no label of."""
    existing = set(new._label_names(conn))
    for name in old._created(conn):
        if name not in existing:
            ops.set("created", name, False, True)
            report.labels_created.append(name)


def _list_overwritten(new: LabelStore, ops: ChangeSet, report: CarryOverReport) -> None:
    """Record in the report the edits of the new run that the carried ones replace."""
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
