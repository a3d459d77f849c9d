"""Distributed helpers that are no-ops in a single process (no process group).

Multi-GPU and multi-node runs go through ``torchrun``; :func:`init_from_env` reads its
environment variables. Everything else here works unchanged in a plain single CPU process,
like ``lightly/utils/dist.py``.
"""
from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as torch_dist

logger = logging.getLogger(__name__)

__all__ = [
    "is_dist",
    "world_size",
    "rank",
    "local_rank",
    "is_main",
    "barrier",
    "gather_with_grad",
    "all_reduce_mean",
    "init_from_env",
    "cleanup",
]


def is_dist() -> bool:
    """True when a default process group is initialised."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """Number of processes in the default group (1 without one)."""
    return torch_dist.get_world_size() if is_dist() else 1


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return torch_dist.get_rank() if is_dist() else 0


def local_rank() -> int:
    """Rank on this node as set by torchrun (``LOCAL_RANK``), 0 otherwise."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on rank 0, and always in a single process."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; does nothing in a single process."""
    if is_dist():
        torch_dist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (a picklable value); ``obj`` itself in one process."""
    if not is_dist() or world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def all_true(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise AND of a bool tensor over ranks (a copy); ``flags`` in one process."""
    if not is_dist() or world_size() == 1:
        return flags
    y = flags.to(torch.int32).clone()
    torch_dist.all_reduce(y, op=torch_dist.ReduceOp.MIN)
    return y.bool()


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradients of all ranks.

    Each rank computes the same loss from the gathered tensor, so the sum over ranks of the
    gradient w.r.t. this rank's slice is ``world_size`` times the single-process gradient; DDP
    then averages parameter gradients over ranks, which gives exactly the single-process
    gradient of the loss on the concatenated batch.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(torch_dist.get_world_size())]
        torch_dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        torch_dist.all_reduce(grad, op=torch_dist.ReduceOp.SUM)
        start = torch_dist.get_rank() * ctx.batch
        return grad[start : start + ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to this rank's rows.

    All ranks must pass the same shape. In a single process this returns ``x`` itself.
    The backward sums gradients over ranks (see :class:`_GatherWithGrad`), the convention
    that matches DDP's gradient averaging.
    """
    if not is_dist() or world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over ranks (a new tensor, no gradient); ``x`` itself in one process."""
    if not is_dist() or world_size() == 1:
        return x
    y = x.detach().clone()
    torch_dist.all_reduce(y, op=torch_dist.ReduceOp.SUM)
    return y / world_size()


# How long a rank waits in a collective. Rank 0 alone scans the folder and predicts it after
# training while the others wait at a barrier: a million images took 120 s to scan on a 2-core
# CPU, and torch's 30-minute default would end the waiting ranks (and the run) of a folder
# that takes longer. A rank that dies is noticed by torchrun at once, not by this timeout.
TIMEOUT_S = 4 * 3600.0


def init_from_env(backend: str | None = None, timeout_s: float = TIMEOUT_S) -> bool:
    """Join the process group described by torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without
    them (a plain ``python`` run) nothing happens. The backend defaults to ``nccl`` when CUDA is
    available and ``gloo`` otherwise; with nccl the CUDA device is set to ``LOCAL_RANK`` and
    CPU tensors go through gloo in the same group.

    Returns:
        True when a process group is (now) initialised.
    """
    if is_dist():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    size = int(os.environ["WORLD_SIZE"])
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {size}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo", "mpi"):
        raise ValueError(f"unknown distributed backend {backend!r}; use 'nccl', 'gloo' or 'mpi'")
    group_backend = backend
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
        # NCCL takes CUDA tensors only; the small CPU tensors that keep the ranks in step (the
        # run id, the stop flag) go through gloo, else they fail ("No backend type associated
        # with device type cpu")
        group_backend = "cpu:gloo,cuda:nccl"
    torch_dist.init_process_group(
        backend=group_backend,
        rank=int(os.environ["RANK"]),
        world_size=size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    logger.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def cleanup() -> None:
    """Leave the process group, if any."""
    if is_dist():
        torch_dist.destroy_process_group()
