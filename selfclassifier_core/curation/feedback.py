"""What the person has told us about a run's groups, and the classes a refit gives their labels.

:func:`read_feedback` reads the labels of a run and head (:class:`~.labels.Labels`):

- *checked* images (strong): moved to a cluster, given a label, or confirmed (:meth:`Labels.confirm`);
- *named* images (weak): not checked, in a cluster the person renamed or merged (its label is
  not a default ``cluster_NN`` name): the name anchors a class, its unchecked images count
  :data:`NAMED_WEIGHT` as much as a checked one in a fast refit and nothing in a scratch or
  finetune one (:data:`NAMED_WEIGHTS`, measured in ``benchmarks/refit.py``);
- *excluded* images: left out of training and out of the new run's groups.

:func:`plan_refit` fixes, before training, which class of the new run each label is. Every
cluster of a label stays a class of the new run, named with the label: a merge of two clusters
keeps both, and each merged image keeps its own cluster (an image moved or lent into a merged
label goes to its cluster nearest to it). Letting a merge become one class freed the other
cluster's id, and a refit left it unnamed: without a check and at a learning rate of 1e-12, a
scratch refit of MNIST 2,000 named by majority fell from 0.672 to 0.572 ACC (its images stayed
in that cluster), now 0.668 (``benchmarks/refit.py``). A label no cluster carries (one the
person made, by moving images to it or creating it) takes over the cluster most of its checked
images came from when that is one of a merge's clusters (the person split it off), else a free
id, and the main head grows when there are more labels than classes. The other heads get, for
each label, classes that agree with it (:func:`_head_classes`). The plan holds the
:class:`~..training.targets.Targets` the training reads and the names the new run's clusters
get.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..store.fsutil import atomic_open, atomic_write_text
from ..store.predictions import load_predictions
from ..store.workspace import Workspace, as_workspace
from ..training.targets import Targets, load_targets, save_targets
from .labels import FinalLabels, Labels
from .labelstate import ChangeSet, LabelStore, default_name

log = logging.getLogger(__name__)

__all__ = ["Feedback", "RefitPlan", "EARLIER_LABELS_FILE", "NAMED_WEIGHT", "NAMED_WEIGHTS",
           "REFIT_FILE", "read_feedback", "plan_refit", "save_plan", "read_plan",
           "apply_refit_labels"]

REFIT_FILE = "refit.json"  # in a refit's run directory, next to targets.npz
EARLIER_LABELS_FILE = "refit-labels.npz"  # beside it: the earlier run's label of every image

NAMED_WEIGHT = 0.25  # weight of an unchecked image of a named cluster (checked: 1), fast mode
# ... by the mode of the run refit. A scratch or finetune refit trains the whole network, and
# named images pulling toward their cluster (at full strength: the supervised term is
# normalised by the batch's weights) moved it off the named grouping: benchmarks/refit.py,
# MNIST 2,000, default recipe, no check: 0.672 -> 0.621 at 0.25, 0.683 at 0 (50 checks: 0.761
# either way)
NAMED_WEIGHTS = {"fast": NAMED_WEIGHT, "scratch": 0.0, "finetune": 0.0}
NEIGHBOURS = 80      # each checked image lends its label to this many nearest neighbours
                     # (benchmarks/refit.py, 50 checks: 10 -> 80 gained 0.02-0.09 ACC
                     # on MNIST, digits and emoji; 160 no more)
NEIGHBOUR_WEIGHT = 0.5


@dataclass
class Feedback:
    """The labels of one run and head, read as teaching signal (arrays aligned with ``ids``)."""

    run_id: int
    head: int
    ids: np.ndarray              # usable images with a prediction, ascending
    label: np.ndarray            # final label name (object)
    cluster: np.ndarray          # the run's predicted cluster
    checked: np.ndarray          # bool: moved, given a label or confirmed (not excluded)
    named: np.ndarray            # bool: unchecked, in a cluster the person named
    excluded: np.ndarray         # bool
    confirmed: np.ndarray        # bool
    cluster_names: dict[int, str]
    created: list[str]

    @property
    def n_checked(self) -> int:
        return int(self.checked.sum())

    @property
    def n_named(self) -> int:
        return int(self.named.sum())

    @property
    def n_excluded(self) -> int:
        return int(self.excluded.sum())

    def summary(self) -> str:
        return (f"run {self.run_id} (head {self.head}): {self.n_checked} checked images, "
                f"{self.n_named} more in named clusters, {self.n_excluded} excluded")


def read_feedback(labels: Labels, final: FinalLabels | None = None) -> Feedback:
    """What the person has told us in ``labels`` (see the module docs); ``final`` reuses a
    :meth:`Labels.final_labels` just read."""
    final = labels.final_labels() if final is None else final
    excluded, confirmed = final.excluded, final.confirmed
    moved = final.edited & ~excluded
    checked = (moved | confirmed) & ~excluded
    # a few names for a million images: each image's is taken from them by its code
    names = np.asarray(final.names, dtype=object)
    defaults = {default_name(c, labels.head) for c in range(labels.head)}
    default = np.isin(names, list(defaults))
    named = ~checked & ~excluded & ~default[final.codes]
    with labels.workspace._conn() as conn:
        created = labels._created(conn)
    return Feedback(labels.run_id, labels.head, final.ids, names[final.codes],
                    final.predicted.astype(np.int64, copy=False), checked, named, excluded,
                    confirmed, dict(enumerate(final.cluster_names)), created)


@dataclass
class RefitPlan:
    """The classes of a refit, fixed before it trains."""

    feedback: Feedback
    heads: list[int]                       # the new run's heads, main first
    source_heads: list[int]                # the earlier run's head of each (warm start)
    classes: dict[str, int]                # label -> class of the new main head
    targets: Targets
    names: dict[int, str] = field(default_factory=dict)   # new main-head class -> label

    @property
    def n_labels(self) -> int:
        return len(self.classes)

    def summary(self) -> str:
        grown = self.heads[0] - self.feedback.head
        return (f"{self.n_labels} labels on {self.heads[0]} classes"
                + (f" (grown by {grown} for new labels)" if grown > 0 else "")
                + f"; learns from {self.targets.n_checked} checked images and "
                  f"{len(self.targets) - self.targets.n_checked} in named clusters")


def plan_refit(fb: Feedback, run_heads: list[int], run_dir,
               named_weight: float = NAMED_WEIGHT, neighbours: int = NEIGHBOURS,
               neighbour_weight: float = NEIGHBOUR_WEIGHT) -> RefitPlan:
    """The class of each label in the new run, and the per-image targets (module docs).

    Args:
        fb: :func:`read_feedback` of the earlier run.
        run_heads: the earlier run's heads (class counts, in order).
        run_dir: the earlier run's directory (its predictions give the other heads' classes).
        named_weight: weight of an unchecked image of a named cluster (0: only checked ones).
        neighbours, neighbour_weight: an unchecked image among the ``neighbours`` nearest (in
            the run's embedding; at most the images per label) of a checked image takes that
            image's label with this weight
            (the nearest checked image's, when several; over a named cluster's label).
    """
    for name, w in (("named_weight", named_weight), ("neighbour_weight", neighbour_weight)):
        if not 0 <= w <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {w!r}")
    if not isinstance(neighbours, int) or neighbours < 0:
        raise ValueError(f"neighbours must be an integer >= 0, got {neighbours!r}")
    K = fb.head
    kept = ~fb.excluded
    sizes: dict[str, int] = {}
    for name in fb.label[kept]:
        sizes[name] = sizes.get(name, 0) + 1
    taught = set(fb.label[fb.checked | fb.named].tolist())
    carriers: dict[str, list[int]] = {}
    for c, name in fb.cluster_names.items():
        carriers.setdefault(name, []).append(c)
    classes: dict[str, int] = {}
    for name in sizes:  # labels with images; a cluster's label keeps its lowest cluster id
        if name in carriers:
            classes[name] = min(carriers[name])
    carriers = {n: list(cs) for n, cs in carriers.items() if n in classes}
    extra = sorted((n for n in sizes if n not in classes and n in taught),
                   key=lambda n: (-sizes[n], n))
    for name in extra:  # a label the person made takes over a merged cluster it came from
        c = _taken_over(fb, name, carriers, classes)
        if c is not None:
            classes[name] = c
    # every other cluster of a label stays a class of the new run, named with the label (a
    # merge of two clusters keeps both), so a class no image is pushed out of keeps its name
    kept_classes = {c for cs in carriers.values() for c in cs} | set(classes.values())
    free = [c for c in range(K) if c not in kept_classes]
    others = [k for k in run_heads if k != K]
    new_k = K
    for name in extra:
        if name in classes:
            continue
        if free:
            classes[name] = free.pop(0)
        else:
            new_k += 1
            while new_k in others:  # head sizes are distinct
                new_k += 1
            classes[name] = new_k - 1
    heads = [new_k] + others
    source_heads = [K] + others

    label = fb.label.copy()
    lent = np.zeros(len(fb.ids), bool)
    lending = bool(neighbours and neighbour_weight > 0 and fb.n_checked)
    merged = any(len(cs) > 1 for cs in carriers.values())  # carriers: labels with a class
    preds = (load_predictions(run_dir, embeddings=lending or merged)
             if others or lending or merged else None)
    if lending:
        # at most an average label's share of the images: a few checks of one label must not
        # lend it to the whole folder
        label, lent = _lend_to_neighbours(
            fb, preds, min(neighbours, max(1, int(kept.sum()) // max(1, len(classes)))))
    rows = np.flatnonzero((fb.checked | fb.named | lent) & np.isin(label, list(classes)))
    t_classes = np.full((len(rows), len(heads)), -1, np.int64)
    t_classes[:, 0] = _label_classes(fb, kept, label, rows, carriers, classes, preds)
    if others:
        pos = preds.position(fb.ids)
        for h, k in enumerate(others, start=1):
            t_classes[:, h] = _head_classes(fb, kept, preds.heads[k].cluster[pos].astype(np.int64),
                                            k, rows, label)
    weights = np.where(fb.checked[rows], 1.0,
                       np.where(lent[rows], neighbour_weight, named_weight)).astype(np.float32)
    use = weights > 0
    targets = Targets(heads, fb.ids[rows][use], t_classes[use], weights[use],
                      fb.ids[fb.excluded])
    names = {c: n for n, k in classes.items() for c in carriers.get(n, [k])
             if n != default_name(c, new_k)}
    plan = RefitPlan(fb, heads, source_heads, classes, targets, names)
    log.info("refit plan: %s", plan.summary())
    return plan


def _taken_over(fb: Feedback, name: str, carriers: dict[str, list[int]],
                classes: dict[str, int]) -> int | None:
    """The cluster a new label ``name`` takes over, or None: the cluster most of its checked
    images were in, when its label has another cluster left (it is one of a merge's clusters,
    not yet taken over). Its label keeps the others (``carriers`` and ``classes`` change)."""
    came = fb.cluster[fb.checked & (fb.label == name)]
    if not len(came):
        return None
    c = int(np.bincount(came).argmax())
    owner = next((n for n, cs in carriers.items() if c in cs), None)
    if owner is None or len(carriers[owner]) < 2:
        return None
    carriers[owner].remove(c)
    classes[owner] = min(carriers[owner])
    return c


def _label_classes(fb: Feedback, kept: np.ndarray, label: np.ndarray, rows: np.ndarray,
                   carriers: dict[str, list[int]], classes: dict[str, int],
                   preds) -> np.ndarray:
    """The main-head class of each labelled row: its label's class; for a label that several
    clusters carry (a merge), the row's own cluster when it is one of them, else (moved there,
    or lent the label) the one whose mean embedding is nearest to the row's (the label's lowest
    cluster when the run has no embeddings). ``carriers``: each label with a class -> its
    clusters."""
    out = np.array([classes[n] for n in label[rows]], np.int64)
    merged = {n: cs for n, cs in carriers.items() if len(cs) > 1}
    if not merged:
        return out
    emb = pos = None
    if preds is not None and preds.embeddings is not None:  # rows read as needed, no copy
        emb, pos = preds.embeddings, preds.position(fb.ids)
    own = fb.cluster[rows]
    for name, cs in merged.items():
        mine = np.flatnonzero(label[rows] == name)
        inside = np.isin(own[mine], cs)
        out[mine[inside]] = own[mine[inside]]
        rest = mine[~inside]
        if not len(rest) or emb is None:
            continue
        x = np.asarray(emb[pos[rows[rest]]], np.float32)
        score = np.full((len(rest), len(cs)), -np.inf)
        for j, c in enumerate(cs):
            members = kept & (fb.cluster == c) & (fb.label == name)
            if members.any():  # a cluster of the label left with none of its images: not it
                score[:, j] = x @ np.asarray(emb[pos[members]], np.float32).mean(0)
        out[rest] = np.asarray(cs)[np.argmax(score, axis=1)]
    return out


def _nearest_rows(embeddings: np.ndarray, pos: np.ndarray, queries: np.ndarray, k: int,
                  chunk: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, indices into pos)`` of the ``k`` rows ``embeddings[pos]`` with the
    largest dot product with each query, best first: exact, read in chunks (a million stored
    float16 rows are never copied whole; a flat index would hold them all as float32)."""
    k = min(k, len(pos))
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(pos), chunk):
        block = np.asarray(embeddings[pos[start:start + chunk]], np.float32)
        sims = np.concatenate([best_s, queries @ block.T], axis=1)
        idx = np.concatenate([best_i, np.broadcast_to(
            np.arange(start, start + len(block)), (len(queries), len(block)))], axis=1)
        if sims.shape[1] > k:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            sims, idx = np.take_along_axis(sims, top, 1), np.take_along_axis(idx, top, 1)
        best_s, best_i = sims, idx
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def _lend_to_neighbours(fb: Feedback, preds, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with those of checked images lent to their ``k`` nearest unchecked, kept
    neighbours in the run's embedding (``preds``, the run's predictions; the nearest checked
    image wins). Returns ``(labels, lent)``."""
    if preds.embeddings is None:
        return fb.label.copy(), np.zeros(len(fb.ids), bool)
    pos = preds.position(fb.ids)
    src = np.flatnonzero(fb.checked)
    queries = np.asarray(preds.embeddings[pos[src]], np.float32)
    sims, nbrs = _nearest_rows(preds.embeddings, pos, queries, k + 1)  # + itself
    label = fb.label.copy()
    lent = np.zeros(len(fb.ids), bool)
    best = np.full(len(fb.ids), -np.inf)
    open_ = ~fb.checked & ~fb.excluded
    for s_row, sim_row, nbr_row in zip(src.tolist(), sims, nbrs):
        for sim, j in zip(sim_row.tolist(), nbr_row.tolist()):
            if not open_[j] or sim <= best[j]:
                continue
            best[j] = sim
            label[j] = fb.label[s_row]
            lent[j] = True
    return label, lent


def _head_classes(fb: Feedback, kept: np.ndarray, pred: np.ndarray, k: int,
                  rows: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Classes of head ``k`` for the labelled ``rows`` that agree with their labels.

    A cluster of head ``k`` belongs to the label most of its (kept) images carry. An image keeps
    its own cluster when that belongs to its label (a finer head keeps its finer split inside
    the label); otherwise it goes to the largest cluster belonging to its label, or, when none
    does (a coarser head), to the cluster most of the label's images are in.
    """
    labels = fb.label[kept]
    p = pred[kept]
    uniq, inv = np.unique(labels, return_inverse=True)
    counts = np.zeros((k, len(uniq)), np.int64)
    np.add.at(counts, (p, inv), 1)
    owner = np.where(counts.sum(1) > 0, counts.argmax(1), -1)   # cluster -> label index
    index = {n: i for i, n in enumerate(uniq.tolist())}
    best: dict[int, int] = {}
    for li in range(len(uniq)):
        owned = np.flatnonzero(owner == li)
        best[li] = int(owned[np.argmax(counts[owned, li])]) if len(owned) \
            else int(counts[:, li].argmax())
    out = np.empty(len(rows), np.int64)
    for j, r in enumerate(rows.tolist()):
        li = index.get(label[r])
        if li is None:  # pragma: no cover - labelled rows are kept rows
            out[j] = -1
        elif owner[pred[r]] == li:
            out[j] = pred[r]
        else:
            out[j] = best[li]
    return out


# --------------------------------------------------------------------------- the new run's labels
def save_plan(run_dir: str | os.PathLike, plan: RefitPlan) -> None:
    """Write the plan into the new run's directory: ``targets.npz`` (what training reads) and
    ``refit.json`` (what the new run's labels get when it is done, and what it learned from)."""
    fb = plan.feedback
    save_targets(run_dir, plan.targets)
    names, codes = np.unique(np.asarray(fb.label, dtype=str), return_inverse=True)
    with atomic_open(Path(run_dir) / EARLIER_LABELS_FILE, "wb") as fh:  # ~5 MB a million
        np.savez(fh, ids=np.asarray(fb.ids, np.int64), codes=codes.astype(np.int32),
                 names=names)
    record = {"of": fb.run_id, "head": fb.head, "heads": plan.heads,
              "classes": plan.classes, "names": {str(k): v for k, v in plan.names.items()},
              "created": [n for n in fb.created if n not in plan.classes],
              "checked": fb.n_checked, "named": fb.n_named, "excluded": fb.n_excluded,
              "applied": None}
    atomic_write_text(Path(run_dir) / REFIT_FILE, json.dumps(record, ensure_ascii=False))


def _earlier_labels(run_dir: Path, plan: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, labels)`` of the earlier run when the refit was planned (a refit planned by
    an earlier release kept them in ``refit.json``)."""
    if "labels" in plan:
        return (np.asarray(plan["labels"]["ids"], np.int64),
                np.asarray(plan["labels"]["label"], dtype=object))
    with np.load(run_dir / EARLIER_LABELS_FILE) as z:
        return z["ids"], z["names"].astype(object)[z["codes"]]


def read_plan(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``refit.json`` of a run (None when the run is not a refit)."""
    path = Path(run_dir) / REFIT_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def apply_refit_labels(workspace: Workspace | str | os.PathLike, run_id: int) -> dict[str, Any]:
    """Give a finished refit's groups the person's names and keep every image they checked.

    Clusters get their labels' names (the classes were fixed before training); an image the
    person checked keeps its label: confirmed where the new model agrees, moved to its label's
    cluster where it does not; excluded images stay excluded; created labels that got no class
    are created again. One operation in the new run's history (``refit``). Done once: later
    calls return the stored outcome. Returns ``{"changed", "compared", "moved", "confirmed",
    "history_id"}``: ``changed`` counts images whose label differs from the earlier run's.
    """
    ws = as_workspace(workspace)
    run = ws.get_run(run_id)
    plan = read_plan(run.dir)
    targets = load_targets(run.dir)
    if plan is None or targets is None:
        raise ValueError(f"run {run_id} is not a refit (no {REFIT_FILE} in {run.dir})")
    if plan.get("applied"):
        return plan["applied"]
    store = LabelStore(ws, run_id, plan["heads"][0])
    names = {int(k): v for k, v in plan["names"].items()}
    checked = targets.image_ids[targets.weights >= 1]
    want = targets.lookup(checked)[0][:, 0].numpy()
    in_run = np.isin(checked, store.image_ids)
    checked, want = checked[in_run], want[in_run]
    excluded = targets.excluded[np.isin(targets.excluded, store.image_ids)]
    predicted = store._predicted_of(checked) if len(checked) else np.zeros(0, np.int64)
    with ws.transaction() as conn:
        ops = ChangeSet()
        stored = store._names(conn)
        for c, name in names.items():
            if c < store.head:
                ops.set("names", c, stored.get(c), name)
        current = store._overrides(conn, np.concatenate([checked, excluded]).tolist())
        moved = confirmed = 0
        for i, c, p in zip(checked.tolist(), want.tolist(), predicted.tolist()):
            if c == p or (c in names and names.get(p) == names[c]):  # one of its label's
                ops.set("confirmed", i, False, True)
                confirmed += 1
            else:
                store._set_override(ops, i, current.get(i), int(c), None, 0)
                moved += 1
        for i in excluded.tolist():
            store._set_override(ops, i, current.get(i), None, None, 1)
        for name in plan["created"]:
            ops.set("created", name, False, True)
        history_id = store._commit(conn, "refit", {"from_run": plan["of"]}, ops)
    new = Labels(ws, run_id, store.head).final_labels()
    old_ids, old_label = _earlier_labels(run.dir, plan)
    shared, oi, ni = np.intersect1d(old_ids, new.ids, return_indices=True)
    kept = ~new.excluded[ni]
    new_label = np.asarray(new.names, dtype=object)[new.codes[ni]]
    changed = int((old_label[oi][kept] != new_label[kept]).sum())
    outcome = {"changed": changed, "compared": int(kept.sum()), "moved": moved,
               "confirmed": confirmed, "history_id": history_id}
    plan["applied"] = outcome
    atomic_write_text(run.dir / REFIT_FILE, json.dumps(plan, ensure_ascii=False))
    log.info("refit run %d: names applied; %d of %d images changed label (%d checked images "
             "kept by a move)", run_id, changed, outcome["compared"], moved)
    return outcome
