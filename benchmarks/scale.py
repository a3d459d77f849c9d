"""At scale: a synthetic workspace of N images, every step and every app screen timed.

    python benchmarks/scale.py --n 100000            # ~2 min on 2 cores (a million: ~11)
    python benchmarks/scale.py --n 1000000 --keep /big/disk/scale-1m
    python benchmarks/scale.py --keep /big/disk/scale-1m --screens-only   # screens again

Builds N small generated PNGs (8 px, in folders of 1,000), scans them, adds a synthetic finished
run (128-d embeddings around 40 centres, heads of 10, 20 and 40 classes; no training) and
measures: the scan; the neighbour index (exact up to the threshold, IVF above it) and the IVF's
recall@10 against exact search on a sample of queries; the 2-D map (UMAP fit on a sample, then
transform); the final label table; each export; and every app screen's server time through
AppTest, twice (the second run shows what the caches save), then what a person does there (open
a group, rename it, confirm an image, pick an image for its neighbours, lasso half the map), in
a process of its own as the app would be. Peak memory is printed after each step: the process's
during that step (and what it holds after it), and its children's. Everything goes into a
temporary directory (or ``--keep DIR``), removed afterwards unless kept.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADS = (10, 20, 40)
DIM = 128


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:  # not Linux
        pass
    return None


def peak_mb() -> tuple[float, float]:
    """Peak resident memory of this process during the last step, and of its (finished)
    children, in MB.

    On Linux the step's peak is the kernel's high-water mark (``VmHWM``), reset after every
    step (``/proc/self/clear_refs``), so each line shows what that step held at most, what
    it kept from earlier steps included. Elsewhere: the process's peak so far (``ru_maxrss``)."""
    me = _status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return me, kids


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def report(step: str, seconds: float, extra: str = "") -> None:
    me, kids = peak_mb()
    now = _status_mb("VmRSS")
    print(f"{step:<44} {seconds:8.2f} s   peak {me:7.0f} MB"
          + (f" (after {now:5.0f})" if now is not None else "")
          + f" (workers {kids:5.0f} MB)" + (f"   {extra}" if extra else ""), flush=True)
    _reset_peak()


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


def recall_at_10(index, exact, ids: np.ndarray, n_queries: int = 500) -> float:
    """Share of the exact top-10 neighbours (``exact``: the flat index) that ``index`` returns,
    for ``n_queries`` images drawn at random; each query's own image is left out of both."""
    rng = np.random.default_rng(0)
    q_ids = ids[rng.choice(len(ids), size=min(n_queries, len(ids)), replace=False)]
    hits = 0
    for qid in q_ids.tolist():
        want = set(exact.search(qid, 10)["image_id"].tolist())
        got = set(index.search(qid, 10)["image_id"].tolist())
        hits += len(want & got)
    return hits / (10 * len(q_ids))


def screens(ws, run_id: int, pause: float = 0.0) -> None:
    """Every screen's server time in AppTest: first run (caches cold) and a rerun; ``pause``
    seconds before each first view, as a person looks at a page before the next (what a page
    warms in the background for the next one has that long)."""
    from streamlit.testing.v1 import AppTest

    app = str(ROOT / "app" / "main.py")
    sys.argv = [app, "--folder", str(ws.root), "--workspace", str(ws.path)]
    from selfclassifier_core.store.settings import set_setting

    set_setting("auto_group", False)
    at = AppTest.from_file(app, default_timeout=3600)
    # AppTest's first run also does what a server does once at `streamlit run`, before any
    # page: look through the installed packages for Streamlit components (~1 s here). Done and
    # timed apart, so "app start" is the first page's own time, as in a running server.
    try:
        from streamlit.components.v2.component_manager import BidiComponentManager

        t0 = time.perf_counter()
        manager = BidiComponentManager()
        manager.discover_and_register_components(start_file_watching=False)
        at._bidi_component_manager = manager  # what AppTest.run would make (private)
        report("Streamlit start-up: component discovery (once per server)",
               time.perf_counter() - t0, "")
    except (ImportError, AttributeError, TypeError) as exc:  # another Streamlit: timed with it
        print(f"component discovery not timed apart ({exc})", flush=True)
    t0 = time.perf_counter()
    at.run()
    report("app start: first page (Folder & training)", time.perf_counter() - t0,
           f"{len(at.exception)} exception(s)")
    def timed(step: str, act) -> None:
        t0 = time.perf_counter()
        act()
        problems = [e.value for e in at.exception] + [e.value for e in at.error]
        report(step, time.perf_counter() - t0, "; ".join(str(p)[:80] for p in problems))

    for page in ("screens/clusters.py", "screens/review.py", "screens/map.py",
                 "screens/neighbours.py", "screens/export.py", "screens/folder_training.py"):
        time.sleep(pause)
        for attempt in ("first", "again"):
            timed(f"screen {page.split('/')[-1][:-3]} ({attempt})",
                  lambda: at.switch_page(page).run())
    # what a person does on them: open the biggest group, pick an image for its neighbours,
    # lasso half of the map
    from selfclassifier_core.curation.projection import run_map

    at.switch_page("screens/clusters.py").run()
    biggest = next(b for b in at.button if b.label == "Open")
    timed("clusters: open a group", lambda: biggest.click().run())
    timed("clusters: the group again", lambda: at.run())
    name = next(t for t in at.text_input if t.key.startswith("rn_detail|"))
    new_name = f"renamed {time.strftime('%H%M%S')}"   # a new name each run: a real edit
    timed("clusters: rename it (an edit: labels re-read)", lambda: name.input(new_name).run())
    at.switch_page("screens/review.py").run()
    for check in range(1, 4):   # each check is an edit: the queue is chosen again
        right = next((b for b in at.button if b.label == "✓ Right"), None)
        if right is not None:
            timed(f"review: an image is right (an edit, #{check})", lambda: right.click().run())
    wrong = next((s for s in at.selectbox if s.key.startswith("rv_to|")), None)
    if wrong is not None:
        timed("review: an image is wrong, moved (an edit)",
              lambda: wrong.set_value(wrong.options[-1]).run())
    at.switch_page("screens/neighbours.py").run()
    for attempt in ("first: opens the index", "again"):
        at.session_state["nn_query"] = int(ws.usable_images()[7][0]) if attempt != "again" else 8
        timed(f"neighbours: one image's ({attempt})", lambda: at.run())
    at.switch_page("screens/map.py").run()
    key = next(k for k in at.session_state.keys() if str(k).startswith("map|"))
    pts = run_map(ws, run_id)
    x0, x1 = float(pts["x"].min()) - 1, float(pts["x"].median())
    y0, y1 = float(pts["y"].min()) - 1, float(pts["y"].max()) + 1
    at.session_state[key] = {"selection": {"points": [], "point_indices": [], "box": [],
                                           "lasso": [{"xref": "x", "yref": "y",
                                                      "x": [x0, x1, x1, x0],
                                                      "y": [y0, y0, y1, y1]}]}}
    timed("map: lasso around half the points", lambda: at.run())
    heading = next((h.value for h in at.subheader if h.value.endswith("selected")), "none")
    print(f"{'':<44} {heading}", flush=True)


def screens_of(base: Path, pause: float = 0.0) -> int:
    """The screens step alone, on the workspace and latest finished run under ``base``."""
    os.environ["SELFCLASSIFIER_HOME"] = str(base / "home")
    from selfclassifier_core.store.workspace import Workspace

    ws = Workspace.open(base / "ws")
    run = ws.latest_run()
    if run is None:
        raise SystemExit(f"no finished run in {base / 'ws'}: build it first with --keep")
    print(f"screens of run {run.id} (a process of its own)"
          + (f", {pause:g} s before each first view" if pause else ""), flush=True)
    screens(ws, run.id, pause)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="images")
    ap.add_argument("--keep", help="build in this directory and keep it")
    ap.add_argument("--skip-screens", action="store_true")
    ap.add_argument("--skip-imagefolder", action="store_true")
    ap.add_argument("--screens-only", action="store_true",
                    help="only the app screens, on the workspace an earlier --keep DIR left")
    ap.add_argument("--pause", type=float, default=0.0,
                    help="with --screens-only: seconds before each screen's first view")
    args = ap.parse_args()
    if args.screens_only:
        return screens_of(Path(args.keep), args.pause)

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
        r = recall_at_10(ivf, index, ids)
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
            # In a process of its own, as the app runs: its peak memory is the app's alone.
            subprocess.run([sys.executable, __file__, "--keep", str(base), "--screens-only"],
                           check=True)
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
