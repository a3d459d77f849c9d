"""Stored predictions of a run: per-image embeddings and, for every head, cluster/confidence/margin.

Files in the run directory (both written atomically):

- ``predictions.npz``: ``image_ids`` int64 [N] (catalog ids, ascending), ``heads`` int64 [H]
  (class count of each head), ``cluster`` int32 [H, N], ``confidence`` float32 [H, N]
  (top-1 probability), ``margin`` float32 [H, N] (top-1 minus top-2 probability).
  With embeddings, also ``centrality`` float32 [N]: how central each image is in its group of
  the finest head (the most classes): its unit embedding's dot product with the mean of its
  group's unit embeddings (:func:`group_centrality`). The review queue orders each group's
  members by it; computed once here, where the embeddings are written, instead of reading a
  million embeddings again in the app. Older files lack it (``None``: computed when needed).
  With it, ``central_order`` int32 [N]: the rows by group of the finest head (ascending), the
  most central first within a group, ties in row order (:func:`central_order`): the sort the
  queue starts from (a million rows: 0.2 s), made once here. Older files lack it.
- ``embeddings.npy``: float16 [N, D], L2-normalised projection output, rows aligned with
  ``image_ids``; loaded memory-mapped.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fsutil import atomic_open, file_identity
from .ids import find_ids

PREDICTIONS_FILE = "predictions.npz"
EMBEDDINGS_FILE = "embeddings.npy"


@dataclass
class HeadPrediction:
    classes: int
    cluster: np.ndarray      # int32 [N]
    confidence: np.ndarray   # float32 [N]
    margin: np.ndarray       # float32 [N]


@dataclass
class Predictions:
    image_ids: np.ndarray                 # int64 [N]
    heads: dict[int, HeadPrediction]      # keyed by class count, in head order
    embeddings: np.ndarray | None = None  # float16 [N, D] (memory-mapped when loaded)
    centrality: np.ndarray | None = None  # float32 [N], in the finest head (module docs)
    central_order: np.ndarray | None = None  # int32 [N]: rows by group, most central first

    @property
    def head_sizes(self) -> list[int]:
        return list(self.heads)

    def head(self, classes: int | None = None) -> HeadPrediction:
        """The head with ``classes`` classes (the first head if None); clear error otherwise."""
        if classes is None:
            return next(iter(self.heads.values()))
        if classes not in self.heads:
            raise ValueError(f"no head with {classes} classes; this run has heads "
                             f"{self.head_sizes}")
        return self.heads[classes]

    def position(self, image_ids) -> np.ndarray:
        """Row positions of catalog ``image_ids`` (KeyError naming a missing id); the rows in
        order, without a search, when they are the run's ids (a million: 0.001 s, not 0.04)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        if len(ids) == len(self.image_ids) and np.array_equal(ids, self.image_ids):
            return np.arange(len(ids))
        pos, found = find_ids(self.image_ids, ids)
        if not found.all():
            raise KeyError(f"image id {int(ids[np.argmin(found)])} has no prediction in this run")
        return pos


def save_predictions(run_dir: str | Path, preds: Predictions) -> None:
    run_dir = Path(run_dir)
    order = np.argsort(preds.image_ids, kind="stable")
    ids = np.asarray(preds.image_ids, dtype=np.int64)[order]
    heads = list(preds.heads.values())
    emb = None if preds.embeddings is None else np.asarray(preds.embeddings, np.float16)[order]
    centre = {}
    if emb is not None and heads:
        finest = preds.heads[max(preds.heads)]
        groups = np.asarray(finest.cluster, np.int64)[order]
        centre["centrality"] = group_centrality(emb, groups, finest.classes)
        centre["central_order"] = central_order(groups, centre["centrality"]).astype(np.int32)
    buf = io.BytesIO()
    np.savez(
        buf,
        image_ids=ids,
        heads=np.array([h.classes for h in heads], dtype=np.int64),
        cluster=np.stack([np.asarray(h.cluster, np.int32)[order] for h in heads]) if heads
        else np.zeros((0, len(ids)), np.int32),
        confidence=np.stack([np.asarray(h.confidence, np.float32)[order] for h in heads]) if heads
        else np.zeros((0, len(ids)), np.float32),
        margin=np.stack([np.asarray(h.margin, np.float32)[order] for h in heads]) if heads
        else np.zeros((0, len(ids)), np.float32),
        **centre,
    )
    if emb is not None:
        with atomic_open(run_dir / EMBEDDINGS_FILE, "wb") as fh:
            np.save(fh, emb)
    with atomic_open(run_dir / PREDICTIONS_FILE, "wb") as fh:
        fh.write(buf.getvalue())


def has_predictions(run_dir: str | Path) -> bool:
    return (Path(run_dir) / PREDICTIONS_FILE).exists()


def predictions_path(run_dir: str | Path) -> Path:
    """The run's predictions file; FileNotFoundError saying what to run when there is none."""
    path = Path(run_dir) / PREDICTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"run {run_dir} has no predictions ({PREDICTIONS_FILE} missing); "
                                "run `predict` on it")
    return path


def prediction_heads(run_dir: str | Path) -> list[int]:
    """The class counts of the heads a run's predictions hold, reading nothing else."""
    with np.load(predictions_path(run_dir)) as z:
        return [int(k) for k in z["heads"]]


def prediction_ids(run_dir: str | Path) -> np.ndarray:
    """The catalog ids (ascending) of the images a run's predictions cover, reading nothing
    else."""
    with np.load(predictions_path(run_dir)) as z:
        return np.asarray(z["image_ids"], np.int64)


def load_predictions(run_dir: str | Path, embeddings: bool = True) -> Predictions:
    run_dir = Path(run_dir)
    path = predictions_path(run_dir)
    with np.load(path) as z:  # each z[...] reads (and inflates) the whole array: once each
        ids, sizes = z["image_ids"], z["heads"]
        cluster, confidence, margin = z["cluster"], z["confidence"], z["margin"]
        centrality = z["centrality"] if "centrality" in z.files else None
        by_centre = z["central_order"] if "central_order" in z.files else None
    heads = {int(k): HeadPrediction(int(k), cluster[i], confidence[i], margin[i])
             for i, k in enumerate(sizes)}
    emb = None
    if embeddings and (run_dir / EMBEDDINGS_FILE).exists():
        emb = np.load(run_dir / EMBEDDINGS_FILE, mmap_mode="r")
    return Predictions(image_ids=ids, heads=heads, embeddings=emb, centrality=centrality,
                       central_order=by_centre)


def unit_rows(embeddings: np.ndarray, pos: np.ndarray | None = None,
              chunk: int = 100_000) -> np.ndarray:
    """``embeddings[pos]`` (all rows when ``pos`` is None) as float32 unit rows, converted in
    chunks: a million stored float16 rows cost their float32 copy (512 MB) and no more."""
    n = len(embeddings) if pos is None else len(pos)
    out = np.empty((n, embeddings.shape[1]), np.float32)
    for start in range(0, n, chunk):
        block = out[start:start + chunk]
        block[:] = (embeddings[start:start + chunk] if pos is None
                    else embeddings[pos[start:start + chunk]])
        norm = np.sqrt(np.einsum("ij,ij->i", block, block))  # a third faster than linalg.norm
        block /= np.maximum(norm, 1e-12)[:, None]
    return out


def group_centrality(embeddings: np.ndarray, groups: np.ndarray, k: int,
                     chunk: int = 100_000) -> np.ndarray:
    """For each row, the dot product of its unit embedding with the mean of the unit embeddings
    of its group (``groups`` [N] in ``0..k-1``): near 1 at a group's centre, lower at its edge.
    Two passes over ``embeddings`` in chunks (float16 or float32; memory-mapped is fine)."""
    groups = np.asarray(groups, np.int64)
    n, d = len(groups), embeddings.shape[1]
    if len(embeddings) != n:
        raise ValueError(f"{len(embeddings)} embeddings for {n} group ids")
    if n and (groups.min() < 0 or groups.max() >= k):
        raise ValueError(f"group ids must lie in 0..{k - 1}")
    sums = np.zeros((k, d), np.float64)
    step = max(1, min(chunk, (1 << 24) // max(k, 1)))  # the one-hot block stays under 64 MB
    for start in range(0, n, step):
        x = unit_rows(embeddings[start:start + step])
        g = groups[start:start + step]
        onehot = np.zeros((k, len(g)), np.float32)
        onehot[g, np.arange(len(g))] = 1.0
        sums += onehot @ x  # per-group sums as one product (np.add.reduceat is slower)
    counts = np.bincount(groups, minlength=k)
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    out = np.empty(n, np.float32)
    for start in range(0, n, chunk):
        x = unit_rows(embeddings[start:start + chunk])
        out[start:start + chunk] = np.einsum("ij,ij->i", x, means[groups[start:start + chunk]])
    return out


def central_order(groups: np.ndarray, centrality: np.ndarray) -> np.ndarray:
    """Rows by ``groups`` ascending, within a group by ``centrality`` descending (ties: the
    lower row first), as int64."""
    return np.lexsort((-np.asarray(centrality), np.asarray(groups)))


def load_run_embeddings(workspace, run_id: int | None = None):
    """``(run, image_ids, embeddings, identity)`` for building caches from a run's embeddings.

    ``run`` is the given run or the newest finished one; ``image_ids`` are the predictions'
    ids (only they are read from ``predictions.npz``: a million rows 0.006 s, the whole file
    0.04-0.16 s); ``embeddings`` are memory-mapped, one row per id; ``identity`` (size and
    mtime of the embeddings file) changes whenever they are rewritten. A run without
    embeddings, or with embeddings that do not match its ids, is a ``WorkspaceError``.
    """
    from .workspace import WorkspaceError

    run = workspace.resolve_run(run_id)
    emb_path = Path(run.dir) / EMBEDDINGS_FILE
    if not emb_path.exists():
        raise WorkspaceError(f"run {run.id} has no embeddings ({emb_path} missing); "
                             "run `predict` on it")
    ids = prediction_ids(run.dir)
    emb = np.load(emb_path, mmap_mode="r")
    if emb.ndim != 2 or len(emb) != len(ids):
        raise WorkspaceError(f"run {run.id}: {emb_path} holds {emb.shape[0] if emb.ndim else 0} "
                             f"rows for {len(ids)} predicted images; run `predict` on it again")
    return run, ids, emb, file_identity(emb_path)
