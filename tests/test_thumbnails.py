"""Thumbnails: made once, regenerated on source change, placeholder, image folder untouched, fast."""
from __future__ import annotations

import io
import os
import time

import numpy as np
import pytest
from PIL import Image
from workspace_fixtures import image_path, make_workspace_with_run

from selfclassifier_core.catalog import thumbnails
from selfclassifier_core.catalog.thumbnails import (ensure_thumbnails, placeholder_path, thumbnail,
                                            thumbnail_bytes, thumbnail_path)


def folder_state(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in root.rglob("*"))


def count_decodes(monkeypatch):
    calls = []
    real = thumbnails._load_source

    def counting(path, size):
        calls.append(path)
        return real(path, size)

    monkeypatch.setattr(thumbnails, "_load_source", counting)
    return calls


def update_catalog_row(ws, image_id, path):
    st = path.stat()
    with ws.transaction() as conn:
        conn.execute("UPDATE images SET bytes=?, mtime_ns=? WHERE id=?",
                     (st.st_size, st.st_mtime_ns, image_id))


@pytest.fixture
def ws(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=12, image_size=300)
    return ws


def test_thumbnails_made_once_with_the_right_size(ws, monkeypatch):
    decodes = count_decodes(monkeypatch)
    before = folder_state(ws.root)
    progress = []
    paths = ensure_thumbnails(ws, range(1, 13), size=64, workers=2,
                              progress=lambda d, t: progress.append((d, t)))
    assert list(paths) == list(range(1, 13))
    assert len(decodes) == 12
    assert progress[-1] == (12, 12)
    for i, p in paths.items():
        assert p.exists() and p.parent.parent == ws.thumbnails_dir / "64"
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.size == (64, 64)
            # the fixture paints each image one solid colour: the thumbnail keeps it
            with Image.open(ws.root / image_path(i - 1)) as src:
                expected = np.asarray(src.convert("RGB"))[0, 0].astype(int)
            assert np.abs(np.asarray(im)[32, 32].astype(int) - expected).max() <= 6

    again = ensure_thumbnails(ws, range(1, 13), size=64)
    assert again == paths and len(decodes) == 12         # nothing decoded the second time
    assert thumbnail(ws, 5, size=64) == paths[5] and len(decodes) == 12
    assert thumbnail_path(ws, 5, size=64) == paths[5]
    assert folder_state(ws.root) == before                # image folder untouched
    assert not any(p.suffix == ".jpg" for p in ws.root.rglob("*"))


def test_changed_source_regenerates(ws, monkeypatch):
    old = thumbnail(ws, 3)
    src = ws.root / image_path(2)
    Image.new("RGB", (200, 100), (250, 10, 10)).save(src)
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    decodes = count_decodes(monkeypatch)
    assert thumbnail(ws, 3) == old                        # catalog not updated yet: cached one
    assert decodes == []
    update_catalog_row(ws, 3, src)                        # what a re-scan does
    new = thumbnail(ws, 3)
    assert new != old and len(decodes) == 1 and not old.exists()
    with Image.open(new) as im:
        assert im.size == (128, 64)
        r, g, b = np.asarray(im)[32, 64]
        assert r > 200 and g < 60 and b < 60


def test_unreadable_source_gives_placeholder(ws):
    broken = ws.root / image_path(0)
    broken.write_bytes(b"this is not an image")
    update_catalog_row(ws, 1, broken)
    (ws.root / image_path(1)).unlink()                    # a vanished file

    paths = ensure_thumbnails(ws, [1, 2, 3])
    ph = placeholder_path(ws)
    assert paths[1] == ph and paths[2] == ph and paths[3] != ph
    with Image.open(ph) as im:
        assert im.size == (128, 128)
    assert thumbnail(ws, 1) == ph
    data = thumbnail_bytes(ws, [1, 3])
    assert data[1] == ph.read_bytes() and data[3][:2] == b"\xff\xd8"

    Image.new("RGB", (50, 50), (0, 0, 255)).save(broken, format="PNG")  # repaired later
    update_catalog_row(ws, 1, broken)
    assert thumbnail(ws, 1) != ph


def test_bad_arguments(ws):
    with pytest.raises(ValueError, match="999"):
        thumbnail(ws, 999)
    with pytest.raises(ValueError, match="999"):
        thumbnail_bytes(ws, [1, 999])
    with pytest.raises(ValueError, match="size"):
        thumbnail(ws, 1, size=0)
    with pytest.raises(ValueError, match="workers"):
        ensure_thumbnails(ws, [1], workers=0)


def test_thumbnail_bytes_without_making(ws):
    ensure_thumbnails(ws, [1, 2])
    data = thumbnail_bytes(ws, [1, 2, 3], make_missing=False)
    assert set(data) == {1, 2}
    with Image.open(io.BytesIO(data[2])) as im:
        assert im.size == (128, 128)


def test_a_page_of_cached_thumbnails_from_a_large_catalog(tmp_path):
    """A page of the app reads its thumbnails' bytes among many catalog rows (its speed at
    100,000 rows: benchmarks/curation_speed.py)."""
    ws, _ = make_workspace_with_run(tmp_path, n_images=100, image_size=64)
    now = time.time_ns()
    with ws.transaction() as conn:
        conn.executemany(
            "INSERT INTO images (id, path, bytes, mtime_ns, status) VALUES (?, ?, ?, ?, 'ok')",
            ((i, f"more/{i:06d}.jpg", 1000, now) for i in range(101, 10_001)))
    page = list(range(1, 101))
    ensure_thumbnails(ws, page, workers=2)                # cached once, as the app would
    data = thumbnail_bytes(ws, page)
    assert sorted(data) == page and all(v[:2] == b"\xff\xd8" for v in data.values())