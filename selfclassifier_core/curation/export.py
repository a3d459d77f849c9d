"""Exports of the final labels: CSV, Parquet, JSON lines and an ImageFolder tree.

Columns (CSV, Parquet, JSON lines): ``path`` (relative to the scanned folder, POSIX), ``label``
(final, after the person's edits), ``cluster`` (the image's cluster after edits; empty/null for
an image given a label that no cluster carries), ``confidence``, ``margin`` (the model's),
``head`` (class count), ``edited`` (true if the person changed this image individually), and
``excluded`` only when excluded images are included. See :mod:`selfclassifier_core.curation.labels`.

The CSV is UTF-8 without a byte-order mark, booleans written ``true``/``false``. Text cells a
spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
return) get a leading ``'``; numbers are written as numbers (a spreadsheet does not run them), so
they are never altered. Parquet and JSON lines carry the values unaltered.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..store.fsutil import atomic_open, atomic_write_bytes, atomic_write_json, is_within

try:
    import fcntl
except ImportError:  # Windows: no advisory locks on directories
    fcntl = None
from .labels import Labels
from ..store.workspace import Workspace, WorkspaceError

log = logging.getLogger(__name__)

COLUMNS = ["path", "label", "cluster", "confidence", "margin", "head", "edited"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
LINK_MODES = ("copy", "hard", "sym")
MAPPING_JSON = "mapping.json"
MAPPING_CSV = "labels.csv"
MAX_FOLDER_BYTES = 200

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{p}{d}" for p in ("COM", "LPT") for d in list("0123456789") + ["¹", "²", "³"]}
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')


# ---------------------------------------------------------------------- the table
def export_table(workspace: Workspace, run_id: int | None = None, head: int | None = None,
                 include_excluded: bool = False, labels: Labels | None = None):
    """The rows every export writes: a DataFrame with :data:`COLUMNS` (+ ``excluded``).

    Indexed by image id, ordered by id. ``labels`` reuses an open :class:`Labels`.
    """
    labels = labels or Labels(workspace, run_id, head)
    df = labels.final_table()
    if not include_excluded:
        df = df[~df["excluded"]]
    cols = COLUMNS + (["excluded"] if include_excluded else [])
    out = df[cols].copy()
    out["confidence"] = out["confidence"].astype("float64").round(6)
    out["margin"] = out["margin"].astype("float64").round(6)
    return out


def neutralize_formula(value: str) -> str:
    """Prefix ``'`` to a text cell that a spreadsheet would evaluate as a formula."""
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def _neutralize_series(s):
    s = s.astype("str")
    return s.where(~s.str.startswith(FORMULA_PREFIXES), "'" + s)


def build_csv_bytes(workspace: Workspace, run_id: int | None = None, head: int | None = None,
                    include_excluded: bool = False, labels: Labels | None = None) -> bytes:
    """The CSV export as UTF-8 bytes (what :func:`export_csv` writes; for download buttons)."""
    df = export_table(workspace, run_id, head, include_excluded, labels)
    return _csv_bytes(df)


def _csv_bytes(df) -> bytes:
    df = df.copy()
    for col in ("path", "label"):
        df[col] = _neutralize_series(df[col])
    for col in ("edited", "excluded"):
        if col in df:
            df[col] = df[col].map({True: "true", False: "false"})
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, na_rep="")
    return buf.getvalue().encode("utf-8")


def export_csv(workspace: Workspace, out: str | os.PathLike, run_id: int | None = None,
               head: int | None = None, include_excluded: bool = False) -> Path:
    """Write the labels CSV to ``out`` atomically; returns its path."""
    out = Path(out).expanduser()
    _refuse_image_folder(workspace, out)
    data = build_csv_bytes(workspace, run_id, head, include_excluded)
    atomic_write_bytes(out, data)
    _usual_mode(out)
    log.info("wrote %s (%d bytes)", out, len(data))
    return out


def export_parquet(workspace: Workspace, out: str | os.PathLike, run_id: int | None = None,
                   head: int | None = None, include_excluded: bool = False) -> Path:
    """Write the labels as Parquet (same columns, values unaltered); returns the path."""
    out = Path(out).expanduser()
    _refuse_image_folder(workspace, out)
    df = export_table(workspace, run_id, head, include_excluded).reset_index(drop=True)
    with atomic_open(out, "wb") as fh:
        df.to_parquet(fh, index=False)
    _usual_mode(out)
    log.info("wrote %s (%d rows)", out, len(df))
    return out


def export_jsonl(workspace: Workspace, out: str | os.PathLike, run_id: int | None = None,
                 head: int | None = None, include_excluded: bool = False) -> Path:
    """Write the labels as JSON lines, one object per image (UTF-8); returns the path."""
    out = Path(out).expanduser()
    _refuse_image_folder(workspace, out)
    df = export_table(workspace, run_id, head, include_excluded)
    cols = list(df.columns)
    with atomic_open(out, "w") as fh:
        for row in zip(*(df[c].tolist() for c in cols)):
            rec = {}
            for c, v in zip(cols, row):
                if c == "cluster":
                    v = None if _isna(v) else int(v)
                elif c in ("edited", "excluded"):
                    v = bool(v)
                elif c == "head":
                    v = int(v)
                rec[c] = v
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    _usual_mode(out)
    log.info("wrote %s (%d rows)", out, len(df))
    return out


def _isna(v) -> bool:
    import pandas as pd

    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _usual_mode(path: Path) -> None:
    """Give a written file the permissions a plain ``open()`` would (temp files are 0600)."""
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, not thread-safe)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _refuse_image_folder(workspace: Workspace, out: Path) -> None:
    root = workspace.root
    if root is not None and is_within(out, root):
        raise ValueError(f"export target {out} lies inside the image folder {root}; the image "
                         "folder is never written to")


# ---------------------------------------------------------------------- safe names
def safe_folder_name(name: str, taken: set[str] | None = None,
                     max_bytes: int = MAX_FOLDER_BYTES) -> str:
    """A folder name for a label that is safe on Linux, macOS and Windows.

    Slashes, backslashes, control characters and ``<>:"|?*`` become ``_``; surrounding
    whitespace and dots are stripped (so no ``.``/``..`` and no trailing dot or space); Windows
    device names (``CON``, ``nul.txt``, ``COM1``...) get a leading ``_``; an empty result becomes
    ``unnamed``; the name is cut to ``max_bytes`` UTF-8 bytes. With ``taken`` (a set of
    case-folded names already used, updated in place) a clash, also one differing only by case,
    gets ``_2``, ``_3``... appended.
    """
    s = unicodedata.normalize("NFC", str(name))
    s = _BAD_CHARS.sub("_", s)
    s = s.strip().strip(". ")
    if s.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        s = "_" + s
    s = _cut_bytes(s, max_bytes) or "unnamed"
    if s.casefold() in (MAPPING_JSON, MAPPING_CSV):
        s = "_" + s
    if taken is None:
        return s
    base, n, cand = s, 1, s
    while cand.casefold() in taken:
        n += 1
        suffix = f"_{n}"
        cand = _cut_bytes(base, max_bytes - len(suffix)) + suffix
    taken.add(cand.casefold())
    return cand


def _cut_bytes(s: str, max_bytes: int) -> str:
    b = s.encode("utf-8")
    if len(b) > max_bytes:
        s = b[:max_bytes].decode("utf-8", errors="ignore")
    return s.rstrip(". ")


def _unique_file_name(name: str, taken: set[str]) -> str:
    """``name`` or ``stem_2.ext``, ``stem_3.ext``... not in ``taken`` (case-folded; updated)."""
    cand = name
    stem, dot, ext = name.rpartition(".")
    if not stem:
        stem, dot, ext = name, "", ""
    n = 1
    while cand.casefold() in taken:
        n += 1
        cand = f"{stem}_{n}{dot}{ext}"
    taken.add(cand.casefold())
    return cand


# ---------------------------------------------------------------------- ImageFolder
@dataclass
class ExportReport:
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


def export_imagefolder(workspace: Workspace, out_dir: str | os.PathLike,
                       run_id: int | None = None, head: int | None = None, link: str = "copy",
                       overwrite: bool = False, include_excluded: bool = False,
                       progress: Callable[[int, int], None] | None = None) -> ExportReport:
    """Write ``OUT/<label>/<file>`` for every image, plus ``mapping.json`` and ``labels.csv``.

    Args:
        link: ``copy`` (independent files), ``hard`` (hard links: same file system as the image
            folder; editing an exported file then edits the original) or ``sym`` (absolute
            symbolic links).
        overwrite: allow a non-empty OUT. Files listed by an earlier export's ``mapping.json``
            in OUT are removed once the new tree is complete; anything else there is left alone
            (new files never replace it: names are made unique instead).
        include_excluded: also export excluded images, under their label.

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
    root = workspace.root
    if root is None:
        raise WorkspaceError(f"workspace {workspace.path} has no image folder recorded")
    out = Path(out_dir).expanduser().absolute()
    if is_within(out, root) or is_within(root, out):
        raise ValueError(f"export folder {out} overlaps the image folder {root}; choose a "
                         "folder outside it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"export folder {out} exists and is not a directory")
    _remove_stale_staging(out)
    existing = list(out.iterdir()) if out.exists() else []
    if existing and not overwrite:
        raise ValueError(f"export folder {out} is not empty ({len(existing)} entries); choose an "
                         "empty folder or pass overwrite=True (--overwrite)")
    previous = _previous_export(out) if existing else None
    labels = Labels(workspace, run_id, head)
    table = export_table(workspace, labels.run_id, labels.head, include_excluded, labels)
    if link == "hard":
        anchor = next(p for p in (out, *out.parents) if p.exists())
        if os.stat(anchor).st_dev != os.stat(root).st_dev:
            raise ValueError(f"hard links need the export folder on the same file system as the "
                             f"image folder ({out} and {root} are on different devices); use "
                             "link='copy' or 'sym'")
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


def _build_tree(tree: Path, root: Path, table, link: str, labels: Labels, taken_folders: set[str],
                report: ExportReport, progress: Callable[[int, int], None] | None) -> None:
    """Write the label folders, ``labels.csv`` and ``mapping.json`` into the empty ``tree``;
    ``taken_folders`` (case-folded) are names the tree's folders must not take."""
    folders: dict[str, str] = {}
    taken_files: dict[str, set[str]] = {}
    files: dict[str, str] = {}
    file_col: list[str | None] = []
    total = len(table)
    for done, (rel, label) in enumerate(zip(table["path"].tolist(), table["label"].tolist()), 1):
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
        unique = _unique_file_name(name, taken_files[folder])
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
        if progress is not None:
            progress(done, total)
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
