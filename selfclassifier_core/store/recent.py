"""Recently opened image folders, remembered in ``$SELFCLASSIFIER_HOME/recent.json``.

Each entry is ``{"folder": ..., "workspace": ..., "opened": unix time}``, newest first. The file
is rewritten atomically, so a crash never corrupts it; an unreadable file counts as empty.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_json
from .workspace import default_home

RECENT_FILE = "recent.json"
MAX_RECENT = 10


def _path() -> Path:
    return default_home() / RECENT_FILE


def load_recent() -> list[dict[str, Any]]:
    """Remembered folders, newest first (folders that no longer exist are left out)."""
    try:
        data = json.loads(_path().read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        return []
    items = data.get("recent", []) if isinstance(data, dict) else []
    return [e for e in items if isinstance(e, dict) and isinstance(e.get("folder"), str)
            and Path(e["folder"]).is_dir()]


def remember(folder: str | os.PathLike, workspace: str | os.PathLike | None = None,
             limit: int = MAX_RECENT) -> list[dict[str, Any]]:
    """Put ``folder`` (with its workspace) first in the list; return the new list."""
    folder = str(Path(folder).expanduser().resolve())
    entry = {"folder": folder,
             "workspace": str(Path(workspace).expanduser().resolve()) if workspace else None,
             "opened": time.time()}
    items = [entry] + [e for e in load_recent() if e["folder"] != folder]
    items = items[:limit]
    atomic_write_json(_path(), {"recent": items})
    return items


def forget(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Remove ``folder`` from the list."""
    folder = str(Path(folder).expanduser().resolve())
    items = [e for e in load_recent() if e["folder"] != folder]
    atomic_write_json(_path(), {"recent": items})
    return items
