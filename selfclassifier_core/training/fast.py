"""Fast mode: Self-Classifier heads on a frozen pretrained backbone's cached features.

The backbone is frozen, so every image is embedded once for a few views
(:func:`.features.extract_features`) and training touches only the projection MLP and the
classifier heads (:meth:`SelfClassifier.forward_features`): seconds on a GPU, a minute or two on
a laptop CPU. Each training sample is ``n_train_views`` different cached views of one image;
with nearest-neighbour positives (on by default) one of them is, with probability ``nn_prob``,
a view of one of the image's ``nn_k`` nearest neighbours in the pretrained feature space.

:func:`fit_fast` is the loop: it writes through the run's recorder (progress, stats lines, the
checkpoint, which holds the *whole* :class:`SelfClassifier`, pretrained backbone included, so
prediction of new images works as for every other run) and returns the predictions of every
cached image, computed from the cached features. The pipeline saves them and sets the status.

A refit's predictions are smoothed: each image's class probabilities are the mean of its own
and those of its :data:`~.config.PREDICT_NEIGHBOURS` nearest neighbours in the pretrained
feature space (the neighbours training already treats as positives). A refit learns from
labels lent by a few checked images, some of them wrong, and a single image's prediction
follows that noise; its neighbourhood's mean follows it less. Images predicted later from the
checkpoint get the model's own probabilities (they have no cached neighbours); an ordinary
run's predictions are the model's own, as before.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..engine.device import resolve_device
from ..engine.lars import LARS
from ..engine.loss import SelfClassifierLoss
from ..engine.loss import supervised_term
from ..engine.model import ModelConfig, SelfClassifier, warm_start
from ..engine.neighbours import knn_graph
from ..engine.pretrained import load_backbone_weights
from ..engine.schedules import cosine_with_warmup
from ..store.predictions import HeadPrediction, Predictions
from ..store.runfiles import RunRecorder
from ..store.workspace import Workspace
from .config import FastConfig
from .features import FeatureCache, extract_features
from .recipes import resolve_fast, resolve_views
from .targets import Targets, load_targets, start_state

log = logging.getLogger(__name__)

__all__ = ["FastFit", "fit_fast"]

CHECKPOINT_FORMAT = 1
@dataclass
class FastFit:
    """What a fast-mode loop ends with."""

    config: FastConfig                 # resolved
    status: str                        # done | cancelled
    message: str | None = None
    predictions: Predictions | None = None
    final: dict[str, Any] = dataclasses.field(default_factory=dict)  # last progress fields


# --------------------------------------------------------------------------- helpers
def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    # LambdaLR calls with the number of steps taken; warm-up starts above 0 so step 1 learns
    return lambda step: max(cosine_with_warmup(min(step + 1, total), total, warmup), 0.0)


def _make_optimizer(params, cfg: FastConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "lars":
        return LARS(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _head_probs(logits: torch.Tensor, row_tau: float) -> torch.Tensor:
    return torch.softmax(logits.float() / row_tau, dim=1)


@torch.no_grad()
def _predict(model, feats: torch.Tensor, row_tau: float, batch: int = 4096,
             neighbours: torch.Tensor | None = None
             ) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Embeddings and per-head (cluster, confidence, margin) from backbone features.

    With ``neighbours`` (``[N, k]`` row indices, :func:`~..engine.neighbours.knn_graph`) a
    row's class probabilities are the mean of its own and its neighbours' (its embedding stays
    its own). The neighbours are run through the model with each batch, so memory stays that
    of ``batch`` rows."""
    was = model.training
    model.eval()
    embs, per_head = [], [[] for _ in model.head_sizes]
    k = 0 if neighbours is None else neighbours.shape[1]
    step = max(1, batch // (k + 1))
    for s in range(0, feats.shape[0], step):
        rows = torch.arange(s, min(s + step, feats.shape[0]), device=feats.device)
        if k:
            rows = torch.cat([rows, neighbours[s:s + step].to(feats.device).T.reshape(-1)])
        out = model.forward_features(feats[rows].float())
        n = out.embedding.shape[0] // (k + 1)
        embs.append(out.embedding[:n].float().cpu())
        for h, z in enumerate(out.logits):
            p = _head_probs(z, row_tau).reshape(k + 1, n, -1).mean(dim=0)
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



def _predictions(model, cache: FeatureCache, full: torch.Tensor, cfg: FastConfig,
                 neighbours: torch.Tensor | None = None) -> Predictions:
    emb, per_head = _predict(model, full, cfg.row_tau, neighbours=neighbours)
    return Predictions(
        image_ids=np.asarray(cache.image_ids, np.int64),
        heads={k: HeadPrediction(k, c.astype(np.int32), conf.astype(np.float32),
                                 m.astype(np.float32))
               for k, (c, conf, m) in zip(cfg.heads, per_head)},
        embeddings=emb.astype(np.float16))


def _build_model(cfg: FastConfig, cache: FeatureCache, device: torch.device) -> SelfClassifier:
    config = ModelConfig(backbone=cfg.backbone, image_size=cache.recipe.image_size,
                         small_input=cache.small_input, proj_hidden_dim=cfg.proj_hidden_dim,
                         proj_layers=cfg.proj_layers, proj_bn=cfg.proj_bn, out_dim=128,
                         heads=list(cfg.heads))
    model = SelfClassifier(config)
    report = load_backbone_weights(model.backbone, cfg.backbone, cfg.pretrained)
    if report.identity != cache.weights:
        raise RuntimeError(f"weights changed while running ({report.identity} vs {cache.weights})")
    model.backbone.requires_grad_(False).eval()
    model.projection.to(device)
    model.heads.to(device)
    return model


# --------------------------------------------------------------------------- the loop
def fit_fast(ws: Workspace, run_id: int, cfg: FastConfig, recorder: RunRecorder,
             should_stop: Callable[[], bool] | None = None) -> FastFit:
    """Train fast mode for run ``run_id``: features (cached), then projection + heads.

    ``cfg`` is the validated config; the recipe fills what it leaves open. Stops early when
    ``should_stop()`` or the run's CANCEL file asks (checkpoint and predictions of the current
    state are still made) or when ``cfg.minutes`` (the whole run's budget) runs out.
    """
    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cfg = resolve_views(cfg, ws, device)

    def stop_requested() -> bool:
        return bool((should_stop is not None and should_stop()) or recorder.cancel_requested())

    # 1. features ---------------------------------------------------------------------------
    def feat_progress(done: int, total: int) -> None:
        recorder.progress({"phase": "features", "done": done, "total": total,
                           "fraction": 0.0, "step": 0})

    try:
        cache = extract_features(ws, cfg.backbone, cfg.pretrained, views=cfg.views,
                                 image_size=cfg.image_size, seed=cfg.feature_seed,
                                 device=device, batch_size=cfg.feature_batch_size,
                                 workers=cfg.workers, progress=feat_progress,
                                 should_stop=stop_requested)
    except InterruptedError:
        return FastFit(cfg, "cancelled", "cancelled during feature extraction",
                       final={"phase": "features"})
    t_feat = time.perf_counter() - t_start
    targets = load_targets(recorder.dir)
    ids = np.asarray(cache.image_ids, np.int64)
    keep = (~np.isin(ids, targets.excluded) if targets is not None
            else np.ones(len(ids), bool))     # excluded: left out of training, still predicted
    cfg = resolve_fast(dataclasses.replace(cfg, image_size=cache.recipe.image_size,
                                           feature_cache=cache.key), int(keep.sum()), device)
    model = _build_model(cfg, cache, device)
    if cfg.refit_of is not None:
        _start_from(model, ws, cfg.refit_of)
    recorder.set_heads(cfg.heads)
    recorder.write_config(cfg.to_dict())

    # 2. training ---------------------------------------------------------------------------
    feats = torch.from_numpy(np.array(cache.features)).to(device)  # a copy: memmaps are read-only
    full = feats[0]
    if keep.all():
        train_feats, train_ids = feats, ids
    else:
        train_feats, train_ids = feats[:, torch.from_numpy(keep).to(device)], ids[keep]
    log.info("fast mode: %d images, %d views, heads %s, batch %d, %d steps, %s on %s (features "
             "took %.1f s)%s", train_feats.shape[1], cfg.views, cfg.heads, cfg.batch_size,
             cfg.steps, cfg.optimizer, device, t_feat,
             f"; refit of run {cfg.refit_of}, {len(targets)} images with a class"
             if targets is not None else "")
    deadline = t_start + cfg.minutes * 60 if cfg.minutes else None
    labelled = _labelled(targets, train_ids) if targets is not None else None
    # nearest neighbours in the pretrained space, a search quadratic in the images: training's
    # positives (``nn_k``) and a refit's averaged predictions share one when training sees
    # every image (a row's first k neighbours of a larger search are its k nearest)
    smooth = cfg.prediction_neighbours  # module docs
    train_k = cfg.nn_k if cfg.nn_k > 0 and cfg.nn_prob > 0 else 0
    shared = knn_graph(full, max(train_k, smooth)) if smooth and keep.all() else None
    if shared is not None:
        nn_idx = shared[:, :train_k] if train_k else None
    else:
        nn_idx = knn_graph(train_feats[0], train_k) if train_k else None
    step, status, message = _train_heads(model, train_feats, cfg, recorder, stop_requested,
                                         deadline, labelled, nn_idx)

    # 3. checkpoint and predictions ---------------------------------------------------------
    model.cpu()
    recorder.save_checkpoint({
        "format_version": CHECKPOINT_FORMAT, **model.checkpoint_dict(), "mode": "fast",
        "train_config": cfg.to_dict(), "step": step, "steps": cfg.steps,
        "weights": cache.weights, "feature_cache": cache.key, "views": cache.recipe.to_dict()})
    model.to(device)
    if smooth:
        near = shared[:, :smooth] if shared is not None else knn_graph(full, smooth)
    preds = _predictions(model, cache, full, cfg, near if smooth else None)
    in_use = {k: int(len(np.unique(h.cluster))) for k, h in preds.heads.items()}
    spe = max(1, len(cache) // cfg.batch_size)
    total_s = time.perf_counter() - t_start
    log.info("fast mode done in %.1f s (features %.1f s); classes in use %s", total_s, t_feat,
             in_use)
    return FastFit(cfg, status, message, preds, final={
        "epoch": math.ceil(step / spe), "epochs": math.ceil(cfg.steps / spe), "step": step,
        "steps": cfg.steps, "fraction": step / cfg.steps,
        "classes_in_use": {str(k): v for k, v in in_use.items()},
        "features_s": round(t_feat, 2), "total_s": round(total_s, 2)})


def _start_from(model: SelfClassifier, ws: Workspace, run_id: int) -> None:
    """Warm start a refit: the projection and heads of run ``run_id`` (grown heads keep their
    new classes' fresh rows; the frozen backbone is the pretrained one either way)."""
    fresh = warm_start(model, start_state(ws, run_id, model.head_sizes),
                       skip_prefixes=("backbone.",))
    log.info("refit: started from run %d (%d tensors new or grown)", run_id,
             sum(1 for n in fresh if not n.startswith("backbone.")))


@dataclass
class _Labelled:
    """The training rows that have a class: row index, classes per head, sampling weight."""

    rows: torch.Tensor      # [L] long, into the training rows
    classes: torch.Tensor   # [L, H] long
    weights: torch.Tensor   # [L] float, > 0


def _labelled(targets: Targets, train_ids: np.ndarray) -> _Labelled | None:
    classes, weights = targets.lookup(train_ids)
    has = (weights > 0) & (classes >= 0).any(dim=1)
    if not bool(has.any()):
        return None
    rows = torch.nonzero(has).squeeze(1)
    return _Labelled(rows, classes[rows], weights[rows])


def _supervised(model, feats: torch.Tensor, cfg: FastConfig, lab: _Labelled,
                gen: torch.Generator) -> torch.Tensor:
    """The supervised term on a batch of labelled images drawn in proportion to their weight
    (so its expectation is the weighted mean over all of them), one cached view each of
    ``n_train_views``."""
    size = min(cfg.batch_size, len(lab.rows))
    pick = torch.multinomial(lab.weights, size, replacement=True, generator=gen)
    idx = lab.rows[pick]
    vsel, src = _batch_views(idx, cfg, None, gen)
    out = model.forward_features(feats[vsel.to(feats.device), src.to(feats.device)].float())
    logits = [list(z.split(size)) for z in out.logits]
    return supervised_term(logits, lab.classes[pick].to(feats.device),
                           torch.ones(size, device=feats.device), cfg.row_tau)


def _batch_views(idx: torch.Tensor, cfg: FastConfig, nn_idx: torch.Tensor | None,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, image) indices ``[V, B]`` of one batch: V distinct cached views per sample (with
    replacement when the cache has fewer), the last one a neighbour's with ``nn_prob``."""
    batch, V, n_views = idx.shape[0], cfg.n_train_views, cfg.views
    if n_views >= V:
        vsel = torch.argsort(torch.rand(batch, n_views, generator=gen), dim=1)[:, :V]
    else:
        vsel = torch.randint(0, n_views, (batch, V), generator=gen)
    src = idx.unsqueeze(1).expand(batch, V).clone()
    if nn_idx is not None:
        swap = torch.rand(batch, generator=gen) < cfg.nn_prob
        pick = torch.randint(0, nn_idx.shape[1], (batch,), generator=gen)
        nbr = nn_idx[idx.to(nn_idx.device), pick.to(nn_idx.device)].cpu()
        src[:, V - 1] = torch.where(swap, nbr, src[:, V - 1])
    return vsel.T.reshape(-1), src.T.reshape(-1)


def _train_heads(model, feats: torch.Tensor, cfg: FastConfig, recorder: RunRecorder,
                 stop_requested: Callable[[], bool], deadline: float | None,
                 labelled: _Labelled | None = None, nn_idx: torch.Tensor | None = None
                 ) -> tuple[int, str, str | None]:
    """The optimisation loop; returns ``(steps taken, status, message)``. With ``labelled``
    rows (a refit) each step adds ``cfg.supervised_weight`` times the supervised term;
    ``nn_idx`` (``[N, nn_k]``, :func:`~..engine.neighbours.knn_graph` of ``feats[0]``) gives
    the neighbour positives (None: none)."""
    n, batch, steps = feats.shape[1], cfg.batch_size, cfg.steps
    device = feats.device
    full = feats[0]
    params = [p for name, p in model.named_parameters() if not name.startswith("backbone.")]
    opt = _make_optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(steps, int(cfg.warmup_fraction * steps)))
    # one process trains the heads (under torchrun: rank 0, after the ranks shared the embedding)
    criterion = SelfClassifierLoss(row_tau=cfg.row_tau, col_tau=cfg.col_tau, gather=False)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    model.projection.train()
    model.heads.train()
    spe = max(1, n // batch)
    log_every = max(spe, math.ceil(steps / 20))  # stats: per epoch, at most ~20 lines
    t_train = last_row = time.perf_counter()
    losses: list[float] = []
    step, row_start, perm, pos = 0, 0, torch.randperm(n, generator=gen), 0
    while step < steps:
        if stop_requested():
            log.info("fast-mode run %s cancelled at step %d of %d", recorder.run_id, step, steps)
            return step, "cancelled", f"cancelled at step {step} of {steps}"
        if deadline is not None and time.perf_counter() > deadline:
            log.info("time budget reached after %d of %d steps", step, steps)
            return step, "done", f"time budget reached after {step} of {steps} steps"
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        vsel, src = _batch_views(perm[pos:pos + batch], cfg, nn_idx, gen)
        pos += batch
        out = model.forward_features(feats[vsel.to(device), src.to(device)].float())
        loss = criterion([list(z.split(batch)) for z in out.logits], n_global=cfg.n_train_views)
        if labelled is not None and cfg.supervised_weight > 0:
            loss = loss + cfg.supervised_weight * _supervised(model, feats, cfg, labelled, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower the "
                                     "learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(float(loss.detach()))
        elapsed = time.perf_counter() - t_train
        info = {"phase": "training", "epoch": math.ceil(step / spe),
                "epochs": math.ceil(steps / spe), "step": step, "steps": steps,
                "epoch_step": (step - 1) % spe + 1, "epoch_steps": spe, "loss": losses[-1],
                "lr": opt.param_groups[0]["lr"], "images_per_s": round(step * batch / elapsed, 1),
                "eta_s": round((steps - step) * elapsed / step, 1), "fraction": step / steps}
        if step % log_every == 0 or step == steps:
            info["classes_in_use"] = _classes_in_use(model, full, cfg.row_tau)
            model.projection.train()
            model.heads.train()
            now = time.perf_counter()
            recorder.append_stats({
                "epoch": info["epoch"], "step": step, "steps": step - row_start,
                "loss": float(np.mean(losses)) if losses else None, "lr": info["lr"],
                "classes_in_use": info["classes_in_use"], "images_per_s": info["images_per_s"],
                "seconds": round(now - last_row, 3), "time": round(elapsed, 3)})
            losses, row_start, last_row = [], step, now
            recorder.progress(info, force=True)
        else:
            recorder.progress(info)
    return step, "done", None
