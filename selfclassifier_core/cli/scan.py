"""``scan FOLDER``: catalog an image folder into its workspace and print what was found."""
from __future__ import annotations

import argparse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "scan", help="catalog the images in a folder",
        description="Walk FOLDER (recursively), decode every image and record it in the "
                    "workspace: usable images, unreadable ones with the reason, ignored files "
                    "and skipped links. Re-scans only decode new or changed files. The folder "
                    "itself is never written to.")
    parser.add_argument("folder", metavar="FOLDER", help="the image folder")
    parser.add_argument("--workspace", metavar="WS",
                        help="workspace directory (default: under $SELFCLASSIFIER_HOME, "
                             "or $SELFCLASSIFIER_WORKSPACE)")
    parser.add_argument("--workers", metavar="N", type=_positive_int,
                        help="decoding processes (default: one per CPU)")
    parser.add_argument("--retry-unreadable", action="store_true",
                        help="also decode again the unchanged files an earlier scan found "
                             "unreadable (by default only a change retries them)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..catalog.scanner import scan
    from .progress import Reporter

    with Reporter() as shown:
        report = scan(args.folder, workspace=args.workspace,
                      progress=shown.step("reading images", "files"), workers=args.workers,
                      retry_unreadable=args.retry_unreadable)
    print(report.summary())
    return 0
