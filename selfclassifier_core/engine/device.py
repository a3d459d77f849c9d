"""Where work runs: the one device rule, the one worker rule, autocast.

Everything that picks a device (training, fast mode's feature extraction, prediction) calls
:func:`resolve_device`; everything that sizes a DataLoader or a decode pool calls
:func:`default_workers`. ``torch`` is imported inside the functions that need it, so the scan
(which only decodes images) can size its pool without loading torch.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")

# below this many images a DataLoader's worker start-up costs more than it saves
MIN_ITEMS_FOR_WORKERS = 256
MAX_LOADER_WORKERS = 16
MAX_DECODE_PROCESSES = 32


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def resolve_device(device: "str | torch.device | None" = "auto") -> "torch.device":
    """The device to run on. ``auto`` (or None): CUDA, then Apple MPS, then CPU.

    Under torchrun a bare ``cuda`` becomes each rank's local GPU (``cuda:LOCAL_RANK``).
    Raises ``ValueError`` for an unknown name or a CUDA device on a machine without CUDA.
    """
    import torch  # kept out of processes that never touch a model (the scan)

    from . import dist

    if isinstance(device, torch.device):
        return device
    name = "auto" if device is None else str(device)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None
                              and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} requested but Apple MPS is not available here")
    if name == "cuda" and dist.is_dist():
        name = f"cuda:{dist.local_rank()}"
    return torch.device(name)


def device_type(device: Any) -> str:
    """``cpu`` | ``cuda`` | ``mps`` of a device or its name (``cuda:1`` -> ``cuda``)."""
    return str(getattr(device, "type", device) or "cpu").split(":")[0]


def default_workers(n_items: int, device: Any = "cpu", *, purpose: str = "loader") -> int:
    """How many worker processes a job gets: the one rule for every pool.

    - ``loader`` (DataLoader workers that decode and augment for a model): none for fewer than
      :data:`MIN_ITEMS_FOR_WORKERS` items or a single CPU; with a GPU every CPU but the one
      feeding it (at most :data:`MAX_LOADER_WORKERS`); on a CPU the model needs the cores too,
      so half of them (at least 1, at most 8).
    - ``decode`` (the scan's decode processes, no model competing): every CPU (at most
      :data:`MAX_DECODE_PROCESSES`); the scan decodes tiny folders inline itself.
    """
    cpus = available_cpus()
    if purpose == "decode":
        return max(1, min(cpus, MAX_DECODE_PROCESSES))
    if purpose != "loader":
        raise ValueError(f"purpose must be 'loader' or 'decode', got {purpose!r}")
    if n_items < MIN_ITEMS_FOR_WORKERS or cpus < 2:
        return 0
    if device_type(device) == "cuda":
        return max(1, min(MAX_LOADER_WORKERS, cpus - 1))
    return max(1, min(8, cpus // 2))


def autocast(device: Any):
    """bf16 autocast on CUDA; a no-op context elsewhere (CPU bf16 was slower here)."""
    if device_type(device) == "cuda":
        import torch

        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
