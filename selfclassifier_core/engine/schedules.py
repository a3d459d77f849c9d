"""Learning-rate (and other hyper-parameter) schedules computed from the step number.

A schedule that is a pure function of the step needs no state of its own: resuming a run at step
``s`` gives the same values as never stopping.
"""
from __future__ import annotations

import logging
import math

from torch.optim import Optimizer

logger = logging.getLogger(__name__)

__all__ = ["cosine_with_warmup", "set_lr"]


def cosine_with_warmup(
    step: int, total_steps: int, warmup_steps: int, base_value: float = 1.0,
    final_value: float = 0.0,
) -> float:
    """Linear warm-up from 0 to ``base_value``, then a half cosine down to ``final_value``.

    With the default ``base_value=1.0`` the result is a multiplier (e.g. for ``LambdaLR``).

    * ``step < warmup_steps``: ``base_value * step / warmup_steps`` (0 at step 0);
    * ``warmup_steps <= step <= total_steps``:
      ``final + (base - final) * (1 + cos(pi * (step - warmup) / (total - warmup))) / 2``;
    * ``step > total_steps``: ``final_value``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be between 0 and total_steps ({total_steps}), "
                         f"got {warmup_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return base_value * step / warmup_steps
    if total_steps == warmup_steps:
        return base_value if step == warmup_steps else final_value
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return final_value + (base_value - final_value) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: Optimizer, lr: float) -> None:
    """Set every param group's ``lr`` to ``lr * group.get("lr_scale", 1.0)``.

    ``lr_scale`` lets one group (e.g. a pretrained backbone being fine-tuned) follow the same
    schedule at a lower rate.
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    for group in optimizer.param_groups:
        scale = group.get("lr_scale", 1.0)
        if scale < 0:
            raise ValueError(f"lr_scale must be >= 0, got {scale}")
        group["lr"] = lr * scale
