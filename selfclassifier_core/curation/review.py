"""The review queue ("label next"): the images whose answer would teach a refit the most.

An image is a candidate when the person has not checked it (not moved, given a label or
confirmed) and not excluded it. Each candidate gets a *doubt* score: ``1 - margin`` of the main
head (a near tie between two classes) plus the share of the other heads that disagree with it
(its cluster in a finer or coarser head mostly holds images of another main-head cluster). The
queue takes few images per cluster -- the clusters with the most doubt first, in turns -- and,
inside a cluster, spreads its picks over the embedding space (each next pick trades doubt for
distance from the picks already made), so it does not offer twenty near-duplicates from one
corner of the map.
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
SPREAD = 0.5        # weight of the distance to earlier picks against the doubt


def review_queue(labels: Labels, n: int = DEFAULT_QUEUE, per_cluster: int | None = None):
    """The next ``n`` images to check, best first.

    Args:
        labels: the run and head to review.
        n: how many images (≥ 1).
        per_cluster: at most this many from one cluster (default: ``ceil(n / clusters with
            candidates)``, at least 1; a cluster gives more only when the others run out).

    Returns:
        A DataFrame indexed by image id with ``path``, ``label``, ``cluster``, ``confidence``,
        ``margin``, ``disagreement`` (share of the other heads that disagree) and ``doubt``.
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if per_cluster is not None and (not isinstance(per_cluster, (int, np.integer))
                                    or per_cluster < 1):
        raise ValueError(f"per_cluster must be a positive integer, got {per_cluster!r}")
    fb = read_feedback(labels)
    table = labels.final_table()
    cand = ~fb.checked & ~fb.excluded
    run = labels.workspace.get_run(labels.run_id)
    preds = load_predictions(run.dir, embeddings=True)
    pos = preds.position(fb.ids)
    disagree = _disagreement(preds, labels.head, pos, fb.cluster)
    margin = table["margin"].to_numpy(np.float64)
    doubt = (1.0 - margin) + disagree
    emb = np.asarray(preds.embeddings[pos], np.float32) if preds.embeddings is not None else None
    cluster = table["cluster"].fillna(-1).to_numpy(np.int64)

    groups: dict[int, np.ndarray] = {}
    for c in np.unique(cluster[cand]).tolist():
        rows = np.flatnonzero(cand & (cluster == c))
        groups[c] = rows[np.argsort(-doubt[rows], kind="stable")]
    if not groups:
        return table.iloc[:0].assign(disagreement=[], doubt=[])[_COLUMNS]
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
    out = table.iloc[chosen].assign(disagreement=disagree[chosen].round(4),
                                    doubt=doubt[chosen].round(4))
    return out[_COLUMNS]


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
