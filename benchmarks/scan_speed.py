"""Catalog speed: first scan and incremental re-scan of N small PNGs.

    python benchmarks/scan_speed.py            # 10,000 images, default workers
    python benchmarks/scan_speed.py -n 2000 --workers 1 --size 64

Generates the images in a temporary folder (removed afterwards) and prints images/s and seconds.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfclassifier_core.catalog.scanner import scan  # noqa: E402
from selfclassifier_core.engine.device import default_workers  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    per_dir = 1000
    for i in range(n):
        sub = folder / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(sub / f"img{i:06d}.png", compress_level=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=10_000, help="number of images (default 10000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes")
    args = parser.parse_args(argv)
    workers = args.workers or default_workers(0, purpose="decode")

    with tempfile.TemporaryDirectory(prefix="scan-bench-") as tmp:
        folder, ws = Path(tmp) / "images", Path(tmp) / "ws"
        t = time.perf_counter()
        make_images(folder, args.n, args.size)
        print(f"generated {args.n:,} PNGs of {args.size}×{args.size} in "
              f"{time.perf_counter() - t:.1f} s")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; workers={workers}")
        for label in ("first scan", "re-scan (unchanged)"):
            t = time.perf_counter()
            report = scan(folder, ws, workers=workers)
            dt = time.perf_counter() - t
            assert report.usable == args.n, report.summary()
            print(f"{label:20s} {dt:7.2f} s  {args.n / dt:9,.0f} images/s  "
                  f"(new {report.new:,}, unchanged {report.unchanged:,})")


if __name__ == "__main__":
    main()
