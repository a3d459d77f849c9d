"""The label table every export writes, and its file formats: CSV, Parquet, JSON lines.

Columns (CSV, Parquet, JSON lines): ``path`` (relative to the scanned folder, POSIX), ``label``
(final, after the person's edits), ``cluster`` (the image's cluster after edits; empty/null for
an image given a label that no cluster carries), ``confidence``, ``margin`` (the model's),
``head`` (class count), ``edited`` (true if the person changed this image individually), and
``excluded`` only when excluded images are included. See :mod:`selfclassifier_core.curation.labels`.

The CSV is UTF-8 without a byte-order mark, booleans written ``true``/``false``. Text cells a
spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
return) get a leading ``'``; numbers are written as numbers (a spreadsheet does not run them), so
they are never altered. Parquet and JSON lines carry the values unaltered.

Each export takes ``progress(done, total)`` (:mod:`selfclassifier_core.store.progress`): rows
written, reported from 0 once the table is built.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path

from ..store.fsutil import atomic_open, atomic_write_bytes, is_within
from ..store.progress import Progress, Tally
from ..store.workspace import Workspace, as_workspace
from .labels import Labels

log = logging.getLogger(__name__)

COLUMNS = ["path", "label", "cluster", "confidence", "margin", "head", "edited"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
WRITE_CHUNK = 50_000  # rows written between two progress reports


def export_table(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
                 head: int | None = None, include_excluded: bool = False,
                 labels: Labels | None = None, table=None):
    """The rows every export writes: a DataFrame with :data:`COLUMNS` (+ ``excluded``).

    ``workspace`` is a :class:`Workspace` or its directory (a path). Indexed by image id, ordered
    by id. ``labels`` reuses an open :class:`Labels` (``workspace``, ``run_id`` and ``head`` are
    then not used); ``table``, its :meth:`~Labels.final_table` just read.
    """
    df = table if table is not None else (labels or Labels(workspace, run_id, head)).final_table()
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


def build_csv_bytes(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
                    head: int | None = None, include_excluded: bool = False,
                    labels: Labels | None = None, *, progress: Progress | None = None) -> bytes:
    """The CSV export as UTF-8 bytes (what :func:`export_csv` writes; for download buttons).

    ``workspace`` is a :class:`Workspace` or its directory (a path); ``progress`` counts rows.
    """
    df = export_table(workspace, run_id, head, include_excluded, labels)
    return _csv_bytes(df, progress)


def _csv_bytes(df, progress: Progress | None = None) -> bytes:
    df = df.copy()
    for col in ("path", "label"):
        df[col] = _neutralize_series(df[col])
    for col in ("edited", "excluded"):
        if col in df:
            df[col] = df[col].map({True: "true", False: "false"})
    buf = io.StringIO()
    options = dict(index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL, na_rep="")
    df.iloc[:0].to_csv(buf, **options)  # the header; then the rows chunk by chunk
    tally = Tally(progress, len(df))
    for start in range(0, len(df), WRITE_CHUNK):
        chunk = df.iloc[start:start + WRITE_CHUNK]
        chunk.to_csv(buf, header=False, **options)
        tally.add(len(chunk))
    tally.finish()
    return buf.getvalue().encode("utf-8")


def export_csv(workspace: Workspace | str | os.PathLike, out: str | os.PathLike,
               run_id: int | None = None, head: int | None = None,
               include_excluded: bool = False, *, progress: Progress | None = None) -> Path:
    """Write the labels CSV to ``out`` atomically; returns its path.

    ``workspace`` is a :class:`Workspace` or its directory (a path); ``progress`` counts rows.
    """
    workspace, out = _target_file(workspace, out)
    data = build_csv_bytes(workspace, run_id, head, include_excluded, progress=progress)
    atomic_write_bytes(out, data)
    _usual_mode(out)
    log.info("wrote %s (%d bytes)", out, len(data))
    return out


def export_parquet(workspace: Workspace | str | os.PathLike, out: str | os.PathLike,
                   run_id: int | None = None, head: int | None = None,
                   include_excluded: bool = False, *, progress: Progress | None = None) -> Path:
    """Write the labels as Parquet (same columns, values unaltered); returns the path.

    ``workspace`` is a :class:`Workspace` or its directory (a path); ``progress`` counts rows
    (written in one go: 0, then all).
    """
    workspace, out = _target_file(workspace, out)
    df = export_table(workspace, run_id, head, include_excluded).reset_index(drop=True)
    tally = Tally(progress, len(df))
    with atomic_open(out, "wb") as fh:
        df.to_parquet(fh, index=False)
    tally.finish()
    _usual_mode(out)
    log.info("wrote %s (%d rows)", out, len(df))
    return out


def export_jsonl(workspace: Workspace | str | os.PathLike, out: str | os.PathLike,
                 run_id: int | None = None, head: int | None = None,
                 include_excluded: bool = False, *, progress: Progress | None = None) -> Path:
    """Write the labels as JSON lines, one object per image (UTF-8); returns the path.

    ``workspace`` is a :class:`Workspace` or its directory (a path); ``progress`` counts rows.
    """
    workspace, out = _target_file(workspace, out)
    df = export_table(workspace, run_id, head, include_excluded)
    cols = list(df.columns)
    values = [df[c].tolist() for c in cols]
    tally = Tally(progress, len(df))
    with atomic_open(out, "w") as fh:
        for start in range(0, len(df), WRITE_CHUNK):
            stop = start + WRITE_CHUNK
            for row in zip(*(v[start:stop] for v in values)):
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
            tally.add(min(stop, len(df)) - start)
    tally.finish()
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


def _target_file(workspace: Workspace | str | os.PathLike,
                 out: str | os.PathLike) -> tuple[Workspace, Path]:
    """The workspace and the file to write, refused when it lies inside the image folder."""
    workspace = as_workspace(workspace)
    out = Path(out).expanduser()
    root = workspace.root
    if root is not None and is_within(out, root):
        raise ValueError(f"export target {out} lies inside the image folder {root}; the image "
                         "folder is never written to")
    return workspace, out
