"""Stored predictions of a run: per-image embeddings and, for every head, cluster/confidence/margin.

Files in the run directory (both written atomically):

- ``predictions.npz``: ``image_ids`` int64 [N] (catalog ids, ascending), ``heads`` int64 [H]
  (class count of each head), ``cluster`` int32 [H, N], ``confidence`` float32 [H, N]
  (top-1 probability), ``margin`` float32 [H, N] (top-1 minus top-2 probability).
- ``embeddings.npy``: float16 [N, D], L2-normalised projection output, rows aligned with
  ``image_ids``; loaded memory-mapped.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fsutil import atomic_open, file_identity

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
        """Row positions of catalog ``image_ids`` (KeyError naming a missing id)."""
        ids = np.asarray(image_ids, dtype=np.int64)
        pos = np.searchsorted(self.image_ids, ids)
        pos = np.clip(pos, 0, len(self.image_ids) - 1)
        bad = self.image_ids[pos] != ids if len(self.image_ids) else np.ones(len(ids), bool)
        if np.any(bad):
            raise KeyError(f"image id {int(ids[np.argmax(bad)])} has no prediction in this run")
        return pos


def save_predictions(run_dir: str | Path, preds: Predictions) -> None:
    run_dir = Path(run_dir)
    order = np.argsort(preds.image_ids, kind="stable")
    ids = np.asarray(preds.image_ids, dtype=np.int64)[order]
    heads = list(preds.heads.values())
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
    )
    if preds.embeddings is not None:
        with atomic_open(run_dir / EMBEDDINGS_FILE, "wb") as fh:
            np.save(fh, np.asarray(preds.embeddings, dtype=np.float16)[order])
    with atomic_open(run_dir / PREDICTIONS_FILE, "wb") as fh:
        fh.write(buf.getvalue())


def has_predictions(run_dir: str | Path) -> bool:
    return (Path(run_dir) / PREDICTIONS_FILE).exists()


def load_predictions(run_dir: str | Path, embeddings: bool = True) -> Predictions:
    run_dir = Path(run_dir)
    path = run_dir / PREDICTIONS_FILE
    if not path.exists():
        raise FileNotFoundError(f"run {run_dir} has no predictions ({PREDICTIONS_FILE} missing); "
                                "run `predict` on it")
    with np.load(path) as z:  # each z[...] reads (and inflates) the whole array: once each
        ids, sizes = z["image_ids"], z["heads"]
        cluster, confidence, margin = z["cluster"], z["confidence"], z["margin"]
    heads = {int(k): HeadPrediction(int(k), cluster[i], confidence[i], margin[i])
             for i, k in enumerate(sizes)}
    emb = None
    if embeddings and (run_dir / EMBEDDINGS_FILE).exists():
        emb = np.load(run_dir / EMBEDDINGS_FILE, mmap_mode="r")
    return Predictions(image_ids=ids, heads=heads, embeddings=emb)


def load_run_embeddings(workspace, run_id: int | None = None):
    """``(run, predictions, identity)`` for building caches from a run's embeddings.

    ``run`` is the given run or the newest finished one; ``predictions`` carries the
    memory-mapped embeddings; ``identity`` (size and mtime of the embeddings file) changes
    whenever they are rewritten. A run without embeddings is a ``WorkspaceError``.
    """
    from .workspace import WorkspaceError

    run = workspace.resolve_run(run_id)
    emb_path = Path(run.dir) / EMBEDDINGS_FILE
    if not emb_path.exists():
        raise WorkspaceError(f"run {run.id} has no embeddings ({emb_path} missing); "
                             "run `predict` on it")
    return run, load_predictions(run.dir), file_identity(emb_path)
