"""Frozen-backbone feature cache for fast mode.

Every usable image is decoded once; the pretrained backbone (eval mode, no grad, bf16 autocast on
CUDA) embeds ``n_views`` views of it in one pass: view 0 is the full image through
:func:`transforms.eval_transform` (what prediction sees), views 1.. are random resized crops with
random horizontal flips, seeded by ``(seed, image id, view)`` so a view never depends on the
batch or on which other images exist. Pixels are resampled and normalised as the backbone asks
(:func:`backbones.backbone_preprocess`: ImageNet statistics for the torchvision backbones, the
library's own for DINOv2 / CLIP / SigLIP).

The result lives in ``<workspace>/features/<key>/``::

    meta.json   what was computed: backbone, weights identity, view recipe, catalog version
    ids.npy     int64 [N]      catalog image ids (ascending)
    sig.npy     int64 [N, 2]   (bytes, mtime_ns) of each image when it was embedded
    feats.npy   float16 [M, N, D]  features of view m of image n (memory-mapped on load)

``key`` hashes backbone + weights identity + view recipe (its size, crops, seed and the
backbone's preprocessing) + small-input flag, so the same request reuses the cache. When the catalog changes (``workspace.catalog_version()``), the cache is
rebuilt: rows of images that did not change are copied, only new or changed images are
embedded. A build is written to a temporary directory and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..engine import dist
from ..engine.device import autocast, default_workers, resolve_device
from ..engine.transforms import Preprocess
from ..store.fsutil import atomic_write_json
from ..store.progress import Progress, Tally
from ..store.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["ViewRecipe", "FeatureCache", "extract_features", "feature_key",
           "build_extractor", "compute_view"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ViewRecipe:
    """How the views of one image are made (part of the cache key).

    Args:
        n_views: views per image: the full image plus ``n_views - 1`` random crops (>= 1).
        image_size: side of every view in pixels.
        crop_scale: area range of the random crops (fraction of the image).
        crop_ratio: aspect-ratio range of the random crops.
        flip: random horizontal flips on the crops.
        seed: base seed of the crops.
        preprocess: the backbone's resampling, evaluation crop and normalisation (the default:
            ImageNet statistics, as every torchvision backbone).
    """

    n_views: int = 4
    image_size: int = 224
    crop_scale: tuple[float, float] = (0.35, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    seed: int = 0
    preprocess: Preprocess = Preprocess()

    def __post_init__(self) -> None:
        if int(self.n_views) < 1:
            raise ValueError(f"n_views must be >= 1, got {self.n_views!r}")
        if int(self.image_size) < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size!r}")
        from ..engine.transforms import crop_scale

        scale = crop_scale("crop_scale", self.crop_scale)
        rlo, rhi = self.crop_ratio
        if not 0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio!r}")
        object.__setattr__(self, "crop_scale", scale)
        object.__setattr__(self, "crop_ratio", (float(rlo), float(rhi)))
        if not isinstance(self.preprocess, Preprocess):
            raise ValueError(f"preprocess must be a Preprocess, got {self.preprocess!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; ``preprocess`` only when it is not the default (so the keys of caches made
        before it existed stay the same)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "preprocess"}
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if self.preprocess != Preprocess():
            d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ViewRecipe":
        d = dict(d)
        pre = Preprocess.from_dict(d.pop("preprocess")) if d.get("preprocess") else Preprocess()
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()},
                   preprocess=pre)


@dataclass
class FeatureCache:
    """A computed feature cache (arrays memory-mapped from ``dir``)."""

    key: str
    dir: Path
    image_ids: np.ndarray        # int64 [N]
    features: np.ndarray         # float16 [M, N, D]
    backbone: str
    weights: str                 # weights identity (name or file hash)
    pretrained: str              # what the user passed (name or path)
    recipe: ViewRecipe
    small_input: bool
    catalog_version: str
    computed: int = 0            # images embedded by the call that returned this (0: reused)

    @property
    def n_views(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[2])

    @property
    def full(self) -> np.ndarray:
        """Features of the full-image view, ``[N, D]``."""
        return self.features[0]

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])


def feature_key(backbone: str, weights_id: str, recipe: ViewRecipe, small_input: bool) -> str:
    """The cache key: hash of backbone, weights identity, view recipe and image size."""
    blob = json.dumps({"format": FORMAT_VERSION, "backbone": backbone, "weights": weights_id,
                       "recipe": recipe.to_dict(), "small_input": bool(small_input)},
                      sort_keys=True)
    return f"{backbone}-{hashlib.sha1(blob.encode()).hexdigest()[:16]}"


# --------------------------------------------------------------------------- views
def _view_rng(seed: int, image_id: int, view: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(image_id), int(view)])


def _crop_box(rng: np.random.Generator, width: int, height: int, scale: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random resized crop (torchvision's algorithm, our generator)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # fallback: centre crop with a clamped ratio
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def compute_view(img, image_id: int, view: int, recipe: ViewRecipe, eval_tf=None) -> torch.Tensor:
    """View ``view`` of one RGB PIL image as a tensor ``[3, S, S]`` normalised as the recipe's
    ``preprocess`` says (view 0: :func:`eval_transform` with it; ``eval_tf`` is that transform,
    made once by the caller)."""
    from torchvision.transforms import functional as TF

    from ..engine.transforms import eval_transform

    pre = recipe.preprocess
    if view == 0:
        return (eval_tf or eval_transform(recipe.image_size, pre))(img)
    rng = _view_rng(recipe.seed, image_id, view)
    top, left, h, w = _crop_box(rng, img.width, img.height, recipe.crop_scale, recipe.crop_ratio)
    size = recipe.image_size
    crop = TF.resized_crop(img, top, left, h, w, [size, size], interpolation=pre.mode,
                           antialias=True)
    if recipe.flip and rng.random() < 0.5:
        crop = TF.hflip(crop)
    return TF.normalize(TF.to_tensor(crop), pre.mean, pre.std)


class _ViewsDataset(Dataset):
    """``(position, [M, 3, S, S])`` per image, or ``(position, None)`` when it cannot be read."""

    def __init__(self, paths: list[Path], ids: list[int], recipe: ViewRecipe):
        self.paths, self.ids, self.recipe = paths, ids, recipe
        self._eval_tf = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from ..catalog.imageio import load_rgb
        from ..engine.transforms import eval_transform

        if self._eval_tf is None:
            self._eval_tf = eval_transform(self.recipe.image_size, self.recipe.preprocess)
        try:
            img = load_rgb(self.paths[i], max_side=max(2 * self.recipe.image_size, 64))
        except Exception as exc:  # noqa: BLE001 - any unreadable image is skipped, never fatal
            log.warning("skipping image %s: %s", self.paths[i], exc)
            return i, None
        views = [compute_view(img, self.ids[i], v, self.recipe, self._eval_tf)
                 for v in range(self.recipe.n_views)]
        return i, torch.stack(views)


def _collate(batch):
    pos = [i for i, v in batch if v is not None]
    bad = [i for i, v in batch if v is None]
    views = torch.stack([v for _, v in batch if v is not None]) if pos else None
    return pos, bad, views


# --------------------------------------------------------------------------- extraction
def build_extractor(backbone: str, pretrained: str | os.PathLike, image_size: int,
                    small_input: bool = False) -> tuple[torch.nn.Module, int, str]:
    """The frozen pretrained backbone: ``(module in eval mode, feature dim, weights identity)``.

    Its views are made with :func:`backbones.backbone_preprocess` of the same name."""
    from ..engine.backbones import build_backbone
    from ..engine.pretrained import load_backbone_weights

    module, dim = build_backbone(backbone, small_input, image_size)
    report = load_backbone_weights(module, backbone, pretrained)
    module.eval().requires_grad_(False)
    return module, dim, report.identity


def _embed(module: torch.nn.Module, x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with autocast(device):
        return module(x).float()


def _default_batch(device: torch.device, n_views: int) -> int:
    return max(1, (512 if device.type == "cuda" else 64) // n_views)


def _load_cache(d: Path) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray] | None:
    try:
        meta = json.loads((d / "meta.json").read_text())
        ids = np.load(d / "ids.npy")
        sig = np.load(d / "sig.npy")
        feats = np.load(d / "feats.npy", mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("feature cache %s unreadable (%s); recomputing", d, exc)
        return None
    if meta.get("format") != FORMAT_VERSION or feats.shape[1] != ids.shape[0]:
        return None
    return meta, ids, sig, feats


def _as_cache(d: Path, meta: dict, ids: np.ndarray, feats: np.ndarray, computed: int
              ) -> FeatureCache:
    return FeatureCache(key=meta["key"], dir=d, image_ids=ids, features=feats,
                        backbone=meta["backbone"], weights=meta["weights"],
                        pretrained=meta["pretrained"],
                        recipe=ViewRecipe.from_dict(meta["recipe"]),
                        small_input=bool(meta["small_input"]),
                        catalog_version=meta["catalog_version"], computed=computed)


def extract_features(workspace: Workspace, backbone: str, pretrained: str | os.PathLike, *,
                     views: int = 4, image_size: int = 224, small_input: bool = False,
                     seed: int = 0, crop_scale: tuple[float, float] = (0.35, 1.0),
                     device: str | torch.device = "auto", batch_size: int | None = None,
                     workers: int | None = None, progress: Progress | None = None,
                     should_stop: Callable[[], bool] | None = None,
                     sharded: bool = False) -> FeatureCache:
    """Features of every usable image for ``views`` views, from the cache when it is current.

    Args:
        workspace: the workspace (its catalog lists the images; the cache goes in
            ``workspace.features_dir``).
        backbone: backbone name (``efficientnet_lite0``, ``resnet18``, ``dinov2_s``, ...); its
            :func:`~selfclassifier_core.engine.backbones.backbone_preprocess` makes the views.
        pretrained: weights name or file (see :func:`pretrained.load_backbone_weights`).
        views: views per image (full image + ``views - 1`` random crops/flips).
        image_size: side of each view.
        small_input: build the backbone's small-image variant (keep False for ImageNet weights
            on upscaled images).
        seed: seed of the random crops.
        crop_scale: area range of the random crops.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: images per forward batch (each contributes ``views`` rows).
        workers: DataLoader workers for decoding (default from folder size and device).
        progress: ``progress(done, total)`` images embedded so far.
        should_stop: polled between batches; True aborts with ``InterruptedError`` (nothing
            written).
        sharded: under torchrun, every rank calls this with the same arguments and embeds
            every ``world``-th image into one cache file that rank 0 creates and finishes (the
            ranks must share the workspace's file system); in one process it changes nothing.

    Returns:
        The :class:`FeatureCache` (``computed`` = images embedded by this call).
    """
    from ..engine.backbones import backbone_preprocess
    from ..engine.pretrained import weights_identity

    # ---- the cache key; a cache of the same catalog is returned as it is
    recipe = ViewRecipe(n_views=int(views), image_size=int(image_size), crop_scale=crop_scale,
                        seed=int(seed), preprocess=backbone_preprocess(backbone))
    dev = resolve_device(device)
    weights_id = weights_identity(backbone, pretrained)
    key = feature_key(backbone, weights_id, recipe, small_input)
    final = workspace.features_dir / key
    version = workspace.catalog_version()
    old = _load_cache(final) if final.is_dir() else None
    if old is not None and old[0].get("catalog_version") == version:
        log.info("feature cache %s is current (%d images); reused", key, len(old[1]))
        if progress:
            progress(len(old[1]), len(old[1]))
        return _as_cache(final, old[0], old[1], old[3], computed=0)

    # ---- what to embed: every usable image whose row the old cache does not have
    table, all_ids, sigs = _usable_images(workspace)
    reuse_from = _reusable_rows(old, all_ids, sigs)
    todo = [n for n in range(len(all_ids)) if n not in reuse_from]
    log.info("feature cache %s: embedding %d images (%d reused) with %s, %d views at %d px on %s",
             key, len(todo), len(reuse_from), backbone, recipe.n_views, recipe.image_size, dev)
    module, dim, _ = build_extractor(backbone, pretrained, recipe.image_size, small_input)
    module.to(dev).to(memory_format=torch.channels_last)  # faster on CUDA and CPU alike
    meta = {"format": FORMAT_VERSION, "key": key, "backbone": backbone,
            "weights": weights_id, "pretrained": str(pretrained),
            "recipe": recipe.to_dict(), "small_input": bool(small_input),
            "catalog_version": version, "dim": int(dim), "dtype": "float16",
            "device": str(dev)}
    if sharded and dist.world_size() > 1:
        return _extract_sharded(workspace, final, meta, table, all_ids, sigs, old, reuse_from,
                                todo, recipe, module, dev, batch_size, workers, progress,
                                should_stop)

    # ---- the new cache, built in a temporary directory that is renamed into place
    with _building(final) as tmp:
        feats = np.lib.format.open_memmap(tmp / "feats.npy", mode="w+", dtype=np.float16,
                                          shape=(recipe.n_views, len(all_ids), dim))
        if reuse_from:
            dst = np.fromiter(reuse_from.keys(), np.int64)
            src = np.fromiter(reuse_from.values(), np.int64)
            feats[:, dst] = old[3][:, src]
        paths = [workspace.abspath(table.at[int(all_ids[n]), "path"]) for n in todo]
        loader = _views_loader(paths, [int(all_ids[n]) for n in todo], recipe, dev, batch_size,
                               workers)
        ok, elapsed = _embed_images(loader, todo, feats, module, dev, progress, should_stop)
        if not np.isfinite(np.asarray(feats[:, ok], np.float32)).all():
            raise FloatingPointError(f"backbone {backbone} produced non-finite features "
                                     "(float16 overflow?)")
        feats.flush()
        del feats  # the file is rewritten when rows are left out
        _write_cache(tmp, ok, all_ids, sigs,
                     {**meta, "created": time.time(), "seconds": round(elapsed, 3)})
    loaded = _load_cache(final)
    if loaded is None:
        raise RuntimeError(f"feature cache {final} unreadable right after writing it")
    return _as_cache(final, loaded[0], loaded[1], loaded[3], computed=len(todo))


def _extract_sharded(workspace: Workspace, final: Path, meta: dict[str, Any], table,
                     all_ids: np.ndarray, sigs: np.ndarray, old, reuse_from: dict[int, int],
                     todo: list[int], recipe: ViewRecipe, module: torch.nn.Module,
                     dev: torch.device, batch_size: int | None, workers: int | None,
                     progress: Progress | None, should_stop: Callable[[], bool] | None
                     ) -> FeatureCache:
    """:func:`extract_features` over the ranks of a process group: rank 0 makes the cache file
    (rows reused from the old cache filled in), every rank embeds every ``world``-th image to
    do into it, rank 0 checks and finishes the cache once all are done."""
    world, rank = dist.world_size(), dist.rank()
    tmp = None
    if dist.is_main():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.mkdir()
        feats = np.lib.format.open_memmap(tmp / "feats.npy", mode="w+", dtype=np.float16,
                                          shape=(recipe.n_views, len(all_ids), int(meta["dim"])))
        if reuse_from:
            dst = np.fromiter(reuse_from.keys(), np.int64)
            src = np.fromiter(reuse_from.values(), np.int64)
            feats[:, dst] = old[3][:, src]
        feats.flush()
        del feats
    tmp = Path(dist.broadcast_object(str(tmp)))
    try:
        feats = np.load(tmp / "feats.npy", mmap_mode="r+")
        mine = todo[rank::world]
        paths = [workspace.abspath(table.at[int(all_ids[n]), "path"]) for n in mine]
        loader = _views_loader(paths, [int(all_ids[n]) for n in mine], recipe, dev, batch_size,
                               workers)
        ok, elapsed = _embed_images(loader, mine, feats, module, dev, progress, should_stop)
        feats.flush()
        del feats
        ok = dist.all_true(torch.from_numpy(ok)).numpy()
        dist.barrier()
        if dist.is_main():
            feats = np.load(tmp / "feats.npy", mmap_mode="r")
            if not np.isfinite(np.asarray(feats[:, ok], np.float32)).all():
                raise FloatingPointError(f"backbone {meta['backbone']} produced non-finite "
                                         "features (float16 overflow?)")
            del feats
            _write_cache(tmp, ok, all_ids, sigs, {**meta, "created": time.time(),
                                                   "seconds": round(elapsed, 3),
                                                   "ranks": world})
            _replace_dir(tmp, final)
    except BaseException:
        if dist.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
    loaded = _load_cache(final)
    if loaded is None:
        raise RuntimeError(f"feature cache {final} unreadable right after writing it")
    log.info("rank %d of %d embedded %d of %d images", rank, world, len(todo[rank::world]),
             len(todo))
    return _as_cache(final, loaded[0], loaded[1], loaded[3], computed=len(todo))


def _usable_images(workspace: Workspace) -> tuple[Any, np.ndarray, np.ndarray]:
    """The catalog's usable images: ``(table, ids [N], signatures [N, 2] of (bytes, mtime_ns))``;
    a ValueError when there are none."""
    table = workspace.image_table("ok")
    all_ids = table.index.to_numpy(dtype=np.int64)
    sigs = np.stack([table["bytes"].fillna(-1).to_numpy(np.int64),
                     table["mtime_ns"].fillna(-1).to_numpy(np.int64)], axis=1) \
        if len(table) else np.zeros((0, 2), np.int64)
    if len(all_ids) == 0:
        raise ValueError(f"workspace {workspace.path} has no usable images; scan a folder with "
                         "images first")
    return table, all_ids, sigs


def _reusable_rows(old: tuple[dict, np.ndarray, np.ndarray, np.ndarray] | None,
                   all_ids: np.ndarray, sigs: np.ndarray) -> dict[int, int]:
    """``{new row: old row}`` for the images the old cache holds unchanged (same signature)."""
    reuse_from: dict[int, int] = {}
    if old is not None:
        old_pos = {int(i): p for p, i in enumerate(old[1])}
        for n, (i, s) in enumerate(zip(all_ids, sigs)):
            p = old_pos.get(int(i))
            if p is not None and tuple(old[2][p]) == tuple(s):
                reuse_from[n] = p
    return reuse_from


def _views_loader(paths: list[Path], ids: list[int], recipe: ViewRecipe, dev: torch.device,
                  batch_size: int | None, workers: int | None) -> DataLoader:
    """Batches of the views of the images to embed, decoded by ``workers`` processes."""
    bs = int(batch_size or _default_batch(dev, recipe.n_views))
    if bs < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    nw = default_workers(len(paths), dev) if workers is None else int(workers)
    return DataLoader(_ViewsDataset(paths, ids, recipe), batch_size=bs, shuffle=False,
                      num_workers=nw, collate_fn=_collate, pin_memory=dev.type == "cuda",
                      persistent_workers=False)


def _embed_images(loader: DataLoader, todo: list[int], feats: np.ndarray,
                  module: torch.nn.Module, dev: torch.device, progress: Progress | None,
                  should_stop: Callable[[], bool] | None) -> tuple[np.ndarray, float]:
    """Embed the loader's images into their rows ``todo`` of ``feats`` ``[M, N, D]``.

    Returns:
        ``(ok, seconds)``: ``ok[n]`` is False for a row whose image could not be read.
    """
    ok = np.ones(feats.shape[1], dtype=bool)
    tally, t0 = Tally(progress, len(todo)), time.perf_counter()
    with torch.inference_mode():
        for pos, bad, views_t in loader:
            if should_stop is not None and should_stop():
                raise InterruptedError("feature extraction stopped")
            for i in bad:
                ok[todo[i]] = False
            if views_t is not None:
                b, m = views_t.shape[:2]
                out = _embed(module, views_t.flatten(0, 1), dev).view(b, m, -1)
                rows = np.asarray([todo[i] for i in pos], np.int64)
                feats[:, rows] = out.transpose(0, 1).cpu().numpy().astype(np.float16)
            tally.add(len(pos) + len(bad))
    tally.finish()
    elapsed = time.perf_counter() - t0
    if todo:
        log.info("embedded %d images in %.1f s (%.1f img/s, %d views each)", len(todo),
                 elapsed, len(todo) / max(elapsed, 1e-9), feats.shape[0])
    return ok, elapsed


def _write_cache(tmp: Path, ok: np.ndarray, all_ids: np.ndarray, sigs: np.ndarray,
                 meta: dict[str, Any]) -> None:
    """Finish the cache in ``tmp`` next to its ``feats.npy``: the rows of unreadable images
    (``ok`` False) left out, then ``ids.npy``, ``sig.npy`` and ``meta.json`` (``meta`` plus
    ``n``, the rows kept)."""
    keep = np.flatnonzero(ok)
    if len(keep) < len(all_ids):
        log.warning("%d image(s) could not be read and are left out of the features",
                    len(all_ids) - len(keep))
        feats = np.load(tmp / "feats.npy", mmap_mode="r")
        kept = np.asarray(feats[:, keep])  # a copy in memory: the file is rewritten next
        del feats
        np.save(tmp / "feats.npy", kept)
    np.save(tmp / "ids.npy", all_ids[keep])
    np.save(tmp / "sig.npy", sigs[keep])
    atomic_write_json(tmp / "meta.json", {**meta, "n": int(len(keep))})


@contextmanager
def _building(final: Path) -> Iterator[Path]:
    """A new temporary directory next to ``final`` that replaces ``final`` when the block ends
    and is removed when it raises."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``, replacing an older ``final`` (which is removed)."""
    trash = None
    if final.exists():
        trash = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, trash)
    os.replace(tmp, final)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
