"""Training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python primitives (no pickled objects)::

    format_version  int
    model_config    dict (``ModelConfig`` fields; rebuilds the model on its own)
    model           state dict
    optimizer       state dict
    queue           state dict of the nearest-neighbour queue, or None
    epoch           completed epochs
    step            optimizer steps taken
    train_config    dict (``TrainConfig`` fields)
    rng             {"python", "numpy", "torch", "cuda"} generator states
    partial         True when saved mid-epoch (time budget, cancellation)
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fsutil import atomic_open

if TYPE_CHECKING:  # pragma: no cover
    import torch

# torch is imported by the functions that need it, not here: the app names CHECKPOINT_FILE on
# every page and should not pay for importing torch (about 1.5 s) to do so.

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable or of an unknown format."""


def rng_states() -> dict[str, Any]:
    """The Python, NumPy, torch and CUDA generator states as weights-only-loadable values."""
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA states only when the devices match)."""
    import torch

    if not states:
        return
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        s = states["numpy"]
        np.random.set_state((s["kind"], s["keys"].numpy().astype(np.uint32), s["pos"],
                             s["has_gauss"], s["cached"]))
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plus ``format_version``) to ``path`` atomically.

    The new file replaces the old one only after it is completely written and synced, so a
    crash or a failing save leaves the previous checkpoint intact.
    """
    import torch

    state = {"format_version": FORMAT_VERSION, **state}
    with atomic_open(path, "wb") as fh:
        torch.save(state, fh)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, unreadable, or of a newer format.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a selfclassifier checkpoint")
    version = int(state.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {version}; this version reads up "
                              f"to {FORMAT_VERSION}. Upgrade selfclassifier.")
    return state
