"""``train FOLDER``: scan, learn classes, predict; prints the run id and the next command."""
from __future__ import annotations

import argparse
from shlex import quote

from ..training.config import option_specs
from . import CliError, add_folder_args, print_run_summary, sigterm_stops


def register(sub) -> None:
    p = sub.add_parser("train", help="learn classes on an image folder, then predict every image",
                       description="Scan FOLDER (incrementally), train Self-Classifier on it and "
                                   "predict every usable image. Defaults follow the folder and "
                                   "the device.")
    add_folder_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the newest scratch or finetune run with a checkpoint (or "
                        "--run); fast runs are not resumed")
    p.add_argument("--run", type=int, dest="run_id", help="with --resume: the run to continue")
    p.add_argument("--run-id", type=int, dest="run_id", help=argparse.SUPPRESS)  # old spelling
    add_config_flags(p)
    p.set_defaults(func=run)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per training option (:func:`training.config.option_specs`)."""
    budget = p.add_mutually_exclusive_group()
    for spec in option_specs():
        kwargs: dict = {"help": spec.help + ("" if len(spec.modes) > 1
                                             else f" ({spec.modes[0]} mode)"), "dest": spec.name}
        if spec.choices:
            kwargs["choices"] = list(spec.choices)
        if spec.kind == "bool":
            kwargs.update(action="store_true", default=None)
        else:
            kwargs["type"] = {"int": int, "float": float, "str": str}[spec.kind]
        if spec.name in ("device", "seed"):  # shown in --help; the others' None = the recipe
            kwargs["default"] = spec.default
        (budget if spec.name in ("epochs", "minutes") else p).add_argument(spec.flag, **kwargs)


def run(args: argparse.Namespace) -> int:
    from ..engine import dist
    from ..workflows.pipeline import TrainingError, train
    from .progress import Reporter

    options = {spec.name: getattr(args, spec.name) for spec in option_specs()}

    try:
        with sigterm_stops() as stop, Reporter() as shown:
            result = train(None if args.resume else args.folder, args.workspace,
                           resume=args.resume, run_id=args.run_id, should_stop=stop.is_set,
                           progress=shown.run_progress(),
                           scan_progress=shown.step("reading images", "files"), **options)
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    finally:
        main = dist.is_main()
        dist.cleanup()
    if not main:
        return 0
    ws = result.workspace.path
    if result.status == "cancelled":
        run = result.workspace.get_run(result.run_id)
        if run.mode == "fast":  # not resumed: a new run starts from the cached features
            print(f"run {run.id} cancelled in workspace {ws}"
                  + (f" ({run.summary})" if run.summary else ""))
            print("fast mode is not resumed: run the same train command again"
                  + ("; it reuses the cached features" if result.predictions_path else ""))
            return 1
        print(f"run {result.run_id} cancelled (checkpoint saved) in workspace {ws}")
        print(f"continue: python -m selfclassifier_core train {quote(str(args.folder))} "
              f"--workspace {quote(str(ws))} --resume --run {result.run_id}")
        return 1
    print(f"run {result.run_id} done in workspace {ws}")
    if not print_run_summary(result.workspace, result.run_id):
        print(f"next: python -m selfclassifier_core export {quote(str(ws))} --csv labels.csv")
    return 0
