"""Training and feature-extraction speed (images/s) for a backbone, crop sizes, batch, device.

Synthetic tensors measure the model alone; ``--folder`` adds the real data pipeline
(decode + multi-crop augmentation through the DataLoader) on that folder's catalog.

    python benchmarks/speed.py --backbone resnet18 --global-size 32 --local-size 16 --batch 64
    python benchmarks/speed.py --backbone resnet18 --global-size 224 --local-size 96 --batch 32
    python benchmarks/speed.py --device cuda --batch 256 --n-local 6 --folder photos/
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selfclassifier_core.loss import SelfClassifierLoss  # noqa: E402
from selfclassifier_core.model import ModelConfig, SelfClassifier  # noqa: E402
from selfclassifier_core.trainer import resolve_device  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def build(args, device: torch.device) -> SelfClassifier:
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


def loader_batches(args, device):
    """Batches of the real pipeline over ``--folder`` (scanned into a temporary workspace)."""
    import tempfile

    from selfclassifier_core.catalog import scan
    from selfclassifier_core.data import MultiCropDataset, default_workers, make_loader
    from selfclassifier_core.transforms import MultiCropTransform
    from selfclassifier_core.workspace import Workspace

    ws = Workspace.for_folder(args.folder, Path(tempfile.mkdtemp()) / "ws")
    scan(args.folder, ws)
    ds = MultiCropDataset(ws, MultiCropTransform(args.global_size, args.local_size, args.n_local),
                          max_side=max(64, 2 * args.global_size))
    workers = args.workers if args.workers is not None else default_workers(len(ds))
    loader = make_loader(ds, args.batch, shuffle=True, drop_last=True, workers=workers,
                         pin_memory=device.type == "cuda")

    def forever():
        while True:
            yield from loader
    return forever(), len(ds), workers


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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
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
        batches, n, workers = loader_batches(args, device)
        print(f"  train, real pipeline ({n} images, {workers} workers): "
              f"{train_speed(args, model, device, batches):8.1f} images/s")


if __name__ == "__main__":
    main()
