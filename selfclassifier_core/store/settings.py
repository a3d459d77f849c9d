"""The person's settings that outlive a session, in ``$SELFCLASSIFIER_HOME/settings.json``.

Known settings and their defaults are in :data:`DEFAULTS`; an unknown name is an error, a
missing or unreadable file gives the defaults, and the file is rewritten atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_json
from .workspace import default_home

SETTINGS_FILE = "settings.json"
DEFAULTS: dict[str, Any] = {
    "auto_group": True,  # the app groups a folder without runs as soon as it is opened
}


def _path() -> Path:
    return default_home() / SETTINGS_FILE


def _check(name: str) -> None:
    if name not in DEFAULTS:
        raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(DEFAULTS))}")


def load_settings() -> dict[str, Any]:
    """Every setting: the saved value where it has the default's type, else the default."""
    try:
        saved = json.loads(_path().read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    return {k: saved[k] if type(saved.get(k)) is type(v) else v for k, v in DEFAULTS.items()}


def get_setting(name: str) -> Any:
    _check(name)
    return load_settings()[name]


def set_setting(name: str, value: Any) -> None:
    """Save one setting (its type must be the default's)."""
    _check(name)
    if type(value) is not type(DEFAULTS[name]):
        raise ValueError(f"setting {name!r} takes a {type(DEFAULTS[name]).__name__}, "
                         f"got {value!r}")
    atomic_write_json(_path(), {**load_settings(), name: value})
