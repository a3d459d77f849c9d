"""Exports of the final labels; this module writes the ImageFolder tree.

The table formats (CSV, Parquet, JSON lines, their columns and the CSV's formula rule) are in
:mod:`~selfclassifier_core.curation.formats` and the names inside the tree in
:mod:`~selfclassifier_core.curation.foldernames`; both are importable from here, so
``export.export_csv`` and ``export.export_imagefolder`` sit side by side as before.

The ImageFolder export builds ``OUT/<label>/<file>`` in a staging folder and moves it into place
when complete (see :func:`export_imagefolder`); an earlier export in OUT is recognised by its
``mapping.json`` and replaced with ``overwrite``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
try:
    import fcntl
except ImportError:  # Windows: no advisory locks on directories
    fcntl = None

from ..store.fsutil import atomic_write_bytes, atomic_write_json, is_within
from ..store.progress import Progress, Tally
from ..store.workspace import Workspace, WorkspaceError, as_workspace
from .foldernames import (MAPPING_CSV, MAPPING_JSON, MAX_FOLDER_BYTES, safe_folder_name,
                          unique_file_name)
from .formats import (COLUMNS, FORMULA_PREFIXES, build_csv_bytes, export_csv, export_jsonl,
                      export_parquet, export_table, neutralize_formula)
# helpers the table formats share with the tree (the permission rule and the CSV writer)
from .formats import _csv_bytes, _neutralize_series, _umask, _usual_mode
from .labels import Labels

__all__ = ["COLUMNS", "FORMULA_PREFIXES", "LINK_MODES", "MAPPING_CSV", "MAPPING_JSON",
           "MAX_FOLDER_BYTES", "ExportReport", "build_csv_bytes", "export_csv",
           "export_imagefolder", "export_jsonl", "export_parquet", "export_table",
           "neutralize_formula", "safe_folder_name"]

log = logging.getLogger(__name__)

LINK_MODES = ("copy", "hard", "sym")


# ---------------------------------------------------------------------- ImageFolder
@dataclass
class ExportReport:
    """What :func:`export_imagefolder` wrote; ``str(report)`` is a readable summary."""
    out_dir: Path
    link: str
    files: int = 0
    folders: dict[str, str] = field(default_factory=dict)   # label -> folder name
    renamed_files: int = 0         # file names made unique inside a label folder
    missing: list[str] = field(default_factory=list)        # sources that could not be read
    removed_previous: int = 0      # files of an earlier export removed (overwrite=True)

    def __str__(self) -> str:
        s = (f"{self.files} images in {len(self.folders)} label folders under {self.out_dir} "
             f"({self.link})")
        if self.renamed_files:
            s += f"; {self.renamed_files} file names made unique"
        if self.missing:
            s += f"; {len(self.missing)} source images missing (not exported): " + \
                 ", ".join(self.missing[:5]) + (" ..." if len(self.missing) > 5 else "")
        return s


def export_imagefolder(workspace: Workspace | str | os.PathLike, out_dir: str | os.PathLike,
                       run_id: int | None = None, head: int | None = None, link: str = "copy",
                       overwrite: bool = False, include_excluded: bool = False,
                       progress: Progress | None = None) -> ExportReport:
    """Write ``OUT/<label>/<file>`` for every image, plus ``mapping.json`` and ``labels.csv``.

    Args:
        workspace: the workspace, or its directory (a path).
        out_dir: OUT, the folder to write.
        link: ``copy`` (independent files), ``hard`` (hard links: same file system as the image
            folder; editing an exported file then edits the original) or ``sym`` (absolute
            symbolic links).
        overwrite: allow a non-empty OUT. Files listed by an earlier export's ``mapping.json``
            in OUT are removed once the new tree is complete; anything else there is left alone
            (new files never replace it: names are made unique instead).
        include_excluded: also export excluded images, under their label.
        progress: ``progress(done, total)`` in images placed (from 0 once the table is built).

    The tree is built in a temporary folder beside OUT (``OUT.partial-*``; inside OUT as
    ``.partial-*`` when OUT is an existing symlink or mount point, or its parent is read-only)
    and moved into place when complete, so an error leaves OUT as it was (absent, or the earlier
    export) and removes the temporary folder. Such a folder left by an export that was killed
    is removed by the next export into OUT; one still in use by a running export (it holds a
    lock on it) makes this export an error.

    Source images are only read. Every target is checked to lie inside the temporary folder;
    OUT may not overlap the image folder. ``mapping.json`` holds ``labels`` (label -> folder)
    and ``files`` (file in OUT -> source path relative to the image folder); ``labels.csv`` is
    the CSV export with a ``file`` column.
    """
    if link not in LINK_MODES:
        raise ValueError(f"link must be one of {LINK_MODES}, got {link!r}")
    workspace = as_workspace(workspace)
    root = workspace.root
    if root is None:
        raise WorkspaceError(f"workspace {workspace.path} has no image folder recorded")
    out = Path(out_dir).expanduser().absolute()
    _check_export_folder(out, root)
    _remove_stale_staging(out)
    existing = list(out.iterdir()) if out.exists() else []
    if existing and not overwrite:
        raise ValueError(f"export folder {out} is not empty ({len(existing)} entries); choose an "
                         "empty folder or pass overwrite=True (--overwrite)")
    previous = _previous_export(out) if existing else None
    labels = Labels(workspace, run_id, head)
    table = export_table(workspace, labels.run_id, labels.head, include_excluded, labels)
    if link == "hard":
        _check_same_device(out, root)
    report = ExportReport(out_dir=out, link=link)
    staging, inside = _staging_dir(out)
    lock = _lock_dir(staging, wait=True)  # marks it as in use for _remove_stale_staging
    try:
        taken = _names_kept(out, previous) if existing else set()
        _build_tree(staging, root, table, link, labels, taken, report, progress)
        if previous is not None:
            report.removed_previous = _remove_previous_export(out, previous)
        _move_into_place(staging, out, inside)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            os.close(lock)
    log.info("%s", report)
    return report


def _check_export_folder(out: Path, root: Path) -> None:
    """OUT may not overlap the image folder, and must be a directory if it exists."""
    if is_within(out, root) or is_within(root, out):
        raise ValueError(f"export folder {out} overlaps the image folder {root}; choose a "
                         "folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} exists and is not a directory")


def _check_same_device(out: Path, root: Path) -> None:
    """Hard links need OUT (or its nearest existing parent) on the image folder's file system."""
    anchor = next(p for p in (out, *out.parents) if p.exists())
    if os.stat(anchor).st_dev != os.stat(root).st_dev:
        raise ValueError(f"hard links need the export folder on the same file system as the "
                         f"image folder ({out} and {root} are on different devices); use "
                         "link='copy' or 'sym'")


def _build_tree(tree: Path, root: Path, table, link: str, labels: Labels, taken_folders: set[str],
                report: ExportReport, progress: Progress | None) -> None:
    """Write the label folders, ``labels.csv`` and ``mapping.json`` into the empty ``tree``;
    ``taken_folders`` (case-folded) are names the tree's folders must not take."""
    folders: dict[str, str] = {}
    taken_files: dict[str, set[str]] = {}
    files: dict[str, str] = {}
    file_col: list[str | None] = []
    tally = Tally(progress, len(table))
    for rel, label in zip(table["path"].tolist(), table["label"].tolist()):
        if label not in folders:
            folders[label] = safe_folder_name(label, taken_folders)
        folder = folders[label]
        d = tree / folder
        if folder not in taken_files:
            d.mkdir(exist_ok=True)
            if not is_within(d, tree) or d.is_symlink():
                raise ValueError(f"label folder {d} would lie outside {tree}")
            taken_files[folder] = {p.name.casefold() for p in d.iterdir()}
        name = Path(rel).name
        unique = unique_file_name(name, taken_files[folder])
        report.renamed_files += unique != name
        target = d / unique
        if not is_within(target, tree) or is_within(target, root):
            raise ValueError(f"target {target} would lie outside {tree}")
        src = root / rel
        try:
            _place(src, target, link)
        except FileNotFoundError:
            log.warning("source image %s is missing; not exported", src)
            report.missing.append(rel)
            taken_files[folder].discard(unique.casefold())
            file_col.append(None)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise ValueError(f"cannot hard-link {src} into the export folder: different "
                                 "file systems; use link='copy' or 'sym'") from exc
            raise
        else:
            rel_target = f"{folder}/{unique}"
            files[rel_target] = rel
            file_col.append(rel_target)
            report.files += 1
        tally.add()
    tally.finish()
    report.folders = {k: v for k, v in folders.items()}
    csv_table = table.copy()
    csv_table.insert(0, "file", file_col)
    csv_table = csv_table[csv_table["file"].notna()]
    atomic_write_bytes(tree / MAPPING_CSV, _csv_bytes_with_file(csv_table))
    atomic_write_json(tree / MAPPING_JSON, {
        "run": labels.run_id, "head": labels.head, "link": link, "created": time.time(),
        "image_folder": str(root), "labels": report.folders, "files": files,
        "missing": report.missing})
    _usual_mode(tree / MAPPING_CSV)
    _usual_mode(tree / MAPPING_JSON)


_STAGING_PREFIX = ".partial-"
# a staging folder's name after OUT's: the prefix and the 8 characters tempfile.mkdtemp adds
_STAGING_SUFFIX = re.compile(re.escape(_STAGING_PREFIX) + r"[A-Za-z0-9_]{8}")


def _staging_dir(out: Path) -> tuple[Path, bool]:
    """A new empty folder to build the export in, and whether it lies inside ``out``.

    Beside ``out`` (same parent, so one rename puts the tree in place) unless ``out`` is an
    existing directory that a sibling cannot be renamed into: a symlink, a mount point, or one
    whose parent is not writable (e.g. a mounted drive or a container volume).
    """
    if out.is_dir() and (out.is_symlink() or os.stat(out).st_dev != os.stat(out.parent).st_dev):
        return _make_temp_dir(out, _STAGING_PREFIX), True
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return _make_temp_dir(out.parent, out.name + _STAGING_PREFIX), False
    except PermissionError:
        if not out.is_dir():
            raise
        return _make_temp_dir(out, _STAGING_PREFIX), True


def _lock_dir(path: Path, wait: bool) -> int | None:
    """An exclusive ``flock`` on directory ``path``: its file descriptor (close it to release),
    or None when another process holds the lock (``wait=False``) or the platform has no flock."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_stale_staging(out: Path) -> None:
    """Delete the temporary folders of exports into ``out`` that were stopped hard (``kill -9``,
    power loss): ``OUT.partial-*`` beside OUT and ``.partial-*`` inside it. A folder that a
    running export holds (its flock) is a clear error: one export into a folder at a time."""
    if fcntl is None:
        return  # no way to tell a stale folder from one in use: leave them
    found = []
    if out.parent.is_dir():
        found += [p for p in out.parent.iterdir() if p.name.startswith(out.name)
                  and _STAGING_SUFFIX.fullmatch(p.name[len(out.name):])]
    if out.is_dir():
        found += [p for p in out.iterdir() if _STAGING_SUFFIX.fullmatch(p.name)]
    for path in found:
        if path.is_symlink() or not path.is_dir():
            continue
        fd = _lock_dir(path, wait=False)
        if fd is None:
            raise ValueError(f"another export into {out} is running (it is building {path}); "
                             "wait until it has finished")
        try:
            shutil.rmtree(path)
            log.warning("removed %s, left behind by an export that was stopped", path)
        finally:
            os.close(fd)


def _make_temp_dir(parent: Path, prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~_umask())  # mkdtemp makes 0700; OUT gets the usual permissions
    return path


def _move_into_place(staging: Path, out: Path, inside: bool) -> None:
    """Put the finished tree ``staging`` at ``out``: one rename when ``out`` is absent or an
    empty directory; otherwise entry by entry (names never clash: see :func:`_names_kept`),
    ``mapping.json`` and ``labels.csv`` first, so that even a move cut short leaves a tree that
    ``overwrite`` recognises."""
    if not inside:
        try:
            os.rename(staging, out)  # POSIX: also replaces an empty directory
            return
        except OSError:
            if not out.is_dir():
                raise
    names = sorted(os.listdir(staging), key=lambda n: (n not in (MAPPING_JSON, MAPPING_CSV), n))
    clash = [n for n in names if os.path.lexists(out / n)]
    if clash:
        raise ValueError(f"{', '.join(clash[:3])} appeared in {out} during the export; export "
                         "again")
    for name in names:
        os.rename(staging / name, out / name)
    staging.rmdir()


def _csv_bytes_with_file(df) -> bytes:
    df = df.copy()
    df["file"] = _neutralize_series(df["file"])
    return _csv_bytes(df)


def _place(src: Path, target: Path, link: str) -> None:
    if not src.is_file():
        raise FileNotFoundError(str(src))
    if link == "copy":
        shutil.copyfile(src, target)
        shutil.copystat(src, target)
    elif link == "hard":
        os.link(src, target)
    else:
        os.symlink(src.absolute(), target)


def _previous_export(out: Path) -> list[Path] | None:
    """The files an earlier export listed in ``out/mapping.json`` (each inside a label folder of
    ``out``), or None without a mapping file. Raises ``ValueError`` for an unreadable one."""
    path = out / MAPPING_JSON
    if not path.exists():
        return None
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
        listed = list(mapping.get("files", {}))
    except (ValueError, AttributeError) as exc:
        raise ValueError(f"{path} is not a mapping file of an earlier export ({exc}); remove it "
                         "or choose an empty folder") from exc
    files = []
    for rel in listed:
        parts = Path(rel).parts
        p = out / rel
        if (len(parts) != 2 or Path(rel).is_absolute() or any(x in ("", ".", "..") for x in parts)
                or not is_within(p.parent, out)):
            log.warning("ignoring %r listed in %s: not inside a label folder", rel, path)
            continue
        files.append(p)
    return files


def _names_kept(out: Path, previous: list[Path] | None) -> set[str]:
    """Case-folded names of the entries of ``out`` that removing the earlier export
    ``previous`` (see :func:`_remove_previous_export`) leaves in place."""
    gone = {p for p in previous or [] if p.is_symlink() or p.is_file()}
    emptied = {p.parent for p in gone}
    kept = set()
    for entry in out.iterdir():
        if previous is not None and entry.name in (MAPPING_JSON, MAPPING_CSV):
            continue
        if entry in emptied and all(c in gone for c in entry.iterdir()):
            continue
        kept.add(entry.name.casefold())
    return kept


def _remove_previous_export(out: Path, files: list[Path]) -> int:
    """Remove ``files`` (from :func:`_previous_export`), the folders they leave empty, and the
    earlier ``mapping.json`` and ``labels.csv``; returns how many files were removed."""
    removed = 0
    dirs = set()
    for p in files:
        if p.is_symlink() or p.is_file():
            p.unlink()
            removed += 1
            dirs.add(p.parent)
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            pass  # not empty: other files were there
    for name in (MAPPING_JSON, MAPPING_CSV):
        (out / name).unlink(missing_ok=True)
    return removed
