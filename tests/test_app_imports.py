"""The app's pages answer without importing torch: a fresh server process shows its first page
seconds sooner (torch and torchvision take 2-3 s to import on the CPU machine this was measured
on); the first page and Clusters do not import pandas either (a background build does).
Training, prediction and text search import torch when they run; they run in a job process
or on a click. Run in a fresh interpreter: this test process has torch already."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
from workspace_fixtures import make_workspace_with_run
ws, run = make_workspace_with_run(sys.argv[2], n_images=40, heads=(3, 6), seed=1)
import subprocess  # as a training leaves it: its summary printed, so remembered
subprocess.run([sys.executable, "-m", "selfclassifier_core", "runs", str(ws.path), "--run",
                str(run)], check=True, capture_output=True, cwd=sys.argv[1])
import numpy as np
import selfclassifier_core.curation.projection as projection
projection.umap_2d = lambda emb, **kw: projection.pca_2d(np.asarray(emb, np.float32))
from selfclassifier_core.store.settings import set_setting
set_setting("auto_group", False)
from streamlit.testing.v1 import AppTest
app = os.path.join(sys.argv[1], "app", "main.py")
sys.argv = [app, "--folder", str(ws.root), "--workspace", str(ws.path)]
at = AppTest.from_file(app, default_timeout=120)
import importlib.abc, threading
class Spy(importlib.abc.MetaPathFinder):  # which thread imports pandas first
    def find_spec(self, name, path=None, target=None):
        if name == "pandas" and "pandas_by" not in seen:
            seen["pandas_by"] = threading.current_thread().name
        return None
seen = {"table_waited_by": []}
sys.meta_path.insert(0, Spy())
import app.caches as caches  # the module the pages use: which page waits for the label table
made_table = caches.label_table
def label_table(view, wait=True):
    if wait:
        seen["table_waited_by"].append(page)
    return made_table(view, wait)
caches.label_table = label_table
page = "folder_training"
at.run()
seen["folder_training"] = ["torch" in sys.modules, [str(e.value) for e in at.exception]]
for page in ("clusters", "review", "map", "neighbours", "export"):
    at.switch_page(f"screens/{page}.py").run()
    seen[page] = ["torch" in sys.modules, [str(e.value) for e in at.exception]]
print(json.dumps(seen))
"""


@pytest.mark.slow  # a fresh interpreter
def test_every_page_answers_without_importing_torch(tmp_path):
    env = {**os.environ, "SELFCLASSIFIER_HOME": str(tmp_path / "home")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # neither the first page nor Clusters waits for pandas (~0.3 s): the label view the first
    # page starts for the next screen is made of arrays; the label table, which Clusters
    # starts in the background for the screens after it, is the first to import it
    assert seen.pop("pandas_by", "").startswith("build: Making the table of final labels")
    # and neither waits for that table: the screens that show it do (Review needs only its
    # queue's few rows)
    assert set(seen.pop("table_waited_by")) == {"map", "neighbours", "export"}
    assert list(seen) == ["folder_training", "clusters", "review", "map", "neighbours", "export"]
    for page, (imported, exceptions) in seen.items():
        assert exceptions == [], (page, exceptions)
        assert not imported, f"the {page} page imported torch"
