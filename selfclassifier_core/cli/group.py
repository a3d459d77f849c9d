"""``group FOLDER``: the one-step path — scan, the default grouping (or the run already there),
the neighbour index and the map, then a summary and the next commands."""
from __future__ import annotations

from shlex import quote

from . import CliError, add_folder_args, sigterm_stops


def register(sub) -> None:
    p = sub.add_parser("group", help="auto-group an image folder in one step (train gives full "
                                     "control)",
                       description="Scan FOLDER, group it with the default recipe (fast mode on "
                                   "offline pretrained weights when installed, else scratch with "
                                   "a time budget), build the neighbour index and the map, then "
                                   "print a summary. A folder that already has a finished run "
                                   "reuses it instead of training again.")
    add_folder_args(p)
    p.add_argument("--retrain", action="store_true",
                   help="train a new run even when the folder already has a finished one")
    p.add_argument("--no-views", action="store_true",
                   help="skip the neighbour index and the map (the app builds them on demand)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..curation.summary import format_summary, run_summary
    from ..workflows.group import VIEWS, group
    from ..workflows.pipeline import TrainingError

    from .progress import Reporter

    view_words = {"neighbors": ("building the neighbour index", "vectors"),
                  "map": ("placing the map", "points")}
    try:
        with sigterm_stops() as stop, Reporter() as shown:
            result = group(args.folder, args.workspace, retrain=args.retrain,
                           views=() if args.no_views else VIEWS, should_stop=stop.is_set,
                           scan_progress=shown.step("reading images", "files"),
                           progress=shown.run_progress(),
                           view_progress=lambda view: shown.step(*view_words[view]))
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    ws = result.workspace.path
    folder = quote(str(args.folder))
    if result.status != "done":
        print(f"run {result.run_id} {result.status} in workspace {ws}; run the same command "
              "again to group the folder")
        return 1
    if result.reused:
        print(f"run {result.run_id} is already done in workspace {ws}: reused, nothing trained "
              f"(--retrain trains a new run)")
        if result.new_images:
            print(f"{result.new_images:,} image(s) added since then have no group yet: "
                  f"python -m selfclassifier_core group {folder} --retrain")
    else:
        print(f"run {result.run_id} done in workspace {ws} ({result.options.get('mode')} mode)")
    for view, seconds in result.prepared.items():
        print(f"{'the neighbour index' if view == 'neighbors' else 'the map'} is ready "
              f"({seconds:.1f} s)")
    print(format_summary(run_summary(result.workspace, result.run_id)))
    return 0
