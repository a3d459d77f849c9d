"""LARS: SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

For each parameter ``w`` with gradient ``g`` that is not excluded::

    d = g + weight_decay * w
    q = trust_coefficient * ||w|| / (||d|| + eps)      (q = 1 when ||w|| or ||d|| is 0)
    d = q * d

Excluded parameters (biases and norm weights: ``ndim <= 1``, or a whole param group marked with
``lars_exclude=True``) get neither weight decay nor adaptation: ``d = g``. Then, for all::

    buf = momentum * buf + d            (buf = d on the first step)
    w   = w - lr * buf
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

__all__ = ["LARS"]


class LARS(Optimizer):
    """LARS optimizer (see the module docstring for the exact update).

    Param groups may set ``lars_exclude``: True excludes every parameter of the group from weight
    decay and adaptation, False includes every one, None (the default) decides per parameter
    (``ndim <= 1`` is excluded).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            exclude_flag = group["lars_exclude"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                excluded = p.ndim <= 1 if exclude_flag is None else bool(exclude_flag)
                if not excluded:
                    if group["weight_decay"] != 0:
                        d = d.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = group["trust_coefficient"] * p_norm / (d_norm + group["eps"])
                    q = torch.where((p_norm > 0) & (d_norm > 0), trust, torch.ones_like(trust))
                    d = d.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    buf = state["momentum_buffer"] = d.clone().detach()
                else:
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss
