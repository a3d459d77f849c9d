"""Datasets over the catalog's usable images, for training (multi-crop) and prediction.

Augmentation randomness is drawn from a generator seeded by ``(seed, epoch, index)``, so an
epoch produces the same views whatever the number of loader workers, and a resumed run sees
exactly the data an uninterrupted one would have seen.

An image that cannot be read at training time (deleted or changed since the scan) yields
``None``; :func:`collate_skip_none` drops it with a logged warning instead of crashing.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from ..store.workspace import Workspace

log = logging.getLogger(__name__)

Item = tuple[int, str]  # (catalog image id, path relative to the folder)


def _load(path: Path, max_side: int | None = None) -> Image.Image:
    from .imageio import load_rgb

    return load_rgb(path, max_side=max_side)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample of one epoch (stable across processes and runs)."""
    h = (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9
         + int(index) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class MultiCropDataset(Dataset):
    """Usable catalog images as ``(views, image_id)``; ``None`` for an image that fails to load.

    Args:
        workspace: the workspace whose catalog lists the images.
        transform: a :class:`~selfclassifier_core.engine.transforms.MultiCropTransform` (views), or a
            :class:`~selfclassifier_core.engine.gpu_augment.UniformImage` (the image, views made later
            on the device).
        items: ``(id, relative path)`` pairs; default ``workspace.usable_images()``.
        seed: base seed of the per-sample augmentation generator.
        max_side: decode large images at most this big (faster JPEG decoding); None = full size.
    """

    def __init__(self, workspace: Workspace, transform: Callable[[Image.Image], list[torch.Tensor]],
                 items: Sequence[Item] | None = None, seed: int = 0, max_side: int | None = None):
        self.workspace = workspace
        self.root = workspace.root
        if self.root is None:
            raise ValueError(f"workspace {workspace.path} has no image folder recorded")
        self.items = list(items if items is not None else workspace.usable_images())
        self.transform = transform
        self.seed = int(seed)
        self.max_side = max_side
        self.epoch = 0
        # image id -> id of the image whose crop replaces global view 1 (nearest neighbour).
        self.neighbors: dict[int, int] = {}
        self._index_of = {image_id: i for i, (image_id, _) in enumerate(self.items)}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_neighbors(self, neighbors: dict[int, int]) -> None:
        """Use the image ``neighbors[id]`` for global view 1 of image ``id`` (NN positives)."""
        self.neighbors = {int(k): int(v) for k, v in neighbors.items() if int(v) in self._index_of}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int] | None:
        image_id, rel = self.items[index]
        try:
            img = _load(self.root / rel, self.max_side)
            nn_id = self.neighbors.get(image_id)
            nn_img = (_load(self.root / self.items[self._index_of[nn_id]][1], self.max_side)
                      if nn_id is not None else None)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, never fatal
            log.warning("skipping image %s (id %d): %s", rel, image_id, exc)
            return None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            views = self.transform(img)
            if getattr(self.transform, "adds_global1_source", False):
                # views are made later from the image (UniformImage): in an epoch with
                # neighbours the source of global view 1 goes in front, the image itself for
                # one without a neighbour, so that every item of a batch has the same shape
                if self.neighbors:
                    views.insert(0, views[0] if nn_img is None
                                 else self.transform.global_view(nn_img))
            elif nn_img is not None:
                views[0] = self.transform.global_view(nn_img)
        return views, image_id


class EvalDataset(Dataset):
    """Images as ``(tensor, position)`` for prediction; ``None`` when an image fails to load.

    ``sources`` are file paths, or raw bytes of an encoded image (for images outside the catalog).
    """

    def __init__(self, sources: Sequence[Path | str | bytes], transform: Callable,
                 max_side: int | None = None):
        self.sources = list(sources)
        self.transform = transform
        self.max_side = max_side

    @classmethod
    def from_workspace(cls, workspace: Workspace, transform: Callable,
                       items: Sequence[Item] | None = None,
                       max_side: int | None = None) -> "EvalDataset":
        items = list(items if items is not None else workspace.usable_images())
        return cls([workspace.abspath(rel) for _, rel in items], transform, max_side)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        src = self.sources[index]
        try:
            if isinstance(src, (bytes, bytearray)):
                img = _load_bytes(bytes(src))
            else:
                img = _load(Path(src), self.max_side)
        except Exception as exc:  # noqa: BLE001
            log.warning("cannot read image %s: %s", src if not isinstance(src, bytes) else
                        f"<{len(src)} bytes>", exc)
            return None
        return self.transform(img), index


def _load_bytes(data: bytes) -> Image.Image:
    from PIL import ImageOps

    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        img = ImageOps.exif_transpose(img)
        return img.convert("RGB")


def collate_skip_none(batch: list[Any]) -> Any:
    """Default collation of the samples that loaded; ``None`` if none did."""
    kept = [b for b in batch if b is not None]
    if len(kept) < len(batch):
        log.warning("%d image(s) of this batch could not be read and were skipped",
                    len(batch) - len(kept))
    if not kept:
        return None
    return default_collate(kept)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, drop_last: bool,
                workers: int, sampler=None, generator: torch.Generator | None = None,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader with :func:`collate_skip_none` and sensible worker settings."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, drop_last=drop_last, num_workers=workers,
                      collate_fn=collate_skip_none, generator=generator,
                      pin_memory=pin_memory, persistent_workers=False,
                      prefetch_factor=4 if workers > 0 else None)
