"""What the catalog of a workspace holds, read in one go: the summary a folder screen shows.

This module owns the read side of the catalog for people (the scanner owns the write side):
how many images have each status, the report of the newest finished scan, which files could not
be read and why, and a ``version`` string for cache keys. The app's Folder screen shows it, so
no page has to query the workspace database itself.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..store.workspace import Workspace, as_workspace

log = logging.getLogger(__name__)

STATUSES = ("ok", "unreadable", "missing")
UNREADABLE_LIMIT = 1000


@dataclass(frozen=True)
class CatalogSummary:
    """The state of a catalog: see :func:`catalog_summary`.

    Attributes:
        counts: images per status; every status of :data:`STATUSES` is present (0 if none).
        last_scan: the report of the newest finished scan (:meth:`ScanReport.to_dict` form);
            None before the first scan has finished, ``{}`` if its report cannot be read.
        unreadable: ``(path, reason)`` of unreadable images, ordered by path, at most the
            limit asked for (``counts["unreadable"]`` has the full number).
        version: changes with every finished scan and whenever the usable images change; a
            cache key for anything computed from the catalog.
    """

    counts: dict[str, int]
    last_scan: dict[str, Any] | None
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    version: str = ""

    @property
    def usable(self) -> int:
        """Images that can be trained on (status ``ok``)."""
        return self.counts["ok"]

    @property
    def ignored(self) -> int:
        """Files the last scan passed over: not images (by extension) and hidden files."""
        report = self.last_scan or {}
        return int(report.get("ignored", 0)) + int(report.get("hidden", 0))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of links and paths the last scan did not follow."""
        report = self.last_scan or {}
        return [(str(p), str(r)) for p, r in
                report.get("skipped_links", []) + report.get("skipped_paths", [])]


def _parse_report(text: str | None, scan_id: int) -> dict[str, Any]:
    if not text:
        return {}
    try:
        report = json.loads(text)
    except json.JSONDecodeError:
        log.warning("scan %d has an unreadable report; shown as empty", scan_id)
        return {}
    return report if isinstance(report, dict) else {}


def _count_statuses(conn) -> str:
    """Images per status as JSON (a million rows: ~0.1 s; remembered by the workspace)."""
    return json.dumps({status: int(n) for status, n in conn.execute(
        "SELECT status, COUNT(*) FROM images GROUP BY status")})


def catalog_summary(workspace: Workspace | str | os.PathLike,
                    unreadable_limit: int = UNREADABLE_LIMIT) -> CatalogSummary:
    """Counts by status, the last finished scan's report and the unreadable files of a catalog.

    Args:
        workspace: a :class:`Workspace` or the path of one (which must exist).
        unreadable_limit: list at most this many unreadable files (0: none).

    Raises:
        ValueError: ``unreadable_limit`` is not a non-negative integer.
        WorkspaceError: no workspace at the path, or its database cannot be read.
    """
    if (not isinstance(unreadable_limit, int) or isinstance(unreadable_limit, bool)
            or unreadable_limit < 0):
        raise ValueError(f"unreadable_limit must be a non-negative integer, "
                         f"got {unreadable_limit!r}")
    ws = as_workspace(workspace)
    # The version is taken before the rest is read: if a scan writes in between, the data is
    # at least as new as the version, so a cache keyed by it never keeps older data.
    usable_version = ws.catalog_version()
    counts = dict.fromkeys(STATUSES, 0)
    counts.update(json.loads(ws.catalog_memo("status_counts", _count_statuses)))
    conn = ws.connect()
    try:
        conn.execute("BEGIN")  # one read snapshot for everything below
        row = conn.execute("SELECT id, report FROM scans WHERE finished IS NOT NULL "
                           "ORDER BY id DESC LIMIT 1").fetchone()
        unreadable = [(r[0], r[1] or "") for r in conn.execute(
            "SELECT path, reason FROM images WHERE status='unreadable' ORDER BY path LIMIT ?",
            (unreadable_limit,))]
        conn.execute("COMMIT")
    finally:
        conn.close()
    scan_id = int(row[0]) if row else 0
    last_scan = _parse_report(row[1], scan_id) if row else None
    return CatalogSummary(counts=counts, last_scan=last_scan, unreadable=unreadable,
                          version=f"{scan_id}.{usable_version}")
