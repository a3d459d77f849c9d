"""The Self-Classifier loss (Amrani et al., ECCV 2022, arXiv 2103.10994).

For every classifier head with logits ``z_v`` of shape ``[N, C]`` for each view ``v``
(``N`` is the global batch, gathered over ranks):

* target of view i: ``t_i = softmax(z_i / col_tau, dim=0)`` (over the batch), rows L1-normalised;
* prediction of view j: ``p_j = softmax(z_j / row_tau, dim=1)`` (over classes), columns
  L1-normalised, then ``log(N / C * p_j + eps)`` -- the uniform class prior;
* term ``-mean_rows(sum_c t_i * log(N / C * p_j + eps))`` for each ordered pair ``i != j`` of views
  except pairs of two local crops.

The loss is the mean of all terms of all heads. There is no stop-gradient: gradients flow
through targets and predictions alike. The computation runs in float32 even under autocast.

A refit adds :func:`supervised_term`: the cross-entropy of each labelled row's prediction
``softmax(z / row_tau)`` toward the class its label was given, weighted per row, for every
head and view. :class:`SelfClassifierLoss` adds it when called with targets; without (or
with no weight at all) the loss is exactly the Self-Classifier loss.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import dist

logger = logging.getLogger(__name__)

__all__ = ["SelfClassifierLoss", "self_classifier_loss", "supervised_term", "view_pairs"]


def view_pairs(n_views: int, n_global: int) -> list[tuple[int, int]]:
    """Ordered (target view, prediction view) pairs used by the loss.

    Every ordered pair ``i != j`` except those where both views are local (index ``>= n_global``).
    """
    return [
        (i, j)
        for i in range(n_views)
        for j in range(n_views)
        if i != j and (i < n_global or j < n_global)
    ]


def _check_inputs(head_logits: Sequence[Sequence[torch.Tensor]], n_global: int) -> tuple[int, int]:
    """Validate shapes; return (number of views, local batch size)."""
    if len(head_logits) == 0:
        raise ValueError("head_logits is empty: need at least one head")
    n_views = len(head_logits[0])
    if n_views < 2:
        raise ValueError(f"need at least 2 views per head, got {n_views}")
    if not 1 <= n_global <= n_views:
        raise ValueError(f"n_global={n_global} must be between 1 and the number of views ({n_views})")
    batch = None
    for h, views in enumerate(head_logits):
        if len(views) != n_views:
            raise ValueError(f"head {h} has {len(views)} views but head 0 has {n_views}")
        shape = None
        for v, z in enumerate(views):
            if not isinstance(z, torch.Tensor) or z.ndim != 2:
                raise ValueError(f"head {h} view {v}: logits must be a 2-D tensor [N, C], got "
                                 f"{getattr(z, 'shape', type(z).__name__)}")
            if shape is None:
                shape = tuple(z.shape)
            elif tuple(z.shape) != shape:
                raise ValueError(f"head {h} view {v} has shape {tuple(z.shape)}, view 0 has {shape}")
        assert shape is not None
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise ValueError(f"head {h} has batch {shape[0]} but head 0 has batch {batch}")
        if shape[1] < 1:
            raise ValueError(f"head {h} has {shape[1]} classes")
    assert batch is not None
    if batch < 1:
        raise ValueError("logits have an empty batch")
    return n_views, batch


def _upcast(z: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16/float32 -> float32; float64 stays float64."""
    return z if z.dtype == torch.float64 else z.float()


def _gather_all(head_logits: Sequence[Sequence[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """All-gather every head's logits over ranks in one collective (at least float32)."""
    sizes = [views[0].shape[1] for views in head_logits]
    n_views = len(head_logits[0])
    # [N, V, sum C] so that one all-gather along dim 0 covers every head and view
    packed = torch.cat([torch.stack([_upcast(z) for z in views], dim=1) for views in head_logits], dim=2)
    packed = dist.gather_with_grad(packed)
    out = []
    for chunk in torch.split(packed, sizes, dim=2):
        out.append([chunk[:, v] for v in range(n_views)])
    return out


def _check_temperatures(row_tau: float, col_tau: float, eps: float) -> None:
    if row_tau <= 0:
        raise ValueError(f"row_tau must be > 0, got {row_tau}")
    if col_tau <= 0:
        raise ValueError(f"col_tau must be > 0, got {col_tau}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def self_classifier_loss(
    head_logits: Sequence[Sequence[torch.Tensor]],
    n_global: int = 2,
    row_tau: float = 0.1,
    col_tau: float = 0.05,
    eps: float = 1e-8,
    gather: bool = True,
) -> torch.Tensor:
    """Self-Classifier loss; see the module docstring.

    Args:
        head_logits: ``head_logits[h][v]`` is the ``[N, C_h]`` logits of head h for view v.
        n_global: views ``0..n_global-1`` are global crops, the rest local.
        row_tau: temperature of the prediction softmax (over classes).
        col_tau: temperature of the target softmax (over the batch).
        eps: added inside the log.
        gather: all-gather logits across ranks first (no-op in one process).

    Returns:
        A float32 scalar (float64 when the logits are float64).
    """
    _check_temperatures(row_tau, col_tau, eps)
    n_views, _ = _check_inputs(head_logits, n_global)
    device_type = head_logits[0][0].device.type
    with torch.autocast(device_type=device_type, enabled=False):
        heads = _gather_all(head_logits) if gather else [[_upcast(z) for z in v] for v in head_logits]
        pairs = view_pairs(n_views, n_global)
        terms = []
        for h, views in enumerate(heads):
            n, c = views[0].shape
            if n < c:
                raise ValueError(
                    f"batch of {n} rows cannot spread over {c} classes (head {h}); use batch >= {c}"
                )
            # Normalising a softmax along the other axis is a second softmax of its log: the
            # same numbers, without 0/0 when a whole row or column underflows.
            targets = [F.softmax(F.log_softmax(z / col_tau, dim=0), dim=1) for z in views]
            log_preds = [
                torch.log((n / c) * F.softmax(F.log_softmax(z / row_tau, dim=1), dim=0) + eps)
                for z in views
            ]
            for i, j in pairs:
                terms.append(-(targets[i] * log_preds[j]).sum(dim=1).mean())
        return torch.stack(terms).mean()


def supervised_term(head_logits: Sequence[Sequence[torch.Tensor]], targets: torch.Tensor,
                    weights: torch.Tensor, row_tau: float = 0.1) -> torch.Tensor:
    """Weighted cross-entropy toward given classes, averaged over heads and views.

    Args:
        head_logits: ``head_logits[h][v]`` is the ``[N, C_h]`` logits of head h for view v.
        targets: ``[N, H]`` long, the class of row n in head h; ``-1`` where it has none.
        weights: ``[N]`` (or ``[N, H]``) non-negative weight of each row.
        row_tau: the temperature of the prediction softmax (the one predictions use).

    Returns:
        A float32 scalar: for each head and view, ``sum_n w_n CE_n / sum_n w_n`` over the rows
        with a class, then the mean over them (0 when no row has a class and a weight).
    """
    if row_tau <= 0:
        raise ValueError(f"row_tau must be > 0, got {row_tau}")
    n_heads = len(head_logits)
    if targets.ndim != 2 or targets.shape[1] != n_heads:
        raise ValueError(f"targets must be [N, {n_heads}] (one column per head), got "
                         f"{tuple(targets.shape)}")
    w = weights.float()
    if w.ndim == 1:
        w = w.unsqueeze(1).expand(-1, n_heads)
    if w.shape != targets.shape:
        raise ValueError(f"weights must be [N] or [N, H] like targets {tuple(targets.shape)}, "
                         f"got {tuple(weights.shape)}")
    if (w < 0).any():
        raise ValueError("weights must be >= 0")
    device_type = head_logits[0][0].device.type
    terms = []
    with torch.autocast(device_type=device_type, enabled=False):
        for h, views in enumerate(head_logits):
            t = targets[:, h].to(views[0].device)
            wh = torch.where(t >= 0, w[:, h].to(views[0].device), torch.zeros_like(w[:, h]))
            total = wh.sum()
            if total <= 0:
                continue
            c = views[0].shape[1]
            if int(t.max()) >= c:
                raise ValueError(f"head {h} has {c} classes but a target is {int(t.max())}")
            for z in views:
                ce = F.cross_entropy(_upcast(z) / row_tau, t.clamp(min=0), reduction="none")
                terms.append((wh * ce).sum() / total)
    if not terms:
        return head_logits[0][0].new_zeros((), dtype=torch.float32)
    return torch.stack(terms).mean()


class SelfClassifierLoss(nn.Module):
    """Module form of :func:`self_classifier_loss`.

    Call as ``loss(head_logits, n_global=2)`` with ``head_logits[h][v]`` the ``[N, C_h]`` logits of
    head h for view v (views ``0..n_global-1`` global, the rest local).
    """

    def __init__(self, row_tau: float = 0.1, col_tau: float = 0.05, eps: float = 1e-8,
                 gather: bool = True) -> None:
        super().__init__()
        _check_temperatures(row_tau, col_tau, eps)
        self.row_tau = float(row_tau)
        self.col_tau = float(col_tau)
        self.eps = float(eps)
        self.gather = bool(gather)  # False: this process's batch only, even in a group

    def forward(
        self, head_logits: Sequence[Sequence[torch.Tensor]], n_global: int = 2,
        targets: torch.Tensor | None = None, weights: torch.Tensor | None = None,
        supervised_weight: float = 1.0,
    ) -> torch.Tensor:
        """The Self-Classifier loss, plus ``supervised_weight`` times :func:`supervised_term`
        of the same logits when ``targets`` (``[N, H]``, -1 for none) are given."""
        loss = self_classifier_loss(
            head_logits, n_global=n_global, row_tau=self.row_tau, col_tau=self.col_tau, eps=self.eps,
            gather=self.gather,
        )
        if targets is None or supervised_weight == 0:
            return loss
        if weights is None:
            weights = torch.ones(targets.shape[0], device=targets.device)
        if not bool(((targets >= 0) & (weights.reshape(len(weights), -1) > 0)).any()):
            return loss
        return loss + supervised_weight * supervised_term(head_logits, targets, weights,
                                                          self.row_tau)

    def extra_repr(self) -> str:
        return f"row_tau={self.row_tau}, col_tau={self.col_tau}, eps={self.eps}"
