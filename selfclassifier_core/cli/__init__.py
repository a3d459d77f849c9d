"""Command line: ``python -m selfclassifier_core COMMAND ...`` (also the ``selfclassifier`` script).

Each command lives in its own module in this package with two functions:
``register(subparsers)`` adding its parser, and ``run(args) -> int`` returning the exit code.
Expected errors (bad folder, missing run, bad value) are raised as :class:`CliError` or
``WorkspaceError``/``ValueError`` and printed as one line with exit code 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

COMMANDS = ["scan", "group", "train", "refit", "predict", "export", "labels", "neighbors",
            "duplicates", "runs"]


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def add_folder_args(p: argparse.ArgumentParser) -> None:
    """FOLDER and ``--workspace``, as every command that reads an image folder takes them."""
    p.add_argument("folder", help="image folder (never written to)")
    p.add_argument("--workspace", help="workspace directory (default: one per folder under "
                                       "$SELFCLASSIFIER_HOME)")


@contextlib.contextmanager
def sigterm_stops() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs (a training loop polls it and stops after a
    clean checkpoint); the previous handler is put back after. Off the main thread (where
    handlers cannot be set) the event is only set by the caller."""
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        yield stop
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def open_workspace(path: str):
    """The workspace at ``path``, or the default workspace of the image folder ``path``."""
    from pathlib import Path

    from ..store.workspace import DB_NAME, Workspace, default_workspace_for

    p = Path(path).expanduser()
    if (p / DB_NAME).exists():
        return Workspace.open(p)
    if p.is_dir():
        default = default_workspace_for(p)
        if (default / DB_NAME).exists():
            return Workspace.open(default)
    raise CliError(f"no workspace at {path} (and no workspace for it as an image folder); run "
                   "`scan` or `train` first")


def print_run_summary(ws, run_id: int) -> bool:
    """Print a finished run's summary (how good the grouping is, the granularity to start with,
    the next commands); False, after saying why, when there is none."""
    from ..curation.summary import format_summary, run_summary  # numpy: not for --help
    from ..store.workspace import WorkspaceError

    try:
        print(format_summary(run_summary(ws, run_id)))
        return True
    except (WorkspaceError, FileNotFoundError) as exc:  # e.g. every image gone since the scan
        print(f"no summary of run {run_id}: {exc}")
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selfclassifier",
        description="Group an unlabeled image folder into classes with Self-Classifier, "
                    "then curate and export the labels.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..store.workspace import WorkspaceError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (CliError, WorkspaceError, ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable output, disk full, permission denied
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
