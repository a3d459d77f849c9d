"""Nearest-neighbour positives (Self-Classifier v2): a queue of past view-1 embeddings.

The queue keeps the last ``size`` view-1 embeddings with the catalog id of their image, as
buffers (so they are saved in checkpoints, like lightly's ``MemoryBankModule``). At the start
of each epoch the trainer asks :meth:`NeighborQueue.neighbor_map` for every queued image's
nearest *other* image and the dataset then draws global view 1 of an image from that
neighbour's picture: the neighbour becomes the positive of the other views.

The queue length is capped below the dataset size (:func:`queue_size_for`) so it fills within
the first epoch even on small folders.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def queue_size_for(n_images: int, requested: int = 65536) -> int:
    """Queue length: ``requested`` but at most half the folder (≥ 1), so it fills in one epoch."""
    if n_images < 2:
        raise ValueError(f"nearest-neighbour positives need ≥ 2 images, got {n_images}")
    return max(1, min(int(requested), n_images // 2))


class NeighborQueue(nn.Module):
    """First-in-first-out queue of L2-normalised embeddings and their image ids.

    Args:
        dim: embedding dimension.
        size: number of entries.
    """

    def __init__(self, dim: int, size: int):
        super().__init__()
        if int(dim) < 1:
            raise ValueError(f"queue dim must be ≥ 1, got {dim!r}")
        if int(size) < 1:
            raise ValueError(f"queue size must be ≥ 1, got {size!r}")
        self.register_buffer("embeddings", torch.zeros(int(size), int(dim)))
        self.register_buffer("ids", torch.full((int(size),), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.ids.numel()

    @property
    def filled(self) -> int:
        return int((self.ids >= 0).sum())

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, ids: torch.Tensor) -> None:
        """Add a batch (oldest entries are overwritten); an id already queued is refreshed."""
        emb = F.normalize(embeddings.detach().float(), dim=1).to(self.embeddings.device)
        ids = ids.detach().long().to(self.ids.device)
        if emb.shape[0] != ids.shape[0]:
            raise ValueError(f"{emb.shape[0]} embeddings but {ids.shape[0]} ids")
        # drop stale copies of the same images so every image appears at most once
        stale = torch.isin(self.ids, ids)
        self.ids[stale] = -1
        n = min(emb.shape[0], self.size)
        emb, ids = emb[-n:], ids[-n:]
        pos = (int(self.ptr) + torch.arange(n, device=self.ids.device)) % self.size
        self.embeddings[pos] = emb
        self.ids[pos] = ids
        self.ptr.fill_((int(self.ptr) + n) % self.size)

    @torch.no_grad()
    def nearest(self, embeddings: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Image id of each row's nearest queued embedding from another image (-1 if none)."""
        q = F.normalize(embeddings.detach().float(), dim=1).to(self.embeddings.device)
        sim = q @ self.embeddings.T
        invalid = (self.ids[None, :] < 0) | (self.ids[None, :] == ids.to(self.ids.device)[:, None])
        sim = sim.masked_fill(invalid, float("-inf"))
        best = sim.argmax(dim=1)
        out = self.ids[best].clone()
        out[torch.isinf(sim.max(dim=1).values)] = -1
        return out

    @torch.no_grad()
    def neighbor_map(self) -> dict[int, int]:
        """``{image id: nearest other image id}`` for every image in the queue."""
        valid = self.ids >= 0
        if int(valid.sum()) < 2:
            return {}
        ids = self.ids[valid]
        nn_ids = self.nearest(self.embeddings[valid], ids)
        return {int(a): int(b) for a, b in zip(ids.tolist(), nn_ids.tolist()) if b >= 0}
