"""``train FOLDER``: scan, learn classes, predict; prints the run id and the next command."""
from __future__ import annotations

import argparse
import signal
import threading
from shlex import quote

from ..training.config import cli_fields, flag_name
from . import CliError


def register(sub) -> None:
    p = sub.add_parser("train", help="learn classes on an image folder, then predict every image",
                       description="Scan FOLDER (incrementally), train Self-Classifier on it and "
                                   "predict every usable image. Defaults follow the folder and "
                                   "the device.")
    p.add_argument("folder", help="image folder (never written to)")
    p.add_argument("--workspace", help="workspace directory (default: one per folder under "
                                       "$SELFCLASSIFIER_HOME)")
    p.add_argument("--resume", action="store_true",
                   help="continue the newest scratch or finetune run with a checkpoint (or "
                        "--run); fast runs are not resumed")
    p.add_argument("--run", type=int, dest="run_id", help="with --resume: the run to continue")
    p.add_argument("--run-id", type=int, dest="run_id", help=argparse.SUPPRESS)  # old spelling
    add_config_flags(p)
    p.set_defaults(func=run)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field that has a help text (:func:`training.config.cli_fields`)."""
    budget = p.add_mutually_exclusive_group()
    for name, typ, meta, modes in cli_fields():
        kind = str(typ)
        kwargs: dict = {"help": meta["help"] + ("" if len(modes) > 1 else f" ({modes[0]} mode)"),
                        "dest": name}
        if meta.get("choices"):
            kwargs["choices"] = list(meta["choices"])
        if "bool" in kind:
            kwargs.update(action="store_true", default=None)
        elif "int" in kind and "float" not in kind:
            kwargs["type"] = int
        elif "float" in kind:
            kwargs["type"] = float
        if name == "device":
            kwargs["default"] = "auto"
        if name == "seed":
            kwargs.update(type=int, default=0)
        (budget if name in ("epochs", "minutes") else p).add_argument(flag_name(name), **kwargs)


def run(args: argparse.Namespace) -> int:
    from ..engine import dist
    from ..workflows.pipeline import TrainingError, train

    options = {name: getattr(args, name) for name, _, _, _ in cli_fields()}

    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        result = train(None if args.resume else args.folder, args.workspace,
                       resume=args.resume, run_id=args.run_id, should_stop=stop.is_set,
                       **options)
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        main = dist.is_main()
        dist.cleanup()
    if not main:
        return 0
    ws = result.workspace.path
    if result.status == "cancelled":
        run = result.workspace.get_run(result.run_id)
        if run.mode == "fast":  # not resumed: a new run starts from the cached features
            print(f"run {run.id} cancelled in workspace {ws}"
                  + (f" ({run.message})" if run.message else ""))
            print("fast mode is not resumed: run the same train command again"
                  + ("; it reuses the cached features" if result.predictions_path else ""))
            return 1
        print(f"run {result.run_id} cancelled (checkpoint saved) in workspace {ws}")
        print(f"continue: python -m selfclassifier_core train {quote(str(args.folder))} "
              f"--workspace {quote(str(ws))} --resume --run {result.run_id}")
        return 1
    print(f"run {result.run_id} done in workspace {ws}")
    print(f"next: python -m selfclassifier_core export {quote(str(ws))} --csv labels.csv")
    return 0
