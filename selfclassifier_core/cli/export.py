"""``export WS --csv F | --imagefolder DIR | --parquet F | --jsonl F``: write the final labels."""
from __future__ import annotations

import argparse

from . import open_workspace
from .labels import add_run_head


def register(sub) -> None:
    p = sub.add_parser("export", help="write the labels as CSV, ImageFolder tree, Parquet or JSONL",
                       description=__doc__)
    p.add_argument("workspace", metavar="WS", help="workspace directory (or its image folder)")
    g = p.add_argument_group("targets (at least one)")
    g.add_argument("--csv", metavar="FILE", help="CSV file (UTF-8)")
    g.add_argument("--imagefolder", metavar="DIR", help="ImageFolder tree DIR/<label>/<file>")
    g.add_argument("--parquet", metavar="FILE", help="Parquet file")
    g.add_argument("--jsonl", metavar="FILE", help="JSON lines file")
    p.add_argument("--link", choices=("copy", "hard", "sym"), default="copy",
                   help="how --imagefolder places files (default: copy)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --imagefolder DIR (an earlier export there is replaced)")
    p.add_argument("--include-excluded", action="store_true",
                   help="also write excluded images (with an `excluded` column)")
    add_run_head(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..curation import export
    from . import CliError
    from .progress import Reporter

    if not (args.csv or args.imagefolder or args.parquet or args.jsonl):
        raise CliError("export needs a target: --csv FILE, --imagefolder DIR, --parquet FILE "
                       "or --jsonl FILE")
    ws = open_workspace(args.workspace)
    common = dict(run_id=args.run, head=args.head, include_excluded=args.include_excluded)
    with Reporter() as shown:
        for target, write in ((args.csv, export.export_csv),
                              (args.parquet, export.export_parquet),
                              (args.jsonl, export.export_jsonl)):
            if target:
                step = shown.step(f"writing {target}", "rows")
                print(f"wrote {write(ws, target, **common, progress=step)}")
        if args.imagefolder:
            report = export.export_imagefolder(
                ws, args.imagefolder, link=args.link, overwrite=args.overwrite, **common,
                progress=shown.step(f"placing images in {args.imagefolder}", "images"))
            print(report)
    return 0
