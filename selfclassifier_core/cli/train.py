"""``train FOLDER``: scan, learn classes, predict; prints the run id and the next command."""
from __future__ import annotations

import argparse
import signal
import threading
from shlex import quote

from . import CliError


def register(sub) -> None:
    p = sub.add_parser("train", help="learn classes on an image folder, then predict every image",
                       description="Scan FOLDER (incrementally), train Self-Classifier on it and "
                                   "predict every usable image. Defaults follow the folder and "
                                   "the device.")
    p.add_argument("folder", help="image folder (never written to)")
    p.add_argument("--workspace", help="workspace directory (default: one per folder under "
                                       "$SELFCLASSIFIER_HOME)")
    p.add_argument("--classes", type=int, help="classes of the main head (≥ 2)")
    p.add_argument("--backbone", help="resnet18, resnet34, resnet50, vit_b_16, convnext_tiny, "
                                      "efficientnet_b0, ...")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=int, help="number of epochs")
    budget.add_argument("--minutes", type=float, help="time budget; stops cleanly, then predicts")
    p.add_argument("--batch-size", type=int, help="global batch (≥ classes)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--resume", action="store_true",
                   help="continue the newest scratch or finetune run with a checkpoint (or "
                        "--run-id); fast runs are not resumed")
    p.add_argument("--run-id", type=int, help="with --resume: the run to continue")
    p.add_argument("--mode", choices=["scratch", "fast", "finetune"],
                   help="default: fast with --pretrained, else scratch")
    p.add_argument("--pretrained", help="torchvision weights name (e.g. DEFAULT) or a local file")
    p.add_argument("--lr", type=float, help="peak learning rate (default scales with the batch)")
    p.add_argument("--optimizer", choices=["lars", "adamw"])
    p.add_argument("--nn-positives", action="store_true", default=None,
                   help="use a nearest neighbour's image as the positive of view 1 (paper v2)")
    p.add_argument("--n-local", type=int, help="local crops per image")
    p.add_argument("--workers", type=int, help="data loader processes")
    p.add_argument("--augment", choices=["auto", "cpu", "device"],
                   help="where the multi-crop views are made: cpu (PIL in the loader "
                        "workers), device (batched on the training device), auto (default: "
                        "device on CUDA, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engine import dist
    from ..training.scratch import TrainingError, train

    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        result = train(
            None if args.resume else args.folder, args.workspace, classes=args.classes,
            backbone=args.backbone, epochs=args.epochs, minutes=args.minutes,
            batch_size=args.batch_size, device=args.device, resume=args.resume,
            mode=args.mode, pretrained=args.pretrained, should_stop=stop.is_set,
            run_id=args.run_id, seed=args.seed, lr=args.lr, optimizer=args.optimizer,
            nn_positives=args.nn_positives, n_local=args.n_local, workers=args.workers,
            augment=args.augment)
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        main = dist.is_main()
        dist.cleanup()
    if not main:
        return 0
    ws = result.workspace.path
    if result.status == "cancelled":
        run = result.workspace.get_run(result.run_id)
        if run.mode == "fast":  # not resumed: a new run starts from the cached features
            print(f"run {run.id} cancelled in workspace {ws}"
                  + (f" ({run.message})" if run.message else ""))
            print("fast mode is not resumed: run the same train command again"
                  + ("; it reuses the cached features" if result.predictions_path else ""))
            return 1
        print(f"run {result.run_id} cancelled (checkpoint saved) in workspace {ws}")
        print(f"continue: python -m selfclassifier_core train {quote(str(args.folder))} "
              f"--workspace {quote(str(ws))} --resume --run-id {result.run_id}")
        return 1
    print(f"run {result.run_id} done in workspace {ws}")
    print(f"next: python -m selfclassifier_core export {quote(str(ws))} --csv labels.csv")
    return 0
