"""Shared test set-up: nothing is written outside pytest's tmp dirs, torch stays on 2 threads,
and the fast lane (``pytest -m "not slow"``) stays fast.

The lane rule: a test that trains a model, starts a subprocess or a server, or fits UMAP is
marked ``slow``. :func:`_fast_lane_guard` enforces it: in a test without the mark, starting a
trainer, a fast-mode fit, a process or a UMAP fit fails the test with a message saying so.
"""
from __future__ import annotations

import multiprocessing.process
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selfclassifier_core.store.workspace import Workspace

SLOW_RULE = ("is not marked slow but {what}; mark it @pytest.mark.slow (a test that trains, "
             "starts a subprocess or a server, or fits UMAP is slow: tests/conftest.py)")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Default workspaces go under a temporary SELFCLASSIFIER_HOME, never ~/.selfclassifier;
    the Hugging Face cache is an empty temporary one and the hub is offline, so weights cached
    on this machine never change a default and no test reaches the network."""
    home = tmp_path_factory.mktemp("sc-home")
    monkeypatch.setenv("SELFCLASSIFIER_HOME", str(home))
    monkeypatch.delenv("SELFCLASSIFIER_WORKSPACE", raising=False)
    hf = tmp_path_factory.mktemp("hf-home")
    monkeypatch.setenv("HF_HOME", str(hf))
    monkeypatch.setenv("HF_HUB_CACHE", str(hf / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


@pytest.fixture(autouse=True)
def _keep_main_module():
    """Streamlit's AppTest leaves its script as ``sys.modules["__main__"]`` (from_function: a
    temporary file it deletes); worker processes started later (the scan's fork server) import
    ``__main__`` and crash on it. Put the real one back after each test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture(autouse=True)
def _fast_lane_guard(request, monkeypatch):
    """Fail a test that is not marked slow when it does what only slow tests may do."""
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    from selfclassifier_core.curation import projection
    from selfclassifier_core.training import fast
    from selfclassifier_core.training.scratch import Trainer

    def refuse(what):
        def refused(*args, **kwargs):
            pytest.fail(f"{request.node.nodeid} " + SLOW_RULE.format(what=what), pytrace=False)
        return refused

    monkeypatch.setattr(Trainer, "__init__", refuse("trains a model"))
    monkeypatch.setattr(fast, "_build_model", refuse("trains fast-mode heads"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a subprocess"))
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start",
                        refuse("starts a process"))
    monkeypatch.setattr(projection, "_import_umap", refuse("fits UMAP"))
    yield


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread for the test: on a shared 2-core machine two OpenMP threads slow
    tiny training steps down several times over. Use it module-wide with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------ shared set-up
@dataclass
class DarkBright:
    """A scanned folder of 16 dark and 16 bright noise PNGs (interleaved names ``img_00.png``…,
    odd ones bright) plus one unreadable ``broken.png``, with random resnet18 weights."""

    folder: Path
    ws: Workspace
    weights: Path
    kinds: dict[str, bool]   # file name -> bright

    def __iter__(self):      # folder, ws, weights, kinds = dark_bright
        return iter((self.folder, self.ws, self.weights, self.kinds))


# the cached views the fast-mode tests train on (tests/test_fastmode.py's options)
DARK_BRIGHT_VIEWS = {"backbone": "resnet18", "views": 3, "image_size": 32}


def _make_dark_bright(root: Path) -> DarkBright:
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from selfclassifier_core.catalog.scanner import scan
    from selfclassifier_core.store.workspace import Workspace

    folder = root / "images"
    folder.mkdir(parents=True)
    kinds = {f"img_{j:02d}.png": j % 2 == 1 for j in range(32)}
    for j, (name, bright) in enumerate(kinds.items()):
        lo, hi = (170, 256) if bright else (0, 86)
        pixels = np.random.default_rng(j).integers(lo, hi, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ws = Workspace.for_folder(folder, root / "ws")
    scan(folder, ws, workers=1)
    torch.manual_seed(0)
    weights = root / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return DarkBright(folder, ws, weights, kinds)


@pytest.fixture(scope="module")
def _dark_bright_with_features(tmp_path_factory) -> DarkBright:
    """Once per module: :class:`DarkBright` with the fast-mode features of
    :data:`DARK_BRIGHT_VIEWS` extracted (the slow part of every fast-mode test)."""
    from selfclassifier_core.training.features import extract_features

    made = _make_dark_bright(tmp_path_factory.mktemp("dark-bright"))
    v = DARK_BRIGHT_VIEWS
    extract_features(made.ws, v["backbone"], made.weights, views=v["views"],
                     image_size=v["image_size"], device="cpu", workers=0)
    return made


@pytest.fixture
def dark_bright(_dark_bright_with_features, tmp_path) -> DarkBright:
    """A test's own copy of the workspace of :func:`_dark_bright_with_features`: same folder and
    weights, features already cached, no runs; what the test writes stays in its copy."""
    from selfclassifier_core.store.workspace import Workspace

    made = _dark_bright_with_features
    shutil.copytree(made.ws.path, tmp_path / "ws")
    return DarkBright(made.folder, Workspace.open(tmp_path / "ws"), made.weights, made.kinds)


@pytest.fixture
def dark_bright_cold(tmp_path) -> DarkBright:
    """:class:`DarkBright` of the test's own, no features cached yet."""
    return _make_dark_bright(tmp_path)


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
