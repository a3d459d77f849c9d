"""catalog.scan: statuses and reasons, symlinks, incremental re-scan, untouched folder, crashes."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

import selfclassifier_core.catalog.scanner as catalog
from image_cases import (
    HIDDEN, IGNORED, LINK_SKIPPED, OK, UNREADABLE, expected_counts, make_case_folder)
from selfclassifier_core.catalog.scanner import ScanReport, scan
from selfclassifier_core.store.workspace import Workspace, WorkspaceError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def case_folder(tmp_path):
    root = tmp_path / "images"
    return root, make_case_folder(root)


def rows(ws_path) -> dict[str, sqlite3.Row]:
    conn = sqlite3.connect(Path(ws_path) / "workspace.db")
    conn.row_factory = sqlite3.Row
    try:
        return {r["path"]: r for r in conn.execute("SELECT * FROM images")}
    finally:
        conn.close()


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under root (hidden ones and links included): lstat data, content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames + ["."]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if os.path.islink(p):
                extra = os.readlink(p)
            elif os.path.isfile(p):
                extra = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            else:
                extra = None
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns, extra)
    return out


def check_first_scan(report: ScanReport, ws_path, root: Path, expected) -> None:
    want = expected_counts(expected)
    assert report.usable == want["usable"]
    assert report.unreadable == want["unreadable"]
    assert report.ignored == want["ignored"]
    assert report.hidden == 2  # .hidden.jpg and the .cache folder
    assert (report.new, report.changed, report.unchanged, report.missing) == (
        want["usable"] + want["unreadable"], 0, 0, 0)

    stored = rows(ws_path)
    catalogued = {rel for rel, c in expected.items() if c.status in (OK, UNREADABLE)}
    assert set(stored) == catalogued
    for rel, case in expected.items():
        if case.status == OK:
            row = stored[rel]
            assert row["status"] == "ok", (rel, row["reason"])
            assert (row["width"], row["height"]) == case.size, rel
            assert row["mode"] == case.mode, rel
            assert row["reason"] is None
            st = os.stat(root / rel)
            assert (row["bytes"], row["mtime_ns"]) == (st.st_size, st.st_mtime_ns), rel
        elif case.status == UNREADABLE:
            row = stored[rel]
            assert row["status"] == "unreadable", rel
            assert case.reason in row["reason"].lower(), (rel, row["reason"])
        else:
            assert rel not in stored
    assert [p for p, _ in report.unreadable_files] == sorted(
        rel for rel, c in expected.items() if c.status == UNREADABLE)
    links = dict(report.skipped_links)
    assert set(links) == {rel for rel, c in expected.items() if c.status == LINK_SKIPPED}
    for rel, reason in links.items():
        assert expected[rel].reason in reason.lower(), (rel, reason)
    # ids follow the sorted paths on a first scan and are unique
    by_id = sorted(stored.values(), key=lambda r: r["id"])
    assert [r["path"] for r in by_id] == sorted(catalogued)


def test_first_scan_records_every_case(case_folder, tmp_path):
    root, expected = case_folder
    ws = tmp_path / "ws"
    report = scan(root, ws, workers=1)
    check_first_scan(report, ws, root, expected)
    assert report.root == str(root.resolve()) and report.workspace == str(ws)


@pytest.mark.slow  # worker processes
def test_parallel_workers_give_the_same_catalog(case_folder, tmp_path, monkeypatch):
    root, expected = case_folder
    monkeypatch.setattr(catalog, "INLINE_MAX", 0)
    calls = []
    report = scan(root, tmp_path / "ws", workers=2, progress=lambda d, t: calls.append((d, t)))
    check_first_scan(report, tmp_path / "ws", root, expected)
    total = report.new
    assert calls[0] == (0, total) and calls[-1] == (total, total) and len(calls) > 2
    assert all(a[0] <= b[0] for a, b in zip(calls, calls[1:]))


@pytest.mark.slow  # worker processes
def test_workers_under_threads_use_a_fork_server(case_folder, tmp_path, monkeypatch):
    """The app scans from a server with threads, where fork is unsafe."""
    import threading

    root, expected = case_folder
    monkeypatch.setattr(catalog, "INLINE_MAX", 0)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        assert catalog._mp_context().get_start_method() == "forkserver"
        report = scan(root, tmp_path / "ws", workers=2)
    finally:
        stop.set()
        thread.join()
    check_first_scan(report, tmp_path / "ws", root, expected)


def test_no_worker_processes_falls_back_to_inline(case_folder, tmp_path, monkeypatch):
    root, expected = case_folder

    class NoPool:
        def __init__(self, *a, **kw):
            raise OSError(38, "Function not implemented")

    monkeypatch.setattr(catalog, "INLINE_MAX", 0)
    monkeypatch.setattr(catalog, "ProcessPoolExecutor", NoPool)
    check_first_scan(scan(root, tmp_path / "ws", workers=2), tmp_path / "ws", root, expected)


def test_rescan_is_incremental_and_ids_are_stable(case_folder, tmp_path, monkeypatch):
    root, expected = case_folder
    ws = tmp_path / "ws"
    scan(root, ws, workers=1)
    before = rows(ws)

    decoded = []
    real_probe = catalog.probe
    monkeypatch.setattr(catalog, "probe", lambda p, **kw: decoded.append(p) or real_probe(p, **kw))

    # nothing changed: nothing decoded
    report = scan(root, ws, workers=1)
    assert decoded == []
    assert (report.new, report.changed, report.unchanged, report.missing) == (0, 0, len(before), 0)
    assert report.usable == expected_counts(expected)["usable"]
    assert report.unreadable == expected_counts(expected)["unreadable"]

    # change one, delete one, add one, fix a broken one
    Image.new("RGB", (30, 7)).save(root / "gray.png")
    (root / "tiny.png").unlink()
    Image.new("RGB", (5, 6)).save(root / "nested" / "added.png")
    Image.new("RGB", (3, 3)).save(root / "bad" / "empty.jpg")
    report = scan(root, ws, workers=1)
    assert sorted(Path(p).name for p in decoded) == ["added.png", "empty.jpg", "gray.png"]
    assert (report.new, report.changed, report.missing) == (1, 2, 1)
    assert report.unchanged == len(before) - 3
    assert report.usable == expected_counts(expected)["usable"] - 1 + 2
    after = rows(ws)
    assert after["tiny.png"]["status"] == "missing"
    assert after["tiny.png"]["id"] == before["tiny.png"]["id"]
    assert (after["gray.png"]["width"], after["gray.png"]["height"], after["gray.png"]["mode"]) \
        == (30, 7, "RGB")
    assert after["gray.png"]["id"] == before["gray.png"]["id"]
    assert after["bad/empty.jpg"]["status"] == "ok"
    assert after["nested/added.png"]["id"] > max(r["id"] for r in before.values())

    # the missing file comes back: old id; a file deleted for good: its id is never reused
    Image.new("RGB", (1, 1)).save(root / "tiny.png")
    top = max(after.values(), key=lambda r: r["id"])
    (root / top["path"]).unlink()
    Image.new("RGB", (2, 2)).save(root / "zzz_new.png")
    report = scan(root, ws, workers=1)
    final = rows(ws)
    assert final["tiny.png"]["status"] == "ok" and final["tiny.png"]["id"] == before["tiny.png"]["id"]
    assert final[top["path"]]["status"] == "missing"
    assert final["zzz_new.png"]["id"] > top["id"]
    assert report.missing == 1 and report.new == 2


@pytest.mark.slow  # worker processes
def test_image_folder_is_never_written(case_folder, tmp_path, monkeypatch):
    root, _ = case_folder
    monkeypatch.setattr(catalog, "INLINE_MAX", 0)
    home = Path(os.environ["SELFCLASSIFIER_HOME"])
    before = fingerprint(root)
    first = scan(root, workers=2)      # default workspace location
    assert Path(first.workspace).is_relative_to(home / "workspaces")
    assert Path(first.workspace).name.startswith("images-")
    assert fingerprint(root) == before
    scan(root, workers=2)
    scan(root, workers=1)
    assert fingerprint(root) == before


def test_workspace_argument_forms(case_folder, tmp_path):
    root, _ = case_folder
    ws = Workspace.open(tmp_path / "ws", create=True)
    r1 = scan(root, ws, workers=1)
    r2 = scan(root, str(tmp_path / "ws"), workers=1)
    assert r1.workspace == r2.workspace == str(tmp_path / "ws")
    assert r2.unchanged == r1.new
    assert Workspace.open(tmp_path / "ws").root == root.resolve()
    assert len(Workspace.open(tmp_path / "ws").usable_images()) == r1.usable


def test_scans_table_has_the_json_report(case_folder, tmp_path):
    root, _ = case_folder
    report = scan(root, tmp_path / "ws", workers=1)
    conn = sqlite3.connect(tmp_path / "ws" / "workspace.db")
    started, finished, stored = conn.execute(
        "SELECT started, finished, report FROM scans WHERE id=?", (report.scan_id,)).fetchone()
    conn.close()
    assert finished >= started
    assert json.loads(stored) == json.loads(json.dumps(report.to_dict()))
    assert json.loads(stored)["usable"] == report.usable


def test_summary_text(case_folder, tmp_path):
    root, expected = case_folder
    report = scan(root, tmp_path / "ws", workers=1)
    text = report.summary()
    assert f"usable images:   {report.usable}" in text
    assert "bad/truncated.jpg: truncated image" in text
    assert "link_etc: points outside the folder (-> /etc)" in text
    assert "nested/loop: symlink loop (-> ..)" in text
    assert f"ignored files:   {expected_counts(expected)['ignored']}" in text
    assert str(tmp_path / "ws") in text


def test_summary_truncates_long_lists():
    report = ScanReport(root="/r", workspace="/w", unreadable=30,
                        unreadable_files=[(f"f{i}.jpg", "truncated image") for i in range(30)])
    text = report.summary()
    assert "f19.jpg" in text and "f20.jpg" not in text and "... and 10 more" in text


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nope"):
        scan(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="not a folder: .*file.jpg"):
        scan(tmp_path / "file.jpg")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(WorkspaceError, match="inside the image folder"):
        scan(tmp_path / "imgs", tmp_path / "imgs" / "ws")
    assert list((tmp_path / "imgs").iterdir()) == []
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="workers"):
            scan(tmp_path / "imgs", tmp_path / "ws", workers=bad)


def test_link_to_folder_inside_root_is_not_followed_twice(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(root / "sub" / "a.png")
    os.symlink("sub", root / "alias")
    report = scan(root, tmp_path / "ws", workers=1)
    assert set(rows(tmp_path / "ws")) == {"sub/a.png"}
    assert [p for p, _ in report.skipped_links] == ["alias"]


def test_fifo_with_image_extension_is_not_opened(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    os.mkfifo(root / "pipe.jpg")  # opening it would block forever
    Image.new("RGB", (4, 4)).save(root / "a.png")
    report = scan(root, tmp_path / "ws", workers=1)
    assert report.usable == 1 and report.ignored == 1


def _scan_twelve_in_forked_workers(tmp_path, monkeypatch, bad_name, misbehave):
    """Scan 12 images with 2 forked workers whose decoder calls ``misbehave()`` on ``bad_name``
    (the patched probe is inherited by the forked workers)."""
    root = tmp_path / "images"
    root.mkdir()
    for i in range(12):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"img{i:02d}.png")
    real_probe = catalog.probe

    def probe(path, **kw):
        if str(path).endswith(bad_name):
            misbehave()
        return real_probe(path, **kw)

    monkeypatch.setattr(catalog, "INLINE_MAX", 0)
    monkeypatch.setattr(catalog, "probe", probe)
    monkeypatch.setattr(catalog, "_mp_context",
                        lambda: __import__("multiprocessing").get_context("fork"))
    return scan(root, tmp_path / "ws", workers=2)


@pytest.mark.slow  # worker processes
def test_decoder_crash_in_a_worker_names_the_file(tmp_path, monkeypatch):
    report = _scan_twelve_in_forked_workers(tmp_path, monkeypatch, "img05.png",
                                            lambda: os._exit(1))  # like a segfault in a codec
    assert report.usable == 11 and report.unreadable == 1
    assert report.unreadable_files == [
        ("img05.png", "the image decoder crashed on this file or took over 120 s")]


@pytest.mark.slow  # worker processes
def test_decoder_that_hangs_in_a_worker_is_ended_and_the_file_named(tmp_path, monkeypatch):
    monkeypatch.setattr(catalog, "DECODE_TIMEOUT_S", 1)
    t0 = time.monotonic()
    report = _scan_twelve_in_forked_workers(tmp_path, monkeypatch, "img07.png",
                                            lambda: time.sleep(600))  # a codec stuck in a loop
    assert time.monotonic() - t0 < 60
    assert report.usable == 11
    assert report.unreadable_files == [
        ("img07.png", "the image decoder crashed on this file or took over 1 s")]
    assert signal.alarm(0) == 0                        # no alarm armed in this process


CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from selfclassifier_core.catalog import scanner as catalog

    folder, ws, marker = sys.argv[1:4]
    catalog.BATCH_ROWS = 40

    def progress(done, total):
        if done >= 80:           # at least one batch is committed by now
            Path(marker).touch()
            time.sleep(0.4)      # slow down so that the kill lands mid-scan

    catalog.scan(folder, ws, progress=progress, workers=2)
    print("finished")
""")


@pytest.mark.slow  # a killed process
def test_killed_scan_leaves_a_usable_database(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    n_good, n_bad = 300, 4
    for i in range(n_good):
        Image.new("RGB", (8, 8), (i % 256, 0, 0)).save(root / f"img{i:03d}.png")
    for i in range(n_bad):
        (root / f"broken{i}.jpg").write_bytes(b"")
    before = fingerprint(root)
    ws, marker = tmp_path / "ws", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root), str(ws), str(marker)],
                            cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "child never reached the middle of the scan"
            time.sleep(0.02)
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGKILL)  # the child and its worker processes
    finally:
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out

    opened = Workspace.open(ws)   # opens without error
    conn = opened.connect()
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    (unfinished,) = conn.execute("SELECT COUNT(*) FROM scans WHERE finished IS NULL").fetchone()
    (committed,) = conn.execute("SELECT COUNT(*) FROM images").fetchone()
    conn.close()
    assert unfinished == 1
    assert 0 < committed < n_good + n_bad, committed

    report = scan(root, ws)
    assert (report.usable, report.unreadable, report.missing) == (n_good, n_bad, 0)
    assert report.unchanged == committed
    assert report.new == n_good + n_bad - committed
    stored = rows(ws)
    assert len(stored) == n_good + n_bad
    assert len({r["id"] for r in stored.values()}) == n_good + n_bad
    assert fingerprint(root) == before


def test_retry_unreadable_decodes_unchanged_failures_again(tmp_path, monkeypatch, capsys):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"img{i}.png")
    real_probe = catalog.probe
    flaky = {"fail": True}

    def share_probe(path, **kw):  # img1 fails while the "share" is slow, then reads fine
        if str(path).endswith("img1.png") and flaky["fail"]:
            raise catalog.ImageLoadError(path, "read timed out")
        return real_probe(path, **kw)

    monkeypatch.setattr(catalog, "probe", share_probe)
    ws = tmp_path / "ws"
    assert scan(root, ws, workers=1).unreadable_files == [("img1.png", "read timed out")]
    flaky["fail"] = False
    again = scan(root, ws, workers=1)                  # unchanged: not decoded again
    assert (again.usable, again.unchanged, again.retried) == (2, 3, 0)
    from selfclassifier_core.cli import main

    assert main(["scan", str(root), "--workspace", str(ws), "--workers", "1",
                 "--retry-unreadable"]) == 0
    out = capsys.readouterr().out
    assert "usable images:   3" in out and "1 unreadable retried" in out
    assert len(Workspace.open(ws).usable_images()) == 3
