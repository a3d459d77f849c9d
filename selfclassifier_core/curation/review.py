"""The review queue ("label next"): the images whose answer would teach a refit the most.

An image is a candidate when the person has not checked it (not moved, given a label or
confirmed) and not excluded it. Each candidate gets a *doubt* score: ``1 - margin`` of the main
head (a near tie between two classes) plus the share of the other heads that disagree with it
(its cluster in a finer or coarser head mostly holds images of another main-head cluster).

The queue offers the most central image of each group of the run's finest head (its
sub-groups spread over the whole map), groups nobody checked yet first and the most doubtful
groups first, in turns over the reviewed head's clusters so each gets a few. A whole sub-group
sitting in the wrong cluster is the error a refit can fix, and one answer about its centre
says it. Measured in ``benchmarks/refit.py`` (README "Teach it"): offering the most doubtful
images instead (near-ties at the borders) found more wrong ones but taught the refit less
than random choice. A run with a single head falls back to the most doubtful images, a few
per cluster, spread over each cluster's embedding space.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from ..store.predictions import load_predictions
from .feedback import read_feedback
from .labels import Labels

log = logging.getLogger(__name__)

__all__ = ["review_queue", "DEFAULT_QUEUE"]

DEFAULT_QUEUE = 20
POOL_PER_PICK = 4   # candidates considered per pick inside a cluster (most doubtful first)
MIX = True          # alternate central images of sub-groups with the most doubtful ones
SPREAD = 0.5        # weight of the distance to earlier picks against the doubt


def review_queue(labels: Labels, n: int = DEFAULT_QUEUE, per_cluster: int | None = None,
                 table=None):
    """The next ``n`` images to check, best first.

    Args:
        labels: the run and head to review.
        n: how many images (≥ 1).
        per_cluster: at most this many from one cluster (default: ``ceil(n / clusters with
            candidates)``, at least 1; a cluster gives more only when the others run out).
        table: a :meth:`Labels.final_table` just read, reused instead of reading it again.

    Returns:
        A DataFrame indexed by image id with ``path``, ``label``, ``cluster``, ``confidence``,
        ``margin``, ``disagreement`` (share of the other heads that disagree) and ``doubt``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if per_cluster is not None and (not isinstance(per_cluster, (int, np.integer))
                                    or per_cluster < 1):
        raise ValueError(f"per_cluster must be a positive integer, got {per_cluster!r}")
    table = labels.final_table() if table is None else table
    fb = read_feedback(labels, table)
    cand = ~fb.checked & ~fb.excluded
    run = labels.workspace.get_run(labels.run_id)
    preds = load_predictions(run.dir, embeddings=True)
    pos = preds.position(fb.ids)
    disagree = _disagreement(preds, labels.head, pos, fb.cluster)
    margin = table["margin"].to_numpy(np.float64)
    doubt = (1.0 - margin) + disagree
    emb = np.asarray(preds.embeddings[pos], np.float32) if preds.embeddings is not None else None
    cluster = table["cluster"].fillna(-1).to_numpy(np.int64)

    fine = _finest_head(preds, labels.head)
    if fine is not None and emb is not None:
        central = _representatives(cand, fb.checked, cluster,
                                   preds.heads[fine].cluster[pos].astype(np.int64), doubt, emb,
                                   n, per_cluster)
        if MIX:
            chosen = _interleave(central, _by_doubt(cand, cluster, doubt, emb, n, per_cluster), n)
        else:
            chosen = central
    else:
        chosen = _by_doubt(cand, cluster, doubt, emb, n, per_cluster)
    out = table.iloc[chosen].assign(disagreement=disagree[chosen].round(4),
                                    doubt=doubt[chosen].round(4))
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


def _representatives(cand: np.ndarray, checked: np.ndarray, cluster: np.ndarray,
                     fine: np.ndarray, doubt: np.ndarray, emb: np.ndarray, n: int,
                     per_cluster: int | None) -> list[int]:
    """One image per group of the finest head -- its most central unchecked image -- groups
    without a checked image first, the most doubtful first, taken in turns over the reviewed
    head's clusters; then the next most central image of each group, and so on.

    A group's image stands for the group: its answer (right, or moved) tells a refit about
    the images around it (:func:`~.feedback.plan_refit` lends it to its neighbours), which
    the most doubtful images, alone at the borders, measured here to do less well."""
    x = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    order = np.argsort(fine, kind="stable")
    bounds = np.flatnonzero(np.diff(fine[order])) + 1
    queues: list[list[int]] = []   # per group: its unchecked images, most central first
    score: list[tuple[bool, float]] = []
    for members in np.split(order, bounds):
        rows = members[cand[members]]
        if not len(rows):
            continue
        centre = x[members].mean(0)
        queues.append(rows[np.argsort(-(x[rows] @ centre), kind="stable")].tolist())
        score.append((bool(checked[members].any()), -float(doubt[rows].mean())))
    rank = sorted(range(len(queues)), key=lambda g: score[g])
    limit = per_cluster or n
    per: dict[int, int] = {}
    chosen: list[int] = []
    depth = 0
    while len(chosen) < n:
        by_cluster: dict[int, list[int]] = {}
        for g in rank:  # this round: each group's next image, uncovered and doubtful first
            if depth < len(queues[g]):
                r = queues[g][depth]
                by_cluster.setdefault(int(cluster[r]), []).append(r)
        if not by_cluster:
            break
        for turn in range(max(len(v) for v in by_cluster.values())):
            for c, rows in by_cluster.items():
                if turn < len(rows) and len(chosen) < n and per.get(c, 0) < limit:
                    chosen.append(rows[turn])
                    per[c] = per.get(c, 0) + 1
        depth += 1
    return chosen


def _by_doubt(cand: np.ndarray, cluster: np.ndarray, doubt: np.ndarray,
              emb: np.ndarray | None, n: int, per_cluster: int | None) -> list[int]:
    """Without a finer head: the most doubtful images, few per cluster, spread in each."""
    groups: dict[int, np.ndarray] = {}
    for c in np.unique(cluster[cand]).tolist():
        rows = np.flatnonzero(cand & (cluster == c))
        groups[c] = rows[np.argsort(-doubt[rows], kind="stable")]
    if not groups:
        return []
    quota = per_cluster or max(1, math.ceil(n / len(groups)))
    picks = {c: _spread(rows, doubt, emb, quota) for c, rows in groups.items()}
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
        counts = np.zeros((k, head), np.int64)
        np.add.at(counts, (other, cluster), 1)
        total += counts.argmax(1)[other] != cluster
    return total / len(others)


def _spread(rows: np.ndarray, doubt: np.ndarray, emb: np.ndarray | None, quota: int
            ) -> list[int]:
    """Up to ``quota`` of ``rows`` (sorted by doubt, most first): the most doubtful, then each
    next one maximising its doubt plus :data:`SPREAD` times its distance to the picks so far."""
    pool = rows[:max(quota, quota * POOL_PER_PICK)]
    if emb is None or len(pool) <= 1:
        return pool[:quota].tolist()
    x = emb[pool]
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    chosen = [0]
    dist = 1.0 - x @ x[0]
    d = doubt[pool]
    while len(chosen) < min(quota, len(pool)):
        score = d + SPREAD * dist
        score[chosen] = -np.inf
        nxt = int(np.argmax(score))
        chosen.append(nxt)
        dist = np.minimum(dist, 1.0 - x @ x[nxt])
    return pool[chosen].tolist()
