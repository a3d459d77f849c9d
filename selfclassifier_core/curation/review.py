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
MIX = False         # True: alternate the central images with the most doubtful ones
SPREAD = 0.5        # weight of the distance to earlier picks against the doubt
COVER_SAMPLE = 2000  # at most this many members and candidates of a group (cover gain)


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
    emb = _unit_rows(preds.embeddings, pos) if preds.embeddings is not None else None
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
    """First one image per group of the finest head that has no checked image yet -- its most
    central unchecked image --, the most doubtful groups first, taken in turns over the reviewed
    head's clusters. Then, when every group has one, the group furthest below its share of the
    checks (its size over the folder's; random choice's share, in expectation) gets its image
    that best represents what its checked images do not cover yet (:func:`_cover_gain`).

    A group's image stands for the group: its answer (right, or moved) tells a refit about
    the images around it (:func:`~.feedback.plan_refit` lends it to its neighbours), which
    the most doubtful images, alone at the borders, measured here to do less well; a second
    image next to the first would tell it little more."""
    x = emb  # unit rows (_unit_rows)
    order = np.argsort(fine, kind="stable")
    bounds = np.flatnonzero(np.diff(fine[order])) + 1
    groups: list[np.ndarray] = []  # per group: its members (candidates and checked ones)
    score: list[float] = []
    central: list[int] = []        # per group: its most central candidate
    for members in np.split(order, bounds):
        members = members[cand[members] | checked[members]]
        rows = members[cand[members]]
        if not len(rows):
            continue
        centre = x[members].mean(0)
        groups.append(members)
        central.append(int(rows[np.argmax(x[rows] @ centre)]))
        score.append(-float(doubt[rows].mean()))
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
    uncovered = sorted((g for g in range(len(groups)) if not checked[groups[g]].any()),
                       key=lambda g: score[g])
    by_cluster: dict[int, list[int]] = {}
    for g in uncovered:
        by_cluster.setdefault(int(cluster[central[g]]), []).append(central[g])
    for turn in range(max((len(v) for v in by_cluster.values()), default=0)):
        for rows in by_cluster.values():
            if turn < len(rows) and len(chosen) < n and allowed(rows[turn]):
                take(rows[turn])
    # 2. then each group in proportion to its size, its least covered part first
    sizes = np.array([len(m) for m in groups], np.float64)
    have = np.array([int((checked[m] | taken[m]).sum()) for m in groups], np.float64)
    while len(chosen) < n:
        share = sizes * (have.sum() + 1) / sizes.sum() - have
        best = None
        for g in np.argsort(-share, kind="stable").tolist():
            members = groups[g]
            rows = members[cand[members] & ~taken[members]]
            rows = rows[np.fromiter((allowed(r) for r in rows.tolist()), bool,
                                    len(rows))]
            if len(rows):
                best = (g, rows)
                break
        if best is None:
            break
        g, rows = best
        if len(rows) > COVER_SAMPLE:   # a huge group: weigh an even sample of its candidates
            rows = rows[np.linspace(0, len(rows) - 1, COVER_SAMPLE).astype(np.int64)]
        members = groups[g]
        covered = members[checked[members] | taken[members]]
        take(int(rows[np.argmax(_cover_gain(x, members, covered, rows))]))
        have[g] += 1
    return chosen


def _unit_rows(embeddings: np.ndarray, pos: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """``embeddings[pos]`` as float32 unit rows, converted in chunks: a million stored float16
    rows cost their float32 copy (512 MB) and no more."""
    out = np.empty((len(pos), embeddings.shape[1]), np.float32)
    for start in range(0, len(pos), chunk):
        block = out[start:start + chunk]
        block[:] = embeddings[pos[start:start + chunk]]
        block /= np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12)
    return out


def _cover_gain(x: np.ndarray, members: np.ndarray, covered: np.ndarray, rows: np.ndarray
                ) -> np.ndarray:
    """For each of ``rows``: how much closer it would bring the ``members`` of its group to
    their nearest checked image (``covered``), summed over at most :data:`COVER_SAMPLE` of them
    (the facility-location gain: the image that stands for most of what is not covered yet)."""
    if len(members) > COVER_SAMPLE:
        members = members[np.linspace(0, len(members) - 1, COVER_SAMPLE).astype(np.int64)]
    near = (x[members] @ x[covered].T).max(1) if len(covered) else np.zeros(len(members))
    return np.maximum(x[rows] @ x[members].T - near[None, :], 0.0).sum(1)


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
