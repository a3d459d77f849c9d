"""Nearest neighbours of a set of rows by cosine similarity, exact, in chunks (pure torch).

Fast mode takes each image's nearest neighbours in the pretrained feature space as extra
positives, and a refit averages each image's class probabilities with its neighbours'
(:data:`~..training.config.PREDICT_NEIGHBOURS`). Exact search compares every row with every
other, so it is quadratic: a few seconds for 10,000 rows on a CPU, fine on a GPU; the app's
neighbour search over a whole run is FAISS (:mod:`~..curation.neighbors`).
"""
from __future__ import annotations

import torch

__all__ = ["knn_graph"]


def knn_graph(feats: torch.Tensor, k: int, max_elements: int = 1 << 26) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's k nearest rows by cosine similarity (itself excluded).

    Rows are compared in chunks whose similarity block holds at most ``max_elements`` floats
    (256 MB by default), so memory stays flat however many images there are."""
    n = feats.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.zeros((n, 0), dtype=torch.long, device=feats.device)
    x = torch.nn.functional.normalize(feats.float(), dim=1)
    chunk = max(1, min(n, max_elements // n))
    out = []
    for s in range(0, n, chunk):
        sim = x[s:s + chunk] @ x.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)
