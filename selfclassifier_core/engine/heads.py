"""Projection MLP and the cosine classifier heads of Self-Classifier."""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["ProjectionMLP", "CosineLinear", "ClassifierHeads"]


class ProjectionMLP(nn.Module):
    """MLP from backbone features to an L2-normalised embedding.

    ``num_layers`` linear layers; every layer but the last is followed by batch-norm (optional)
    and ReLU. With ``num_layers=1`` it is a single linear map.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int = 128,
        num_layers: int = 2,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim),
                            ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=1)


class CosineLinear(nn.Module):
    """Linear layer without bias whose weight rows are normalised to unit length in forward.

    This is weight normalisation with the gain fixed to 1 (a cosine classifier): with unit-norm
    inputs the logits lie in [-1, 1].
    """

    def __init__(self, in_dim: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_dim))
        nn.init.normal_(self.weight, std=0.01)
        self.in_dim = in_dim
        self.num_classes = num_classes

    def normalized_weight(self) -> torch.Tensor:
        """The effective ``[num_classes, in_dim]`` weight (unit rows)."""
        return F.normalize(self.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight())

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, num_classes={self.num_classes}"


class ClassifierHeads(nn.Module):
    """One cosine classifier per class count, in an ``nn.ModuleList``.

    Heads are identified by their class count, so ``sizes`` must be distinct positive ints.
    ``forward(x)`` returns a list of ``[N, C_k]`` logits in the order of ``sizes``.
    """

    def __init__(self, in_dim: int, sizes: Sequence[int]) -> None:
        super().__init__()
        sizes = list(sizes)
        if not sizes:
            raise ValueError("sizes is empty: need at least one head")
        for k in sizes:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"head sizes must be positive ints, got {k!r} in {sizes}")
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"head sizes must be distinct, got {sizes}")
        self.sizes = sizes
        self.heads = nn.ModuleList(CosineLinear(in_dim, k) for k in sizes)

    def __len__(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [head(x) for head in self.heads]
