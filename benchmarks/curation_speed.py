"""How fast the curation layer is: FAISS kNN, the UMAP map, a page of thumbnails, the label table.

    python benchmarks/curation_speed.py [--sizes 10000 100000] [--umap-n 10000] [--skip-umap]

Prints one line per figure. Everything is synthetic (random 128-d vectors, generated images) and
written under a temporary directory that is removed afterwards.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfclassifier_core.curation.neighbors import NeighborIndex  # noqa: E402
from selfclassifier_core.store.workspace import Workspace  # noqa: E402


def random_unit(n: int, dim: int = 128, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def bench_faiss(sizes: list[int], ivf: bool) -> None:
    for n in sizes:
        emb = random_unit(n)
        ids = np.arange(1, n + 1)
        t0 = time.perf_counter()
        index = NeighborIndex(emb, ids, use_gpu=False)
        t1 = time.perf_counter()
        index.knn_all(10)
        t2 = time.perf_counter()
        one = []
        for q in range(5):
            t3 = time.perf_counter()
            index.search(1 + q * (n // 5), k=10)
            one.append(time.perf_counter() - t3)
        print(f"faiss flat   n={n:>7,}  build {t1 - t0:6.2f} s   10-NN of all {t2 - t1:6.2f} s   "
              f"one query (median of 5) {1000 * statistics.median(one):6.2f} ms")
        if ivf and n >= 50_000:
            t0 = time.perf_counter()
            approx = NeighborIndex(emb, ids, ivf_threshold=1, use_gpu=False)
            t1 = time.perf_counter()
            _, pos = approx.knn_all(10)
            t2 = time.perf_counter()
            sample = np.random.default_rng(1).choice(n, 1000, replace=False)
            _, exact_ids = index.search_vectors(emb[sample], 10)
            recall = np.mean([len(set(a) & set(b)) / 10 for a, b in
                              zip(exact_ids, ids[pos[sample]])])
            print(f"faiss IVF    n={n:>7,}  build {t1 - t0:6.2f} s   10-NN of all {t2 - t1:6.2f} s   "
                  f"recall@10 {recall:.3f} (nprobe {approx.cpu_index.nprobe})")


def bench_umap(n: int) -> None:
    from selfclassifier_core.curation.projection import umap_2d

    t0 = time.perf_counter()
    import umap  # noqa: F401
    t1 = time.perf_counter()
    umap_2d(random_unit(200, seed=2), seed=0)  # numba JIT, once per process
    t2 = time.perf_counter()
    emb = random_unit(n, seed=3)
    t3 = time.perf_counter()
    umap_2d(emb, seed=0)
    t4 = time.perf_counter()
    print(f"umap         import {t1 - t0:.1f} s   first fit (JIT) {t2 - t1:.1f} s   "
          f"n={n:,} seeded fit {t4 - t3:.1f} s")


def bench_thumbnails(tmp: Path, n_rows: int = 100_000, page: int = 100) -> None:
    from PIL import Image

    from selfclassifier_core.catalog.thumbnails import ensure_thumbnails, thumbnail_bytes

    root = tmp / "images"
    root.mkdir()
    ws = Workspace.open(tmp / "ws", root=root, create=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(1, page + 1):
        p = root / f"img_{i:04d}.jpg"
        arr = rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((640, 480), Image.Resampling.BILINEAR).save(p, quality=90)
        st = p.stat()
        rows.append((i, p.name, st.st_size, st.st_mtime_ns, "ok"))
    now = time.time_ns()
    rows += [(i, f"more/{i:07d}.jpg", 50_000, now, "ok") for i in range(page + 1, n_rows + 1)]
    with ws.transaction() as conn:
        conn.executemany("INSERT INTO images (id, path, bytes, mtime_ns, status) "
                         "VALUES (?, ?, ?, ?, ?)", rows)
    ids = list(range(1, page + 1))
    t0 = time.perf_counter()
    ensure_thumbnails(ws, ids)
    t1 = time.perf_counter()
    times = []
    for _ in range(7):
        s = time.perf_counter()
        data = thumbnail_bytes(ws, ids)
        times.append(time.perf_counter() - s)
    assert len(data) == page
    print(f"thumbnails   catalog {n_rows:,} rows   make {page} (640x480 JPEG -> 128 px) "
          f"{t1 - t0:.2f} s   fetch bytes of {page} cached: median "
          f"{1000 * statistics.median(times):.1f} ms (min {1000 * min(times):.1f})")


def bench_final_table(tmp: Path, n: int = 100_000) -> None:
    """``Labels.final_table`` of a run of ``n`` images with 10,000 edits (moves to a label, to a
    cluster, exclusions), warm: what every screen reads after an edit."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from workspace_fixtures import make_workspace_with_run

    from selfclassifier_core.curation.labels import Labels

    ws, _ = make_workspace_with_run(tmp, n_images=n, heads=(50,), write_images=False)
    lab = Labels(ws)
    lab.move(list(range(1, 5001)), label="Moved")
    lab.exclude(list(range(5001, 7001)))
    lab.move(list(range(9001, 12001)), cluster=3)
    lab.final_table()  # warm: the catalog read once, as the app keeps it
    times = []
    for _ in range(5):
        s = time.perf_counter()
        df = lab.final_table()
        times.append(time.perf_counter() - s)
    assert len(df) == n
    print(f"final table  {n:,} images, 10,000 edits: median {statistics.median(times):.3f} s "
          f"(min {min(times):.3f})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--umap-n", type=int, default=10_000)
    parser.add_argument("--skip-umap", action="store_true")
    parser.add_argument("--no-ivf", action="store_true", help="skip the IVF comparison")
    args = parser.parse_args(argv)
    print(f"cpu cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp:
        bench_thumbnails(Path(tmp))
    with tempfile.TemporaryDirectory(prefix="sc-bench-") as tmp:
        bench_final_table(Path(tmp))
    bench_faiss(args.sizes, ivf=not args.no_ivf)
    if not args.skip_umap:
        bench_umap(args.umap_n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
