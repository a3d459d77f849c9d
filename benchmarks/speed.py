"""Training and feature-extraction speed (images/s) for a backbone, crop sizes, batch, device.

Synthetic tensors measure the model alone; ``--folder`` adds the real data pipeline
(decode + multi-crop augmentation through the DataLoader) on that folder's catalog, with the
views made by PIL in the workers (``--augment cpu``) or batched on the training device
(``--augment device``: workers decode + resize to a uint8 square, GpuMultiCrop cuts the
views), or both (``--augment both``, the default), each also measured without the model
(data pipeline alone).

    python benchmarks/speed.py --backbone resnet18 --global-size 32 --local-size 16 --batch 64
    python benchmarks/speed.py --backbone resnet18 --global-size 224 --local-size 96 --batch 32
    python benchmarks/speed.py --device cuda --batch 256 --n-local 6 --folder photos/
    python benchmarks/speed.py --global-size 32 --local-size 16 --folder imgs/ --augment device

``--extract`` measures fast mode's feature extraction end to end instead (decode, the cached
views with each backbone's own preprocessing, forward: ``training.features.extract_features``
on a scanned folder, random weights saved to a file), in images/s and views/s per backbone:

    python benchmarks/speed.py --extract efficientnet_lite0:128,dinov2_s:112,clip_b16:112 \
        --images 96 --views 4
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfclassifier_core.engine.loss import SelfClassifierLoss  # noqa: E402
from selfclassifier_core.engine.model import ModelConfig, SelfClassifier  # noqa: E402
from selfclassifier_core.engine.device import resolve_device  # noqa: E402

AUGMENTS = ("cpu", "device")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def build(args, device: torch.device) -> SelfClassifier:
    if args.batch < args.classes:
        raise SystemExit(f"--batch {args.batch} is smaller than --classes {args.classes}: the "
                         "loss needs at least one image per class in a batch")
    cfg = ModelConfig(backbone=args.backbone, image_size=args.global_size,
                      heads=[k for k in (args.classes, 2 * args.classes) if k <= args.batch])
    model = SelfClassifier(cfg).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def train_speed(args, model, device, batches=None) -> float:
    """Images/s of full training steps (forward on all crops, loss, backward, SGD step)."""
    crit = SelfClassifierLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def synthetic():
        while True:
            yield ([torch.randn(args.batch, 3, args.global_size, args.global_size)
                    for _ in range(2)]
                   + [torch.randn(args.batch, 3, args.local_size, args.local_size)
                      for _ in range(args.n_local)], None)

    it = iter(batches) if batches is not None else synthetic()
    n_img, t0 = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        views, _ = next(it)
        views = [v.to(device, non_blocking=True) for v in views]
        with _autocast(device):
            outs = model.forward_views(views)
        loss = crit([[o.logits[h] for o in outs] for h in range(len(outs[0].logits))])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            n_img += views[0].shape[0]
    _sync(device)
    return n_img / (time.perf_counter() - t0)


@torch.no_grad()
def extract_speed(args, model, device) -> float:
    """Images/s of the forward pass used for predictions (one global-size view)."""
    model.eval()
    x = torch.randn(args.batch, 3, args.global_size, args.global_size, device=device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        with _autocast(device):
            model(x)
    _sync(device)
    return args.batch * args.steps / (time.perf_counter() - t0)


def scanned_workspace(folder: str):
    """``folder`` scanned into a temporary workspace."""
    import tempfile

    from selfclassifier_core.catalog.scanner import scan
    from selfclassifier_core.store.workspace import Workspace

    ws = Workspace.for_folder(folder, Path(tempfile.mkdtemp()) / "ws")
    scan(folder, ws)
    return ws


def loader_batches(args, device, ws, augment: str):
    """Batches of views from the real pipeline as the trainer makes them: PIL multi-crop in
    the loader workers (``cpu``), or uniform uint8 images from the workers augmented on
    ``device`` by GpuMultiCrop (``device``). Same crop scales as the trainer."""
    from selfclassifier_core.catalog.datasets import MultiCropDataset, make_loader, sample_seed
    from selfclassifier_core.engine.device import default_workers
    from selfclassifier_core.engine.gpu_augment import GpuMultiCrop, UniformImage, source_size_for
    from selfclassifier_core.engine.transforms import GLOBAL_SCALE, LOCAL_SCALE, MultiCropTransform

    crops = dict(global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE)
    sizes = (args.global_size, args.local_size, args.n_local)
    transform = (UniformImage(source_size_for(args.global_size)) if augment == "device"
                 else MultiCropTransform(*sizes, **crops))
    ds = MultiCropDataset(ws, transform, max_side=max(64, 2 * args.global_size))
    workers = args.workers if args.workers is not None else default_workers(len(ds))
    loader = make_loader(ds, args.batch, shuffle=True, drop_last=True, workers=workers,
                         pin_memory=device.type == "cuda")
    gpu_aug = GpuMultiCrop(*sizes, **crops) if augment == "device" else None

    def forever():
        i = 0
        while True:
            for views, ids in loader:
                if gpu_aug is not None:
                    g = torch.Generator().manual_seed(sample_seed(0, 0, i))
                    with torch.no_grad():
                        views = gpu_aug(views[-1].to(device, non_blocking=True), generator=g)
                i += 1
                yield views, ids
    return forever(), len(ds), workers


def pipeline_speed(args, device, batches) -> float:
    """Images/s of the data pipeline alone (views on ``device``, no model)."""
    n_img, t0 = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        views, _ = next(batches)
        views = [v.to(device, non_blocking=True) for v in views]
        if step >= args.warmup:
            n_img += views[0].shape[0]
    _sync(device)
    return n_img / (time.perf_counter() - t0)


def synthetic_photos(n: int, root: Path, side: int = 256) -> Path:
    """``n`` noise JPEGs of ``side`` px (smooth colour blobs, so decoding costs what a photo
    does) in ``root/images``."""
    import numpy as np
    from PIL import Image

    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize((side, side), Image.BICUBIC).save(folder / f"{i:05d}.jpg",
                                                                         quality=90)
    return folder


def extract_e2e(spec: str, ws, views: int, device: torch.device, batch: int | None,
                workers: int | None, tmp: Path) -> tuple[str, int, float]:
    """``(backbone, view size, seconds)`` of one cold feature extraction of every image in
    ``ws`` with ``spec`` = ``BACKBONE[:SIZE]`` (random weights; SIZE default 224)."""
    from selfclassifier_core.engine.backbones import build_backbone
    from selfclassifier_core.training.features import extract_features

    name, _, size_s = spec.rpartition(":") if spec.rsplit(":", 1)[-1].isdigit() else (spec, "", "")
    size = int(size_s or 224)
    torch.manual_seed(0)
    weights = tmp / f"{name.replace(':', '_')}-{size}.pth"
    torch.save(build_backbone(name, False, size)[0].state_dict(), weights)
    t0 = time.perf_counter()
    extract_features(ws, name, weights, views=views, image_size=size, device=device,
                     batch_size=batch, workers=workers)
    return name, size, time.perf_counter() - t0


def main_extract(args, device: torch.device) -> None:
    import tempfile

    tmp = Path(tempfile.mkdtemp())
    folder = args.folder or synthetic_photos(args.images, tmp)
    ws = scanned_workspace(str(folder))
    n = len(ws.usable_images())
    print(f"feature extraction end to end: {n} images, {args.views} views, {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f" ({torch.get_num_threads()} threads)"))
    for spec in args.extract.split(","):
        name, size, seconds = extract_e2e(spec.strip(), ws, args.views, device,
                                          args.extract_batch, args.workers, tmp)
        print(f"  {name:<20} {size:4d} px: {n / seconds:8.1f} images/s "
              f"{n * args.views / seconds:8.1f} views/s ({seconds:.1f} s)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--n-local", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--folder", help="also measure training through the real data pipeline")
    p.add_argument("--workers", type=int)
    p.add_argument("--augment", choices=(*AUGMENTS, "both"), default="both",
                   help="with --folder: where the views are made (default: measure both)")
    p.add_argument("--extract", metavar="BACKBONE[:SIZE],...",
                   help="measure fast-mode feature extraction end to end for these backbones "
                        "(view side SIZE, default 224) instead of training")
    p.add_argument("--views", type=int, default=4, help="with --extract: views per image")
    p.add_argument("--images", type=int, default=96,
                   help="with --extract and no --folder: synthetic 256-px photos to embed")
    p.add_argument("--extract-batch", type=int, help="with --extract: images per batch "
                   "(default: the feature extractor's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.extract:
        main_extract(args, device)
        return
    torch.manual_seed(0)
    model = build(args, device)
    what = (f"{args.backbone} {args.global_size}/{args.local_size} ×{args.n_local} local, "
            f"batch {args.batch}, {device}"
            + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
               f" ({torch.get_num_threads()} threads)"))
    print(f"{what}")
    print(f"  train, synthetic tensors:   {train_speed(args, model, device):8.1f} images/s")
    print(f"  extract (1 view, forward):  {extract_speed(args, model, device):8.1f} images/s")
    if args.folder:
        ws = scanned_workspace(args.folder)
        for augment in AUGMENTS if args.augment == "both" else (args.augment,):
            batches, n, workers = loader_batches(args, device, ws, augment)
            where = "PIL in workers" if augment == "cpu" else f"GpuMultiCrop on {device.type}"
            print(f"  real pipeline, {where} ({n} images, {workers} workers):")
            print(f"    data alone:               {pipeline_speed(args, device, batches):8.1f} "
                  "images/s")
            print(f"    train:                    "
                  f"{train_speed(args, model, device, batches):8.1f} images/s")


if __name__ == "__main__":
    main()
