"""The final labels of a run and head as arrays, read in one snapshot
(:meth:`~.labels.Labels.final_labels`).

Everything a person sees of the labels is made from them: :meth:`FinalLabels.frame` is the
pandas table of :meth:`~.labels.Labels.final_table` (exports, Review, Map), while
:meth:`FinalLabels.groups` (the images, confidence and exclusions per label) and
:meth:`FinalLabels.members` (each label's images in a given order) need neither pandas nor
Python strings per image. At a million images that is what lets the Clusters screen show its
groups without pandas' import (~0.3 s) and the table (~0.1 s): the labels are codes into the few
label names, and the paths stay in the catalog's Arrow array until a page asks for some.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np

from ..store.ids import find_ids, shown_ids
from .pathcache import paths_at, take_paths

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import pyarrow as pa

__all__ = ["FinalLabels", "LabelGroup", "least_confident_first"]


@dataclass(frozen=True)
class LabelGroup:
    """One label's counts: ``size`` images carry it (excluded ones left out), with
    ``mean_confidence`` (the model's, NaN when empty); ``excluded`` images carrying it were
    excluded; ``clusters`` are the head's clusters named so (empty for a label the person
    made)."""

    name: str
    size: int
    mean_confidence: float
    excluded: int
    clusters: tuple[int, ...]


def least_confident_first(confidence: np.ndarray) -> np.ndarray:
    """Row order by confidence, lowest first (confidences rounded to 1/65535, ties in row
    order). On the 16-bit key numpy sorts by radix: a million rows 0.05 s, not 0.16-0.28 s."""
    key = np.round(np.clip(confidence, 0.0, 1.0) * 65535).astype(np.uint16)
    return np.argsort(key, kind="stable")


@dataclass(frozen=True, eq=False)
class FinalLabels:
    """One row per usable image the run predicted, ids ascending (the rows of
    :meth:`~.labels.Labels.final_table`, whose columns these arrays are).

    ``names`` are every label name in :meth:`~.labels.Labels.label_names` order (cluster names
    in cluster order, labels the person created, labels given to images), ``codes`` each row's
    position in it; ``cluster`` is -1 where no cluster carries the label (``<NA>`` in the
    table); ``cluster_names`` the name of each cluster of the head. Shared: do not change the
    arrays.
    """

    run_id: int
    head: int
    ids: np.ndarray
    names: tuple[str, ...]
    codes: np.ndarray
    cluster: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    margin: np.ndarray
    edited: np.ndarray
    excluded: np.ndarray
    confirmed: np.ndarray
    cluster_names: tuple[str, ...]
    catalog_paths: "pa.Array"             # the catalog's paths (Arrow), indexed by path_rows
    path_rows: np.ndarray | None = None   # each row's position there; None: row i is path i
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False,
                                  compare=False)

    def __len__(self) -> int:
        return len(self.ids)

    def _once(self, what: str, make):
        """``make()``, made once however many threads ask (each thing behind a lock of its
        own: the groups never wait for the table)."""
        with self._lock:
            lock = self._memo.setdefault(("lock", what), threading.Lock())
        with lock:
            if what not in self._memo:
                self._memo[what] = make()
            return self._memo[what]

    # ------------------------------------------------------------------ rows
    def rows(self, image_ids: Iterable[int]) -> np.ndarray:
        """Positions of ``image_ids`` among the rows; ValueError naming the ids not there."""
        ids = np.asarray(image_ids if isinstance(image_ids, np.ndarray) else list(image_ids),
                         np.int64)
        pos, found = find_ids(self.ids, ids)
        if not found.all():
            raise ValueError(f"image id(s) {shown_ids(ids[~found])} are not among the final "
                             f"labels of run {self.run_id} (head {self.head})")
        return pos

    def take(self, rows: np.ndarray) -> "FinalLabels":
        """The labels of some rows (positions), in their order: a queue's few, as a table with
        :meth:`frame`."""
        rows = np.asarray(rows, np.int64)
        columns = {k: getattr(self, k)[rows] for k in _COLUMNS}
        path_rows = rows if self.path_rows is None else self.path_rows[rows]
        return FinalLabels(self.run_id, self.head, names=self.names,
                           cluster_names=self.cluster_names, catalog_paths=self.catalog_paths,
                           path_rows=path_rows, **columns)

    def paths(self, image_ids: Iterable[int]) -> list[str]:
        """The relative paths of ``image_ids`` (a page of them: taken from the catalog's
        Arrow array, no pandas)."""
        pos = self.rows(image_ids)
        return paths_at(self.catalog_paths, pos if self.path_rows is None else self.path_rows[pos])

    # ------------------------------------------------------------------ per label
    def groups(self) -> list[LabelGroup]:
        """Every label's :class:`LabelGroup`, in :attr:`names` order (made once; shared)."""
        return self._once("groups", self._groups)

    def _groups(self) -> list[LabelGroup]:
        k = len(self.names)
        kept = ~self.excluded
        codes = self.codes[kept]
        size = np.bincount(codes, minlength=k)
        total = np.bincount(codes, weights=self.confidence[kept].astype(np.float64),
                            minlength=k)
        excluded = np.bincount(self.codes[self.excluded], minlength=k)
        by_name: dict[str, list[int]] = {}
        for c, name in enumerate(self.cluster_names):
            by_name.setdefault(name, []).append(c)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / size
        return [LabelGroup(name, int(size[i]), float(mean[i]) if size[i] else float("nan"),
                           int(excluded[i]), tuple(by_name.get(name, ())))
                for i, name in enumerate(self.names)]

    def members(self, order: np.ndarray | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Image ids of each label with images, apart for those kept and those excluded, in
        ``order`` (row positions; default :func:`least_confident_first`, ties in id order):
        one stable sort of a 16-bit key, not a group-by."""
        if order is None:
            order = least_confident_first(self.confidence)
        key = self.codes.astype(np.int64) * 2 + self.excluded
        if len(self.names) < 2 ** 14:   # a 16-bit key: numpy sorts it by radix, in linear time
            key = key.astype(np.int16)
        order = order[np.argsort(key[order], kind="stable")]
        key, ids = key[order], self.ids[order]
        starts = np.flatnonzero(np.diff(key)) + 1
        members: dict[str, np.ndarray] = {}
        excluded: dict[str, np.ndarray] = {}
        for k, part in zip(key[np.r_[0, starts]].tolist() if len(key) else [],
                           np.split(ids, starts)):
            (excluded if k % 2 else members)[self.names[k // 2]] = part
        return members, excluded

    # ------------------------------------------------------------------ the table
    def frame(self) -> "pd.DataFrame":
        """The pandas table of :meth:`~.labels.Labels.final_table` (see the columns there),
        made once (shared: do not change it)."""
        return self._once("frame", self._frame)

    def _frame(self) -> "pd.DataFrame":
        import pandas as pd

        n = len(self.ids)
        paths = self.catalog_paths
        if self.path_rows is not None:
            paths = take_paths(paths, self.path_rows)
        has = self.cluster >= 0
        return pd.DataFrame({
            "path": pd.Series(paths, dtype="str", copy=False).array,
            "label": _strings(self.names, self.codes),
            "cluster": pd.arrays.IntegerArray(np.where(has, self.cluster, 0), ~has),
            "confidence": self.confidence,
            "margin": self.margin,
            "head": np.full(n, self.head, dtype=np.int64),
            "edited": self.edited,
            "excluded": self.excluded,
            "confirmed": self.confirmed,
            "predicted_cluster": self.predicted,
        }, index=pd.Index(self.ids, name="id"))


_COLUMNS = ("ids", "codes", "cluster", "predicted", "confidence", "margin", "edited", "excluded",
            "confirmed")  # the per-row arrays


def _strings(values: Sequence[str], codes: np.ndarray):
    """The pandas string array ``values[codes]``, taken in Arrow (a million rows: 0.03 s;
    built from a million Python strings, 0.2 s)."""
    import pandas as pd
    import pyarrow as pa

    taken = pa.array(list(values), pa.large_string()).take(pa.array(codes, pa.int32()))
    return pd.Series(taken, dtype="str", copy=False).array
