"""Names inside an exported ImageFolder tree: label folders safe on every system, file names
made unique within a folder, and the two mapping files no label folder may take."""
from __future__ import annotations

import re
import unicodedata

MAPPING_JSON = "mapping.json"
MAPPING_CSV = "labels.csv"
MAX_FOLDER_BYTES = 200

_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"} | {
    f"{p}{d}" for p in ("COM", "LPT") for d in list("0123456789") + ["¹", "²", "³"]}
_BAD_CHARS = re.compile(r'[\x00-\x1f\x7f/\\<>:"|?*]')


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


def unique_file_name(name: str, taken: set[str]) -> str:
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
