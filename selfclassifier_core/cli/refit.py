"""``refit WS``: a new run that learns from the labels of a finished run.

It reads what the person told the run (named clusters, moved, confirmed and excluded images),
trains a new run of the same mode from it (the earlier run stays as it was), and prints the new
run, how many labels and checked images it learned from, how many images changed label, and the
new run's summary as `train` prints it.
"""
from __future__ import annotations

import argparse
from shlex import quote

from . import CliError, open_workspace, print_run_summary, sigterm_stops


def register(sub) -> None:
    p = sub.add_parser("refit", help="retrain from your corrections (names, moves, confirms)",
                       description=__doc__)
    p.add_argument("workspace", metavar="WS", help="workspace directory (or its image folder)")
    p.add_argument("--run", type=int, metavar="N",
                   help="the run whose labels teach (default: the newest finished run)")
    p.add_argument("--head", type=int, metavar="K",
                   help="its head whose labels are read (default: the run's main head)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="time budget of the refit")
    budget.add_argument("--epochs", type=int, help="epochs of the refit")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, mps (default: auto)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..workflows.pipeline import TrainingError
    from ..workflows.refit import refit
    from .progress import Reporter

    ws = open_workspace(args.workspace)
    options = {"minutes": args.minutes, "epochs": args.epochs, "device": args.device}
    try:
        with sigterm_stops() as stop, Reporter() as shown:
            result = refit(ws, args.run, head=args.head, should_stop=stop.is_set,
                           progress=shown.run_progress(),
                           **{k: v for k, v in options.items() if v is not None})
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    print(result.summary())
    if result.status != "done":
        run = ws.get_run(result.run_id)
        if run.mode == "fast":
            print("fast mode is not resumed: run the same refit command again")
        else:
            print(f"continue: python -m selfclassifier_core train {quote(str(ws.root or 'FOLDER'))}"
                  f" --workspace {quote(str(ws.path))} --resume --run {result.run_id}")
        return 1
    print_run_summary(ws, result.run_id)   # the new run's, as `train` prints it
    print(f"next: python -m selfclassifier_core labels {quote(str(ws.path))} --run "
          f"{result.run_id} next   (check more images, then refit again)")
    return 0
