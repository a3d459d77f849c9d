"""``predict WS``: (re)compute a run's predictions, or predict a new folder with a trained run."""
from __future__ import annotations

import argparse
from shlex import quote

from . import open_workspace


def register(sub) -> None:
    p = sub.add_parser("predict", help="predict every image with a trained run",
                       description="Write predictions for every usable image of WS with a run "
                                   "(default: the newest finished one). With --folder NEW, scan "
                                   "NEW into its own workspace (--out-workspace) and predict it "
                                   "with the trained run.")
    p.add_argument("workspace", help="workspace of the trained run")
    p.add_argument("--run", type=int, help="run id (default: newest finished run)")
    p.add_argument("--folder", help="a new image folder to predict with the run")
    p.add_argument("--out-workspace", help="with --folder: workspace for the new folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..inference.predict import predict, predict_folder
    from .progress import Reporter

    ws = open_workspace(args.workspace)
    if args.folder:
        with Reporter() as shown:
            new_ws, run_id, preds = predict_folder(
                ws, args.folder, args.run, out_workspace=args.out_workspace,
                batch_size=args.batch_size, device=args.device,
                scan_progress=shown.step("reading images", "files"),
                progress=shown.step("predicting", "images"))
        print(f"{len(preds.image_ids)} images predicted: run {run_id} in workspace {new_ws.path}")
        print(f"next: python -m selfclassifier_core export {quote(str(new_ws.path))} "
              "--csv labels.csv")
        return 0
    run_id = ws.resolve_run(args.run).id
    with Reporter() as shown:
        preds = predict(ws, run_id, batch_size=args.batch_size, device=args.device,
                        progress=shown.step("predicting", "images"))
    print(f"{len(preds.image_ids)} images predicted: run {run_id} in workspace {ws.path}")
    return 0
