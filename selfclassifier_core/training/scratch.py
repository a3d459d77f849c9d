"""Training: learn classes on an image folder with Self-Classifier, then predict every image.

``train(folder)`` scans the folder (incrementally) when needed, picks defaults from the folder
and the device, trains with checkpoints every epoch, and writes predictions for every usable
image. Everything of a run lives in ``<workspace>/runs/<id>/``: ``checkpoint.pt``,
``config.json``, ``stats.jsonl`` (one JSON line per epoch), ``progress.json`` (live, for the
app) and the predictions.

Modes: ``scratch`` (the paper: everything from random weights; the default without
``pretrained``), ``finetune`` (end to end from pretrained backbone weights, backbone at a lower
learning rate) and ``fast`` (frozen pretrained backbone, see :mod:`.fastmode`; the default when
``pretrained`` is given).

Augmentation (``augment``): ``cpu`` makes the multi-crop views with PIL in the DataLoader
workers (:class:`.transforms.MultiCropTransform`); ``device`` has the workers only decode and
resize each image to a uint8 square (:class:`.gpu_augment.UniformImage`) and makes the views of
the whole batch on the training device (:class:`.gpu_augment.GpuMultiCrop`), which keeps a GPU
fed; ``auto`` (default) is ``device`` on CUDA and ``cpu`` elsewhere. Both use the config's crop scales
(:data:`.transforms.GLOBAL_SCALE`, :data:`.transforms.LOCAL_SCALE` unless the recipe or the
caller sets others).

Determinism: the model is initialised from ``seed``; the sampling order of epoch ``e`` comes
from a generator seeded with ``(seed, e)`` and each sample's augmentation from
``(seed, e, index)`` (see :mod:`.data`); with ``augment="device"`` each batch's views come
from a generator seeded with ``(seed, e, batch index, rank)``. Checkpoints hold the model,
optimizer, queue, step and RNG states, so on CPU a run interrupted at an epoch boundary and
resumed ends with exactly the weights of an uninterrupted run (with either augmentation).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..engine import dist
from ..store.checkpoint import (CHECKPOINT_FILE, CheckpointError, load_checkpoint, rng_states,
                         save_checkpoint, set_rng_states)
from ..catalog.datasets import MultiCropDataset, default_workers, make_loader, sample_seed
from ..store.fsutil import atomic_write_json
from ..engine.loss import SelfClassifierLoss
from ..engine.queue import NeighborQueue, queue_size_for
from ..engine.transforms import (GLOBAL_SCALE, LOCAL_SCALE, TINY_GLOBAL_SCALE, TINY_LOCAL_SCALE,
                         MultiCropTransform, crop_scale, crop_sizes_for)
from ..store.workspace import RunInfo, Workspace, WorkspaceError

if TYPE_CHECKING:
    from ..engine.pretrained import LoadReport

log = logging.getLogger(__name__)

MODES = ("scratch", "fast", "finetune")
RESUMABLE_MODES = ("scratch", "finetune")  # fast runs start again from their feature cache
OPTIMIZERS = ("lars", "adamw")
AUGMENTS = ("auto", "cpu", "device")
CANCEL_FILE = "CANCEL"
# what a finished run's message says (after any earlier message) when continuing it failed or
# was cancelled; _restore_finished_run drops an earlier such note instead of repeating it
RESUME_NOTE = "continuing it "
RESUME_CANCELLED = RESUME_NOTE + "was cancelled; --resume goes on from its checkpoint"
PROGRESS_FILE = "progress.json"
STATS_FILE = "stats.jsonl"
CONFIG_FILE = "config.json"
PROGRESS_EVERY_S = 2.0

ProgressFn = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what to try."""


@dataclass
class TrainConfig:
    """Every option of a training run (saved in the checkpoint and ``config.json``)."""

    classes: int
    heads: list[int]
    backbone: str = "resnet18"
    batch_size: int = 64
    epochs: int | None = None
    minutes: float | None = None
    device: str = "cpu"
    mode: str = "scratch"
    pretrained: str | None = None
    optimizer: str = "lars"
    lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_fraction: float = 0.05
    final_lr_fraction: float = 0.01
    clip_grad: float = 3.0
    global_size: int = 224
    local_size: int = 96
    n_local: int = 6
    global_scale: tuple[float, float] = GLOBAL_SCALE  # area range of the random resized crops
    local_scale: tuple[float, float] = LOCAL_SCALE
    small_input: bool = False
    proj_hidden_dim: int = 2048
    row_tau: float = 0.1
    col_tau: float = 0.05
    nn_positives: bool = False
    queue_size: int = 65536
    backbone_lr_scale: float = 1.0
    seed: int = 0
    workers: int | None = None
    augment: str = "auto"  # "cpu" (PIL in the workers) | "device" (GpuMultiCrop) | "auto"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainResult:
    workspace: Workspace
    run_id: int
    run_dir: Path
    stats: list[dict[str, Any]] = field(default_factory=list)
    predictions_path: Path | None = None
    status: str = "done"


# --------------------------------------------------------------------------- defaults
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: CUDA, then Apple MPS, then CPU. Under torchrun each rank takes its local GPU."""
    name = str(device)
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu, cuda or mps, got {device!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    if name == "cuda" and dist.is_dist():
        name = f"cuda:{dist.local_rank()}"
    return torch.device(name)


def resolve_augment(augment: str | None, device: str | torch.device) -> str:
    """Where the multi-crop views are made: ``cpu`` (PIL, DataLoader workers) or ``device``
    (:class:`.gpu_augment.GpuMultiCrop` on the training device). ``auto``/None: ``device`` on
    CUDA, ``cpu`` elsewhere (MPS included)."""
    augment = "auto" if augment is None else augment
    if augment not in AUGMENTS:
        raise ValueError(f"--augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if augment == "auto":
        return "device" if torch.device(device).type == "cuda" else "cpu"
    return augment


def default_classes(n_images: int) -> int:
    """Classes when none are asked for: about sqrt(n/2), between 2 and 1000."""
    return int(max(2, min(1000, round(math.sqrt(n_images / 2)))))


def head_sizes(classes: int, batch_size: int) -> list[int]:
    """Main head ``classes`` plus finer heads 2K and 4K when the batch can hold them."""
    return [k for k in (classes, 2 * classes, 4 * classes) if k <= batch_size]


CPU_SMALL_CROP = 32    # global crop cap on a CPU for images ≤ 64 px (small-image stem)
CPU_PHOTO_CROP = 128   # global crop cap on a CPU for larger images
CPU_TINY_CROP = 32     # scratch on a CPU: chosen global crops up to this side get the tiny recipe


def resolve_config(n_images: int, image_sizes: list[tuple[int, int]], device: torch.device, *,
                   classes: int | None = None, backbone: str | None = None,
                   epochs: int | None = None, minutes: float | None = None,
                   batch_size: int | None = None, mode: str = "scratch",
                   pretrained: str | None = None, seed: int = 0,
                   world: int = 1, **options: Any) -> TrainConfig:
    """Fill in every option from the folder and the device, validating what was given.

    Defaults (documented rule):

    - crops: :func:`crop_sizes_for` on the catalog's sizes (28-px → 28/12, photos → 224/96);
      on a CPU capped at 32 px for small images (≤ 64 px) and 128 px for photos
      (:data:`CPU_SMALL_CROP`, :data:`CPU_PHOTO_CROP`); local crops: 6 on a GPU, 2 on a CPU.
    - tiny recipe (from scratch on a CPU when the chosen global crop is ≤ 32 px,
      :data:`CPU_TINY_CROP`, and no crop size was given): convnet_small, AdamW and the
      larger crop areas below; each explicit option still wins.
    - backbone: otherwise resnet18 (with the small-image stem for crops ≤ 64 px); resnet50 on
      a GPU for folders of 20,000+ photos. An explicit ``backbone`` always wins.
    - classes: about sqrt(n/2) (2 … 1000); heads K, 2K, 4K capped by the batch size.
    - batch: GPU 256 (512 for small images), CPU 128 for small images else 32; never more than
      the folder, never less than the main head (the uniform prior needs batch ≥ classes).
    - budget: enough epochs for about 3,000 optimizer steps on a GPU, 400 on a CPU (10 … 800
      epochs), unless ``epochs`` or ``minutes`` are given.
    - optimizer: LARS, lr 0.3 × batch / 256 (the paper's 4.8 at 4096), weight decay 1e-6;
      AdamW: lr 1e-3 × max(1, batch / 256), weight decay 0.04. AdamW in the tiny recipe.
    - augmentation: on the device on CUDA, PIL in the loader workers elsewhere
      (:func:`resolve_augment`; the config records the resolved choice); ``device`` (batch-wise
      in the training process) is about 3× faster on a 2-core CPU with tiny crops.
    - crop areas: :data:`.transforms.GLOBAL_SCALE` / :data:`.transforms.LOCAL_SCALE`; in the tiny
      recipe the larger :data:`.transforms.TINY_GLOBAL_SCALE` /
      :data:`.transforms.TINY_LOCAL_SCALE` (a tiny image has little to crop away).
    """
    if n_images < 2:
        raise ValueError(f"the folder has {n_images} usable image(s); training needs at least 2")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    gpu = device.type == "cuda"
    asked_global, asked_local = options.pop("global_size", None), options.pop("local_size", None)
    global_size, local_size = crop_sizes_for(image_sizes, asked_global, asked_local)
    if not gpu and asked_global is None:
        # A CPU trains resnet18 at ~20 img/s on 224-px crops and even slower on 64-px crops
        # with the small-image stem (no down-sampling in the stem): cap the crops so an epoch
        # takes seconds, not minutes. Explicit --global-size/--local-size are kept.
        cap = CPU_SMALL_CROP if global_size <= 64 else CPU_PHOTO_CROP
        if global_size > cap:
            global_size, local_size = crop_sizes_for(None, cap, asked_local)
    small = global_size <= 64
    if classes is not None and (not isinstance(classes, int) or classes < 2):
        raise ValueError(f"--classes must be an integer ≥ 2, got {classes!r}")
    if classes is not None and classes > n_images:
        raise ValueError(f"--classes {classes} is more than the {n_images} usable images")
    k = classes if classes is not None else min(default_classes(n_images), n_images)
    if batch_size is not None:
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"--batch-size must be an integer ≥ 2, got {batch_size!r}")
        if batch_size < k:
            raise ValueError(f"--batch-size {batch_size} is smaller than --classes {k}; the "
                             f"uniform class prior needs batch ≥ classes (use --batch-size {k} "
                             "or more, or fewer classes)")
        if batch_size > n_images:
            raise ValueError(f"--batch-size {batch_size} is larger than the {n_images} usable "
                             "images")
        batch = batch_size
    else:
        batch = (512 if small else 256) if gpu else (128 if small else 32)
        batch = min(max(batch, k), n_images)
    if batch % world:
        raise ValueError(f"batch size {batch} must be divisible by the {world} processes")
    heads = options.pop("heads", None) or head_sizes(k, batch)
    if max(heads) > batch:
        raise ValueError(f"head of {max(heads)} classes is larger than the batch size {batch}")
    # From scratch on a CPU with tiny crops, a recipe measured to learn within minutes
    # (benchmarks/quality.py, digits): the small convnet, AdamW and larger crop areas
    # (augment="device" measured ~3x faster still here, ~280 vs ~100 img/s). Only with crop sizes
    # chosen here: explicit ones keep the general defaults (as the tests' tiny runs do).
    tiny_cpu = (mode == "scratch" and device.type == "cpu" and asked_global is None
                and global_size <= CPU_TINY_CROP)
    if backbone is None:
        if tiny_cpu:
            backbone = "convnet_small"
        else:
            backbone = "resnet50" if gpu and n_images >= 20000 and not small else "resnet18"
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"--epochs must be a positive integer, got {epochs!r}")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes!r}")
    if epochs is None and minutes is None:
        steps_per_epoch = max(1, n_images // batch)
        target = 3000 if gpu else 400
        epochs = int(max(10, min(800, math.ceil(target / steps_per_epoch))))
    optimizer = options.pop("optimizer", None) or ("adamw" if tiny_cpu else "lars")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    lr = options.pop("lr", None)
    if lr is None:
        lr = 0.3 * batch / 256 if optimizer == "lars" else 1e-3 * max(1.0, batch / 256)
    if not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr!r}")
    wd = options.pop("weight_decay", None)
    wd = (1e-6 if optimizer == "lars" else 0.04) if wd is None else wd
    n_local = options.pop("n_local", None)
    n_local = (6 if gpu else 2) if n_local is None else n_local
    lr_scale = options.pop("backbone_lr_scale", None)
    lr_scale = (0.1 if mode == "finetune" else 1.0) if lr_scale is None else lr_scale
    asked_augment = options.pop("augment", None)
    # the tiny recipe's crops are cheap to make as batched tensor ops; PIL in a worker was
    # its bottleneck (digits, 3 minutes: ACC 0.85 with device-side views vs 0.44 with PIL)
    augment = ("device" if tiny_cpu and asked_augment in (None, "auto")
               else resolve_augment(asked_augment, device))
    for name, tiny, usual in (("global_scale", TINY_GLOBAL_SCALE, GLOBAL_SCALE),
                              ("local_scale", TINY_LOCAL_SCALE, LOCAL_SCALE)):
        value = options.get(name)
        options[name] = crop_scale(name, (tiny if tiny_cpu else usual) if value is None else value)
    cfg = TrainConfig(
        classes=k, heads=list(heads), backbone=backbone, batch_size=batch, epochs=epochs,
        minutes=minutes, device=str(device), mode=mode, pretrained=pretrained,
        optimizer=optimizer, lr=float(lr), weight_decay=float(wd), global_size=global_size,
        local_size=local_size, n_local=int(n_local), small_input=small,
        backbone_lr_scale=float(lr_scale), seed=int(seed), augment=augment,
        **_known(options))
    if cfg.nn_positives:
        cfg.queue_size = queue_size_for(n_images, cfg.queue_size)
    return cfg


def check_options(classes: int | None = None, batch_size: int | None = None,
                  epochs: int | None = None, minutes: float | None = None,
                  lr: float | None = None, optimizer: str | None = None,
                  augment: str | None = None, **_: Any) -> None:
    """Checks that need no folder, done before scanning so a typo fails at once."""
    if classes is not None and (not isinstance(classes, int) or classes < 2):
        raise ValueError(f"--classes must be an integer ≥ 2, got {classes!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 2):
        raise ValueError(f"--batch-size must be an integer ≥ 2, got {batch_size!r}")
    if classes is not None and batch_size is not None and batch_size < classes:
        raise ValueError(f"--batch-size {batch_size} is smaller than --classes {classes}; the "
                         f"uniform class prior needs batch ≥ classes (use --batch-size "
                         f"{classes} or more, or fewer classes)")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"--epochs must be a positive integer, got {epochs!r}")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"--minutes must be > 0, got {minutes!r}")
    if lr is not None and not lr > 0:
        raise ValueError(f"--lr must be > 0, got {lr!r}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if augment is not None:
        resolve_augment(augment, "cpu")


def _known(options: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k, v in options.items() if k not in known and v is not None)
    if unknown:
        raise ValueError(f"unknown training option(s) {unknown}; valid: {sorted(known)}")
    return {k: v for k, v in options.items() if v is not None}


# --------------------------------------------------------------------------- building blocks
def build_model(cfg: TrainConfig):
    from ..engine.model import ModelConfig, SelfClassifier

    torch.manual_seed(cfg.seed)
    mcfg = ModelConfig(backbone=cfg.backbone, image_size=cfg.global_size,
                       small_input=cfg.small_input, proj_hidden_dim=cfg.proj_hidden_dim,
                       heads=list(cfg.heads))
    return SelfClassifier(mcfg)


def load_finetune_weights(model: nn.Module, cfg: TrainConfig) -> "LoadReport":
    """Load ``cfg.pretrained`` into ``model.backbone`` for fine-tuning; returns the
    :class:`.pretrained.LoadReport` (its ``missing`` lists what stays at random init).

    With the small-input stem (crops ≤ 64 px) the weights are first checked and loaded into
    the standard architecture, then every tensor whose shape still fits is copied: only the
    layers the stem replaces (a ResNet's 3×3 ``conv1``) keep their initialisation, and the
    report names them, instead of the whole load failing on the stem's shape.
    """
    from ..engine.pretrained import load_backbone_weights

    if not cfg.small_input:
        return load_backbone_weights(model.backbone, cfg.backbone, cfg.pretrained)
    from ..engine.backbones import build_backbone

    with torch.random.fork_rng(devices=[]):  # the reference's init must not shift the RNG
        reference, _ = build_backbone(cfg.backbone, small_input=False, image_size=cfg.global_size)
    report = load_backbone_weights(reference, cfg.backbone, cfg.pretrained)
    ref, own = reference.state_dict(), model.backbone.state_dict()
    not_loaded = set(report.missing)
    copied, replaced = 0, []
    with torch.no_grad():
        for k, t in own.items():
            if k in ref and ref[k].shape == t.shape:
                if k not in not_loaded:
                    t.copy_(ref[k])
                    copied += 1
            elif not k.endswith("num_batches_tracked"):
                replaced.append(k)
    if replaced:
        log.warning("pretrained %s: the small-input stem replaces %s; left at random init",
                    cfg.backbone, ", ".join(replaced))
    return dataclasses.replace(report, loaded=copied, total=len(own),
                               missing=sorted(set(report.missing) | set(replaced)))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """LARS (SGD + LARS adaptation) or AdamW. Biases and norm weights get no weight decay
    (and no LARS adaptation); backbone groups carry ``lr_scale = backbone_lr_scale``."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (name.startswith("backbone."), p.ndim <= 1)
        groups.setdefault(key, []).append(p)
    param_groups = []
    for (is_backbone, no_decay), params in sorted(groups.items()):
        g: dict[str, Any] = {"params": params,
                             "lr_scale": cfg.backbone_lr_scale if is_backbone else 1.0,
                             "weight_decay": 0.0 if no_decay else cfg.weight_decay}
        if cfg.optimizer == "lars":
            g["lars_exclude"] = no_decay
        param_groups.append(g)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from ..engine.lars import LARS

    return LARS(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


_GRID = 1_000_000  # the run's progress fraction in millionths, as a step for the schedule


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Cosine schedule with linear warm-up at the fraction ``progress`` ∈ [0, 1] of the run
    (of its epochs, or of its minutes when budgeted by time)."""
    from ..engine.schedules import cosine_with_warmup

    return cosine_with_warmup(int(round(min(1.0, progress) * _GRID)), _GRID,
                              int(round(cfg.warmup_fraction * _GRID)), cfg.lr,
                              cfg.lr * cfg.final_lr_fraction)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr × group['lr_scale']`` (lower backbone rate when fine-tuning)."""
    from ..engine.schedules import set_lr as _set_lr

    _set_lr(optimizer, lr)


class _ViewsForward(nn.Module):
    """Makes ``forward_views`` the module's forward, so DDP synchronises its gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, views: list[torch.Tensor]):
        return self.model.forward_views(views)


# --------------------------------------------------------------------------- the loop
@dataclass
class _State:
    """What the loop carries from step to step (saved in checkpoints where needed)."""

    epoch: int = 0                 # completed epochs
    step: int = 0                  # optimizer steps taken
    elapsed_s: float = 0.0         # training time of previous sessions (minutes budget)
    stop_reason: str | None = None  # "cancelled" | "time" | None


class _Stopper:
    """Cancellation sources: ``should_stop()``, the run's CANCEL file, and the time budget."""

    def __init__(self, run_dir: Path, should_stop: Callable[[], bool] | None,
                 deadline: float | None):
        self.cancel_file = run_dir / CANCEL_FILE
        self.should_stop = should_stop
        self.deadline = deadline

    def check(self) -> str | None:
        reason = None
        if self.should_stop is not None and self.should_stop():
            reason = "cancelled"
        elif self.cancel_file.exists():
            reason = "cancelled"
        elif self.deadline is not None and time.monotonic() >= self.deadline:
            reason = "time"
        if dist.is_dist():  # every rank must stop at the same step
            flag = torch.tensor([{None: 0, "time": 1, "cancelled": 2}[reason]])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            reason = {0: None, 1: "time", 2: "cancelled"}[int(flag)]
        return reason


class Trainer:
    """One training run: model, optimizer, data, queue, and the epoch loop.

    Use :func:`train`; this class exists so tests and the fast paths can drive single epochs.
    """

    def __init__(self, workspace: Workspace, run_id: int, cfg: TrainConfig,
                 progress: ProgressFn | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.ws, self.run_id, self.cfg = workspace, run_id, cfg
        self.run_dir = workspace.run_dir(run_id)
        self.progress = progress
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.state = _State()
        self.model = build_model(cfg)
        self.queue = NeighborQueue(self.model.config.out_dim, cfg.queue_size) \
            if cfg.nn_positives else None
        self.criterion = SelfClassifierLoss(row_tau=cfg.row_tau, col_tau=cfg.col_tau)
        self._last_progress = 0.0
        self._should_stop = should_stop

    # ---------------------------------------------------------------- set-up
    def prepare(self, resume_state: dict[str, Any] | None = None) -> None:
        cfg = self.cfg
        self.pretrained_report = None
        if resume_state is None and cfg.mode == "finetune":
            self.pretrained_report = load_finetune_weights(self.model, cfg)
            log.info("pretrained backbone: %s", self.pretrained_report)
        self.model.to(self.device)
        if self.queue is not None:
            self.queue.to(self.device)
        if self.cuda:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer(self.model, cfg)
        if resume_state is not None:
            self.model.load_state_dict(resume_state["model"])
            self.optimizer.load_state_dict(resume_state["optimizer"])
            if self.queue is not None and resume_state.get("queue") is not None:
                self.queue.load_state_dict(resume_state["queue"])
            self.state = _State(epoch=int(resume_state["epoch"]), step=int(resume_state["step"]),
                                elapsed_s=float(resume_state.get("elapsed_s", 0.0)))
            set_rng_states(resume_state.get("rng") or {})
        self.net: nn.Module = _ViewsForward(self.model)
        if dist.world_size() > 1:
            if self.cuda:  # SyncBatchNorm runs on GPUs only; CPU/gloo keeps per-rank BN
                self.net = nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
                self.model = self.net.model
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[self.device.index] if self.cuda else None)

        self.items = self.ws.usable_images()
        self.augment = resolve_augment(cfg.augment, self.device)
        crops = dict(global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale))
        self.gpu_aug = None
        if self.augment == "device":
            from ..engine.gpu_augment import GpuMultiCrop, UniformImage, source_size_for

            self.gpu_aug = GpuMultiCrop(cfg.global_size, cfg.local_size, cfg.n_local,
                                        **crops).to(self.device)
            transform: Any = UniformImage(source_size_for(cfg.global_size))
        else:
            transform = MultiCropTransform(cfg.global_size, cfg.local_size, cfg.n_local, **crops)
        self.dataset = MultiCropDataset(self.ws, transform, self.items, seed=cfg.seed,
                                        max_side=max(64, 2 * cfg.global_size))
        world = dist.world_size()
        self.local_batch = cfg.batch_size // world
        self.steps_per_epoch = len(self.items) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch size {cfg.batch_size} is larger than the "
                             f"{len(self.items)} usable images")
        workers = cfg.workers if cfg.workers is not None else default_workers(len(self.items))
        self.sampler = None
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler

            self.sampler = DistributedSampler(self.dataset, shuffle=True, seed=cfg.seed,
                                              drop_last=True)
        self.generator = torch.Generator()
        self.loader = make_loader(self.dataset, self.local_batch, shuffle=True, drop_last=True,
                                  workers=workers, sampler=self.sampler,
                                  generator=self.generator, pin_memory=self.cuda)

    def _autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _total_progress(self, epoch_frac: float) -> float:
        cfg = self.cfg
        parts = []
        if cfg.epochs:
            parts.append(epoch_frac / cfg.epochs)
        if cfg.minutes:
            parts.append((self.state.elapsed_s + time.monotonic() - self._t_session)
                         / (cfg.minutes * 60))
        return min(1.0, max(parts)) if parts else 0.0

    # ---------------------------------------------------------------- one epoch
    def train_one_epoch(self, epoch: int, stopper: _Stopper) -> dict[str, Any]:
        """Train epoch ``epoch`` (0-based); returns its statistics (what ``stats.jsonl`` gets).

        Stops early (``self.state.stop_reason`` set) when cancelled or out of time.
        """
        cfg = self.cfg
        self.model.train()
        self.dataset.set_epoch(epoch)
        self.generator.manual_seed(cfg.seed * 1_000_003 + epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        if self.queue is not None and epoch > 0:
            self.dataset.set_neighbors(self.queue.neighbor_map())
        n_heads = len(cfg.heads)
        seen: list[set[int]] = [set() for _ in range(n_heads)]
        loss_sum, n_steps, n_images, skipped = 0.0, 0, 0, 0
        t0 = time.monotonic()
        bar = _bar(self.steps_per_epoch, epoch, cfg.epochs)
        lr = cfg.lr
        for i, batch in enumerate(self.loader):
            reason = stopper.check()
            if reason:
                self.state.stop_reason = reason
                break
            if batch is None or batch[1].numel() < max(cfg.heads) // dist.world_size():
                skipped += 1
                log.warning("epoch %d step %d: batch skipped (too few readable images)",
                            epoch + 1, i + 1)
                continue
            views, ids = batch
            if self.gpu_aug is not None:
                views = self._device_views(views, epoch, i)
            else:
                views = [v.to(self.device, non_blocking=True) for v in views]
            if self.cuda:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            lr = lr_at(cfg, self._total_progress(epoch + i / self.steps_per_epoch))
            set_lr(self.optimizer, lr)
            with self._autocast():
                outs = self.net(views)
            logits = [[o.logits[h] for o in outs] for h in range(n_heads)]
            loss = self.criterion(logits, n_global=2)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {loss.item()} at step {self.state.step + 1} (epoch {epoch + 1}, "
                    f"batch {i + 1}); training stopped. Try a lower --lr (now {cfg.lr:g}) or "
                    "--optimizer adamw")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad)
            self.optimizer.step()
            self.state.step += 1
            if self.queue is not None:
                self.queue.enqueue(dist.gather_with_grad(outs[0].embedding.detach().float()),
                                   dist.gather_with_grad(ids.to(self.device)))
            with torch.no_grad():
                for h in range(n_heads):
                    seen[h].update(outs[0].logits[h].argmax(1).tolist())
            loss_value = float(dist.all_reduce_mean(loss.detach()))
            loss_sum += loss_value
            n_steps += 1
            n_images += ids.numel() * dist.world_size()
            rate = n_images / max(1e-9, time.monotonic() - t0)
            info = self._progress_info(epoch, i + 1, loss_value, rate, lr, seen)
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:.0f}",
                                classes="/".join(str(len(s)) for s in seen))
                bar.update(1)
            self._report(info)
        if bar is not None:
            bar.close()
        seconds = time.monotonic() - t0
        return {
            "epoch": epoch + 1,
            "steps": n_steps,
            "images": n_images,
            "loss": loss_sum / n_steps if n_steps else None,
            "lr": lr,
            "seconds": round(seconds, 3),
            "images_per_s": round(n_images / seconds, 2) if seconds > 0 else None,
            "classes_in_use": {str(k): len(s) for k, s in zip(cfg.heads, seen)},
            "skipped_batches": skipped,
            "augment": self.augment,
            "complete": self.state.stop_reason is None,
        }

    def _device_views(self, sources: list[torch.Tensor], epoch: int, index: int
                      ) -> list[torch.Tensor]:
        """The views of batch ``index`` made on the device by :class:`GpuMultiCrop`.

        ``sources`` is the collated :class:`UniformImage` output: the images, uint8
        ``[B, 3, S, S]``, after (in an epoch with neighbours) the sources of global view 1 (a
        nearest neighbour's image with NN positives). The randomness comes from a CPU generator
        seeded with ``(seed, epoch, batch index, rank)``, so a resumed run makes the same views.
        """
        images = sources[-1].to(self.device, non_blocking=True)
        src1 = sources[0].to(self.device, non_blocking=True) if len(sources) == 2 else None
        g = torch.Generator().manual_seed(
            sample_seed(self.cfg.seed, epoch, index * dist.world_size() + dist.rank()))
        with torch.no_grad():
            return self.gpu_aug(images, generator=g, global1_images=src1)

    def _progress_info(self, epoch: int, step: int, loss: float, rate: float, lr: float,
                       seen: list[set[int]]) -> dict[str, Any]:
        cfg = self.cfg
        done = self._total_progress(epoch + step / self.steps_per_epoch)
        elapsed = self.state.elapsed_s + time.monotonic() - self._t_session
        eta = elapsed * (1 - done) / done if done > 0 else None
        return {"status": "running", "epoch": epoch + 1, "epochs": cfg.epochs, "step": step,
                "steps": self.steps_per_epoch, "global_step": self.state.step, "loss": loss,
                "lr": lr, "images_per_s": rate, "eta_s": eta, "fraction": done,
                "augment": self.augment,
                "classes_in_use": {str(k): len(s) for k, s in zip(cfg.heads, seen)},
                "updated": time.time()}

    def _report(self, info: dict[str, Any], force: bool = False) -> None:
        if not dist.is_main():
            return
        if self.progress is not None:
            self.progress(info)
        now = time.monotonic()
        if force or now - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = now
            atomic_write_json(self.run_dir / PROGRESS_FILE, info)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_state(self, partial: bool) -> dict[str, Any]:
        return {
            **self.model.checkpoint_dict(),
            "optimizer": self.optimizer.state_dict(),
            "queue": self.queue.state_dict() if self.queue is not None else None,
            "epoch": self.state.epoch,
            "step": self.state.step,
            "elapsed_s": self.state.elapsed_s + time.monotonic() - self._t_session,
            "train_config": self.cfg.to_dict(),
            "rng": rng_states(),
            "partial": partial,
        }

    def save(self, partial: bool = False) -> None:
        if dist.is_main():
            save_checkpoint(self.run_dir / CHECKPOINT_FILE, self.checkpoint_state(partial))
        dist.barrier()

    # ---------------------------------------------------------------- the run
    def fit(self, stopper: _Stopper) -> list[dict[str, Any]]:
        """Train until the epochs or minutes run out, or a stop; checkpoint every epoch."""
        self._t_session = time.monotonic()
        stats: list[dict[str, Any]] = []
        last = self.cfg.epochs if self.cfg.epochs is not None else 10 ** 9
        while self.state.epoch < last:
            reason = stopper.check()
            if reason:
                self.state.stop_reason = reason
                break
            s = self.train_one_epoch(self.state.epoch, stopper)
            complete = self.state.stop_reason is None
            if complete:
                self.state.epoch += 1
            if s["steps"]:
                stats.append(s)
                if dist.is_main():
                    with open(self.run_dir / STATS_FILE, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(s) + "\n")
            if s["steps"] and dist.is_main():
                log.info("epoch %d: loss %.4f, %.1f images/s, classes in use %s", s["epoch"],
                         s["loss"], s["images_per_s"] or 0, s["classes_in_use"])
            if complete or s["steps"]:
                self.save(partial=not complete)
            if not complete:
                break
        return stats


def _bar(total: int, epoch: int, epochs: int | None):
    if not dist.is_main():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional: the progress callback and progress.json remain
        return None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs or '?'}", leave=False,
                disable=None, dynamic_ncols=True)


# --------------------------------------------------------------------------- public entry
def _open_workspace(folder: str | os.PathLike | None,
                    workspace: Workspace | str | os.PathLike | None) -> Workspace:
    if isinstance(workspace, Workspace):
        return workspace
    if folder is None:
        if workspace is None:
            raise ValueError("give an image folder or a workspace")
        return Workspace.open(workspace)
    return Workspace.for_folder(folder, workspace)


def _find_resume_run(ws: Workspace, run_id: int | None) -> RunInfo:
    """The run ``--resume`` continues: ``run_id``, else the newest scratch or finetune run with a
    checkpoint. Fast runs are never resumed. Raises before anything is changed."""
    if run_id is not None:
        run = ws.get_run(run_id)
        if run.mode not in RESUMABLE_MODES:
            raise ValueError(f"--resume: run {run.id} is a {run.mode}-mode run; {run.mode} mode is "
                             "not resumed, start it again: its features are cached")
    else:
        saved = [r for r in ws.list_runs() if (r.dir / CHECKPOINT_FILE).exists()]
        runs = [r for r in saved if r.mode in RESUMABLE_MODES]
        if not runs:
            hint = ("; fast-mode runs are not resumed, start one again: its features are cached"
                    if saved else "")
            raise CheckpointError(f"--resume: no run with a checkpoint in workspace {ws.path}"
                                  f"{hint}")
        run = runs[-1]
    if not (run.dir / CHECKPOINT_FILE).exists():
        raise CheckpointError(f"--resume: run {run.id} has no checkpoint ({run.dir / CHECKPOINT_FILE}"
                              " missing); start a new run without --resume")
    return run


def train(folder: str | os.PathLike | None, workspace: Workspace | str | os.PathLike | None = None,
          *, classes: int | None = None, backbone: str | None = None, epochs: int | None = None,
          minutes: float | None = None, batch_size: int | None = None,
          device: str = "auto", resume: bool = False, mode: str | None = None,
          pretrained: str | None = None, progress: ProgressFn | None = None,
          should_stop: Callable[[], bool] | None = None, run_id: int | None = None,
          seed: int = 0, **options: Any) -> TrainResult:
    """Learn classes on ``folder`` and predict every usable image.

    Args:
        folder: the image folder (scanned incrementally first; None with ``resume`` or with a
            workspace whose catalog is used as is).
        workspace: a :class:`Workspace` or its directory (default: the folder's workspace).
        classes: class count of the main head (finer heads 2K, 4K are added when the batch
            allows). Default about sqrt(n/2); see :func:`resolve_config` for every default.
        epochs / minutes: the budget; with both, whichever ends first.
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``.
        resume: continue run ``run_id`` (default: the newest scratch or finetune run with a
            checkpoint) from its checkpoint; ``epochs``/``minutes`` then set the new total. A
            missing checkpoint or a fast run is an error, raised before the run is changed; a
            finished run whose continuation fails or is cancelled stays ``done`` with its
            predictions.
        mode: ``scratch`` | ``finetune`` | ``fast`` (default ``fast`` with ``pretrained``,
            else ``scratch``).
        pretrained: torchvision weights name or a local weights file.
        progress: called with a dict (epoch, epochs, step, steps, loss, images_per_s, eta_s,
            classes_in_use, ...) after every step; ``progress.json`` gets the same every 2 s.
        should_stop: polled every step; True cancels after a clean checkpoint.
        run_id: with ``resume``, the run to continue.
        seed: seeds model initialisation, sampling and augmentation.
        **options: any :class:`TrainConfig` field (lr, optimizer, nn_positives, n_local,
            global_size, local_size, workers, augment, ...).

    Returns:
        A :class:`TrainResult`; ``status`` is ``done`` or ``cancelled``.

    Raises:
        ValueError: a bad option (named in the message).
        TrainingError: the loss became NaN/inf (the message names the step).
    """
    if mode is None:
        mode = "fast" if pretrained else "scratch"
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "finetune" and not pretrained:
        raise ValueError("mode 'finetune' needs --pretrained NAME|PATH")
    if resume and mode == "fast":
        raise ValueError("--resume applies to scratch and finetune runs; fast mode re-runs in "
                         "seconds from its feature cache")
    if not resume:
        check_options(classes=classes, batch_size=batch_size, epochs=epochs, minutes=minutes,
                      **options)
    dist.init_from_env()
    ws = _open_workspace(folder, workspace)
    if folder is not None and not resume and dist.is_main():
        from ..catalog.scanner import scan

        report = scan(folder, ws)
        log.info("%s", report.summary())
    dist.barrier()
    if mode == "fast":
        return _train_fast(ws, dict(options, classes=classes, backbone=backbone, epochs=epochs,
                                    minutes=minutes, batch_size=batch_size, device=device,
                                    pretrained=pretrained, seed=seed), progress, should_stop)
    dev = resolve_device(device)

    resume_state = None
    before: RunInfo | None = None  # the resumed run as it was, restored if resuming fails
    if resume:
        before = _find_resume_run(ws, run_id)
        run_id = before.id
        resume_state = load_checkpoint(ws.run_dir(run_id) / CHECKPOINT_FILE)
        cfg = TrainConfig.from_dict(resume_state["train_config"])
        if cfg.mode not in RESUMABLE_MODES:
            raise ValueError(f"--resume: the checkpoint of run {run_id} is from a {cfg.mode}-mode "
                             "run, which is not resumed; start it again: its features are cached")
        if epochs is not None or minutes is not None:
            cfg.epochs, cfg.minutes = epochs, minutes
        cfg.device = str(dev)
        if options.get("workers") is not None:
            cfg.workers = options["workers"]
        if "augment" not in resume_state["train_config"]:
            cfg.augment = "cpu"  # runs from before the option had PIL views
        if options.get("augment") is not None:  # changes the views: no longer exact
            cfg.augment = resolve_augment(options["augment"], dev)
    else:
        if run_id is not None:
            raise ValueError("--run-id names the run to continue and needs --resume")
        table = ws.image_table()
        sizes = list(zip(table["width"].tolist(), table["height"].tolist()))
        cfg = resolve_config(len(table), sizes, dev, classes=classes, backbone=backbone,
                             epochs=epochs, minutes=minutes, batch_size=batch_size, mode=mode,
                             pretrained=pretrained, seed=seed, world=dist.world_size(), **options)
        if dist.is_main():
            run_id = ws.create_run(mode, cfg.to_dict(), heads=cfg.heads, main_head=cfg.classes)
        run_id = _broadcast_int(run_id)

    run_dir = ws.run_dir(run_id)
    if dist.is_main():
        atomic_write_json(run_dir / CONFIG_FILE, cfg.to_dict())
        ws.update_run(run_id, status="running", message=None, config=cfg.to_dict())
        (run_dir / CANCEL_FILE).unlink(missing_ok=True)
    finished = before if before is not None and before.status == "done" else None
    try:
        result = _train_loop(ws, run_id, cfg, resume_state, progress, should_stop, finished)
    except BaseException as exc:
        if dist.is_main():
            status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
            if finished is not None:
                why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                _restore_finished_run(ws, finished, RESUME_NOTE + f"failed ({why})"
                                      if status == "failed" else RESUME_CANCELLED)
            else:
                ws.update_run(run_id, status=status, message=str(exc) or type(exc).__name__)
                _write_final_progress(run_dir, status, str(exc))
        raise
    return result


def _restore_finished_run(ws: Workspace, before: RunInfo, what: str) -> None:
    """Undo what a failed or cancelled ``--resume`` of a finished run changed in its record: the
    run stays ``done`` with its config and its predictions (the checkpoint may hold later
    steps; the message says so)."""
    log.warning("run %d: %s; it stays done with its earlier predictions", before.id, what)
    earlier = (before.message or "").split(RESUME_NOTE)[0].rstrip("; ")  # not twice
    message = f"{earlier}; {what}" if earlier else what
    ws.update_run(before.id, status="done", finished=before.finished, message=message,
                  config=before.config)
    atomic_write_json(before.dir / CONFIG_FILE, before.config)
    _write_final_progress(before.dir, "done", message)


def _broadcast_int(value: int | None) -> int:
    if not dist.is_dist():
        return int(value)  # type: ignore[arg-type]
    t = torch.tensor([int(value) if value is not None else -1])
    torch.distributed.broadcast(t, src=0)
    return int(t)


def _write_final_progress(run_dir: Path, status: str, message: str | None = None) -> None:
    path = run_dir / PROGRESS_FILE
    try:
        info = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        info = {}
    info.update(status=status, message=message, updated=time.time())
    atomic_write_json(path, info)


def _train_loop(ws: Workspace, run_id: int, cfg: TrainConfig,
                resume_state: dict[str, Any] | None, progress: ProgressFn | None,
                should_stop: Callable[[], bool] | None,
                finished: RunInfo | None = None) -> TrainResult:
    """Train, then predict and mark the run done; a cancelled run is marked cancelled, or, when
    it continued the ``finished`` run, left done as that run was."""
    run_dir = ws.run_dir(run_id)
    trainer = Trainer(ws, run_id, cfg, progress, should_stop)
    trainer.prepare(resume_state)
    deadline = None
    if cfg.minutes is not None:
        deadline = time.monotonic() + max(0.0, cfg.minutes * 60 - trainer.state.elapsed_s)
    stopper = _Stopper(run_dir, should_stop, deadline)
    if dist.is_main():
        log.info("run %d: %s, heads %s, batch %d, crops %d/%d ×%d local (augment: %s), "
                 "%s on %s", run_id, cfg.backbone, cfg.heads, cfg.batch_size, cfg.global_size,
                 cfg.local_size, cfg.n_local, trainer.augment,
                 f"{cfg.epochs} epochs" if cfg.epochs else f"{cfg.minutes} min", cfg.device)
    stats = trainer.fit(stopper)
    result = TrainResult(ws, run_id, run_dir, stats)
    if trainer.state.stop_reason == "cancelled":
        if dist.is_main() and finished is not None:
            _restore_finished_run(ws, finished, RESUME_CANCELLED)
        elif dist.is_main():
            msg = f"cancelled after {trainer.state.step} steps; continue with --resume"
            ws.update_run(run_id, status="cancelled", message=msg)
            _write_final_progress(run_dir, "cancelled", msg)
        result.status = "cancelled"
        return result
    if dist.is_main():
        from ..inference.predict import predict

        _write_final_progress(run_dir, "predicting")
        predict(ws, run_id, model=trainer.model, device=trainer.device,
                batch_size=max(64, cfg.batch_size), image_size=cfg.global_size)
        from ..store.predictions import PREDICTIONS_FILE

        result.predictions_path = run_dir / PREDICTIONS_FILE
        msg = "stopped at the time budget" if trainer.state.stop_reason == "time" else None
        ws.update_run(run_id, status="done", message=msg)
        _write_final_progress(run_dir, "done", msg)
    dist.barrier()
    return result


def _train_fast(ws: Workspace, options: dict[str, Any], progress: ProgressFn | None,
                should_stop: Callable[[], bool] | None) -> TrainResult:
    """Fast mode (frozen pretrained backbone): :func:`.fastmode.train_fast` does the work and
    sets the run's status; this records the run and collects the result."""
    from . import fast as fastmode
    from ..store.predictions import PREDICTIONS_FILE

    if dist.world_size() > 1:
        raise ValueError("fast mode runs in one process; start it without torchrun")
    options = {k: v for k, v in options.items() if v is not None}
    heads = options.get("heads")
    run_id = ws.create_run("fast", options, heads=heads,
                           main_head=options.get("classes") or (heads[0] if heads else None))
    fastmode.train_fast(ws, run_id, options, progress, should_stop)
    run = ws.get_run(run_id)
    stats = []
    if (run.dir / STATS_FILE).exists():
        stats = [json.loads(line) for line in (run.dir / STATS_FILE).read_text().splitlines()
                 if line.strip()]
    preds = run.dir / PREDICTIONS_FILE
    return TrainResult(ws, run_id, run.dir, stats, preds if preds.exists() else None,
                       "cancelled" if run.status == "cancelled" else "done")
