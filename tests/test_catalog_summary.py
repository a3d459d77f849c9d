"""catalog_summary: counts by status, the last scan's report, unreadable files, the version."""
from __future__ import annotations

import json
import os
import sqlite3

import pytest
from PIL import Image

from selfclassifier_core.catalog.scanner import scan
from selfclassifier_core.catalog.summary import CatalogSummary, catalog_summary
from selfclassifier_core.store.workspace import Workspace, WorkspaceError


@pytest.fixture
def scanned(tmp_path):
    """A folder of three PNGs, one broken PNG, a text file, a hidden file and a link outside."""
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        Image.new("RGB", (8, 8), (60 * i, 10, 10)).save(folder / name)
    (folder / "broken.png").write_bytes(b"not a png at all" * 64)
    (folder / "notes.txt").write_text("not an image")
    Image.new("RGB", (8, 8)).save(folder / ".hidden.png")
    outside = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "link.png").symlink_to(outside)
    ws_path = tmp_path / "ws"
    scan(folder, ws_path, workers=1)
    return folder, Workspace.open(ws_path)


def test_summary_of_a_scanned_folder(scanned):
    folder, ws = scanned
    s = catalog_summary(ws)
    assert isinstance(s, CatalogSummary)
    assert s.counts == {"ok": 3, "unreadable": 1, "missing": 0}
    assert s.usable == 3
    [(path, reason)] = s.unreadable
    assert path == "broken.png" and reason          # the reason is given in words
    assert s.last_scan["usable"] == 3 and s.last_scan["unreadable"] == 1
    assert s.ignored == 2                           # notes.txt and the hidden file
    [(link, why)] = s.skipped
    assert link == "link.png" and why


def test_a_path_works_like_the_workspace(scanned):
    folder, ws = scanned
    assert catalog_summary(str(ws.path)) == catalog_summary(ws)
    assert catalog_summary(ws.path) == catalog_summary(ws)


def test_before_any_scan(tmp_path):
    ws = Workspace.open(tmp_path / "ws", create=True)
    s = catalog_summary(ws)
    assert s.counts == {"ok": 0, "unreadable": 0, "missing": 0}
    assert s.last_scan is None and s.unreadable == [] and s.ignored == 0 and s.skipped == []
    assert s.version


def test_no_workspace_at_the_path(tmp_path):
    with pytest.raises(WorkspaceError, match="no workspace"):
        catalog_summary(tmp_path / "nothing-here")


def test_unreadable_limit(scanned):
    folder, ws = scanned
    (folder / "broken2.png").write_bytes(b"\0" * 300)
    scan(folder, ws, workers=1)
    s = catalog_summary(ws, unreadable_limit=1)
    assert s.unreadable == [("broken.png", s.unreadable[0][1])]   # by path, cut at the limit
    assert s.counts["unreadable"] == 2                              # the count is complete
    assert catalog_summary(ws, unreadable_limit=0).unreadable == []
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="unreadable_limit"):
            catalog_summary(ws, unreadable_limit=bad)


def test_version_changes_with_each_scan_and_each_change(scanned):
    folder, ws = scanned
    v0 = catalog_summary(ws).version
    assert catalog_summary(ws).version == v0        # stable while nothing happens
    assert v0.endswith(ws.catalog_version())        # built on the workspace's catalog version
    scan(folder, ws, workers=1)                     # nothing changed, but a new scan
    v1 = catalog_summary(ws).version
    assert v1 != v0
    Image.new("RGB", (9, 9), (1, 2, 3)).save(folder / "a.png")   # a usable image changes
    st = os.stat(folder / "a.png")
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    scan(folder, ws, workers=1)
    v2 = catalog_summary(ws).version
    assert v2 not in (v0, v1)
    (folder / "b.png").unlink()                     # a file is gone
    scan(folder, ws, workers=1)
    s = catalog_summary(ws)
    assert s.version not in (v0, v1, v2)
    assert s.counts == {"ok": 2, "unreadable": 1, "missing": 1}
    assert s.last_scan["missing"] == 1


def test_counts_are_remembered_until_any_writer_changes_the_catalog(scanned):
    folder, ws = scanned
    assert catalog_summary(ws).counts == {"ok": 3, "unreadable": 1, "missing": 0}
    changes, _, remembered = ws.get_meta("status_counts").partition(":")
    assert json.loads(remembered) == {"ok": 3, "unreadable": 1}
    with sqlite3.connect(ws.path / "workspace.db") as raw:   # the memo is what is read ...
        raw.execute("UPDATE meta SET value=? WHERE key='status_counts'",
                    (f"{changes}:" + json.dumps({"ok": 7}),))
    assert catalog_summary(ws).counts == {"ok": 7, "unreadable": 0, "missing": 0}
    with sqlite3.connect(ws.path / "workspace.db") as raw:   # ... until the images change
        raw.execute("UPDATE images SET status='missing' WHERE path='a.png'")
    assert catalog_summary(ws).counts == {"ok": 2, "unreadable": 1, "missing": 1}
    with sqlite3.connect(ws.path / "workspace.db") as raw:   # a change of reason alone: kept
        raw.execute("UPDATE images SET reason='x' WHERE path='broken.png'")
    assert catalog_summary(ws).counts == {"ok": 2, "unreadable": 1, "missing": 1}


def test_an_unreadable_report_reads_as_empty(scanned):
    folder, ws = scanned
    with ws.transaction() as conn:
        conn.execute("UPDATE scans SET report='{broken' WHERE finished IS NOT NULL")
    s = catalog_summary(ws)
    assert s.last_scan == {} and s.ignored == 0 and s.skipped == []
    assert s.counts["ok"] == 3                       # the counts come from the catalog itself
