"""Nearest neighbours and near-duplicates over a run's embeddings, with FAISS.

Vectors are L2-normalised float32 and compared by inner product (cosine similarity). Up to
``ivf_threshold`` vectors (default 1,000,000) the index is exact (``IndexFlatIP``); above it an
``IndexIVFFlat`` with ``nlist ~ 4*sqrt(n)`` lists, trained on a seeded sample. The index runs on
the GPU when the installed faiss has GPU support and a GPU is present, on the CPU otherwise; it
is always saved in its CPU form.

For a run, :meth:`NeighborIndex.for_run` builds the index once and saves it as
``runs/<id>/neighbors.faiss`` (+ ``neighbors_ids.npy`` and ``neighbors.json``, the key that
says which embeddings file it was built from); later calls load it, and a changed embeddings
file (size or mtime) makes it rebuild.

Threads: a search of a few vectors (the neighbours of one image or one uploaded file, up to
:data:`FEW_QUERIES`) runs on one OpenMP thread (:func:`faiss_threads`): on a small, loaded
machine the spin-waiting of idle OpenMP workers costs such a query more than they save. Bulk
searches (:meth:`NeighborIndex.knn_all`, :meth:`NeighborIndex.duplicates`, many query vectors)
keep faiss's thread count.
"""
from __future__ import annotations

import json
import logging
import math
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..store.fsutil import atomic_write_bytes, atomic_write_json, atomic_open
from ..store.ids import find_ids
from ..store.predictions import load_run_embeddings
from ..store.progress import Progress, Tally
from ..store.workspace import Workspace, as_workspace

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

log = logging.getLogger(__name__)

INDEX_FILE = "neighbors.faiss"
IDS_FILE = "neighbors_ids.npy"
KEY_FILE = "neighbors.json"
INDEX_FORMAT = 1                 # bump when the saved layout or build recipe changes
DEFAULT_IVF_THRESHOLD = 1_000_000
_CHUNK = 65_536                  # rows normalised / searched at a time
_GPU_MAX_K = 2048                # faiss GPU indexes refuse larger k
FEW_QUERIES = 16                 # searches of at most this many vectors run on one thread

EmbedFn = Callable[[list], np.ndarray]


def _import_faiss():
    # faiss logs which CPU build it loads (and failed attempts) at INFO: noise for users
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "nearest neighbours need FAISS: `pip install faiss-cpu` (or faiss-gpu on a CUDA "
            "machine)") from exc
    return faiss


def gpu_missing() -> str | None:
    """What stops a GPU index, in words (None when the installed faiss has GPU support and sees
    a CUDA device)."""
    faiss = _import_faiss()
    if not hasattr(faiss, "StandardGpuResources") or not hasattr(faiss, "get_num_gpus"):
        version = getattr(faiss, "__version__", "")
        return (f"the installed faiss{' ' + version if version else ''} is a CPU-only build "
                "(faiss-cpu): it has no GPU support; install a GPU build (faiss-gpu) to search "
                "on the GPU")
    try:
        n = faiss.get_num_gpus()
    except Exception as exc:  # noqa: BLE001 - a broken CUDA runtime means "no GPU", not a crash
        return f"faiss has GPU support but could not query CUDA devices ({exc})"
    if n < 1:
        return ("faiss has GPU support but sees no CUDA device (no GPU, no driver, or "
                "CUDA_VISIBLE_DEVICES hides them)")
    return None


def gpu_available() -> bool:
    """True when the installed faiss was built with GPU support and sees a GPU."""
    return gpu_missing() is None


@contextmanager
def faiss_threads(n: int) -> Iterator[None]:
    """Run faiss with ``n`` OpenMP threads inside the block; the previous count is restored
    after it, also when it raises. The count is per calling thread (OpenMP), so a search in
    another thread is not affected."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"faiss threads must be a positive integer, got {n!r}")
    faiss = _import_faiss()
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _threads_for(n_queries: int) -> AbstractContextManager[None]:
    """One thread for a search of a few query vectors, faiss's own count for bulk searches."""
    return faiss_threads(1) if n_queries <= FEW_QUERIES else nullcontext()


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows as contiguous float32 with unit L2 norm (zero rows stay zero)."""
    x = np.array(vectors, dtype=np.float32, copy=True, order="C")
    if x.ndim == 1:
        x = x[None, :]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class NeighborIndex:
    """k-nearest-neighbour search by cosine similarity over image embeddings.

    Args:
        embeddings: ``[N, D]`` array (any float dtype, may be memory-mapped); rows are
            L2-normalised here, the array itself is not copied as a whole.
        image_ids: ``[N]`` catalog ids, one per row, distinct.
        ivf_threshold: above this many vectors use an approximate IVF index.
        nprobe: IVF lists searched per query (default ``max(16, nlist // 16)``).
        use_gpu: ``None`` = automatic, ``False`` = CPU only, ``True`` = GPU required.
        progress: ``progress(done, total)`` while vectors are added.
    """

    def __init__(self, embeddings: np.ndarray, image_ids: Sequence[int] | np.ndarray, *,
                 ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nprobe: int | None = None,
                 use_gpu: bool | None = None, progress: Progress | None = None,
                 seed: int = 0, _index: Any = None):
        emb = embeddings if isinstance(embeddings, np.ndarray) else np.asarray(embeddings)
        ids = np.asarray(image_ids, dtype=np.int64)
        if emb.ndim != 2:
            raise ValueError(f"embeddings must be a 2-D array [N, D], got shape {emb.shape}")
        if ids.ndim != 1 or len(ids) != emb.shape[0]:
            raise ValueError(f"image_ids must be 1-D with one id per embedding row; got "
                             f"{ids.shape} ids for {emb.shape[0]} rows")
        if emb.shape[1] == 0:
            raise ValueError(f"embeddings have dimension 0 (shape {emb.shape})")
        if ivf_threshold < 1:
            raise ValueError(f"ivf_threshold must be >= 1, got {ivf_threshold}")
        if nprobe is not None and nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if use_gpu not in (None, True, False):
            raise ValueError(f"use_gpu must be None (automatic), True or False, got {use_gpu!r}")
        if use_gpu:  # before the index is built: a GPU that cannot be had fails at once
            missing = gpu_missing()
            if missing is not None:
                raise ValueError(f"use_gpu=True but {missing}; use use_gpu=None to choose "
                                 "automatically or False for the CPU")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        if len(ids) > 1 and np.any(sorted_ids[1:] == sorted_ids[:-1]):
            dup = int(sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0])
            raise ValueError(f"image id {dup} appears more than once in image_ids")
        self.embeddings = emb
        self.image_ids = ids
        self._order = order
        self._sorted_ids = sorted_ids
        self.dim = int(emb.shape[1])
        self.ivf_threshold = int(ivf_threshold)
        self.workspace: Workspace | None = None
        self.run_id: int | None = None
        self.loaded_from_disk = False

        faiss = _import_faiss()
        if _index is not None:
            cpu_index = _index
            if cpu_index.ntotal != len(ids) or cpu_index.d != self.dim:
                raise ValueError(f"saved index holds {cpu_index.ntotal}x{cpu_index.d} vectors, "
                                 f"expected {len(ids)}x{self.dim}")
        else:
            cpu_index = self._build(faiss, progress, seed)
        self.kind = "ivf" if isinstance(cpu_index, faiss.IndexIVF) else "flat"
        if self.kind == "ivf":
            nlist = faiss.extract_index_ivf(cpu_index).nlist
            cpu_index.nprobe = int(min(nlist, nprobe or max(16, nlist // 16)))
        self.cpu_index = cpu_index
        self.index, self.device = self._place(faiss, cpu_index, use_gpu)

    # ------------------------------------------------------------------ building
    def _normalized_rows(self, start: int, stop: int) -> np.ndarray:
        return normalize(self.embeddings[start:stop])

    def _build(self, faiss, progress: Progress | None, seed: int):
        n, d = len(self.image_ids), self.dim
        tally = Tally(progress, n)  # counts vectors added; an IVF index is trained first
        if n > self.ivf_threshold:
            # faiss wants >= 39 training points per list; keep nlist within what n supports.
            nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
            n_train = min(n, max(64 * nlist, 50_000))
            rng = np.random.default_rng(seed)
            sample = np.sort(rng.choice(n, size=n_train, replace=False))
            train = normalize(self.embeddings[sample])
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.seed = seed
            log.info("training IVF index: %d vectors, nlist=%d, %d training points",
                     n, nlist, n_train)
            index.train(train)
        else:
            index = faiss.IndexFlatIP(d)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            index.add(self._normalized_rows(start, stop))
            tally.add(stop - start)
        tally.finish()
        return index

    @staticmethod
    def _place(faiss, cpu_index, use_gpu: bool | None):
        want = gpu_available() if use_gpu is None else use_gpu  # True: checked in __init__
        if not want:
            return cpu_index, "cpu"
        try:
            res = faiss.StandardGpuResources()
            gpu_index = faiss.index_cpu_to_gpu(res, 0, cpu_index)
        except Exception as exc:  # noqa: BLE001 - faiss raises a bare RuntimeError with C++ text
            if use_gpu is None:
                log.warning("GPU index failed (%s); searching on the CPU", _first_line(exc))
                return cpu_index, "cpu"
            raise RuntimeError(f"use_gpu=True but the index could not be moved to the GPU: "
                               f"{_first_line(exc)}") from exc
        gpu_index._sc_resources = res  # keep the resources alive with the index
        return gpu_index, "cuda"

    # ------------------------------------------------------------------ per run
    @classmethod
    def for_run(cls, workspace: Workspace | str | os.PathLike, run_id: int | None = None, *,
                ivf_threshold: int = DEFAULT_IVF_THRESHOLD, nprobe: int | None = None,
                use_gpu: bool | None = None, rebuild: bool = False,
                progress: Progress | None = None) -> "NeighborIndex":
        """The index of a run's embeddings: loaded from the run directory, or built and saved.

        A saved index is used only if it was built from the same embeddings file (same size and
        mtime) with the same ``ivf_threshold`` decision; otherwise it is rebuilt. ``workspace``
        is a :class:`Workspace` or its directory (a path). ``progress(done, total)`` counts the
        vectors added to a new index (a saved one reports ``(n, n)`` once loaded).
        """
        workspace = as_workspace(workspace)
        run, image_ids, embeddings, emb_identity = load_run_embeddings(workspace, run_id)
        n = len(image_ids)
        key = {"format": INDEX_FORMAT, "embeddings": emb_identity,
               "n": n, "dim": int(embeddings.shape[1]),
               "kind": "ivf" if n > ivf_threshold else "flat"}
        index_path, ids_path, key_path = (run.dir / INDEX_FILE, run.dir / IDS_FILE,
                                          run.dir / KEY_FILE)
        saved = None
        if not rebuild and index_path.exists() and ids_path.exists() and key_path.exists():
            try:
                if json.loads(key_path.read_text()) == key:
                    saved = _read_index(index_path)
                    saved_ids = np.load(ids_path)
                    if not np.array_equal(saved_ids, image_ids):
                        saved = None
            except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                log.warning("ignoring unreadable neighbour index in %s: %s", run.dir, exc)
                saved = None
        if saved is not None:
            log.debug("loaded neighbour index of run %s", run.id)
            self = cls(embeddings, image_ids, ivf_threshold=ivf_threshold,
                       nprobe=nprobe, use_gpu=use_gpu, _index=saved)
            self.loaded_from_disk = True
            if progress:
                progress(n, n)
        else:
            log.info("building neighbour index of run %s (%d vectors)", run.id, n)
            self = cls(embeddings, image_ids, ivf_threshold=ivf_threshold,
                       nprobe=nprobe, use_gpu=use_gpu, progress=progress)
            # Key last: a crash in between leaves a stale key that no longer matches.
            key_path.unlink(missing_ok=True)
            _write_index(self.cpu_index, index_path)
            with atomic_open(ids_path, "wb") as fh:
                np.save(fh, np.asarray(image_ids, dtype=np.int64))
            atomic_write_json(key_path, key)
        self.workspace = workspace
        self.run_id = run.id
        return self

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.image_ids)

    def positions(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Row positions of ``image_ids`` (ValueError naming an id that is not indexed)."""
        ids = np.atleast_1d(np.asarray(image_ids, dtype=np.int64))
        if len(self._sorted_ids) == 0:
            if len(ids):
                raise ValueError(f"image id {int(ids[0])} is not in the neighbour index (empty)")
            return ids
        p, found = find_ids(self._sorted_ids, ids)
        if not found.all():
            raise ValueError(f"image id {int(ids[np.argmin(found)])} is not in the neighbour "
                             "index of this run")
        return self._order[p]

    def contains(self, image_id: int) -> bool:
        """True if ``image_id`` is indexed."""
        p = int(np.searchsorted(self._sorted_ids, int(image_id)))
        return p < len(self._sorted_ids) and int(self._sorted_ids[p]) == int(image_id)

    def vectors(self, image_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """The normalised embeddings of catalog ids, ``float32 [m, D]``."""
        pos = self.positions(image_ids)
        order = np.argsort(pos)
        out = np.empty((len(pos), self.dim), np.float32)
        out[order] = normalize(self.embeddings[pos[order]])  # sorted reads suit a memmap
        return out

    def _search_raw(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, row positions) with -1 where fewer than k vectors exist."""
        k_eff = min(k, len(self))
        m = queries.shape[0]
        if k_eff == 0 or m == 0:
            return (np.full((m, k), -np.inf, np.float32), np.full((m, k), -1, np.int64))
        if self.device == "cuda" and k_eff > _GPU_MAX_K:
            index = self.cpu_index
        else:
            index = self.index
        sims, pos = index.search(queries, k_eff)
        if k_eff < k:
            sims = np.hstack([sims, np.full((m, k - k_eff), -np.inf, np.float32)])
            pos = np.hstack([pos, np.full((m, k - k_eff), -1, np.int64)])
        return sims, pos

    def search_vectors(self, vectors: np.ndarray, k: int = 10, *,
                       progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray]:
        """k nearest catalog images of each query vector (on one thread for a few vectors).

        Args:
            vectors: ``[m, D]`` or ``[D]`` query embeddings (normalised here).
            k: neighbours per query.

        Returns:
            ``(similarities float32 [m, k], image_ids int64 [m, k])``, best first; where fewer
            than ``k`` images exist the rest is ``-inf`` / ``-1``.
        """
        k = _check_k(k)
        q = np.asarray(vectors)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape [m, {self.dim}], got {q.shape}")
        m = q.shape[0]
        sims = np.empty((m, k), np.float32)
        ids = np.empty((m, k), np.int64)
        tally = Tally(progress, m)
        for start in range(0, m, _CHUNK):
            stop = min(m, start + _CHUNK)
            with _threads_for(m):
                s, p = self._search_raw(normalize(q[start:stop]), k)
            sims[start:stop] = s
            ids[start:stop] = np.where(p >= 0, self.image_ids[np.maximum(p, 0)], -1)
            tally.add(stop - start)
        tally.finish()
        return sims, ids

    def search(self, image_id: int, k: int = 10, *, include_self: bool = False) -> "pd.DataFrame":
        """The k nearest neighbours of a catalog image, most similar first.

        The query image itself is left out unless ``include_self``; an exact duplicate of it
        (similarity 1) is still returned, first.

        Returns:
            DataFrame with columns ``image_id`` (int64) and ``similarity`` (float32).
        """
        import pandas as pd

        k = _check_k(k)
        image_id = int(image_id)
        q = self.vectors([image_id])
        with _threads_for(1):
            sims, pos = self._search_raw(q, k + (0 if include_self else 1))
        sims, pos = sims[0], pos[0]
        keep = pos >= 0
        ids = self.image_ids[np.maximum(pos, 0)]
        if not include_self:
            keep &= ids != image_id
        ids, sims = ids[keep][:k], sims[keep][:k]
        # Exact ties (duplicates) come back in index order; keep that but make "best first" strict.
        order = np.argsort(-sims, kind="stable")
        return pd.DataFrame({"image_id": ids[order].astype(np.int64),
                             "similarity": sims[order].astype(np.float32)})

    def search_file(self, path_or_bytes: str | os.PathLike | bytes, k: int = 10, *,
                    embed_fn: EmbedFn | None = None) -> "pd.DataFrame":
        """Neighbours of an image that need not be in the catalog (a path or raw bytes).

        ``embed_fn(items) -> float32 [n, D]`` embeds it; by default the run's model does, via
        :func:`selfclassifier_core.inference.predict.embed_files` (needs an index from
        :meth:`for_run`).
        """
        import pandas as pd

        if embed_fn is None:
            if self.workspace is None or self.run_id is None:
                raise ValueError("search_file needs embed_fn for an index that was not made "
                                 "with NeighborIndex.for_run(workspace, run_id)")
            from ..inference.predict import embed_files  # torch: only to embed a file

            ws, run_id = self.workspace, self.run_id

            def embed_fn(items):  # noqa: E306
                return embed_files(ws, run_id, items)[0]

        if isinstance(path_or_bytes, (str, os.PathLike)) and not Path(path_or_bytes).is_file():
            raise FileNotFoundError(f"no image file at {path_or_bytes}")
        emb = np.asarray(embed_fn([path_or_bytes]))
        if emb.ndim != 2 or emb.shape[0] != 1:
            raise ValueError(f"embed_fn must return one embedding row, got shape {emb.shape}")
        if not np.all(np.isfinite(emb)):
            raise ValueError(f"could not read the image {_describe(path_or_bytes)}")
        sims, ids = self.search_vectors(emb, k)
        keep = ids[0] >= 0
        return pd.DataFrame({"image_id": ids[0][keep], "similarity": sims[0][keep]})

    def knn_all(self, k: int = 10, *, progress: Progress | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest neighbours of every indexed vector (itself usually first).

        Returns ``(similarities [N, k], row positions [N, k])`` — positions, not ids.
        """
        k = _check_k(k)
        n = len(self)
        sims = np.empty((n, k), np.float32)
        pos = np.empty((n, k), np.int64)
        tally = Tally(progress, n)
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            sims[start:stop], pos[start:stop] = self._search_raw(
                self._normalized_rows(start, stop), k)
            tally.add(stop - start)
        tally.finish()
        return sims, pos

    def duplicates(self, threshold: float = 0.95, k: int = 10, *,
                   progress: Progress | None = None) -> list[list[int]]:
        """Groups of near-duplicate images: connected components of "similarity >= threshold".

        Each image is linked to those of its ``k`` nearest neighbours at or above ``threshold``;
        groups are the connected components with two or more images (so a chain a~b~c is one
        group even if a and c are further apart). Groups are sorted largest first (ties by
        smallest id), ids inside a group ascending.
        """
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        if not -1.0 <= float(threshold) <= 1.0:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        n = len(self)
        if n < 2:
            if progress:
                progress(n, n)
            return []
        sims, pos = self.knn_all(min(_check_k(k) + 1, n), progress=progress)
        rows = np.repeat(np.arange(n, dtype=np.int64), pos.shape[1])
        cols = pos.ravel()
        mask = (sims.ravel() >= threshold) & (cols >= 0) & (cols != rows)
        graph = coo_matrix((np.ones(int(mask.sum()), np.int8), (rows[mask], cols[mask])),
                           shape=(n, n))
        n_comp, labels = connected_components(graph, directed=False)
        sizes = np.bincount(labels, minlength=n_comp)
        groups = [np.sort(self.image_ids[labels == c]).tolist()
                  for c in np.flatnonzero(sizes >= 2)]
        groups.sort(key=lambda g: (-len(g), g[0]))
        return groups

    def __repr__(self) -> str:
        return (f"NeighborIndex(n={len(self)}, dim={self.dim}, kind={self.kind!r}, "
                f"device={self.device!r})")


def _describe(item: str | os.PathLike | bytes) -> str:
    return f"({len(item)} bytes)" if isinstance(item, (bytes, bytearray)) else str(item)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _write_index(index, path: Path) -> None:
    faiss = _import_faiss()
    atomic_write_bytes(path, faiss.serialize_index(index).tobytes())


def _read_index(path: Path):
    faiss = _import_faiss()
    return faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
