"""The review queue ("label next"): the images whose answer would teach a refit the most.

An image is a candidate when the person has not checked it (not moved, given a label or
confirmed) and not excluded it. Each candidate gets a *doubt* score: ``1 - margin`` of the main
head (a near tie between two classes) plus the share of the other heads that disagree with it
(its cluster in a finer or coarser head mostly holds images of another main-head cluster).

The queue offers the most central image of each group of the run's finest head (its
sub-groups spread over the whole map), groups nobody checked yet first and the most doubtful
groups first, in turns over the reviewed head's clusters. A whole sub-group sitting in the
wrong cluster is the error a refit can fix, and one answer about its centre says it. Once
every group has a checked image, each next image comes from the group furthest below its
share of the checks (its share of the images, what random choice gives in expectation) and is
the one that stands for most of that group's images no checked image is close to yet, so the
checks cover the folder as a refit lends them to their neighbours
(:func:`~.feedback.plan_refit`). Measured in ``benchmarks/refit.py`` (README "Teach it"):
offering the most doubtful images (near-ties at the borders) found more wrong ones but taught
the refit less than random choice, and mixing them in (:data:`MIX`) taught less than the
central images alone (50 checks, lending to 80 neighbours: MNIST 0.809 vs 0.813, digits
0.838 vs 0.852, emoji 0.635 vs 0.654); taking each group's next most central image instead of
its share taught less at 100 and 200 checks. A run with a single head falls back to the most
doubtful images, a few per cluster, spread over each cluster's embedding space.

What no edit changes -- each image's doubt, its group, the order of each group's members by
how central they are (the predictions' ``central_order``, written with them) -- is a
:class:`ReviewBasis`, made once per run (:func:`review_basis`; the app keeps it), so that
choosing the queue again after a check costs the size of the few groups it picks from
(``benchmarks/scale.py`` gives the figures at a million images).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..store.predictions import central_order, group_centrality, unit_rows
from .feedback import read_feedback
from .labels import FinalLabels, Labels

log = logging.getLogger(__name__)

__all__ = ["review_queue", "review_basis", "ReviewBasis", "DEFAULT_QUEUE"]

DEFAULT_QUEUE = 20
POOL_PER_PICK = 4   # candidates considered per pick inside a cluster (most doubtful first)
MIX = False         # True: alternate the central images with the most doubtful ones
SPREAD = 0.5        # weight of the distance to earlier picks against the doubt
COVER_SAMPLE = 2000  # at most this many members of a group weigh a candidate (cover gain)
COVER_CANDIDATES = 500  # at most this many of a group's candidates are weighed for one pick
                        # (a million images, 12 picks after every group has one: 2,000
                        # candidates cost 0.32 s; the refit benchmark's groups are smaller)


@dataclass(frozen=True)
class ReviewBasis:
    """What the queue needs from a run and head that no edit changes, made once
    (:func:`review_basis`) and reused for every label version (at a million images, sorting
    each group's members by how central they are is most of the work).

    Arrays are aligned with ``ids`` (the rows of :meth:`Labels.final_labels`). The embeddings
    stay memory-mapped: :meth:`unit` reads the few rows a pick weighs."""

    ids: np.ndarray             # int64: the final labels' image ids
    doubt: np.ndarray           # float64: 1 - margin + disagreement
    disagreement: np.ndarray    # float64: share of the other heads that disagree
    embeddings: Any             # float16 [N, D] memory map (None: the run has none)
    pos: np.ndarray             # int64: each row's row in ``embeddings``
    fine: np.ndarray | None     # int64: each row's group in the finest head (None: no finer head)
    order: np.ndarray | None    # rows by group, ascending within a group
    starts: np.ndarray | None   # group g is ``order[starts[g]:starts[g + 1]]``
    by_centre: np.ndarray | None  # rows by group, the nearest to the group's mean first

    def unit(self, rows: np.ndarray) -> np.ndarray:
        """The embeddings of ``rows`` as float32 unit rows."""
        return unit_rows(self.embeddings, self.pos[rows])

    def members(self, g: int) -> np.ndarray:
        return self.order[self.starts[g]:self.starts[g + 1]]


def review_basis(labels: Labels, final: FinalLabels | None = None) -> ReviewBasis:
    """The :class:`ReviewBasis` of ``labels``' run and head (``final``: a
    :meth:`Labels.final_labels` just read, or some of its rows)."""
    final = labels.final_labels() if final is None else final
    ids = final.ids
    preds = labels.run_predictions()
    pos = preds.position(ids)
    same = len(pos) == len(preds.image_ids)  # (ids are unique: every row of the run, in order)
    predicted = final.predicted.astype(np.int64, copy=False)
    disagree = _disagreement(preds, labels.head, pos, predicted)
    doubt = (1.0 - final.margin.astype(np.float64)) + disagree
    emb = preds.embeddings
    k = _finest_head(preds, labels.head)
    if k is None or emb is None:
        return ReviewBasis(ids, doubt, disagree, emb, pos, None, None, None, None)
    fine = preds.heads[k].cluster[pos].astype(np.int64)
    order = np.argsort(fine.astype(np.int16) if k <= 2 ** 15 else fine, kind="stable")
    starts = np.r_[0, np.cumsum(np.bincount(fine, minlength=k))]
    # each group's members, the most central first (ties: lowest row): the predictions'
    # order of their rows, written with them (older runs: sorted now), kept to the table's
    by_pred = preds.central_order
    if by_pred is None:
        centrality = preds.centrality
        if centrality is None:
            centrality = group_centrality(emb, preds.heads[k].cluster, k)
        by_pred = central_order(preds.heads[k].cluster, centrality)
    by_pred = np.asarray(by_pred, np.int64)
    if same:
        by_centre = by_pred
    else:
        row = np.full(len(preds.image_ids), -1, np.int64)
        row[pos] = np.arange(len(pos))
        by_centre = row[by_pred]
        by_centre = by_centre[by_centre >= 0]
    return ReviewBasis(ids, doubt, disagree, emb, pos, fine, order, starts, by_centre)


def review_queue(labels: Labels, n: int = DEFAULT_QUEUE, per_cluster: int | None = None,
                 final: FinalLabels | None = None, basis: ReviewBasis | None = None,
                 feedback=None):
    """The next ``n`` images to check, best first.

    Args:
        labels: the run and head to review.
        n: how many images (≥ 1).
        per_cluster: at most this many from one cluster (default: ``ceil(n / clusters with
            candidates)``, at least 1; a cluster gives more only when the others run out).
        final: a :meth:`Labels.final_labels` just read, reused instead of reading them again.
        basis: a :func:`review_basis` of the same run, head and images, reused (one made for
            other images is made again).
        feedback: a :func:`~.feedback.read_feedback` of ``final``, reused.

    Returns:
        A DataFrame indexed by image id with ``path``, ``label``, ``cluster``, ``confidence``,
        ``margin``, ``disagreement`` (share of the other heads that disagree) and ``doubt``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if per_cluster is not None and (not isinstance(per_cluster, (int, np.integer))
                                    or per_cluster < 1):
        raise ValueError(f"per_cluster must be a positive integer, got {per_cluster!r}")
    final = labels.final_labels() if final is None else final
    fb = read_feedback(labels, final) if feedback is None else feedback
    if basis is None or not np.array_equal(basis.ids, fb.ids):
        basis = review_basis(labels, final)
    cand = ~fb.checked & ~fb.excluded
    cluster = final.cluster
    if basis.fine is not None:
        central = _representatives(basis, cand, fb.checked, fb.excluded, cluster, n,
                                   per_cluster)
        if MIX:
            chosen = _interleave(central, _by_doubt(cand, cluster, basis, n, per_cluster), n)
        else:
            chosen = central
    else:
        chosen = _by_doubt(cand, cluster, basis, n, per_cluster)
    out = final.take(chosen).frame().assign(disagreement=basis.disagreement[chosen].round(4),
                                            doubt=basis.doubt[chosen].round(4))
    return out[_COLUMNS]


def _interleave(a: list[int], b: list[int], n: int) -> list[int]:
    out: list[int] = []
    seen: set[int] = set()
    for pair in zip(a, b):
        for r in pair:
            if r not in seen and len(out) < n:
                out.append(r)
                seen.add(r)
    for r in a[len(b):] + b[len(a):]:
        if r not in seen and len(out) < n:
            out.append(r)
            seen.add(r)
    return out


def _finest_head(preds, head: int) -> int | None:
    """The head with the most classes, when it is finer than the one reviewed."""
    k = max(preds.head_sizes)
    return k if k > head else None


def _representatives(basis: ReviewBasis, cand: np.ndarray, checked: np.ndarray,
                     excluded: np.ndarray, cluster: np.ndarray, n: int,
                     per_cluster: int | None) -> list[int]:
    """First one image per group of the finest head that has no checked image yet -- its most
    central unchecked image --, the most doubtful groups first, taken in turns over the reviewed
    head's clusters. Then, when every group has one, the group furthest below its share of the
    checks (its size over the folder's; random choice's share, in expectation) gets its image
    that best represents what its checked images do not cover yet (:func:`_cover_gain`).

    A group's image stands for the group: its answer (right, or moved) tells a refit about
    the images around it (:func:`~.feedback.plan_refit` lends it to its neighbours), which
    the most doubtful images, alone at the borders, measured here to do less well; a second
    image next to the first would tell it little more.

    A group's centre is the mean of its members that are not excluded: the basis orders the
    members by their distance to the mean of all, and only groups with an excluded member are
    weighed again. Everything else is counted per group at once, so a pick costs the size of
    one group, not of the folder."""
    fine, starts = basis.fine, basis.starts
    k = len(starts) - 1
    n_cand = np.bincount(fine[cand], minlength=k)
    n_checked = np.bincount(fine[checked], minlength=k)
    live = np.flatnonzero(n_cand)   # the groups with a candidate, in group order
    if not len(live):
        return []
    # each group's most central candidate: the first candidate in the basis order ...
    hits = np.flatnonzero(cand[basis.by_centre])
    first = np.searchsorted(hits, starts[live])
    central = np.full(k, -1, np.int64)
    central[live] = basis.by_centre[hits[first]]   # n_cand > 0: the hit lies in the group
    # ... but the centre of a group with excluded members is the mean of the others
    for g in np.intersect1d(np.unique(fine[excluded]), live).tolist():
        members = basis.members(g)
        members = members[~excluded[members]]
        rows = members[cand[members]]
        x = basis.unit(members)
        central[g] = int(rows[np.argmax(x[cand[members]] @ x.mean(0))])
    doubt_sum = np.bincount(fine[cand], weights=basis.doubt[cand], minlength=k)
    score = -(doubt_sum[live] / n_cand[live])   # most doubtful groups first
    limit = per_cluster or n
    per: dict[int, int] = {}
    chosen: list[int] = []
    taken = np.zeros(len(cand), bool)

    def allowed(r: int) -> bool:
        return per.get(int(cluster[r]), 0) < limit

    def take(r: int) -> None:
        chosen.append(r)
        taken[r] = True
        per[int(cluster[r])] = per.get(int(cluster[r]), 0) + 1

    # 1. the centre of every group nobody checked yet
    open_ = n_checked[live] == 0
    by_cluster: dict[int, list[int]] = {}
    for g in live[open_][np.argsort(score[open_], kind="stable")].tolist():
        by_cluster.setdefault(int(cluster[central[g]]), []).append(int(central[g]))
    for turn in range(max((len(v) for v in by_cluster.values()), default=0)):
        if len(chosen) >= n:
            break
        for rows in by_cluster.values():
            if turn < len(rows) and len(chosen) < n and allowed(rows[turn]):
                take(rows[turn])
    # 2. then each group in proportion to its size, its least covered part first
    sizes = (n_cand + n_checked)[live].astype(np.float64)
    have = (n_checked + np.bincount(fine[taken], minlength=k))[live].astype(np.float64)
    while len(chosen) < n:
        share = sizes * (have.sum() + 1) / sizes.sum() - have
        full = [c for c, m in per.items() if m >= limit]
        best = None
        for j in np.argsort(-share, kind="stable").tolist():
            members = basis.members(int(live[j]))
            rows = members[cand[members] & ~taken[members]]
            if full:
                rows = rows[~np.isin(cluster[rows], full)]
            if len(rows):
                best = (j, members[~excluded[members]], rows)
                break
        if best is None:
            break
        j, members, rows = best
        if len(rows) > COVER_CANDIDATES:   # a huge group: weigh an even sample of them
            rows = rows[np.linspace(0, len(rows) - 1, COVER_CANDIDATES).astype(np.int64)]
        covered = members[checked[members] | taken[members]]
        take(int(rows[np.argmax(_cover_gain(basis, members, covered, rows))]))
        have[j] += 1
    return chosen


def _cover_gain(basis: ReviewBasis, members: np.ndarray, covered: np.ndarray,
                rows: np.ndarray) -> np.ndarray:
    """For each of ``rows``: how much closer it would bring the ``members`` of its group to
    their nearest checked image (``covered``), summed over at most :data:`COVER_SAMPLE` of them
    (the facility-location gain: the image that stands for most of what is not covered yet)."""
    if len(members) > COVER_SAMPLE:
        members = members[np.linspace(0, len(members) - 1, COVER_SAMPLE).astype(np.int64)]
    xm = basis.unit(members)
    near = (xm @ basis.unit(covered).T).max(1) if len(covered) else np.zeros(len(members))
    return np.maximum(basis.unit(rows) @ xm.T - near[None, :], 0.0).sum(1)


def _by_doubt(cand: np.ndarray, cluster: np.ndarray, basis: ReviewBasis, n: int,
              per_cluster: int | None) -> list[int]:
    """Without a finer head: the most doubtful images, few per cluster, spread in each."""
    doubt = basis.doubt
    groups: dict[int, np.ndarray] = {}
    for c in np.unique(cluster[cand]).tolist():
        rows = np.flatnonzero(cand & (cluster == c))
        groups[c] = rows[np.argsort(-doubt[rows], kind="stable")]
    if not groups:
        return []
    quota = per_cluster or max(1, math.ceil(n / len(groups)))
    picks = {c: _spread(rows, basis, quota) for c, rows in groups.items()}
    order = sorted(groups, key=lambda c: -float(doubt[groups[c][:quota]].mean()))
    chosen: list[int] = []
    for turn in range(quota):
        for c in order:
            if turn < len(picks[c]) and len(chosen) < n:
                chosen.append(picks[c][turn])
    if len(chosen) < n and per_cluster is None:  # other clusters ran out: top up by doubt
        taken = set(chosen)
        rest = [r for r in np.argsort(-doubt, kind="stable").tolist() if cand[r]
                and r not in taken]
        chosen += rest[:n - len(chosen)]
    return chosen


_COLUMNS = ["path", "label", "cluster", "confidence", "margin", "disagreement", "doubt"]


def _disagreement(preds, head: int, pos: np.ndarray, cluster: np.ndarray) -> np.ndarray:
    """For each image, the share of the other heads in which its cluster mostly holds images of
    another main-head cluster than its own."""
    others = [k for k in preds.head_sizes if k != head]
    if not others:
        return np.zeros(len(pos))
    total = np.zeros(len(pos))
    for k in others:
        other = preds.heads[k].cluster[pos].astype(np.int64)
        counts = np.bincount(other * head + cluster, minlength=k * head).reshape(k, head)
        total += counts.argmax(1)[other] != cluster
    return total / len(others)


def _spread(rows: np.ndarray, basis: ReviewBasis, quota: int) -> list[int]:
    """Up to ``quota`` of ``rows`` (sorted by doubt, most first): the most doubtful, then each
    next one maximising its doubt plus :data:`SPREAD` times its distance to the picks so far."""
    pool = rows[:max(quota, quota * POOL_PER_PICK)]
    if basis.embeddings is None or len(pool) <= 1:
        return pool[:quota].tolist()
    x = basis.unit(pool)
    chosen = [0]
    dist = 1.0 - x @ x[0]
    d = basis.doubt[pool]
    while len(chosen) < min(quota, len(pool)):
        score = d + SPREAD * dist
        score[chosen] = -np.inf
        nxt = int(np.argmax(score))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
    return pool[chosen].tolist()
