"""Shared test set-up: nothing is written outside pytest's tmp dirs, torch stays on 2 threads."""
from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Default workspaces go under a temporary SELFCLASSIFIER_HOME, never ~/.selfclassifier."""
    home = tmp_path_factory.mktemp("sc-home")
    monkeypatch.setenv("SELFCLASSIFIER_HOME", str(home))
    monkeypatch.delenv("SELFCLASSIFIER_WORKSPACE", raising=False)
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


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
