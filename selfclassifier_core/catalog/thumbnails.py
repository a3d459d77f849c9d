"""Thumbnails: made once from the source image, cached as JPEG in the workspace.

Layout: ``<workspace>/thumbnails/<size>/<id // 1000>/<id>-<key>.jpg`` where ``key`` is a short
hash of the catalog row's file size and mtime, so a changed source (after a re-scan) gets a new
thumbnail and the old one is removed. Files are written atomically; the image folder is never
written to. Every lookup goes through the catalog's primary key (``WHERE id IN (...)``), so
fetching a page of thumbnails costs the same on a workspace of 100 or 1,000,000 images.

An image that cannot be read gets a placeholder (``thumbnails/<size>/placeholder.jpg``), never
an exception; it is not cached per image, so a fixed file shows up on the next call.
"""
from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from ..store.fsutil import atomic_open, is_within
from ..store.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import sqlite3

    from PIL import Image

    from ..store.workspace import Workspace

log = logging.getLogger(__name__)

DEFAULT_SIZE = 128
MIN_SIZE, MAX_SIZE = 16, 1024
JPEG_QUALITY = 85
PLACEHOLDER_NAME = "placeholder.jpg"
_SQL_CHUNK = 500  # ids per IN (...) query, well under SQLite's parameter limit


@dataclass(frozen=True)
class _Row:
    id: int
    path: str
    bytes: int | None
    mtime_ns: int | None


def _check_size(size: int) -> int:
    if isinstance(size, bool) or int(size) != size or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"thumbnail size must be an integer in [{MIN_SIZE}, {MAX_SIZE}], "
                         f"got {size!r}")
    return int(size)


def _rows(workspace: "Workspace", image_ids: Iterable[int],
          conn: "sqlite3.Connection | None" = None) -> dict[int, _Row]:
    """Catalog rows of ``image_ids`` by primary key (ValueError naming an unknown id)."""
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    own = conn is None
    conn = conn or workspace.connect()
    try:
        found: dict[int, _Row] = {}
        for start in range(0, len(ids), _SQL_CHUNK):
            chunk = ids[start:start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            for r in conn.execute(
                    f"SELECT id, path, bytes, mtime_ns FROM images WHERE id IN ({marks})", chunk):
                found[r[0]] = _Row(r[0], r[1], r[2], r[3])
    finally:
        if own:
            conn.close()
    missing = [i for i in ids if i not in found]
    if missing:
        raise ValueError(f"image id {missing[0]} is not in the catalog of {workspace.path}")
    return found


def _path_for(workspace: "Workspace", row: _Row, size: int) -> Path:
    key = hashlib.sha1(f"{row.bytes}:{row.mtime_ns}".encode()).hexdigest()[:10]
    return workspace.thumbnails_dir / str(size) / str(row.id // 1000) / f"{row.id}-{key}.jpg"


def thumbnail_path(workspace: "Workspace", image_id: int, size: int = DEFAULT_SIZE) -> Path:
    """Where the thumbnail of ``image_id`` at ``size`` lives (it may not exist yet)."""
    size = _check_size(size)
    return _path_for(workspace, _rows(workspace, [image_id])[int(image_id)], size)


def _load_source(path: Path, size: int) -> "Image.Image":
    """Decode ``path`` as RGB, at most ``2 * size`` on its longer side (JPEGs decoded reduced)."""
    from .imageio import load_rgb

    return load_rgb(path, max_side=2 * size)


def _encode(img: "Image.Image", size: int) -> bytes:
    import io

    from PIL import Image

    img = img.copy()
    img.thumbnail((size, size), Image.Resampling.LANCZOS)  # reduces by whole factors first
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def placeholder_path(workspace: "Workspace", size: int = DEFAULT_SIZE) -> Path:
    """A grey image with a cross, shown for images that cannot be read (made once)."""
    size = _check_size(size)
    path = workspace.thumbnails_dir / str(size) / PLACEHOLDER_NAME
    if not path.exists():
        from PIL import Image, ImageDraw

        img = Image.new("RGB", (size, size), (200, 200, 200))
        draw = ImageDraw.Draw(img)
        m = size // 4
        draw.line((m, m, size - m, size - m), fill=(120, 120, 120), width=max(1, size // 32))
        draw.line((m, size - m, size - m, m), fill=(120, 120, 120), width=max(1, size // 32))
        with atomic_open(path, "wb") as fh:
            img.save(fh, "JPEG", quality=JPEG_QUALITY)
    return path


def _check_outside_images(workspace: "Workspace") -> None:
    root = workspace.root
    if root is not None and is_within(workspace.thumbnails_dir, root):
        raise ValueError(f"thumbnail folder {workspace.thumbnails_dir} lies inside the image "
                         f"folder {root}; the image folder is never written to")


def _make(workspace: "Workspace", root: Path | None, row: _Row, size: int) -> Path:
    """Create the thumbnail of ``row`` (or return the placeholder if its source is unreadable)."""
    target = _path_for(workspace, row, size)
    if target.exists():
        return target
    try:
        if root is None:
            raise FileNotFoundError("the workspace has no image folder recorded")
        data = _encode(_load_source(root / row.path, size), size)
    except Exception as exc:  # noqa: BLE001 - any decode failure means "show a placeholder"
        log.warning("no thumbnail for image %d (%s): %s", row.id, row.path, exc)
        return placeholder_path(workspace, size)
    with atomic_open(target, "wb") as fh:
        fh.write(data)
    for old in target.parent.glob(f"{row.id}-*.jpg"):  # older versions of a changed source
        if old != target:
            old.unlink(missing_ok=True)
    return target


def thumbnail(workspace: "Workspace", image_id: int, size: int = DEFAULT_SIZE) -> Path:
    """Path of the thumbnail of ``image_id`` (longest side ``size``), making it on first use."""
    size = _check_size(size)
    row = _rows(workspace, [image_id])[int(image_id)]
    path = _path_for(workspace, row, size)
    if path.exists():
        return path
    _check_outside_images(workspace)
    return _make(workspace, workspace.root, row, size)


def ensure_thumbnails(workspace: "Workspace", image_ids: Iterable[int], size: int = DEFAULT_SIZE,
                      workers: int | None = None, progress: Progress | None = None
                      ) -> dict[int, Path]:
    """Thumbnails of many images, making the missing ones in parallel threads.

    Returns ``{image_id: path}`` in the order of ``image_ids``; unreadable sources map to the
    placeholder. ``progress(done, total)`` counts images.
    """
    size = _check_size(size)
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    rows = _rows(workspace, ids)
    out: dict[int, Path] = {}
    todo: list[_Row] = []
    for i in ids:
        path = _path_for(workspace, rows[i], size)
        if os.path.exists(path):
            out[i] = path
        else:
            todo.append(rows[i])
    total, done = len(ids), len(ids) - len(todo)
    if progress:
        progress(done, total)
    if todo:
        _check_outside_images(workspace)
        root = workspace.root
        workers = workers or min(8, os.cpu_count() or 1)
        log.info("making %d thumbnails (%d px, %d threads)", len(todo), size, workers)
        if workers == 1 or len(todo) == 1:
            results = map(lambda r: _make(workspace, root, r, size), todo)
            for row, path in zip(todo, results):
                out[row.id] = path
                done += 1
                if progress:
                    progress(done, total)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="thumbs") as pool:
                for row, path in zip(todo, pool.map(lambda r: _make(workspace, root, r, size),
                                                    todo)):
                    out[row.id] = path
                    done += 1
                    if progress:
                        progress(done, total)
    return {i: out[i] for i in ids}


def thumbnail_bytes(workspace: "Workspace", image_ids: Iterable[int], size: int = DEFAULT_SIZE,
                    *, make_missing: bool = True, workers: int | None = None,
                    progress: Progress | None = None) -> dict[int, bytes]:
    """JPEG bytes of many thumbnails at once (the app's fast path for a page of images).

    One indexed catalog query per 500 ids plus one file read per thumbnail; missing thumbnails
    are made first unless ``make_missing`` is False (then they are left out of the result).
    ``progress(done, total)`` counts images made or found (as :func:`ensure_thumbnails`).
    """
    size = _check_size(size)
    ids = list(dict.fromkeys(int(i) for i in image_ids))
    if make_missing:
        paths = ensure_thumbnails(workspace, ids, size, workers=workers, progress=progress)
    else:
        rows = _rows(workspace, ids)
        paths = {i: _path_for(workspace, rows[i], size) for i in ids}
        if progress:
            progress(len(ids), len(ids))
    out: dict[int, bytes] = {}
    for i, path in paths.items():
        try:
            out[i] = path.read_bytes()
        except FileNotFoundError:
            if make_missing:  # removed between making and reading: make it again
                out[i] = thumbnail(workspace, i, size).read_bytes()
    return out
