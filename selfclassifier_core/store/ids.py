"""Image ids: finding some among the ascending ids that key a table of the workspace (the
catalog, a run's predictions, its labels, a refit's targets, a neighbour index).

One rule for every such lookup: bisection, each id's position clipped into range and kept only
where the id is there (a million ids are found in ~0.05 s, with no dict of a million keys).
"""
from __future__ import annotations

from typing import Iterable

import numpy as np


def find_ids(sorted_ids: np.ndarray, ids: Iterable[int] | np.ndarray
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(positions, found)`` of ``ids`` among ``sorted_ids`` (ascending, unique): each id's
    position, meaningful only where ``found``."""
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), np.int64)
    if not len(sorted_ids):
        return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), len(sorted_ids) - 1)
    return pos, sorted_ids[pos] == ids


def shown_ids(ids: np.ndarray, most: int = 10) -> str:
    """Ids for a message: the first ``most`` of them, then "..." when there are more."""
    ids = np.asarray(ids).ravel()
    return ", ".join(str(int(i)) for i in ids[:most]) + (" ..." if len(ids) > most else "")
