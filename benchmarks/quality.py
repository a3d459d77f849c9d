"""Clustering quality against true labels: Self-Classifier (scratch or fast mode) vs k-means.

Builds an image folder from offline data (``benchmarks/datasets.py``), trains through the public
API (``selfclassifier_core.train``) under a time budget, and prints ACC (Hungarian matching),
NMI and ARI of the main head next to k-means on raw pixels -- and, in fast mode, k-means on the
very same cached backbone features -- all measured in the same run, plus the time to clusters
(scan + feature extraction + training + predictions).

    python benchmarks/quality.py --dataset emoji --mode fast --minutes 3
    python benchmarks/quality.py --dataset digits --mode scratch --minutes 5
    python benchmarks/quality.py --dataset mnist --n 2000 --mode fast --set nn_prob=0.7
    python benchmarks/quality.py --dataset emoji --mode fast --seeds 5   # mean and range

``--seeds N`` trains every variant N times (training seeds 0..N-1; in fast mode the cached
features are the same for all) and prints each run, then the mean, min and max.

``--set key=value`` passes extra fast-mode options (see ``training.config.FastConfig``); several
``--set`` groups separated by ``--variant`` are trained one after another on the same cache.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402  (benchmarks/datasets.py)

log = logging.getLogger("quality")


def cluster_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy under the best one-to-one matching of clusters to labels (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    t = np.unique(y_true, return_inverse=True)[1]
    p = np.unique(y_pred, return_inverse=True)[1]
    cont = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(cont, (p, t), 1)
    rows, cols = linear_sum_assignment(-cont)
    return float(cont[rows, cols].sum() / len(t))


def scores(y_true, y_pred) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"acc": cluster_acc(y_true, y_pred),
            "nmi": float(normalized_mutual_info_score(y_true, y_pred)),
            "ari": float(adjusted_rand_score(y_true, y_pred))}


def kmeans(x: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, float]:
    from sklearn.cluster import KMeans

    t = time.perf_counter()
    labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)
    return labels, time.perf_counter() - t


def feature_ceiling(x: np.ndarray, y: np.ndarray, k: int = 20) -> dict[str, float]:
    """What the features allow at best, using the labels: 5-fold logistic-regression accuracy
    and the fraction of each row's ``k`` nearest rows (cosine) that share its label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    probe = cross_val_score(LogisticRegression(max_iter=2000), x, y, cv=5).mean()
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    nbrs = np.argpartition(-sim, k, axis=1)[:, :k]
    return {"probe": float(probe), "knn": float((y[nbrs] == y[:, None]).mean())}


def parse_sets(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def train_run(folder: Path, ws_path: Path, args, extra: dict) -> tuple[int, float]:
    """Train through the public API; returns (run id, seconds)."""
    import selfclassifier_core as sc

    t = time.perf_counter()
    kwargs = dict(workspace=ws_path, mode=args.mode, classes=args.classes,
                  backbone=args.backbone, minutes=args.minutes, device=args.device)
    if args.mode != "scratch":
        kwargs["pretrained"] = args.pretrained
    result = sc.train(folder, **kwargs, **extra)
    return int(result.run_id), time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(datasets.BUILDERS), default="digits")
    ap.add_argument("--n", type=int, default=None, help="subset size (default: all)")
    ap.add_argument("--mode", choices=("fast", "scratch", "finetune"), default="fast")
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--pretrained", default="DEFAULT")
    ap.add_argument("--classes", type=int, default=None, help="default: number of true labels")
    ap.add_argument("--minutes", type=float, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="/tmp/sc-bench")
    ap.add_argument("--keep-workspace", action="store_true",
                    help="reuse the workspace (and its feature cache) of an earlier run")
    ap.add_argument("--set", action="append", default=[], help="extra option key=value")
    ap.add_argument("--variant", action="append", default=[],
                    help="extra variant: comma-separated key=value (trained after the first)")
    ap.add_argument("--seeds", type=int, default=1,
                    help="train each variant with seeds 0..N-1 and print mean/min/max")
    ap.add_argument("--json", action="store_true", help="print one JSON line per result")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    out = Path(args.out) / f"{args.dataset}{'' if args.n is None else '-' + str(args.n)}"
    folder, ws_path = out / "images", out / "ws"
    if not (args.keep_workspace and folder.is_dir()):
        t = time.perf_counter()
        truth, pixels = datasets.BUILDERS[args.dataset](folder, n=args.n)
        if ws_path.exists():
            import shutil
            shutil.rmtree(ws_path)
        log.info("built %s: %d images in %.1f s", folder, len(truth), time.perf_counter() - t)
    else:
        truth = {str(p.relative_to(folder).as_posix()): p.parent.name
                 for p in sorted(folder.rglob("*.png"))}
        pixels = datasets._pixels(folder, truth, size=64 if args.dataset == "emoji" else None)
    labels_sorted = [truth[r] for r in sorted(truth)]
    n_true = len(set(labels_sorted))
    if args.classes is None:
        args.classes = n_true

    results = []
    y_all = np.asarray(labels_sorted)
    km_pix, t_km = kmeans(pixels, n_true)
    results.append(("k-means raw pixels", scores(y_all, km_pix), t_km, None))

    variants = [parse_sets(args.set)] + [
        {**parse_sets(args.set), **parse_sets(v.split(","))} for v in args.variant]
    import selfclassifier_core as sc
    from selfclassifier_core.store.workspace import Workspace

    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    runs = [(vi, {**extra, "seed": seed} if args.seeds > 1 else extra)
            for vi, extra in enumerate(variants) for seed in range(args.seeds)]
    first_time = None
    ceiling = None
    for vi, extra in runs:
        run_id, secs = train_run(folder, ws_path, args, extra)
        first_time = first_time or secs
        ws = Workspace.open(ws_path)
        run = ws.get_run(run_id)
        preds = sc.load_predictions(run.dir)
        rel_of = dict(ws.usable_images())
        y_true = np.asarray([truth[rel_of[int(i)]] for i in preds.image_ids])
        head = run.main_head or preds.head_sizes[0]
        name = f"self-classifier {args.mode} (K={head}{', ' + json.dumps(extra) if extra else ''})"
        results.append((name, scores(y_true, preds.head(head).cluster), secs, vi))
        print(f"run {run_id}: status {run.status} {run.message or ''}; classes in use "
              f"{len(np.unique(preds.head(head).cluster))}/{head}")

        if args.mode == "fast" and vi == 0 and extra.get("seed", 0) == 0:
            from selfclassifier_core.training.features import extract_features

            ckpt_cfg = json.loads((run.dir / "config.json").read_text())
            cache = extract_features(ws, ckpt_cfg["backbone"], ckpt_cfg["pretrained"],
                                     views=ckpt_cfg["views"], image_size=ckpt_cfg["image_size"],
                                     seed=ckpt_cfg.get("feature_seed", ckpt_cfg["seed"]),
                                     device=args.device)
            assert cache.computed == 0, "feature cache should have been reused"
            pos = {int(i): p for p, i in enumerate(cache.image_ids)}
            rows = [pos[int(i)] for i in preds.image_ids]
            f = np.asarray(cache.full, np.float32)[rows]
            km, t = kmeans(f, n_true)
            results.append(("k-means same features", scores(y_true, km), t, None))
            fn = f / np.linalg.norm(f, axis=1, keepdims=True)
            km, t = kmeans(fn, n_true)
            results.append(("k-means same features, L2-normalised", scores(y_true, km), t, None))
            ceiling = feature_ceiling(fn, y_true)

    print(f"\n{args.dataset}: {len(truth)} images, {n_true} true classes; mode {args.mode}, "
          f"time to clusters {first_time:.1f} s (incl. scan + features + training + predict)")
    print(f"{'method':<70} {'ACC':>6} {'NMI':>6} {'ARI':>6} {'sec':>7}")
    for name, s, t, _ in results:
        print(f"{name:<70} {s['acc']:6.3f} {s['nmi']:6.3f} {s['ari']:6.3f} {t:7.1f}")
        if args.json:
            print(json.dumps({"dataset": args.dataset, "method": name, **s, "seconds": t}))
    if ceiling is not None:
        print(f"\nhow well the features separate the true classes (uses the labels, for scale): "
              f"supervised linear probe {ceiling['probe']:.3f} accuracy (5-fold); "
              f"{ceiling['knn']:.3f} of each image's 20 nearest neighbours share its class")
    if args.seeds > 1:
        print(f"\nover {args.seeds} training seeds: mean [min, max]")
        for vi, extra in enumerate(variants):
            per_seed = [s for _, s, _, v in results if v == vi]
            print(f"variant {vi} {json.dumps(extra)}")
            for m in ("acc", "nmi", "ari"):
                vals = np.asarray([r[m] for r in per_seed])
                print(f"  {m.upper()} {vals.mean():.3f} [{vals.min():.3f}, {vals.max():.3f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
