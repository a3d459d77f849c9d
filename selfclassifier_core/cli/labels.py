"""``labels WS ACTION ...``: list and edit the labels of a run from the command line.

Actions::

    labels WS list [--images]                 clusters (or every image) with their labels
    labels WS rename CLUSTER NAME             e.g. labels WS rename 3 "Cats"
    labels WS merge C1 C2 ... [--into C] [--name NAME]
    labels WS move --to-cluster C ID...       (or --to-label NAME ID...)
    labels WS create NAME
    labels WS rename-label OLD NEW
    labels WS delete NAME                     clusters named NAME get default names back, images
                                              given NAME fall back to their cluster
    labels WS exclude ID... / include ID...
    labels WS next [-n 20]                    the images worth checking next (review queue)
    labels WS confirm ID... / unconfirm ID... their label is right (a refit learns from it)
    labels WS undo [--steps N] / redo [--steps N]
    labels WS history [--all]
    labels WS carry --from RUN [--from-head K]   carry labels of an earlier run to this one
    labels WS suggest-names [--vocab FILE] [--top 3] [--apply]
                                              names for the clusters from the CLIP text tower
                                              (a fast run on a CLIP/SigLIP backbone); --apply
                                              renames them in one operation (one undo)

``--run N`` and ``--head K`` (before or after the action) pick the run (default: newest finished)
and head (default: the run's main head). Image ids are catalog ids (``labels WS list --images``)
or relative paths. A name starting with ``-`` goes after ``--``: ``rename 3 -- -x``.
"""
from __future__ import annotations

import argparse
import os

from . import CliError, open_workspace

ACTIONS = ("list", "rename", "merge", "move", "create", "rename-label", "delete", "exclude",
           "include", "next", "confirm", "unconfirm", "undo", "redo", "history", "carry",
           "suggest-names")


def add_run_head(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--run", type=int, default=default, metavar="N",
                        help="run id (default: the newest finished run)")
    parser.add_argument("--head", type=int, default=default, metavar="K",
                        help="head by class count (default: the run's main head)")


def register(sub) -> None:
    p = sub.add_parser("labels", help="list and edit cluster names and image labels",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workspace", metavar="WS", help="workspace directory (or its image folder)")
    add_run_head(p)
    acts = p.add_subparsers(dest="action", metavar="ACTION")
    acts.required = True

    def act(name: str, help: str) -> argparse.ArgumentParser:
        a = acts.add_parser(name, help=help)
        add_run_head(a, suppress=True)
        return a

    a = act("list", "clusters with names, sizes, mean confidence")
    a.add_argument("--images", action="store_true", help="list every image instead")
    a.add_argument("--by-label", action="store_true", help="one row per label, not per cluster")
    a = act("rename", "name a cluster")
    a.add_argument("cluster", type=int)
    a.add_argument("name")
    a = act("merge", "give clusters one label name")
    a.add_argument("clusters", type=int, nargs="+")
    a.add_argument("--into", type=int, help="keep this cluster's name")
    a.add_argument("--name", help="the shared name")
    a = act("move", "move images to a cluster or label")
    g = a.add_mutually_exclusive_group(required=True)
    g.add_argument("--to-cluster", type=int, metavar="C")
    g.add_argument("--to-label", metavar="NAME")
    a.add_argument("images", nargs="+", metavar="ID")
    a = act("create", "create an empty label")
    a.add_argument("name")
    a = act("rename-label", "rename a label everywhere")
    a.add_argument("old")
    a.add_argument("new")
    a = act("delete", "delete a label: its clusters get default names, its images their cluster")
    a.add_argument("name")
    a = act("exclude", "exclude images (junk, outliers)")
    a.add_argument("images", nargs="+", metavar="ID")
    a = act("include", "include excluded images again")
    a.add_argument("images", nargs="+", metavar="ID")
    a = act("next", "the images whose check would teach a refit most (none checked before)")
    a.add_argument("-n", type=int, default=20, help="how many (default 20)")
    a = act("confirm", "mark images whose label is right (checked)")
    a.add_argument("images", nargs="+", metavar="ID")
    a = act("unconfirm", "take the check mark off images")
    a.add_argument("images", nargs="+", metavar="ID")
    for name in ("undo", "redo"):
        a = act(name, f"{name} the last operation(s)")
        a.add_argument("--steps", type=int, default=1)
    a = act("history", "operations, oldest first")
    a.add_argument("--all", action="store_true", help="also discarded (undone, then replaced)")
    a = act("carry", "carry labels of an earlier run to this run (clusters matched by overlap)")
    a.add_argument("--from", dest="from_run", type=int, required=True, metavar="RUN")
    a.add_argument("--from-head", type=int, metavar="K")
    a = act("suggest-names", "suggested cluster names from the backbone's text tower (CLIP)")
    a.add_argument("--vocab", metavar="FILE",
                   help="names to choose from, one a line (default: the ImageNet-1k classes)")
    a.add_argument("--top", type=int, default=3, help="suggestions per cluster (default 3)")
    a.add_argument("--apply", action="store_true",
                   help="rename each cluster to its top suggestion, as one undoable operation "
                        "(clusters you named keep their names)")
    p.set_defaults(func=run)


def _image_ids(ws, items: list[str]) -> list[int]:
    ids, paths = [], []
    for it in items:
        (ids if it.strip().isdigit() else paths).append(it)
    out = [int(i) for i in ids]
    if paths:
        known = {p: i for i, p in ws.usable_images()}
        missing = [p for p in paths if p.replace(os.sep, "/") not in known]
        if missing:
            raise ValueError(f"unknown image(s) {', '.join(missing[:10])}: neither ids nor "
                             "relative paths of usable images")
        out += [known[p.replace(os.sep, "/")] for p in paths]
    return out


def _done(hid) -> int:
    print("nothing changed" if hid is None else f"done (history {hid})")
    return 0


def run(args) -> int:
    from ..curation.labels import Labels, carry_over

    ws = open_workspace(args.workspace)
    if args.action == "carry":
        report = carry_over(ws, args.from_run, ws.resolve_run(args.run).id, args.head,
                            args.from_head)
        print(report)
        return 0
    lab = Labels(ws, args.run, args.head)
    a = args.action
    if a == "list":
        import pandas as pd

        with pd.option_context("display.max_rows", None, "display.width", 200,
                               "display.max_colwidth", 60):
            if args.images:
                print(lab.final_table().drop(columns=["predicted_cluster"]).to_string())
            else:
                print(f"run {lab.run_id}, head {lab.head}")
                print(lab.cluster_summary("label" if args.by_label else "cluster").to_string())
        return 0
    if a == "rename":
        return _done(lab.rename(args.cluster, args.name))
    if a == "merge":
        return _done(lab.merge(args.clusters, into=args.into, name=args.name))
    if a == "move":
        ids = _image_ids(ws, args.images)
        return _done(lab.move(ids, cluster=args.to_cluster, label=args.to_label))
    if a == "create":
        return _done(lab.create_label(args.name))
    if a == "rename-label":
        return _done(lab.rename_label(args.old, args.new))
    if a == "delete":
        return _done(lab.delete_label(args.name))
    if a == "next":
        from ..curation.review import review_queue

        q = review_queue(lab, args.n)
        if q.empty:
            print("nothing left to check: every usable image is checked or excluded")
            return 0
        print(f"run {lab.run_id}, head {lab.head}: {len(q)} images to check "
              f"(confirm the right ones, move the wrong ones)")
        for image_id, r in q.iterrows():
            print(f"{image_id}\t{r['path']}\t{r['label']}\tconfidence {r['confidence']:.3f}"
                  f"\tmargin {r['margin']:.3f}")
        return 0
    if a in ("exclude", "include", "confirm", "unconfirm"):
        ids = _image_ids(ws, args.images)
        return _done(getattr(lab, a)(ids))
    if a in ("undo", "redo"):
        if args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        for _ in range(args.steps):
            entry = getattr(lab, a)()
            if entry is None:
                print(f"nothing to {a}")
                break
            print(f"{a}: {entry.op} {entry.args} (history {entry.id})")
        return 0
    if a == "suggest-names":
        return _suggest_names(ws, lab, args)
    if a == "history":
        import time

        for e in lab.history(include_discarded=args.all):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.time))
            print(f"{e.id:>5} {when} {e.state:<9} {e.op} {e.args}")
        return 0
    raise CliError(f"unknown labels action {a!r}")  # pragma: no cover - argparse checks


def _suggest_names(ws, lab, args) -> int:
    import numpy as np

    from ..curation.names import (BUILTIN_NAME, PROMPT, SCORE_TEXT, apply_names, suggest_names,
                                  top_names)
    from ..inference.text import text_source
    from .progress import Reporter

    backbone, _ = text_source(ws.get_run(lab.run_id))  # no text tower: one error line
    with Reporter() as shown:
        sugg = suggest_names(ws, lab.run_id, lab.head, args.vocab, args.top,
                             progress=shown.step("embedding the vocabulary", "names"))
    names = lab.cluster_names()
    sizes = np.bincount(lab.predicted, minlength=lab.head)
    print(f"run {lab.run_id}, head {lab.head}, {backbone}: names from "
          f"{args.vocab or BUILTIN_NAME} as {PROMPT!r}; score = {SCORE_TEXT}")
    print(f"{'cluster':>7}  {'images':>6}  {'name':<20}  suggestions")
    for c, items in sugg.items():
        shown_items = ", ".join(f"{n} ({p:.3f})" for n, p in items) or "(no images)"
        print(f"{c:>7}  {int(sizes[c]):>6}  {names[c]:<20}  {shown_items}")
    if not args.apply:
        return 0
    from ..curation.labels import default_name

    best = top_names(sugg)
    kept = [c for c in best if names[c] != default_name(c, lab.head)]
    hid = apply_names(lab, best)
    if kept:
        print(f"kept the names you gave cluster(s) {', '.join(map(str, kept))}")
    if hid is None:
        print("nothing changed")
        return 0
    renamed = {c: n for c, n in best.items() if c not in kept}
    shared = sorted({n for n in renamed.values() if list(renamed.values()).count(n) > 1})
    print(f"renamed {len(renamed)} cluster(s) to their top suggestion in one operation "
          f"(history {hid}); `labels WS undo` takes it back")
    if shared:
        print(f"clusters sharing a name are one label now: {', '.join(shared)}")
    return 0
