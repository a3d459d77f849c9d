"""At scale: a synthetic workspace of N images, every step and every app screen timed.

    python benchmarks/scale.py --n 100000            # ~10 min on 2 cores
    python benchmarks/scale.py --n 1000000 --keep /big/disk/scale-1m

Builds N small generated PNGs (8 px, in folders of 1,000), scans them, adds a synthetic finished
run (128-d embeddings around 40 centres, heads of 10, 20 and 40 classes; no training) and
measures: the scan; the neighbour index (exact up to the threshold, IVF above it) and the IVF's
recall@10 against exact search on a sample of queries; the 2-D map (UMAP fit on a sample, then
transform); the final label table; each export; and every app screen's server time through
AppTest, twice (the second run shows what the caches save). Peak memory (this process and its
children) is printed after each step. Everything goes into a temporary directory (or
``--keep DIR``), removed afterwards unless kept.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = (10, 20, 40)
DIM = 128


def peak_mb() -> tuple[float, float]:
    """Peak resident memory of this process and of its (finished) children, in MB."""
    me = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


def report(step: str, seconds: float, extra: str = "") -> None:
    me, kids = peak_mb()
    print(f"{step:<44} {seconds:8.2f} s   peak {me:7.0f} MB (workers {kids:5.0f} MB)"
          + (f"   {extra}" if extra else ""), flush=True)


def make_images(folder: Path, n: int, size: int = 8) -> None:
    """N PNGs of one of 40 colours (the colour follows the synthetic run's coarse cluster)."""
    from PIL import Image

    palette = np.random.default_rng(1).integers(0, 256, (max(HEADS), 3))
    tiles = [Image.new("RGB", (size, size), tuple(int(v) for v in c)) for c in palette]
    import io

    encoded = []
    for tile in tiles:
        buf = io.BytesIO()
        tile.save(buf, format="PNG")
        encoded.append(buf.getvalue())
    for start in range(0, n, 1000):
        d = folder / f"d{start // 1000:04d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(start, min(n, start + 1000)):
            (d / f"img_{i:07d}.png").write_bytes(encoded[i % max(HEADS)])


def add_run(ws, seed: int = 0) -> int:
    """A finished run over every usable image: clusters nested 10 < 20 < 40, embeddings near
    the centre of the image's 40-class cluster (what a trained run looks like to the screens)."""
    from selfclassifier_core.store.predictions import (HeadPrediction, Predictions,
                                                       save_predictions)

    ids = np.array([i for i, _ in ws.usable_images()], np.int64)
    n = len(ids)
    rng = np.random.default_rng(seed)
    fine = (np.arange(n) % max(HEADS)).astype(np.int32)
    heads = {}
    for k in HEADS:
        cluster = (fine % k).astype(np.int32)
        conf = rng.uniform(0.3, 1.0, n).astype(np.float32)
        heads[k] = HeadPrediction(k, cluster, conf, (conf * rng.uniform(0, 1, n)).astype(
            np.float32))
    centres = rng.normal(size=(max(HEADS), DIM)).astype(np.float32)
    emb = np.empty((n, DIM), np.float16)
    for start in range(0, n, 100_000):  # in chunks: float32 for 1M x 128 is 0.5 GB
        stop = min(n, start + 100_000)
        block = centres[fine[start:stop]] + 0.35 * rng.normal(size=(stop - start, DIM))
        emb[start:stop] = (block / np.linalg.norm(block, axis=1, keepdims=True)).astype(
            np.float16)
    run_id = ws.create_run("fast", {"synthetic": True}, list(HEADS), HEADS[0])
    save_predictions(ws.run_dir(run_id), Predictions(ids, heads, emb))
    ws.update_run(run_id, status="done", heads=list(HEADS), main_head=HEADS[0])
    return run_id


def recall_at_10(index, emb: np.ndarray, ids: np.ndarray, n_queries: int = 500) -> float:
    """Share of the exact top-10 neighbours (cosine, brute force) the index returns."""
    rng = np.random.default_rng(0)
    q_pos = rng.choice(len(ids), size=min(n_queries, len(ids)), replace=False)
    hits = 0
    for pos in q_pos:
        q = emb[pos].astype(np.float32)
        sims = np.empty(len(ids), np.float32)
        for start in range(0, len(ids), 200_000):
            block = emb[start:start + 200_000].astype(np.float32)
            sims[start:start + 200_000] = block @ q
        sims[pos] = -np.inf
        exact = set(ids[np.argpartition(-sims, 10)[:10]].tolist())
        got = set(index.search(int(ids[pos]), 10)["image_id"].tolist())
        hits += len(exact & got)
    return hits / (10 * len(q_pos))


def screens(ws, run_id: int) -> None:
    """Every screen's server time in AppTest: first run (caches cold) and a rerun."""
    from streamlit.testing.v1 import AppTest

    app = str(ROOT / "app" / "main.py")
    sys.argv = [app, "--folder", str(ws.root), "--workspace", str(ws.path)]
    from selfclassifier_core.store.settings import set_setting

    set_setting("auto_group", False)
    at = AppTest.from_file(app, default_timeout=3600)
    t0 = time.perf_counter()
    at.run()
    report("app start (Folder & training)", time.perf_counter() - t0,
           f"{len(at.exception)} exception(s)")
    for page in ("screens/clusters.py", "screens/map.py", "screens/neighbours.py",
                 "screens/export.py", "screens/folder_training.py"):
        for attempt in ("first", "again"):
            t0 = time.perf_counter()
            at.switch_page(page).run()
            problems = [e.value for e in at.exception] + [e.value for e in at.error]
            report(f"screen {page.split('/')[-1][:-3]} ({attempt})", time.perf_counter() - t0,
                   "; ".join(str(p)[:80] for p in problems))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images")
    ap.add_argument("--keep", help="build in this directory and keep it")
    ap.add_argument("--skip-screens", action="store_true")
    ap.add_argument("--skip-imagefolder", action="store_true")
    args = ap.parse_args()

    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sc-scale-"))
    os.environ["SELFCLASSIFIER_HOME"] = str(base / "home")
    folder, ws_path = base / "images", base / "ws"
    print(f"N = {args.n:,} images in {base} ({os.cpu_count()} CPUs)", flush=True)
    try:
        from selfclassifier_core.catalog.scanner import scan
        from selfclassifier_core.curation import export
        from selfclassifier_core.curation.labels import Labels
        from selfclassifier_core.curation.neighbors import NeighborIndex
        from selfclassifier_core.curation.projection import run_map
        from selfclassifier_core.store.predictions import load_predictions
        from selfclassifier_core.store.workspace import Workspace

        if not folder.exists():
            t0 = time.perf_counter()
            make_images(folder, args.n)
            report("generate PNGs", time.perf_counter() - t0)
        t0 = time.perf_counter()
        rep = scan(folder, Workspace.for_folder(folder, ws_path))
        report("scan (first)", time.perf_counter() - t0, f"{rep.usable:,} usable")
        t0 = time.perf_counter()
        scan(folder, ws_path)
        report("scan (again, nothing changed)", time.perf_counter() - t0)
        ws = Workspace.open(ws_path)
        t0 = time.perf_counter()
        run_id = add_run(ws)
        report("synthetic run (predictions saved)", time.perf_counter() - t0)

        t0 = time.perf_counter()
        index = NeighborIndex.for_run(ws, run_id)
        report(f"neighbour index ({index.kind})", time.perf_counter() - t0)
        preds = load_predictions(ws.run_dir(run_id))
        emb, ids = np.asarray(preds.embeddings), np.asarray(preds.image_ids)
        t0 = time.perf_counter()
        ivf = NeighborIndex(emb, ids, ivf_threshold=min(len(ids) - 1, 100_000), use_gpu=False)
        report(f"IVF index ({ivf.kind})", time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = recall_at_10(ivf, emb, ids)
        report("IVF recall@10 vs exact (500 queries)", time.perf_counter() - t0, f"{r:.3f}")
        t0 = time.perf_counter()
        index.search(int(ids[0]), 10)
        report("one neighbour query", time.perf_counter() - t0)

        t0 = time.perf_counter()
        run_map(ws, run_id)
        report("map (UMAP fit on a sample + transform)", time.perf_counter() - t0)
        t0 = time.perf_counter()
        table = Labels(ws, run_id).final_table()
        report("final label table", time.perf_counter() - t0, f"{len(table):,} rows")
        out = base / "exports"
        for name, fn in (("csv", export.export_csv), ("parquet", export.export_parquet),
                         ("jsonl", export.export_jsonl)):
            t0 = time.perf_counter()
            fn(ws, out / f"labels.{name}", run_id)
            report(f"export {name}", time.perf_counter() - t0)
        if not args.skip_imagefolder:
            t0 = time.perf_counter()
            export.export_imagefolder(ws, out / "tree", run_id, link="sym")
            report("export ImageFolder (symlinks)", time.perf_counter() - t0)
        if not args.skip_screens:
            screens(ws, run_id)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
