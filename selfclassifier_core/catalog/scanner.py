"""The image catalog: walk an image folder, decode every image once, record it in the workspace.

:func:`scan` is incremental: a file whose size and mtime are unchanged since the last scan is not
decoded again (unreadable ones only with ``retry_unreadable``), new files are added, deleted ones
are marked ``missing`` (their ids are never reused; a file that comes back gets its old id).
Decoding runs in worker processes (a file that crashes or hangs the decoder ends its worker and is
reported, never the scan); results are written in short transactions, so a scan killed half-way
leaves a database that opens and a scan that simply re-runs. The image folder itself is only ever
read.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator

from ..engine.device import default_workers
from ..store.fsutil import is_within
from ..store.progress import Progress
from .imageio import DEFAULT_MAX_PIXELS, ImageLoadError, is_image_name, printable_text, probe
from ..store.workspace import Workspace

log = logging.getLogger(__name__)

INLINE_MAX = 32          # decode in this process when there are at most this many files
MAX_CHUNK = 64           # files per task sent to a worker process
DECODE_TIMEOUT_S = 120   # a worker decoding one file for longer is ended, the file reported
BATCH_ROWS = 500         # rows per database transaction ...
BATCH_SECONDS = 1.0      # ... or fewer, if this much time has passed
LIST_LIMIT = 20          # entries per list printed by ScanReport.summary()

_UPSERT = """
INSERT INTO images (path, bytes, mtime_ns, width, height, mode, status, reason, scanned_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT(path) DO UPDATE SET
    bytes=excluded.bytes, mtime_ns=excluded.mtime_ns, width=excluded.width,
    height=excluded.height, mode=excluded.mode, status=excluded.status,
    reason=excluded.reason, scanned_at=excluded.scanned_at
"""
_VANISHED = "vanished"   # worker result: the file disappeared between the walk and the decode


@dataclass
class ScanReport:
    """What a scan found. Counts of images are totals for the folder after the scan
    (``usable``, ``unreadable``, ``missing``) or what this scan did (``new``, ``changed``,
    ``unchanged``, ``retried``). ``new`` includes files that came back after being missing;
    ``retried`` counts unchanged unreadable files decoded again (``retry_unreadable``)."""

    root: str
    workspace: str
    usable: int = 0
    unreadable: int = 0
    ignored: int = 0
    hidden: int = 0
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    retried: int = 0
    missing: int = 0
    unreadable_files: list[tuple[str, str]] = field(default_factory=list)
    skipped_links: list[tuple[str, str]] = field(default_factory=list)
    skipped_paths: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    scan_id: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("unreadable_files", "skipped_links", "skipped_paths"):
            d[key] = [list(item) for item in d[key]]
        return d

    def summary(self) -> str:
        """The human-readable report that the command line prints."""
        lines = [f"Scanned {self.root} in {self.seconds:.1f} s",
                 f"  usable images:   {self.usable:,}"]
        lines.append(f"  unreadable:      {self.unreadable:,}")
        lines += _listed(self.unreadable_files)
        lines.append(f"  ignored files:   {self.ignored:,} (not images)")
        if self.hidden:
            lines.append(f"  hidden skipped:  {self.hidden:,} (names starting with '.')")
        if self.skipped_links:
            lines.append(f"  links skipped:   {len(self.skipped_links):,}")
            lines += _listed(self.skipped_links)
        if self.skipped_paths:
            lines.append(f"  other skipped:   {len(self.skipped_paths):,}")
            lines += _listed(self.skipped_paths)
        lines.append(f"  since last scan: {self.new:,} new, {self.changed:,} changed, "
                     f"{self.unchanged:,} unchanged, {self.missing:,} missing"
                     + (f", {self.retried:,} unreadable retried" if self.retried else ""))
        lines.append(f"Workspace: {self.workspace}")
        return "\n".join(lines)


def _listed(items: list[tuple[str, str]]) -> list[str]:
    out = [f"    {path}: {reason}" for path, reason in items[:LIST_LIMIT]]
    if len(items) > LIST_LIMIT:
        out.append(f"    ... and {len(items) - LIST_LIMIT:,} more")
    return out


# --------------------------------------------------------------------------- walking
@dataclass
class _Walk:
    files: list[tuple[str, int, int]] = field(default_factory=list)  # (relpath, bytes, mtime_ns)
    ignored: int = 0
    hidden: int = 0
    skipped_links: list[tuple[str, str]] = field(default_factory=list)
    skipped_paths: list[tuple[str, str]] = field(default_factory=list)


def _link_problem(link: str, root: Path) -> str | None:
    """Why the symlink ``link`` is not followed, or None for a link to a file inside ``root``."""
    target = os.path.realpath(link)
    try:
        shown = os.readlink(link)
    except OSError:
        shown = target
    shown = printable_text(shown)  # a target name need not be valid UTF-8
    if not os.path.exists(target):
        return f"broken link (-> {shown})"
    if not is_within(target, root):
        return f"points outside the folder (-> {shown})"
    if os.path.isdir(target):
        here = os.path.realpath(os.path.dirname(link))
        if is_within(here, target):
            return f"symlink loop (-> {shown})"
        return f"link to a folder inside the folder, scanned under its own path (-> {shown})"
    return None


def _walk(root: Path) -> _Walk:
    """List image files under ``root`` (sorted), skipping hidden entries and unsafe links."""
    found = _Walk()
    stack: list[tuple[str, str]] = [("", str(root))]
    while stack:
        rel_dir, abs_dir = stack.pop()
        try:
            with os.scandir(abs_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            found.skipped_paths.append((rel_dir or ".", f"cannot read folder ({exc.strerror})"))
            continue
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if entry.name.startswith("."):
                found.hidden += 1
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                shown = printable_text(rel)  # the bad bytes as \xNN, the rest as it is
                found.skipped_paths.append((shown, "file name is not valid UTF-8"))
                continue
            try:
                if entry.is_symlink():
                    problem = _link_problem(entry.path, root)
                    if problem:
                        found.skipped_links.append((rel, problem))
                        continue
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append((rel, entry.path))
                elif not entry.is_file() or not is_image_name(entry.name):
                    found.ignored += 1   # other files, and fifos/sockets/devices (never opened)
                else:
                    st = entry.stat()
                    found.files.append((rel, st.st_size, st.st_mtime_ns))
            except OSError as exc:
                found.skipped_paths.append((rel, f"cannot read ({exc.strerror})"))
        stack.extend(reversed(subdirs))
    found.files.sort()
    return found


# --------------------------------------------------------------------------- decoding
def _decode_one(root: str, rel: str, max_pixels: int | None) -> tuple:
    """(status, width, height, mode, reason) of one file; runs in a worker process."""
    try:
        info = probe(os.path.join(root, rel), max_pixels=max_pixels)
    except ImageLoadError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return (_VANISHED, None, None, None, exc.reason)
        return ("unreadable", None, None, None, exc.reason)
    return ("ok", info.width, info.height, info.mode, None)


def _decode_chunk(root: str, max_pixels: int | None, rels: list[str],
                  timeout_s: float | None = None) -> list[tuple]:
    """Decode ``rels``. With ``timeout_s`` (worker processes only: never in the caller's
    process), each file arms SIGALRM with its default action, so a decoder stuck in C code ends
    the worker like a crash and :func:`_decode_parallel` names and skips the file."""
    if timeout_s is None or not hasattr(signal, "SIGALRM"):
        return [_decode_one(root, rel, max_pixels) for rel in rels]
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    out = []
    for rel in rels:
        signal.alarm(max(1, math.ceil(timeout_s)))
        try:
            out.append(_decode_one(root, rel, max_pixels))
        finally:
            signal.alarm(0)
    return out


def _mp_context():
    """``fork`` is unsafe once threads run (the Streamlit server): use a fork server then."""
    import multiprocessing as mp

    if threading.active_count() > 1 and "forkserver" in mp.get_all_start_methods():
        return mp.get_context("forkserver")
    return None


def _decode_parallel(root: str, rels: list[str], workers: int,
                     max_pixels: int | None) -> Iterator[list[tuple]]:
    """Yield decode results chunk by chunk, in the order of ``rels``.

    If a worker process dies (a decoder crash, one file taking over :data:`DECODE_TIMEOUT_S`,
    the OOM killer), the remaining files are decoded one per task in a single worker so that the
    file responsible can be named and skipped.
    """
    size = max(1, min(MAX_CHUNK, -(-len(rels) // (workers * 4))))
    chunks = [rels[i:i + size] for i in range(0, len(rels), size)]
    fn = partial(_decode_chunk, root, max_pixels, timeout_s=DECODE_TIMEOUT_S)
    done = 0
    try:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context())
    except (OSError, NotImplementedError) as exc:  # no semaphores / process limits (sandboxes)
        log.warning("cannot start worker processes (%s); decoding in this process", exc)
        for chunk in chunks:
            yield _decode_chunk(root, max_pixels, chunk)  # no alarm in this process
        return
    try:
        for result in pool.map(fn, chunks):
            done += len(result)
            yield result
        return
    except BrokenProcessPool:
        log.warning("a decoder worker died; decoding the remaining %d files one by one",
                    len(rels) - done)
    finally:  # also when the consumer stops early: don't wait for queued chunks
        pool.shutdown(wait=True, cancel_futures=True)
    pending = rels[done:]
    while pending:
        pool = ProcessPoolExecutor(max_workers=1, mp_context=_mp_context())
        try:
            for result in pool.map(fn, [[rel] for rel in pending]):
                pending = pending[1:]
                yield result
        except BrokenProcessPool:
            log.warning("decoder crashed or hung on %s", pending[0])
            pending = pending[1:]
            yield [("unreadable", None, None, None, "the image decoder crashed on this file or "
                    f"took over {DECODE_TIMEOUT_S:g} s")]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- scanning
def _open_workspace(root: Path, workspace: Workspace | str | os.PathLike | None) -> Workspace:
    if isinstance(workspace, Workspace):
        return Workspace.open(workspace.path, root=root, create=True)
    return Workspace.for_folder(root, workspace)


def _check_folder(folder: str | os.PathLike) -> Path:
    path = Path(folder).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if not path.is_dir():
        raise NotADirectoryError(f"not a folder: {folder} (give the folder that holds the images)")
    return path.resolve()


def scan(folder: str | os.PathLike, workspace: Workspace | str | os.PathLike | None = None,
         progress: Progress | None = None, workers: int | None = None,
         max_pixels: int | None = DEFAULT_MAX_PIXELS, retry_unreadable: bool = False
         ) -> ScanReport:
    """Catalog every image under ``folder`` into the workspace and return a :class:`ScanReport`.

    Args:
        folder: the image folder (read only, never written to).
        workspace: a :class:`Workspace`, a workspace directory, or None for the default
            location (:meth:`Workspace.for_folder`).
        progress: called as ``progress(done, total)`` while files are decoded; ``total`` is the
            number of files this scan decodes (new or changed ones).
        workers: decoding processes (default: the CPUs available); 1 decodes in this process.
        max_pixels: images whose header claims more pixels are recorded as unreadable.
        retry_unreadable: also decode unchanged files that an earlier scan found unreadable
            (one that failed on a slow share, say); otherwise only a change retries them.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        NotADirectoryError: ``folder`` is a file.
        WorkspaceError: the workspace cannot be used (corrupt, newer, inside ``folder``).
        ValueError: ``workers`` is not a positive integer.
    """
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    started = time.time()
    t0 = time.perf_counter()
    root = _check_folder(folder)
    ws = _open_workspace(root, workspace)
    report = ScanReport(root=str(root), workspace=str(ws.path))

    conn = ws.connect()
    try:
        with ws.transaction(conn):
            scan_id = int(conn.execute("INSERT INTO scans (started) VALUES (?)",
                                       (started,)).lastrowid)
        report.scan_id = scan_id

        walk = _walk(root)
        report.ignored, report.hidden = walk.ignored, walk.hidden
        report.skipped_links, report.skipped_paths = walk.skipped_links, walk.skipped_paths

        known = {row["path"]: row for row in conn.execute(
            "SELECT id, path, bytes, mtime_ns, status FROM images")}
        todo, gone = _changes(walk.files, known, retry_unreadable, report)
        if gone:
            with ws.transaction(conn):
                conn.executemany("UPDATE images SET status='missing', scanned_at=? WHERE id=?",
                                 [(started, i) for (i,) in gone])
        log.debug("scan %s: %d images found, %d to decode, %d gone", root, len(walk.files),
                 len(todo), len(gone))

        _decode_into(conn, ws, str(root), todo, known,
                     workers or default_workers(len(todo), purpose="decode"), max_pixels, progress)

        counts = dict(conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status")
                      .fetchall())
        report.usable = counts.get("ok", 0)
        report.unreadable = counts.get("unreadable", 0)
        report.missing = counts.get("missing", 0)
        report.unreadable_files = [(r[0], r[1]) for r in conn.execute(
            "SELECT path, reason FROM images WHERE status='unreadable' ORDER BY path")]
        report.seconds = round(time.perf_counter() - t0, 3)
        with ws.transaction(conn):
            conn.execute("UPDATE scans SET finished=?, report=? WHERE id=?",
                         (time.time(), json.dumps(report.to_dict()), scan_id))
    finally:
        conn.close()
    return report


def _changes(files: list[tuple[str, int, int]], known: dict, retry_unreadable: bool,
             report: ScanReport) -> tuple[list[tuple[str, int, int]], list[tuple[int]]]:
    """What this scan decodes (new, changed and, with ``retry_unreadable``, unchanged unreadable
    files, as ``(path, bytes, mtime_ns)``) and the ids of catalogued files that are gone;
    counts each kind in ``report``."""
    todo: list[tuple[str, int, int]] = []
    present = set()
    for rel, size, mtime in files:
        present.add(rel)
        row = known.get(rel)
        if row is None or row["status"] == "missing":
            report.new += 1
            todo.append((rel, size, mtime))
        elif row["bytes"] == size and row["mtime_ns"] == mtime:
            if retry_unreadable and row["status"] == "unreadable":
                report.retried += 1
                todo.append((rel, size, mtime))
            else:
                report.unchanged += 1
        else:
            report.changed += 1
            todo.append((rel, size, mtime))
    gone = [(row["id"],) for path, row in known.items()
            if path not in present and row["status"] != "missing"]
    return todo, gone


def _decode_into(conn, ws: Workspace, root: str, todo: list[tuple[str, int, int]], known: dict,
                 workers: int, max_pixels: int | None, progress: Progress | None) -> None:
    """Decode ``todo`` and upsert the results in batched transactions."""
    total = len(todo)
    if progress:
        progress(0, total)
    if not total:
        return
    rels = [rel for rel, _, _ in todo]
    if workers == 1 or total <= INLINE_MAX:
        fn = partial(_decode_chunk, root, max_pixels)
        results: Iterable[list[tuple]] = (fn(rels[i:i + MAX_CHUNK])
                                          for i in range(0, total, MAX_CHUNK))
    else:
        results = _decode_parallel(root, rels, workers, max_pixels)

    pending: list[tuple] = []
    last_flush = time.monotonic()
    done = 0

    def flush() -> None:
        nonlocal pending, last_flush
        if pending:
            with ws.transaction(conn):
                conn.executemany(_UPSERT, pending)
            pending = []
        last_flush = time.monotonic()

    now = time.time()
    for chunk in results:
        for status, width, height, mode, reason in chunk:
            rel, size, mtime = todo[done]
            done += 1
            if status == _VANISHED:
                if rel in known:   # keep its id; a file seen only now is simply not added
                    pending.append((rel, None, None, None, None, None, "missing", None, now))
                continue
            pending.append((rel, size, mtime, width, height, mode, status, reason, now))
        if len(pending) >= BATCH_ROWS or time.monotonic() - last_flush >= BATCH_SECONDS:
            flush()
        if progress:
            progress(done, total)
    flush()
