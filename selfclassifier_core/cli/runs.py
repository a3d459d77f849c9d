"""``runs WS``: list the training runs of a workspace with status, mode and heads (a run whose
training process is gone shows ``interrupted`` and the command that continues it);
``runs WS --run N``: how good run N's grouping is and what to do next."""
from __future__ import annotations

import argparse
import time

from . import open_workspace


def register(sub) -> None:
    p = sub.add_parser("runs", help="list the training runs of a workspace, or summarise one",
                       description=__doc__)
    p.add_argument("workspace")
    p.add_argument("--run", type=int, metavar="N",
                   help="summarise run N: groups per head, their sizes, confidence, balance, "
                        "how the heads nest, the granularity to start with and the next commands")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    ws = open_workspace(args.workspace)
    if args.run is not None:
        from ..curation.summary import format_summary, run_summary  # numpy: only when asked

        print(format_summary(run_summary(ws, args.run)))
        return 0
    runs = ws.list_runs()
    if not runs:
        print(f"no runs in workspace {ws.path}")
        return 0
    print(f"{'run':>4}  {'status':<11}  {'mode':<8}  {'heads':<14}  {'created':<16}  message")
    for r in runs:
        heads = ",".join(str(k) for k in r.heads)
        if r.main_head is not None and len(r.heads) > 1:
            heads = heads.replace(str(r.main_head), f"{r.main_head}*", 1)
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created))
        print(f"{r.id:>4}  {r.status:<11}  {r.mode:<8}  {heads:<14}  {created:<16}  "
              f"{r.summary or ''}")
    return 0
