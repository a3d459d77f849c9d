"""Tiny image folders and short training runs shared by the trainer tests.

Usage (pytest puts ``tests/`` on ``sys.path``)::

    from train_fixtures import FAST, make_folder

    pytestmark = pytest.mark.usefixtures("one_torch_thread")  # fixture in conftest.py

    folder = make_folder(tmp_path / "imgs", n=16)
    res = train(folder, tmp_path / "ws", classes=2, epochs=1, batch_size=8, **FAST)

What you get:

- :data:`FAST`: ``train`` options for a run of a few seconds on the CPU (8-px crops, two global
  views only, a narrow projection, no loader workers).
- :func:`make_folder`: ``n`` noise PNGs, alternately dark (``dark_00.png``, ``dark_02.png``, …)
  and bright (``bright_01.png``, …), plus one ``broken.png`` that the scan reports unreadable.
- :func:`train_one_epoch_then_cancel`: a run stopped right after its first epoch, to resume.
- :func:`assert_same_weights`: the final checkpoints of two runs hold identical weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from selfclassifier_core.store.checkpoint import load_checkpoint
from selfclassifier_core.workflows.pipeline import TrainResult, train

# small and fast: 8-px crops, two global views only, narrow projection
FAST = dict(n_local=0, global_size=8, proj_hidden_dim=64, workers=0, device="cpu")


def make_folder(path: Path, n: int = 24, size: int = 16, seed: int = 0) -> Path:
    """Half dark, half bright noise images (dark_*.png / bright_*.png) plus one broken file."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        bright = i % 2 == 1
        lo, hi = (170, 256) if bright else (0, 86)
        arr = rng.integers(lo, hi, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path / f"{'bright' if bright else 'dark'}_{i:02d}.png")
    (path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return path


def train_one_epoch_then_cancel(folder: Path, workspace: Path, **options: Any) -> TrainResult:
    """``train(folder, workspace, **options)`` cancelled once its first epoch has ended."""
    done_epochs = []

    def progress(info):
        if info.get("epoch_step") == info.get("epoch_steps"):
            done_epochs.append(info["epoch"])

    return train(folder, workspace, progress=progress,
                 should_stop=lambda: len(done_epochs) >= 1, **options)


def checkpoint_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model state dict of a run's checkpoint."""
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def assert_same_weights(run_dir_a: Path, run_dir_b: Path) -> None:
    """The checkpoints of two runs hold the same tensors, bit for bit."""
    a, b = checkpoint_weights(run_dir_a), checkpoint_weights(run_dir_b)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
