"""What corrections are worth: an oracle plays the person with the true labels, then refits.

For each data set (built offline by ``benchmarks/datasets.py``) and mode:

1. train a run (the default recipe of the mode, K = the number of true classes);
2. *name*: every cluster gets the true label most of its images have (clusters sharing one are
   thereby merged) -- the "named, not refit" baseline;
3. for each budget B of checked images and each way of choosing them -- the review queue
   (``labels WS next``, asked in rounds of 10 so each round sees the earlier answers) or images
   drawn at random -- *check* them (confirm the right ones, move the wrong ones to their true
   label: a label no cluster has becomes a new label), then *refit* and score the refit's final
   labels against the truth.

It prints ACC (the share of images whose final label is their true label; the labels are the
true names, so no matching is needed), NMI and ARI for every budget and both choices, next to
the named-but-not-refit labels with the same checks (what the checks alone give). One random
draw is noisy (at 200 checks of MNIST three draws gave 0.811 to 0.865): ``--random-draws R``
draws R times and prints their mean and range, random choice's expectation, next to the queue.

    python benchmarks/refit.py --dataset mnist --n 2000 --mode fast --random-draws 4
    python benchmarks/refit.py --dataset digits --mode scratch --minutes 3 --refit-minutes 1
    python benchmarks/refit.py --dataset emoji --budgets 0,50 --set named_weight=0.5
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import datasets  # noqa: E402  (benchmarks/datasets.py)

log = logging.getLogger("refit-bench")
ROUND = 10  # queue images asked for at a time


def label_scores(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"acc": float(np.mean(truth == labels)),
            "nmi": float(normalized_mutual_info_score(truth, labels)),
            "ari": float(adjusted_rand_score(truth, labels))}


def final_labels(ws, run_id: int, truth_of: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """(true labels, final labels) of every non-excluded image of a run."""
    from selfclassifier_core.curation.labels import Labels

    df = Labels(ws, run_id).final_table()
    df = df[~df["excluded"]]
    return (np.asarray([truth_of[p] for p in df["path"]], dtype=object),
            df["label"].to_numpy(dtype=object))


def name_by_majority(ws, run_id: int, truth_of: dict[str, str]) -> None:
    from selfclassifier_core.curation.labels import Labels

    lab = Labels(ws, run_id)
    df = lab.final_table()
    for c, group in df.groupby("cluster"):
        votes = {}
        for p in group["path"]:
            votes[truth_of[p]] = votes.get(truth_of[p], 0) + 1
        lab.rename(int(c), max(votes, key=votes.get))


def check(ws, run_id: int, truth_of: dict[str, str], budget: int, how: str, seed: int) -> int:
    """The oracle checks ``budget`` images chosen by the queue or at random; returns how many
    were wrong (and moved)."""
    from selfclassifier_core.curation.labels import Labels
    from selfclassifier_core.curation.review import review_queue

    lab = Labels(ws, run_id)
    rng = np.random.default_rng(seed)
    wrong = done = 0
    while done < budget:
        n = min(ROUND, budget - done)
        if how == "queue":
            q = review_queue(lab, n)
            picks = list(zip(q.index.tolist(), q["path"], q["label"]))
        else:
            df = lab.final_table()
            df = df[~df["edited"] & ~df["confirmed"] & ~df["excluded"]]
            rows = rng.choice(len(df), size=min(n, len(df)), replace=False)
            picks = list(zip(df.index[rows].tolist(), df["path"].iloc[rows],
                             df["label"].iloc[rows]))
        if not picks:
            break
        right = [i for i, p, l in picks if truth_of[p] == l]
        if right:
            lab.confirm(right)
        for i, p, l in picks:
            if truth_of[p] != l:
                lab.move_to_label([i], truth_of[p])
                wrong += 1
        done += len(picks)
    return wrong


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=sorted(datasets.BUILDERS), default="mnist")
    ap.add_argument("--n", type=int, default=2000, help="subset size (default 2000)")
    ap.add_argument("--mode", choices=("fast", "scratch", "finetune"), default="fast")
    ap.add_argument("--minutes", type=float, default=None, help="the first run's budget")
    ap.add_argument("--refit-minutes", type=float, default=None, help="each refit's budget")
    ap.add_argument("--budgets", default="0,20,50,100,200")
    ap.add_argument("--choices", default="queue,random")
    ap.add_argument("--set", action="append", default=[],
                    help="refit option key=value (named_weight, supervised_weight, steps, ...)")
    ap.add_argument("--queue", action="append", default=[],
                    help="review-queue constant NAME=VALUE (MIX, COVER_SAMPLE, SPREAD, "
                         "POOL_PER_PICK), to compare")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-draws", type=int, default=1,
                    help="random choice: this many draws (seeds SEED, SEED+1, ...); the table "
                         "gives their mean and range, random choice's expectation")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="/tmp/sc-refit")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per result")
    ap.add_argument("--keep-base", action="store_true",
                    help="reuse the first run (already named) of an earlier call with the same "
                         "data set, n and mode")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    import selfclassifier_core as sc
    from selfclassifier_core.curation import review
    from selfclassifier_core.store.workspace import Workspace

    for item in args.queue:
        key, _, value = item.partition("=")
        if not hasattr(review, key):
            ap.error(f"--queue: no constant {key} in curation/review.py")
        setattr(review, key, ast.literal_eval(value))

    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value
    out = Path(args.out) / f"{args.dataset}-{args.n}-{args.mode}"
    folder, base_ws = out / "images", out / "ws"
    if args.keep_base and (out / "truth.json").exists():
        truth = json.loads((out / "truth.json").read_text())
        ws = Workspace.open(base_ws)
        first_id, t_first = ws.list_runs()[0].id, float("nan")
    else:
        if out.exists():
            shutil.rmtree(out)
        truth, _ = datasets.BUILDERS[args.dataset](folder, n=args.n)
        t = time.perf_counter()
        kwargs = dict(workspace=base_ws, mode=args.mode, classes=len(set(truth.values())),
                      device=args.device, minutes=args.minutes, seed=args.seed)
        if args.mode != "scratch":
            kwargs["pretrained"] = "DEFAULT"
        first_id = sc.train(folder, **kwargs).run_id
        t_first = time.perf_counter() - t
        ws = Workspace.open(base_ws)
        name_by_majority(ws, first_id, truth)
        (out / "truth.json").write_text(json.dumps(truth))
    n_true = len(set(truth.values()))
    y, named = final_labels(ws, first_id, truth)
    base = label_scores(y, named)
    print(f"\n{args.dataset}: {len(truth)} images, {n_true} true classes, mode {args.mode}; "
          f"first run {t_first:.0f} s; named by majority: ACC {base['acc']:.3f} "
          f"NMI {base['nmi']:.3f} ARI {base['ari']:.3f}")
    rows = []
    budgets = [int(b) for b in args.budgets.split(",")]
    choices = args.choices.split(",")
    runs = [(budget, how, draw) for budget in budgets
            for how in (choices if budget else choices[:1])
            for draw in (range(args.random_draws) if how == "random" and budget else [0])]
    for budget, how, draw in runs:
        wdir = out / f"ws-{budget}-{how}"
        shutil.copytree(base_ws, wdir)
        w = Workspace.open(wdir)
        wrong = check(w, first_id, truth, budget, how, args.seed + draw)
        y, checked = final_labels(w, first_id, truth)
        before = label_scores(y, checked)
        t = time.perf_counter()
        opts = dict(extra)
        if args.refit_minutes:
            opts["minutes"] = args.refit_minutes
        res = sc.refit(w, first_id, device=args.device, **opts)
        secs = time.perf_counter() - t
        y, after_l = final_labels(w, res.run_id, truth)
        after = label_scores(y, after_l)
        row = {"dataset": args.dataset, "n": len(truth), "mode": args.mode,
               "budget": budget, "choice": how if budget else "-", "draw": draw,
               "wrong": wrong,
               "checked_acc": before["acc"], **after, "gain": after["acc"] - base["acc"],
               "changed": res.changed, "refit_s": round(secs, 1), "options": extra}
        rows.append(row)
        print(f"  budget {budget:>3} {row['choice']:<6}"
              + (f" draw {draw}" if args.random_draws > 1 and how == "random" else "")
              + f" ({wrong:>3} wrong): named+checked "
              f"ACC {before['acc']:.3f} -> refit ACC {after['acc']:.3f} NMI {after['nmi']:.3f}"
              f" ARI {after['ari']:.3f} (gain {row['gain']:+.3f}; {res.changed} changed; "
              f"{secs:.0f} s)", flush=True)
        shutil.rmtree(wdir)
    print(f"\n| budget | choice | wrong found | named+checked ACC | refit ACC | NMI | ARI | "
          f"gain over named |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| — | named only | — | {base['acc']:.3f} | — | {base['nmi']:.3f} | {base['ari']:.3f} "
          "| — |")
    for r in rows:
        print(f"| {r['budget']} | {r['choice']} | {r['wrong']} | {r['checked_acc']:.3f} | "
              f"{r['acc']:.3f} | {r['nmi']:.3f} | {r['ari']:.3f} | {r['gain']:+.3f} |")
    if args.random_draws > 1:
        print(f"\nrandom choice over {args.random_draws} draws (mean [min, max]) vs the queue:")
        for budget in [b for b in budgets if b]:
            accs = [r["acc"] for r in rows if r["budget"] == budget and r["choice"] == "random"]
            q = [r["acc"] for r in rows if r["budget"] == budget and r["choice"] == "queue"]
            if accs:
                print(f"  {budget:>3} checks: random {np.mean(accs):.3f} [{min(accs):.3f}, "
                      f"{max(accs):.3f}]" + (f", queue {q[0]:.3f} ({q[0] - np.mean(accs):+.3f})"
                                             if q else ""))
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
