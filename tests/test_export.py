"""Exports: CSV columns and formula neutralising, ImageFolder with hostile names, Parquet, JSONL."""
from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from selfclassifier_core.curation import export as ex
from selfclassifier_core.curation.export import (build_csv_bytes, export_csv, export_imagefolder,
                                        export_jsonl, export_parquet, safe_folder_name)
from selfclassifier_core.curation.labels import Labels
from selfclassifier_core.store.predictions import load_predictions, save_predictions
from workspace_fixtures import cluster_assignments, make_workspace_with_run

CSV_COLUMNS = ["path", "label", "cluster", "confidence", "margin", "head", "edited"]


@pytest.fixture
def ws_run(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=24, heads=(3, 12), seed=0)


def read_csv_rows(data: bytes) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def all_paths(base: Path) -> set[Path]:
    return {p for p in base.rglob("*")}


# ---------------------------------------------------------------------- CSV
def test_csv_columns_and_values(ws_run, tmp_path):
    ws, run_id = ws_run
    lab = Labels(ws)
    lab.rename(0, "Cats, and \"dogs\"")
    lab.move([2], label="Ünïcødé 🐱")
    lab.exclude([3])
    out = export_csv(ws, tmp_path / "out" / "labels.csv")
    data = out.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf")
    header = data.decode("utf-8").splitlines()[0]
    assert header == ",".join(CSV_COLUMNS)
    rows = read_csv_rows(data)
    assert len(rows) == 23                      # image 3 excluded
    by_path = {r["path"]: r for r in rows}
    preds = load_predictions(ws.run_dir(run_id), embeddings=False).heads[3]
    expected_cl = cluster_assignments(24, 3, 0)
    r1 = by_path["a/img_0000.png"]
    assert int(r1["cluster"]) == expected_cl[0]
    assert float(r1["confidence"]) == pytest.approx(float(preds.confidence[0]), abs=1e-6)
    assert float(r1["margin"]) == pytest.approx(float(preds.margin[0]), abs=1e-6)
    assert r1["head"] == "3" and r1["edited"] == "false"
    assert r1["label"] == ("Cats, and \"dogs\"" if expected_cl[0] == 0 else
                           f"cluster_{expected_cl[0]}")
    r2 = by_path["b/img_0001.png"]
    assert r2["label"] == "Ünïcødé 🐱" and r2["edited"] == "true" and r2["cluster"] == ""
    assert "a/img_0002.png" not in by_path
    # with excluded images: an extra column
    data = build_csv_bytes(ws, include_excluded=True)
    rows = read_csv_rows(data)
    assert list(rows[0]) == CSV_COLUMNS + ["excluded"]
    assert len(rows) == 24
    assert [r["excluded"] for r in rows if r["path"] == "a/img_0002.png"] == ["true"]
    assert export_csv(ws, tmp_path / "o12.csv", head=12).read_text().count("\n") == 25


@pytest.mark.parametrize("name", ['=HYPERLINK("http://evil","x")', "+1", "-x", "@SUM(A1)",
                                  "=1+2", "-2+3"])
def test_csv_formula_neutralised(ws_run, name):
    ws, _ = ws_run
    lab = Labels(ws)
    lab.rename(1, name)
    rows = read_csv_rows(build_csv_bytes(ws))
    cells = {r["label"] for r in rows if r["cluster"] == "1"}
    assert cells == {"'" + name}
    assert Labels(ws).final_table()["label"].str.startswith(name).any()   # stored unaltered


def test_csv_neutralises_paths_and_tab_but_not_numbers(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, paths=["-rf.png", "=cmd.png", "\tx.png",
                                                          "ok.png"], heads=(2,))
    preds = load_predictions(ws.run_dir(run_id))
    preds.heads[2].margin[:] = -0.25                   # negative numbers stay numbers
    save_predictions(ws.run_dir(run_id), preds)
    text = build_csv_bytes(ws).decode()
    rows = read_csv_rows(text.encode())
    assert [r["path"] for r in rows] == ["'-rf.png", "'=cmd.png", "'\tx.png", "ok.png"]
    assert all(r["margin"] == "-0.25" for r in rows)
    assert ",-0.25," in text
    # Parquet and JSON lines keep the raw values
    df = pd.read_parquet(export_parquet(ws, tmp_path / "o.parquet"))
    assert df["path"].tolist() == ["-rf.png", "=cmd.png", "\tx.png", "ok.png"]


def test_neutralize_formula_direct():
    assert ex.neutralize_formula("=A1") == "'=A1"
    assert ex.neutralize_formula("\rX") == "'\rX"
    assert ex.neutralize_formula("a=b") == "a=b"
    assert ex.neutralize_formula("") == ""


def test_csv_refuses_image_folder(ws_run):
    ws, _ = ws_run
    with pytest.raises(ValueError, match="image folder"):
        export_csv(ws, ws.root / "labels.csv")
    assert not (ws.root / "labels.csv").exists()


# ---------------------------------------------------------------------- Parquet / JSONL
def test_parquet_and_jsonl_round_trip(ws_run, tmp_path):
    ws, _ = ws_run
    lab = Labels(ws)
    lab.rename(2, "🐶 dogs")
    lab.move([5], label="brand new")
    lab.exclude([6])
    table = lab.final_table()
    kept = table[~table["excluded"]]

    pq = pd.read_parquet(export_parquet(ws, tmp_path / "l.parquet"))
    assert list(pq.columns) == CSV_COLUMNS
    assert pq["path"].tolist() == kept["path"].tolist()
    assert pq["label"].tolist() == kept["label"].tolist()
    assert pq["cluster"].isna().tolist() == kept["cluster"].isna().tolist()
    assert pq["cluster"].dropna().astype(int).tolist() == kept["cluster"].dropna().tolist()
    np.testing.assert_allclose(pq["confidence"], kept["confidence"], atol=1e-6)
    assert pq["edited"].dtype == bool and pq["edited"].tolist() == kept["edited"].tolist()

    lines = export_jsonl(ws, tmp_path / "l.jsonl", include_excluded=True).read_text(
        encoding="utf-8").splitlines()
    recs = [json.loads(x) for x in lines]
    assert len(recs) == 24 and list(recs[0]) == CSV_COLUMNS + ["excluded"]
    by_path = {r["path"]: r for r in recs}
    assert by_path["a/img_0004.png"]["label"] == "brand new"
    assert by_path["a/img_0004.png"]["cluster"] is None
    assert by_path["b/img_0005.png"]["excluded"] is True
    assert all(isinstance(r["head"], int) and isinstance(r["edited"], bool) for r in recs)
    assert "🐶 dogs" in {r["label"] for r in recs}
    assert "🐶" in Path(tmp_path / "l.jsonl").read_text(encoding="utf-8")   # not \\u-escaped


# ---------------------------------------------------------------------- safe folder names
@pytest.mark.parametrize("name,expected", [
    ("Cats", "Cats"),
    ("../../x", "_.._x"),
    ("a/b", "a_b"),
    ("a\\b", "a_b"),
    ("..", "unnamed"),
    (".", "unnamed"),
    ("", "unnamed"),
    ("CON", "_CON"),
    ("con.txt", "_con.txt"),
    ("Lpt1", "_Lpt1"),
    ("COM9.tar.gz", "_COM9.tar.gz"),
    ("CONSOLE", "CONSOLE"),
    ("trailing. . ", "trailing"),
    ("nul\x00byte", "nul_byte"),
    ("tab\there\nnl", "tab_here_nl"),
    ('a<b>c:d"e|f?g*h', "a_b_c_d_e_f_g_h"),
    ("🐱 cats", "🐱 cats"),
    ("mapping.json", "_mapping.json"),
])
def test_safe_folder_name(name, expected):
    assert safe_folder_name(name) == expected


def test_safe_folder_name_long_and_collisions():
    long = "é" * 300                                   # 600 UTF-8 bytes
    s = safe_folder_name(long)
    assert len(s.encode()) <= 200 and s == "é" * 100
    emoji = "🐱" * 100                                 # 4 bytes each: cut on a code point
    assert safe_folder_name(emoji) == "🐱" * 50
    taken: set[str] = set()
    got = [safe_folder_name(n, taken) for n in ["Cats", "cats", "CATS", "a/b", "a_b", long, long]]
    assert got[:5] == ["Cats", "cats_2", "CATS_3", "a_b", "a_b_2"]
    assert got[5] != got[6] and all(len(g.encode()) <= 200 for g in got)
    assert len({g.casefold() for g in got}) == len(got)


# ---------------------------------------------------------------------- ImageFolder
HOSTILE = ["../../x", "a/b", "CON", "..", "x" * 300, "🐱 emoji", "a\\b", "Cats", "cats", "/etc",
           "nul.txt", "   spaced  ", ".hidden"]


def test_imagefolder_hostile_names_stay_inside(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=40, heads=(len(HOSTILE),))
    lab = Labels(ws)
    for c, name in enumerate(HOSTILE):
        lab.rename(c, name)
    with pytest.raises(ValueError):
        lab.rename(0, "")                              # empty rejected at rename
    sources_before = tree_digest(ws.root)
    outside_before = all_paths(tmp_path)
    out = tmp_path / "export" / "tree"
    report = export_imagefolder(ws, out)
    assert report.files == 40 and not report.missing

    new_paths = all_paths(tmp_path) - outside_before   # the workspace's own cache aside
    assert all(p == out or out in p.parents or p == out.parent
               for p in new_paths if not (p == ws.cache_dir or ws.cache_dir in p.parents))
    for p in out.rglob("*"):
        assert p.resolve().is_relative_to(out.resolve())
    assert tree_digest(ws.root) == sources_before      # sources unchanged

    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(folders) == len(HOSTILE)
    assert len({f.casefold() for f in folders}) == len(folders)
    for f in folders:
        assert "/" not in f and "\\" not in f and f not in (".", "..") and f.strip(". ") == f
        assert len(f.encode()) <= 255 and f.split(".")[0].upper() not in ("CON", "NUL")
    mapping = json.loads((out / "mapping.json").read_text(encoding="utf-8"))
    assert set(mapping["labels"]) == {n.strip() for n in HOSTILE}
    assert mapping["labels"]["Cats"] != mapping["labels"]["cats"]
    # every image sits in its label's folder with the source's bytes
    table = lab.final_table()
    for image_id, row in table.iterrows():
        folder = mapping["labels"][row["label"]]
        target = out / folder / Path(row["path"]).name
        assert target.read_bytes() == (ws.root / row["path"]).read_bytes()
        assert mapping["files"][f"{folder}/{Path(row['path']).name}"] == row["path"]
    listing = read_csv_rows((out / "labels.csv").read_bytes())
    assert len(listing) == 40 and {r["file"].split("/")[0] for r in listing} == set(folders)


def test_imagefolder_file_name_collisions(tmp_path):
    paths = ["a/x.png", "b/x.png", "c/X.png", "d/x.png", "x_2.png", "e/y"]
    ws, _ = make_workspace_with_run(tmp_path, paths=paths, heads=(1,))
    report = export_imagefolder(ws, tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out" / "cluster_0").iterdir())
    assert len(names) == 6 and len({n.casefold() for n in names}) == 6
    assert "x.png" in names and "y" in names
    assert report.renamed_files == 4   # b, c (case), d, and x_2.png (taken by b)
    files = json.loads((tmp_path / "out" / "mapping.json").read_text())["files"]
    assert sorted(files.values()) == sorted(paths)
    for target, source in files.items():
        assert (tmp_path / "out" / target).read_bytes() == (ws.root / source).read_bytes()


def test_imagefolder_refuses_non_empty_and_overwrites_previous(ws_run, tmp_path):
    ws, _ = ws_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        export_imagefolder(ws, out)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    export_imagefolder(ws, out, overwrite=True)
    lab = Labels(ws)
    lab.merge([0, 1, 2], name="All")
    report = export_imagefolder(ws, out, overwrite=True)
    assert report.removed_previous == 24
    assert sorted(os.listdir(out)) == ["All", "keep.txt", "labels.csv", "mapping.json"]
    assert (out / "keep.txt").read_text() == "mine"
    assert len(os.listdir(out / "All")) == 24


def test_imagefolder_excluded_and_missing_sources(ws_run, tmp_path):
    ws, _ = ws_run
    Labels(ws).exclude([1, 2])
    os.unlink(ws.root / "a/img_0002.png")              # image 3 deleted after the scan
    report = export_imagefolder(ws, tmp_path / "o1")
    assert report.files == 21 and report.missing == ["a/img_0002.png"]
    assert "missing" in str(report)
    report = export_imagefolder(ws, tmp_path / "o2", include_excluded=True)
    assert report.files == 23


def test_imagefolder_links(ws_run, tmp_path):
    ws, _ = ws_run
    export_imagefolder(ws, tmp_path / "sym", link="sym")
    export_imagefolder(ws, tmp_path / "hard", link="hard")
    files = json.loads((tmp_path / "sym" / "mapping.json").read_text())["files"]
    for target, source in files.items():
        link = tmp_path / "sym" / target
        assert link.is_symlink() and link.resolve() == (ws.root / source).resolve()
        hard = tmp_path / "hard" / target
        assert not hard.is_symlink()
        assert os.stat(hard).st_ino == os.stat(ws.root / source).st_ino
    with pytest.raises(ValueError, match="link"):
        export_imagefolder(ws, tmp_path / "bad", link="weird")


def test_hard_link_cross_device_error(ws_run, tmp_path, monkeypatch):
    ws, _ = ws_run

    def fail(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", fail)
    with pytest.raises(ValueError, match="different file systems"):
        export_imagefolder(ws, tmp_path / "out", link="hard")


def test_imagefolder_refuses_overlap_with_image_folder(ws_run, tmp_path):
    ws, _ = ws_run
    with pytest.raises(ValueError, match="image folder"):
        export_imagefolder(ws, ws.root / "sub")
    with pytest.raises(ValueError, match="image folder"):
        export_imagefolder(ws, tmp_path, overwrite=True)   # the image folder lies inside


def test_previous_mapping_cannot_delete_outside(ws_run, tmp_path):
    ws, _ = ws_run
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / "mapping.json").write_text(json.dumps(
        {"files": {"../victim.txt": "x", "a/../../victim.txt": "y", str(victim): "z"}}))
    export_imagefolder(ws, out, overwrite=True)
    assert victim.read_text() == "precious"


def _crash_after(monkeypatch, n: int) -> list[Path]:
    """Make the export place ``n`` files, then fail as a full disk would; returns the placed."""
    real, placed = ex._place, []

    def place(src, target, link):
        if len(placed) == n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, target, link)
        placed.append(target)

    monkeypatch.setattr(ex, "_place", place)
    return placed


def test_imagefolder_crash_leaves_no_out_then_exports(ws_run, tmp_path, monkeypatch):
    ws, _ = ws_run
    sources = tree_digest(ws.root)
    clean = export_imagefolder(ws, tmp_path / "clean")
    out = tmp_path / "export" / "out"
    real = ex._place
    placed = _crash_after(monkeypatch, 5)
    with pytest.raises(OSError, match="No space left"):
        export_imagefolder(ws, out)
    assert len(placed) == 5 and not out.exists()
    assert os.listdir(out.parent) == []                # no temporary folder left
    monkeypatch.setattr(ex, "_place", real)
    report = export_imagefolder(ws, out)
    assert report.files == 24 and report.folders == clean.folders   # no cluster_0_2
    assert sorted(os.listdir(out)) == sorted([*clean.folders.values(), "labels.csv",
                                              "mapping.json"])
    assert os.listdir(out.parent) == ["out"]
    assert out.stat().st_mode & 0o777 == 0o777 & ~ex._umask()
    assert tree_digest(ws.root) == sources


def test_imagefolder_crash_during_overwrite_keeps_previous_export(ws_run, tmp_path, monkeypatch):
    ws, _ = ws_run
    out = tmp_path / "out"
    export_imagefolder(ws, out)
    (out / "keep.txt").write_text("mine")
    before = tree_digest(out)
    Labels(ws).merge([0, 1, 2], name="All")
    real = ex._place
    _crash_after(monkeypatch, 5)
    with pytest.raises(OSError, match="No space left"):
        export_imagefolder(ws, out, overwrite=True)
    assert tree_digest(out) == before                  # the earlier export, complete
    assert sorted(os.listdir(tmp_path)) == ["images", "out", "ws"]
    monkeypatch.setattr(ex, "_place", real)
    report = export_imagefolder(ws, out, overwrite=True)
    assert report.removed_previous == 24
    assert sorted(os.listdir(out)) == ["All", "keep.txt", "labels.csv", "mapping.json"]
    assert len(os.listdir(out / "All")) == 24
    assert sorted(os.listdir(tmp_path)) == ["images", "out", "ws"]


def test_imagefolder_builds_inside_out_when_its_parent_is_read_only(ws_run, tmp_path,
                                                                     monkeypatch):
    ws, _ = ws_run
    out = tmp_path / "mnt" / "out"
    out.mkdir(parents=True)
    real_temp = ex._make_temp_dir

    def make_temp_dir(parent, prefix):
        if parent == out.parent:
            raise PermissionError(errno.EACCES, "Permission denied", str(parent))
        return real_temp(parent, prefix)

    monkeypatch.setattr(ex, "_make_temp_dir", make_temp_dir)
    real = ex._place
    _crash_after(monkeypatch, 5)
    with pytest.raises(OSError, match="No space left"):
        export_imagefolder(ws, out, link="sym")
    assert os.listdir(out) == [] and os.listdir(out.parent) == ["out"]
    monkeypatch.setattr(ex, "_place", real)
    export_imagefolder(ws, out, link="sym")
    assert not [n for n in os.listdir(out) if n.startswith(".")]
    files = json.loads((out / "mapping.json").read_text())["files"]
    assert len(files) == 24
    for target, source in files.items():
        link = out / target
        assert link.is_symlink() and link.resolve() == (ws.root / source).resolve()


# An export in a child process that stops after placing this many files, until it is killed.
# The pause only makes the moment of the SIGKILL certain; the kill itself is real (the kernel
# drops the export's lock on its staging folder, nothing of the export's cleanup runs).
_PAUSED_EXPORT = """
import sys, time
from pathlib import Path
from selfclassifier_core.curation import export as ex
from selfclassifier_core.store.workspace import Workspace

ws, out, marker, n = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
real, placed = ex._place, []

def place(src, target, link):
    real(src, target, link)
    placed.append(target)
    if len(placed) == n:
        marker.write_text(str(target))
        time.sleep(600)

ex._place = place
ex.export_imagefolder(Workspace.open(ws), out, overwrite=True)
"""


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


@pytest.mark.slow  # starts a subprocess
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-an-earlier-export"])
def test_imagefolder_after_an_export_killed_midway(ws_run, tmp_path, earlier):
    import signal
    import subprocess
    import sys
    import time

    ws, _ = ws_run
    out = tmp_path / "export" / "out"
    if earlier:
        export_imagefolder(ws, out)
        (out / "keep.txt").write_text("mine")
    before = tree_digest(out) if earlier else None
    Labels(ws).merge([0, 1, 2], name="All")               # the killed export differs
    marker = tmp_path / "placed"
    repo = Path(__file__).resolve().parents[1]
    child = subprocess.Popen([sys.executable, "-c", _PAUSED_EXPORT, str(ws.path), str(out),
                              str(marker), "5"], env={**os.environ, "PYTHONPATH": str(repo)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, "the export ended before it was killed"
            assert time.monotonic() < deadline, "the export did not start placing files"
            time.sleep(0.05)
        staging = [p for p in out.parent.iterdir() if p.name.startswith("out.partial-")]
        assert len(staging) == 1 and len(_files(staging[0])) == 5   # mid-way
        with pytest.raises(ValueError, match="another export into .* is running"):
            export_imagefolder(ws, out, overwrite=True)         # while it lives: refused
        child.send_signal(signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # killed: OUT is as it was (the earlier export, whole, or nothing), the staging is left
    if earlier:
        assert tree_digest(out) == before
    else:
        assert not out.exists()
    assert staging[0].is_dir() and len(_files(staging[0])) == 5
    report = export_imagefolder(ws, out, overwrite=True)  # the next export clears it, and works
    assert report.files == 24 and not staging[0].exists()
    assert sorted(os.listdir(out.parent)) == ["out"]
    assert sorted(os.listdir(out)) == ["All", *(["keep.txt"] if earlier else []), "labels.csv",
                                       "mapping.json"]
    assert len(os.listdir(out / "All")) == 24


def test_imagefolder_removes_only_its_own_stale_staging(ws_run, tmp_path):
    """Leftover staging folders are recognised by name (OUT.partial-XXXXXXXX beside OUT,
    .partial-XXXXXXXX inside it); similar names of other folders are left alone."""
    ws, _ = ws_run
    out = tmp_path / "export" / "out"
    stale = tmp_path / "export" / "out.partial-k1lled_9"     # as tempfile.mkdtemp names it
    (stale / "cluster_0").mkdir(parents=True)
    (stale / "cluster_0" / "a.png").write_bytes(b"half-built")
    mine = [tmp_path / "export" / n for n in ("out.partial-notmine", "outer.partial-abcd1234")]
    for d in mine:
        d.mkdir()
    export_imagefolder(ws, out)
    assert sorted(os.listdir(out.parent)) == sorted(["out", *[d.name for d in mine]])
    # a hidden one inside OUT (from a symlinked or mounted OUT) goes as well
    (out / ".partial-abcd_123").mkdir()
    report = export_imagefolder(ws, out, overwrite=True)
    assert report.files == 24 and not [n for n in os.listdir(out) if n.startswith(".")]


def test_imagefolder_refuses_while_another_export_builds(ws_run, tmp_path):
    ws, _ = ws_run
    out = tmp_path / "out"
    busy = tmp_path / "out.partial-abcd1234"
    busy.mkdir()
    fd = ex._lock_dir(busy, wait=True)   # as a running export holds its staging folder
    try:
        with pytest.raises(ValueError, match="another export into .* is running"):
            export_imagefolder(ws, out)
        assert busy.is_dir() and not out.exists()
    finally:
        os.close(fd)
    export_imagefolder(ws, out)           # once it is released, the folder is stale
    assert sorted(os.listdir(tmp_path)) == ["images", "out", "ws"]
