"""Rebuild the demo image folder ``assets/demo/`` from the npm package ``emoji-datasource-google``.

The demo is what the app opens with no arguments: a few hundred small, visually varied images.
The images are Google's Noto emoji (Apache-2.0) as shipped, 64 px, by ``emoji-datasource-google``.

Usage::

    cd /tmp && npm install emoji-datasource-google@16.0.0
    python assets/make_demo.py /tmp/node_modules/emoji-datasource-google

Selection (deterministic): every emoji with a Google image, grouped by ``category`` (the
"Component" category - skin-tone swatches and hair parts - is left out), sorted by ``sort_order``;
from each category ``PER_CATEGORY`` emoji are taken at evenly spaced positions so each category's
subcategories are all represented. Files are named ``<short_name>.png`` in one flat folder (no
category subfolders: the app must find groups itself); the true categories go to
``assets/demo_categories.csv`` for tests and benchmarks.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

PER_CATEGORY = 34
SKIP_CATEGORIES = {"Component"}
HERE = Path(__file__).resolve().parent


def select(emoji: list[dict], per_category: int = PER_CATEGORY) -> list[dict]:
    """Evenly spaced emoji from each category, in a stable order."""
    by_cat: dict[str, list[dict]] = {}
    for e in emoji:
        if e.get("has_img_google") and e["category"] not in SKIP_CATEGORIES:
            by_cat.setdefault(e["category"], []).append(e)
    chosen = []
    for cat in sorted(by_cat):
        items = sorted(by_cat[cat], key=lambda e: e["sort_order"])
        n = min(per_category, len(items))
        step = len(items) / n
        chosen += [items[int(i * step)] for i in range(n)]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("package", type=Path, help="path to node_modules/emoji-datasource-google")
    parser.add_argument("--out", type=Path, default=HERE / "demo")
    args = parser.parse_args()

    emoji = json.loads((args.package / "emoji.json").read_text(encoding="utf-8"))
    chosen = select(emoji)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    rows = []
    for e in chosen:
        name = f"{e['short_name']}.png"
        shutil.copyfile(args.package / "img" / "google" / "64" / e["image"], args.out / name)
        rows.append((name, e["category"], e["subcategory"], e["unified"]))
    licence = Path("/usr/share/common-licenses/Apache-2.0")
    (args.out / "LICENSE-emoji").write_text(
        "Images: Noto Emoji by Google, Apache License 2.0, via the npm package "
        "emoji-datasource-google (https://github.com/iamcal/emoji-data).\n\n"
        + licence.read_text(encoding="utf-8"), encoding="utf-8")
    with open(HERE / "demo_categories.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "category", "subcategory", "unified"])
        w.writerows(rows)
    print(f"wrote {len(rows)} images to {args.out}")


if __name__ == "__main__":
    main()
