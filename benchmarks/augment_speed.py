"""Multi-crop augmentation speed: batched GpuMultiCrop (CPU, and CUDA when available) next to
the per-image PIL MultiCropTransform, on the same images.

    python benchmarks/augment_speed.py                    # 2×224 + 6×96 from 256-px, batch 64
    python benchmarks/augment_speed.py --iters 5 --pil-images 64 --threads 2

Prints images/s (one image = all of its 2 + n_local views) and, on the CPU, images per
CPU-second (steadier than wall time on a shared machine). The PIL figure is one process,
as one DataLoader worker would do it; multiply by the workers to compare with a GPU. Also
times the CPU-side ``to_uniform_batch`` (resize + centre crop of 500×375 images to the source
square), the part of the GPU path that stays in the workers.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfclassifier_core.engine.gpu_augment import GpuMultiCrop, to_uniform_batch  # noqa: E402
from selfclassifier_core.engine.transforms import MultiCropTransform  # noqa: E402


def make_images(n: int, width: int, height: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random colour images (blurred blobs), closer to photos than white noise."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        out.append(img)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_gpu_multicrop(aug: GpuMultiCrop, batch: torch.Tensor, device: torch.device,
                       iters: int, warmup: int) -> tuple[float, float]:
    x = batch.to(device)
    g = torch.Generator()
    with torch.no_grad():
        for i in range(warmup):
            g.manual_seed(i)
            aug(x, generator=g)
        _sync(device)
        t, c = time.perf_counter(), time.process_time()
        for i in range(iters):
            g.manual_seed(1000 + i)
            aug(x, generator=g)
        _sync(device)
    n = iters * x.shape[0]
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def time_pil_multicrop(tf: MultiCropTransform,
                       images: list[Image.Image]) -> tuple[float, float]:
    tf(images[0])  # warm-up
    t, c = time.perf_counter(), time.process_time()
    for img in images:
        tf(img)
    return len(images) / (time.perf_counter() - t), len(images) / (time.process_time() - c)


def _line(label: str, wall: float, cpu: float | None, note: str = "") -> None:
    per_cpu = f"{cpu:9,.1f} images per CPU-second" if cpu is not None else " " * 29
    print(f"{label:34s} {wall:9,.1f} images/s  {per_cpu}  {note}".rstrip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--source", type=int, default=256, help="source square side (256)")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--n-local", type=int, default=6)
    parser.add_argument("--iters", type=int, default=3, help="timed batches per device")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pil-images", type=int, default=32,
                        help="images timed through the PIL transform (default 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-cuda", action="store_true", help="skip CUDA even if available")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    views = f"2×{args.global_size} + {args.n_local}×{args.local_size}"
    print(f"views {views} from {args.source}-px uint8, batch {args.batch}")

    photos = make_images(args.batch, 500, 375)
    t, c = time.perf_counter(), time.process_time()
    batch = to_uniform_batch(photos, args.source)
    _line(f"to_uniform_batch 500×375→{args.source}", len(photos) / (time.perf_counter() - t),
          len(photos) / (time.process_time() - c), "(1 process)")

    aug = GpuMultiCrop(args.global_size, args.local_size, args.n_local)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not args.no_cuda:
        devices.append(torch.device("cuda"))
    for dev in devices:
        wall, cpu = time_gpu_multicrop(aug, batch, dev, args.iters, args.warmup)
        _line(f"GpuMultiCrop on {dev}", wall, cpu if dev.type == "cpu" else None)

    tf = MultiCropTransform(args.global_size, args.local_size, args.n_local)
    pil_images = [Image.fromarray(batch[i % args.batch].permute(1, 2, 0).numpy())
                  for i in range(args.pil_images)]
    wall, cpu = time_pil_multicrop(tf, pil_images)
    _line("PIL MultiCropTransform", wall, cpu, "(1 process)")


if __name__ == "__main__":
    main()
