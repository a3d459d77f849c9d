"""The scratch and finetune loop: Self-Classifier trained end to end on multi-crop views.

:class:`Trainer` builds the model, optimizer, data and neighbour queue of one run from its
:class:`~.config.TrainConfig` and trains epoch by epoch, writing through the run's
:class:`~selfclassifier_core.store.runfiles.RunRecorder` (progress, one stats line and one
checkpoint per epoch). Prediction and the run's status belong to the pipeline
(:mod:`selfclassifier_core.workflows.pipeline`), not to this loop.

Modes: ``scratch`` (the paper: everything from random weights) and ``finetune`` (pretrained
backbone weights, backbone at ``backbone_lr_scale`` of the learning rate).

Augmentation (``augment``): ``cpu`` makes the multi-crop views with PIL in the DataLoader
workers (:class:`~selfclassifier_core.engine.transforms.MultiCropTransform`); ``device`` has the
workers only decode and resize each image to a uint8 square
(:class:`~selfclassifier_core.engine.gpu_augment.UniformImage`) and makes the views of the whole
batch on the training device (:class:`~selfclassifier_core.engine.gpu_augment.GpuMultiCrop`).

Determinism: the model is initialised from ``seed``; the sampling order of epoch ``e`` comes
from a generator seeded with ``(seed, e)`` and each sample's augmentation from
``(seed, e, index)`` (see :mod:`selfclassifier_core.catalog.datasets`); with
``augment="device"`` each batch's views come from a generator seeded with
``(seed, e, batch index, rank)``. Checkpoints hold the model, optimizer, queue, step and RNG
states, so on CPU a run interrupted at an epoch boundary and resumed ends with exactly the
weights of an uninterrupted run (with either augmentation).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..catalog.datasets import MultiCropDataset, make_loader, sample_seed
from ..engine import dist
from ..engine.backbones import build_backbone
from ..engine.device import autocast, default_workers
from ..engine.gpu_augment import GpuMultiCrop, UniformImage, source_size_for
from ..engine.lars import LARS
from ..engine.loss import SelfClassifierLoss
from ..engine.model import ModelConfig, SelfClassifier, warm_start
from ..engine.pretrained import load_backbone_weights
from ..engine.queue import NeighborQueue
from ..engine.schedules import cosine_with_warmup
from ..engine.schedules import set_lr as _set_lr
from ..engine.transforms import MultiCropTransform
from ..store.checkpoint import rng_states, set_rng_states
from ..store.runfiles import RunRecorder
from ..store.workspace import Workspace
from .config import TrainConfig
from .recipes import resolve_augment
from .targets import load_targets, start_state

if TYPE_CHECKING:
    from ..engine.pretrained import LoadReport

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss became NaN); the message says why and what to try."""


# --------------------------------------------------------------------------- building blocks
def build_model(cfg: TrainConfig) -> SelfClassifier:
    """The run's model, initialised from ``cfg.seed``."""
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
    if not cfg.small_input:
        return load_backbone_weights(model.backbone, cfg.backbone, cfg.pretrained)

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
    return LARS(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)


_GRID = 1_000_000  # the run's progress fraction in millionths, as a step for the schedule


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Cosine schedule with linear warm-up at the fraction ``progress`` ∈ [0, 1] of the run
    (of its epochs, or of its minutes when budgeted by time)."""
    return cosine_with_warmup(int(round(min(1.0, progress) * _GRID)), _GRID,
                              int(round(cfg.warmup_fraction * _GRID)), cfg.lr,
                              cfg.lr * cfg.final_lr_fraction)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's lr = ``lr × group['lr_scale']`` (lower backbone rate when fine-tuning)."""
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


class Stopper:
    """Cancellation sources: ``should_stop()``, the run's CANCEL file, and the time budget."""

    def __init__(self, recorder: RunRecorder, should_stop: Callable[[], bool] | None,
                 deadline: float | None):
        self.recorder = recorder
        self.should_stop = should_stop
        self.deadline = deadline

    def check(self) -> str | None:
        reason = None
        if self.should_stop is not None and self.should_stop():
            reason = "cancelled"
        elif self.recorder.cancel_requested():
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

    The pipeline (:func:`selfclassifier_core.workflows.pipeline.train`) drives it:
    ``prepare(resume_state)`` then ``fit(stopper)``; tests drive single epochs.
    """

    def __init__(self, workspace: Workspace, run_id: int, cfg: TrainConfig,
                 recorder: RunRecorder | None = None,
                 should_stop: Callable[[], bool] | None = None):
        self.ws, self.run_id, self.cfg = workspace, run_id, cfg
        self.run_dir = workspace.run_dir(run_id)
        self.recorder = recorder or RunRecorder(workspace, run_id, cfg.mode, main=dist.is_main())
        self.device = torch.device(cfg.device)
        self.cuda = self.device.type == "cuda"
        self.state = _State()
        self.model = build_model(cfg)
        self.queue = NeighborQueue(self.model.config.out_dim, cfg.queue_size) \
            if cfg.nn_positives else None
        self.criterion = SelfClassifierLoss(row_tau=cfg.row_tau, col_tau=cfg.col_tau)
        self._should_stop = should_stop

    # ---------------------------------------------------------------- set-up
    def prepare(self, resume_state: dict[str, Any] | None = None) -> None:
        cfg = self.cfg
        self.pretrained_report = None
        self.targets = load_targets(self.run_dir)
        if resume_state is None and cfg.refit_of is not None:  # a refit starts from its run
            fresh = warm_start(self.model, start_state(self.ws, cfg.refit_of, cfg.heads))
            log.info("refit: started from run %d (%d tensors new or grown)", cfg.refit_of,
                     len(fresh))
        elif resume_state is None and cfg.mode == "finetune":
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
        if self.targets is not None and len(self.targets.excluded):  # left out of training
            gone = set(self.targets.excluded.tolist())
            self.items = [it for it in self.items if it[0] not in gone]
        self.augment = resolve_augment(cfg.augment, self.device)
        crops = dict(global_scale=tuple(cfg.global_scale), local_scale=tuple(cfg.local_scale))
        self.gpu_aug = None
        if self.augment == "device":
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
        workers = (cfg.workers if cfg.workers is not None
                   else default_workers(len(self.items), self.device))
        self.sampler = None
        if world > 1:
            from torch.utils.data.distributed import DistributedSampler

            self.sampler = DistributedSampler(self.dataset, shuffle=True, seed=cfg.seed,
                                              drop_last=True)
        self.generator = torch.Generator()
        self.loader = make_loader(self.dataset, self.local_batch, shuffle=True, drop_last=True,
                                  workers=workers, sampler=self.sampler,
                                  generator=self.generator, pin_memory=self.cuda)

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
    def train_one_epoch(self, epoch: int, stopper: Stopper) -> dict[str, Any]:
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
            lr = lr_at(cfg, self._total_progress(epoch + i / self.steps_per_epoch))
            outs, loss_value = self._step(views, ids, epoch, i, lr)
            with torch.no_grad():
                for h in range(n_heads):
                    seen[h].update(outs[0].logits[h].argmax(1).tolist())
            loss_sum += loss_value
            n_steps += 1
            n_images += ids.numel() * dist.world_size()
            rate = n_images / max(1e-9, time.monotonic() - t0)
            info = self._progress_info(epoch, i + 1, loss_value, rate, lr, seen)
            self.recorder.progress(info)
        seconds = time.monotonic() - t0
        return {
            "epoch": epoch + 1,
            "step": self.state.step,
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

    def _step(self, views: list[torch.Tensor], ids: torch.Tensor, epoch: int, index: int,
              lr: float) -> tuple[list[Any], float]:
        """One optimisation step on batch ``index`` of ``epoch`` at rate ``lr``: the views on
        the device, forward, loss (a non-finite one stops training, naming the step), backward,
        clipping, the optimizer, the neighbour queue. Returns the model outputs and the loss
        averaged over the ranks."""
        cfg = self.cfg
        if self.gpu_aug is not None:
            views = self._device_views(views, epoch, index)
        else:
            views = [v.to(self.device, non_blocking=True) for v in views]
        if self.cuda:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        set_lr(self.optimizer, lr)
        with autocast(self.device):
            outs = self.net(views)
        logits = [[o.logits[h] for o in outs] for h in range(len(cfg.heads))]
        if self.targets is not None and cfg.supervised_weight > 0:  # a refit: labelled images
            classes, weights = self.targets.lookup(ids)
            loss = self.criterion(logits, n_global=2, targets=classes.to(self.device),
                                  weights=weights.to(self.device),
                                  supervised_weight=cfg.supervised_weight)
        else:
            loss = self.criterion(logits, n_global=2)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {self.state.step + 1} (epoch {epoch + 1}, "
                f"batch {index + 1}); training stopped. Try a lower --lr (now {cfg.lr:g}) or "
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
        return outs, float(dist.all_reduce_mean(loss.detach()))

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
        """A progress record (schema: :mod:`selfclassifier_core.store.runfiles`)."""
        cfg = self.cfg
        done = self._total_progress(epoch + step / self.steps_per_epoch)
        elapsed = self.state.elapsed_s + time.monotonic() - self._t_session
        eta = elapsed * (1 - done) / done if done > 0 else None
        return {"status": "running", "phase": "training", "epoch": epoch + 1,
                "epochs": cfg.epochs, "step": self.state.step,
                "steps": cfg.epochs * self.steps_per_epoch if cfg.epochs else None,
                "epoch_step": step, "epoch_steps": self.steps_per_epoch, "loss": loss,
                "lr": lr, "images_per_s": rate, "eta_s": eta, "fraction": done,
                "augment": self.augment,
                "classes_in_use": {str(k): len(s) for k, s in zip(cfg.heads, seen)}}

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
            self.recorder.save_checkpoint(self.checkpoint_state(partial))
        dist.barrier()

    # ---------------------------------------------------------------- the run
    def fit(self, stopper: Stopper) -> list[dict[str, Any]]:
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
                self.recorder.append_stats(s)
            if s["steps"] and dist.is_main():
                log.info("epoch %d: loss %.4f, %.1f images/s, classes in use %s", s["epoch"],
                         s["loss"], s["images_per_s"] or 0, s["classes_in_use"])
            if complete or s["steps"]:
                self.save(partial=not complete)
            if not complete:
                break
        return stats
