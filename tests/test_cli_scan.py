"""`python -m selfclassifier_core scan`: output, exit codes, one-line errors, --help."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from image_cases import expected_counts, make_case_folder

pytestmark = pytest.mark.slow  # the command line in subprocesses

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfclassifier_core", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=os.environ.copy())


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert proc.stdout == ""


def test_scan_prints_summary_and_exits_0(tmp_path):
    root = tmp_path / "images"
    expected = make_case_folder(root)
    want = expected_counts(expected)
    proc = cli("scan", str(root), "--workspace", str(tmp_path / "ws"), "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"usable images:   {want['usable']}" in out
    assert f"unreadable:      {want['unreadable']}" in out
    assert "bad/bomb.png: decompression bomb: header claims 40000×40000 pixels" in out
    assert "bad/page.jpg: not an image (looks like HTML/text)" in out
    assert f"ignored files:   {want['ignored']}" in out
    assert f"links skipped:   {want['skipped_links']}" in out
    assert "link_etc: points outside the folder" in out
    assert "Traceback" not in proc.stderr
    again = cli("scan", str(root), "--workspace", str(tmp_path / "ws"))
    assert again.returncode == 0
    assert f"0 new, 0 changed, {want['usable'] + want['unreadable']} unchanged" in again.stdout


def test_default_workspace_goes_under_home(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    Image.new("RGB", (4, 4)).save(root / "a.png")
    proc = cli("scan", str(root))
    assert proc.returncode == 0, proc.stderr
    home = Path(os.environ["SELFCLASSIFIER_HOME"])
    assert f"Workspace: {home / 'workspaces'}" in proc.stdout
    assert sorted(p.name for p in root.iterdir()) == ["a.png"]


def test_missing_folder_is_one_line_exit_2(tmp_path):
    assert_one_line_error(cli("scan", str(tmp_path / "nope")), "not found", str(tmp_path / "nope"))


def test_file_instead_of_folder_is_one_line_exit_2(tmp_path):
    f = tmp_path / "photo.jpg"
    Image.new("RGB", (4, 4)).save(f)
    assert_one_line_error(cli("scan", str(f)), "not a folder", str(f))


def test_corrupt_workspace_is_one_line_exit_2(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "workspace.db").write_bytes(b"\x07" * 4096)
    assert_one_line_error(cli("scan", str(root), "--workspace", str(tmp_path / "ws")),
                          "workspace.db")


def test_workspace_inside_folder_is_one_line_exit_2(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    assert_one_line_error(cli("scan", str(root), "--workspace", str(root / "ws")),
                          "inside the image folder")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_workers_value(tmp_path, value):
    proc = cli("scan", str(tmp_path), "--workers", value)
    assert proc.returncode == 2 and "--workers" in proc.stderr


def test_help(tmp_path):
    top = cli("--help")
    assert top.returncode == 0 and "scan" in top.stdout and "COMMAND" in top.stdout
    sub = cli("scan", "--help")
    assert sub.returncode == 0
    text = " ".join(sub.stdout.split())  # argparse wraps lines
    for words in ("FOLDER", "--workspace WS", "--workers N", "never written to"):
        assert words in text, words
