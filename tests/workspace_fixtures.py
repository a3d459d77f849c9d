"""Build small workspaces with a finished run for tests, without any training.

Usage (pytest puts ``tests/`` on ``sys.path``)::

    from workspace_fixtures import make_workspace_with_run, add_run

    ws, run_id = make_workspace_with_run(tmp_path, n_images=40, heads=(3, 6))

What you get:

- ``tmp_path/images/``: the image folder (``ws.root``), PNGs at ``a/img_0000.png``,
  ``b/img_0001.png``, ... (alternating sub-folders ``a``/``b``; image *i* of the catalog has id
  ``i + 1``). Each image is a small solid colour chosen by its cluster in the first head, so
  images of one cluster look alike. With ``write_images=False`` only the catalog rows exist.
- ``tmp_path/ws/``: the workspace; ``images`` rows with status ``ok`` (plus ``n_unreadable``
  rows with status ``unreadable`` after them, which have no prediction).
- one run with status ``done``, ``heads`` as given, ``main_head`` (default: the first head)
  and predictions saved with :func:`save_predictions`: for head K the clusters are
  ``i % K`` shuffled by ``seed`` (so every cluster is used), confidence in [0.3, 1), margin in
  [0, confidence), embeddings float16 [N, 16], L2-normalised, near the centre of the image's
  first-head cluster.

:func:`add_run` adds another finished run over the same images (e.g. a re-training with
permuted cluster ids, for carry-over tests); :func:`cluster_assignments` gives the arrays that
the fixture generated, so tests can compute expected values without reading the code under test.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import numpy as np

from selfclassifier_core.store.predictions import HeadPrediction, Predictions, save_predictions
from selfclassifier_core.store.workspace import Workspace

EMBED_DIM = 16


def image_path(i: int) -> str:
    """Relative path of the i-th fixture image (0-based; its catalog id is ``i + 1``)."""
    return f"{'ab'[i % 2]}/img_{i:04d}.png"


def cluster_assignments(n_images: int, head: int, seed: int = 0) -> np.ndarray:
    """The cluster of each image for a head of ``head`` classes: ``i % head`` shuffled by seed."""
    rng = np.random.default_rng([seed, head])
    return rng.permutation(np.arange(n_images) % head).astype(np.int32)


def _write_png(path: Path, colour: tuple[int, int, int], size: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="PNG")


def make_workspace_with_run(tmp_path: str | Path, n_images: int = 40,
                            heads: Sequence[int] = (3, 6), seed: int = 0,
                            write_images: bool = True, main_head: int | None = None,
                            n_unreadable: int = 0, image_size: int = 8,
                            paths: Sequence[str] | None = None,
                            ) -> tuple[Workspace, int]:
    """A workspace over ``tmp_path/images`` with one finished run and its predictions.

    Args:
        tmp_path: a fresh directory (pytest's ``tmp_path``).
        n_images: usable images in the catalog (ids 1..n_images).
        heads: class counts of the run's heads.
        seed: seeds clusters, confidences and embeddings.
        write_images: write real PNG files (otherwise only catalog rows).
        main_head: the run's main head (default: ``heads[0]``).
        n_unreadable: extra catalog rows with status ``unreadable`` (not in the predictions).
        image_size: side of the PNGs in pixels.
        paths: relative paths of the images (default: :func:`image_path`); sets ``n_images``.

    Returns:
        ``(workspace, run_id)``.
    """
    tmp_path = Path(tmp_path)
    root = tmp_path / "images"
    root.mkdir(parents=True, exist_ok=True)
    if paths is not None:
        n_images = len(paths)
    ws = Workspace.open(tmp_path / "ws", root=root, create=True)
    first = cluster_assignments(n_images, heads[0], seed)
    palette = np.random.default_rng(seed + 1000).integers(0, 256, size=(max(heads[0], 1), 3))
    now = time.time()
    rows = []
    for i in range(n_images):
        rel = paths[i] if paths is not None else image_path(i)
        size = None
        if write_images:
            p = root / rel
            _write_png(p, tuple(int(v) for v in palette[first[i]]), image_size)
            st = p.stat()
            size, mtime = st.st_size, st.st_mtime_ns
        else:
            mtime = int(now * 1e9)
        rows.append((i + 1, rel, size, mtime, image_size, image_size, "RGB", "ok", None, now))
    for j in range(n_unreadable):
        rows.append((n_images + j + 1, f"bad/broken_{j:03d}.png", 10, int(now * 1e9), None, None,
                     None, "unreadable", "not an image (cannot identify image file)", now))
    with ws.transaction() as conn:
        conn.executemany(
            "INSERT INTO images (id, path, bytes, mtime_ns, width, height, mode, status, reason, "
            "scanned_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    run_id = add_run(ws, heads=heads, seed=seed, main_head=main_head,
                     image_ids=np.arange(1, n_images + 1))
    return ws, run_id


def add_run(ws: Workspace, heads: Sequence[int] = (3, 6), seed: int = 0,
            main_head: int | None = None, image_ids: Sequence[int] | None = None,
            clusters: dict[int, np.ndarray] | None = None) -> int:
    """Add a finished run with made-up predictions over ``image_ids`` (default: all usable).

    ``clusters`` gives the cluster array of some heads explicitly (aligned with ``image_ids``);
    other heads use :func:`cluster_assignments`. Returns the run id.
    """
    if image_ids is None:
        image_ids = [i for i, _ in ws.usable_images()]
    ids = np.asarray(image_ids, dtype=np.int64)
    n = len(ids)
    rng = np.random.default_rng(seed)
    run_id = ws.create_run("scratch", {"fixture": True, "seed": seed}, list(heads),
                           main_head if main_head is not None else heads[0])
    head_preds = {}
    for k in heads:
        cl = (np.asarray(clusters[k], np.int32) if clusters and k in clusters
              else cluster_assignments(n, k, seed))
        conf = rng.uniform(0.3, 1.0, n).astype(np.float32)
        margin = (conf * rng.uniform(0.0, 1.0, n)).astype(np.float32)
        head_preds[int(k)] = HeadPrediction(int(k), cl, conf, margin)
    first = head_preds[int(heads[0])].cluster
    centres = rng.normal(size=(int(heads[0]), EMBED_DIM))
    emb = centres[first] + 0.1 * rng.normal(size=(n, EMBED_DIM))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    save_predictions(ws.run_dir(run_id), Predictions(ids, head_preds, emb.astype(np.float16)))
    ws.update_run(run_id, status="done", heads=list(heads),
                  main_head=main_head if main_head is not None else heads[0])
    return run_id
