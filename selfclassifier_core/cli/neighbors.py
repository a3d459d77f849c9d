"""``neighbors WS IMAGE [-k 10] [--run N]``: the images most similar to IMAGE;
``neighbors WS --text "QUERY" [-k 10] [--run N]``: the images nearest a text.

IMAGE is a catalog image id, a path relative to the scanned folder, or a path to any image file
(embedded with the run's model). ``--text`` needs a run with a text tower (a fast run on a
CLIP/SigLIP backbone): the query and the images are compared in the backbone's CLIP space
(:func:`selfclassifier_core.inference.text.search_text`).
"""
from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

from . import CliError, open_workspace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("neighbors", help="nearest neighbours of an image, or of a text",
                       description="The images most similar to IMAGE, or nearest the text of "
                                   "--text, with their cosine similarity.")
    p.add_argument("workspace", metavar="WS", help="workspace directory")
    p.add_argument("image", metavar="IMAGE", nargs="?",
                   help="catalog image id, path relative to the image folder, or any image file")
    p.add_argument("--text", metavar="QUERY",
                   help="search by text instead, e.g. \"red sneakers\" (a fast run on a "
                        "CLIP/SigLIP backbone)")
    p.add_argument("-k", type=int, default=10, help="number of neighbours (default 10)")
    p.add_argument("--run", type=int, default=None, help="run id (default: latest finished)")
    p.set_defaults(func=run)


def catalog_paths(conn: sqlite3.Connection, ids: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        out.update((r[0], r[1]) for r in conn.execute(
            f"SELECT id, path FROM images WHERE id IN ({marks})", chunk))
    return out


def resolve_image(ws, conn: sqlite3.Connection, image: str) -> tuple[int | None, Path | None]:
    """``(catalog id, None)`` for a catalog image, ``(None, file)`` for another image file."""
    if image.isdigit():
        row = conn.execute("SELECT id FROM images WHERE id=?", (int(image),)).fetchone()
        if row is not None:
            return int(row[0]), None
    root = ws.root
    candidates = [image.replace("\\", "/")]
    p = Path(image).expanduser()
    if root is not None and p.exists():
        try:
            candidates.append(p.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            pass
    for rel in candidates:
        row = conn.execute("SELECT id FROM images WHERE path=?", (rel,)).fetchone()
        if row is not None:
            return int(row[0]), None
    if p.is_file():
        return None, p
    raise CliError(f"{image!r} is neither a catalog image id, a path in the image folder "
                   f"{root}, nor an image file")


def run(args: argparse.Namespace) -> int:
    from ..curation.neighbors import NeighborIndex
    from .progress import Reporter

    if args.k < 1:
        raise CliError(f"-k must be at least 1, got {args.k}")
    if (args.image is None) == (args.text is None):
        raise CliError("give exactly one of IMAGE or --text QUERY")
    ws = open_workspace(args.workspace)
    if args.text is not None:
        return _by_text(ws, args)
    conn = ws.connect()
    try:
        image_id, file = resolve_image(ws, conn, args.image)
        with Reporter() as shown:
            index = NeighborIndex.for_run(
                ws, args.run, progress=shown.step("building the neighbour index", "images"))
        if image_id is not None and not index.contains(image_id):
            # catalogued after this run: embed its file instead
            file = ws.abspath(catalog_paths(conn, [image_id])[image_id])
            image_id = None
        if image_id is not None:
            table = index.search(image_id, k=args.k)
            query = f"image {image_id}"
        else:
            table = index.search_file(file, k=args.k)
            query = str(file)
        paths = catalog_paths(conn, [int(i) for i in table["image_id"]])
    finally:
        conn.close()
    print(f"{len(table)} nearest neighbours of {query} (run {index.run_id}):")
    print(f"{'rank':>4}  {'id':>8}  {'similarity':>10}  path")
    for rank, (i, sim) in enumerate(zip(table["image_id"], table["similarity"]), start=1):
        print(f"{rank:>4}  {int(i):>8}  {float(sim):>10.4f}  {paths.get(int(i), '?')}")
    return 0


def _by_text(ws, args: argparse.Namespace) -> int:
    from ..inference.text import search_text, text_source
    from .progress import Reporter

    run = ws.resolve_run(args.run)
    backbone, _ = text_source(run)  # no text tower: one error line before anything loads
    with Reporter() as shown:
        table = search_text(ws, args.text, k=args.k, run_id=run.id,
                            progress=shown.step("embedding images", "images"))
    print(f"{len(table)} images nearest the text {args.text.strip()!r} (run {run.id}, "
          f"{backbone}):")
    print(f"{'rank':>4}  {'id':>8}  {'similarity':>10}  path")
    for rank, r in enumerate(table.itertuples(index=False), start=1):
        print(f"{rank:>4}  {int(r.image_id):>8}  {float(r.score):>10.4f}  {r.path or '?'}")
    return 0
