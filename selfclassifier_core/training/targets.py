"""What a refit learns from besides the images: a class per head for some images, and a weight.

A refit (:mod:`selfclassifier_core.workflows.refit`) turns the person's labels into
:class:`Targets` before the run starts and saves them in the run's directory
(``targets.npz``), so the run, a resumed run and a later reader all see the same ones. The
training loops read them with :func:`load_targets` and add the supervised term
(:func:`~selfclassifier_core.engine.loss.supervised_term`) for the images that have a class.
``excluded`` images are left out of training altogether.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..store.fsutil import atomic_write_bytes
from ..store.ids import find_ids

if TYPE_CHECKING:  # pragma: no cover
    import torch
# torch is imported by lookup (a training loop's), not here: the app reads and writes targets
# through curation.feedback on its Review screen without torch.

TARGETS_FILE = "targets.npz"

__all__ = ["TARGETS_FILE", "Targets", "load_targets", "save_targets", "start_state"]


@dataclass
class Targets:
    """Per-image classes for a refit.

    ``image_ids`` ``[M]`` sorted; ``classes`` ``[M, H]`` the class in each of ``heads`` (-1:
    none); ``weights`` ``[M]`` how much each image counts (1 for an image the person checked,
    less for one that only sits in a cluster they named); ``excluded`` ids left out of training.
    """

    heads: list[int]
    image_ids: np.ndarray
    classes: np.ndarray
    weights: np.ndarray
    excluded: np.ndarray

    def __post_init__(self) -> None:
        self.heads = [int(k) for k in self.heads]
        self.image_ids = np.asarray(self.image_ids, np.int64)
        self.classes = np.asarray(self.classes, np.int64).reshape(len(self.image_ids),
                                                                   len(self.heads))
        self.weights = np.asarray(self.weights, np.float32)
        self.excluded = np.asarray(self.excluded, np.int64)
        if len(self.weights) != len(self.image_ids):
            raise ValueError(f"{len(self.weights)} weights for {len(self.image_ids)} images")
        if len(self.image_ids) and np.any(np.diff(self.image_ids) <= 0):
            raise ValueError("target image ids must be sorted and distinct")
        for h, k in enumerate(self.heads):
            col = self.classes[:, h]
            if len(col) and (col.max() >= k or col.min() < -1):
                raise ValueError(f"head {k}: target classes must lie in -1..{k - 1}")

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def n_checked(self) -> int:
        """Images with full weight (the person checked them)."""
        return int((self.weights >= 1).sum())

    def lookup(self, ids: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """``(classes [B, H], weights [B])`` of image ids (-1 / 0 for images without a class)."""
        import torch

        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, np.int64)
        classes = np.full((len(ids), len(self.heads)), -1, np.int64)
        weights = np.zeros(len(ids), np.float32)
        pos, hit = find_ids(self.image_ids, ids)
        classes[hit] = self.classes[pos[hit]]
        weights[hit] = self.weights[pos[hit]]
        return torch.from_numpy(classes), torch.from_numpy(weights)


def save_targets(run_dir: str | os.PathLike, targets: Targets) -> Path:
    """Write ``targets.npz`` into the run's directory (atomically)."""
    import io

    buf = io.BytesIO()
    np.savez(buf, heads=np.asarray(targets.heads, np.int64), image_ids=targets.image_ids,
             classes=targets.classes, weights=targets.weights, excluded=targets.excluded)
    path = Path(run_dir) / TARGETS_FILE
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_targets(run_dir: str | os.PathLike) -> Targets | None:
    """The run's targets, or None when it is not a refit (no ``targets.npz``)."""
    path = Path(run_dir) / TARGETS_FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as z:
        return Targets(heads=z["heads"].tolist(), image_ids=z["image_ids"],
                       classes=z["classes"], weights=z["weights"], excluded=z["excluded"])


def start_state(workspace, run_id: int, heads: list[int]) -> dict[str, torch.Tensor]:
    """The model weights a refit of run ``run_id`` starts from, its heads put in the order of
    the new run's ``heads``: a head of the same size comes from that head; the one new size (the
    main head, grown for new labels) from the earlier head whose size the new run lacks."""
    from ..store.checkpoint import CHECKPOINT_FILE, load_checkpoint

    state = load_checkpoint(workspace.run_dir(run_id) / CHECKPOINT_FILE)
    old = [int(k) for k in state["model_config"]["heads"]]
    gone = [j for j, k in enumerate(old) if k not in heads]
    model = {k: v for k, v in state["model"].items() if not k.startswith("heads.")}
    for i, k in enumerate(heads):
        if k in old:
            j = old.index(k)
        elif gone:
            j = gone.pop(0)
        else:
            continue  # a head the earlier run had nothing like: it starts fresh
        prefix = f"heads.heads.{j}."
        for name, value in state["model"].items():
            if name.startswith(prefix):
                model[f"heads.heads.{i}." + name[len(prefix):]] = value
    return model
