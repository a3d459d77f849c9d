"""``duplicates WS [--threshold T] [--run N]``: groups of near-duplicate images."""
from __future__ import annotations

import argparse

from . import CliError, open_workspace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("duplicates", help="groups of near-duplicate images",
                       description="Groups of images whose embeddings have cosine similarity "
                                   "at or above the threshold (largest group first).")
    p.add_argument("workspace", metavar="WS", help="workspace directory")
    p.add_argument("--threshold", type=float, default=0.95,
                   help="cosine similarity in [-1, 1] (default 0.95)")
    p.add_argument("-k", type=int, default=10,
                   help="neighbours looked at per image (default 10)")
    p.add_argument("--run", type=int, default=None, help="run id (default: latest finished)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..curation.neighbors import NeighborIndex
    from .neighbors import catalog_paths
    from .progress import Reporter

    if not -1.0 <= args.threshold <= 1.0:
        raise CliError(f"--threshold is a cosine similarity in [-1, 1], got {args.threshold}")
    if args.k < 1:
        raise CliError(f"-k must be at least 1, got {args.k}")
    ws = open_workspace(args.workspace)
    with Reporter() as shown:
        index = NeighborIndex.for_run(
            ws, args.run, progress=shown.step("building the neighbour index", "images"))
        groups = index.duplicates(threshold=args.threshold, k=args.k,
                                  progress=shown.step("comparing neighbours", "images"))
    conn = ws.connect()
    try:
        paths = catalog_paths(conn, [i for g in groups for i in g])
    finally:
        conn.close()
    n_images = sum(len(g) for g in groups)
    print(f"{len(groups)} group(s) of near-duplicates ({n_images} images) at similarity >= "
          f"{args.threshold:g} (run {index.run_id})")
    for n, group in enumerate(groups, start=1):
        print(f"group {n} ({len(group)} images):")
        for i in group:
            print(f"  {i:>8}  {paths.get(i, '?')}")
    return 0
