"""The layer contracts of pyproject.toml hold: each layer imports only those below it, engine
imports nothing else of the package, the core never imports Streamlit, the app runs no SQL, and
no import cycles (function-local imports included)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import importlinter.cli  # noqa: F401 - registers the contract types and the output settings
import pytest
from importlinter.application import use_cases

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports() -> list[str]:
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    return [exe, "--config", str(ROOT / "pyproject.toml")]


def test_import_contracts_are_kept(capsys, monkeypatch):
    # in this process, so the fast lane checks the layers too (the use case, not the command,
    # which would reconfigure this process's logging)
    monkeypatch.chdir(ROOT)
    passed = use_cases.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_logo=True)
    out = capsys.readouterr().out
    assert passed, out[-4000:]
    assert "0 broken" in out


@pytest.mark.slow  # lint-imports in a subprocess
def test_a_climbing_import_breaks_the_contract(tmp_path):
    """The check can fail: a copy of the package whose engine imports the workspace store."""
    shutil.copytree(ROOT / "selfclassifier_core", tmp_path / "selfclassifier_core")
    shutil.copytree(ROOT / "app", tmp_path / "app",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    loss = tmp_path / "selfclassifier_core" / "engine" / "loss.py"
    loss.write_text(loss.read_text() + "\nfrom ..store import workspace  # noqa\n")
    proc = subprocess.run(_lint_imports()[:1] + ["--config", str(tmp_path / "pyproject.toml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert proc.returncode != 0
    assert "selfclassifier_core.engine.loss -> selfclassifier_core.store.workspace" in proc.stdout
