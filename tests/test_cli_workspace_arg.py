"""Every command that takes WS also takes the image folder whose default workspace exists."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfclassifier_core.cli import main


@pytest.fixture
def scanned_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFCLASSIFIER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SELFCLASSIFIER_WORKSPACE", raising=False)
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["scan", str(folder)]) == 0
    return folder


def test_runs_accepts_the_image_folder(scanned_folder, capsys):
    capsys.readouterr()
    assert main(["runs", str(scanned_folder)]) == 0
    assert "no runs" in capsys.readouterr().out.lower()


@pytest.mark.parametrize("command", [["predict"], ["neighbors", "1", "-k", "2"],
                                     ["duplicates"], ["export", "--csv", "out.csv"]])
def test_folder_reaches_the_workspace_then_needs_a_run(scanned_folder, command, capsys):
    capsys.readouterr()
    args = [command[0], str(scanned_folder), *command[1:]]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no workspace" not in err and "run" in err, err


def test_folder_without_workspace_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SELFCLASSIFIER_HOME", str(tmp_path / "home"))
    (tmp_path / "empty").mkdir()
    for cmd in ("runs", "predict", "duplicates"):
        assert main([cmd, str(tmp_path / "empty")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "no workspace" in err and "\n" not in err
