"""Predictions of a trained run: per-image embedding and, for every head, cluster/probability/margin.

- :func:`predict` runs a run's model on every usable catalog image and stores the result with
  :func:`~selfclassifier_core.store.predictions.save_predictions` in the run directory.
- Predicting a *new* folder with a trained run (``predict(ws, folder=NEW)`` or
  ``predict WS --folder NEW [--out-workspace WS2]``): NEW is scanned into its own workspace,
  a run is created there that holds a copy of the trained checkpoint (its config records the
  source workspace and run), and the predictions are written to that run. Labels, exports and
  the app then work on NEW's workspace as on any other.
- :func:`embed_files` embeds images outside the catalog (paths or encoded bytes).

Probabilities are the softmax of the head's logits at the training row temperature
(``row_tau``, 0.1 by default), the distribution the loss trained; the margin is top-1 minus
top-2 probability.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..engine.device import autocast, default_workers, resolve_device
from ..engine.neighbours import knn_graph
from ..store.checkpoint import CHECKPOINT_FILE, load_checkpoint
from ..catalog.datasets import EvalDataset, make_loader
from ..catalog.scanner import scan
from ..store.fsutil import atomic_open
from ..store.predictions import HeadPrediction, Predictions, save_predictions
from ..store.progress import Progress, Tally
from ..store.runfiles import RunRecorder
from ..engine.transforms import eval_transform
from ..store.workspace import Workspace, as_workspace
from ..training.config import DEFAULT_ROW_TAU, config_from_dict

log = logging.getLogger(__name__)



def load_model(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
               device: str | torch.device = "auto") -> tuple[nn.Module, dict[str, Any]]:
    """The model of a run (default: the newest finished one) in eval mode on ``device``.

    Returns:
        ``(model, info)`` with info ``{"run_id", "image_size", "row_tau", "heads"}``.
    """
    from ..engine.model import build_from_checkpoint

    ws = as_workspace(workspace)
    run = ws.resolve_run(run_id)
    state = load_checkpoint(run.dir / CHECKPOINT_FILE)
    model = build_from_checkpoint(state).to(resolve_device(device)).eval()
    return model, _model_info(state, run.id)


def _preprocess(model: nn.Module):
    """The pixels the model's backbone expects (DINOv2 / CLIP / SigLIP bring their own
    statistics; fast mode cached its features with the same)."""
    from ..engine.backbones import backbone_preprocess

    config = getattr(model, "config", None)
    return backbone_preprocess(config.backbone) if config is not None else None


def _model_info(state: dict[str, Any], run_id: int) -> dict[str, Any]:
    """What prediction needs from a checkpoint: the run's config, read through its mode's
    class (the image side prediction sees, the row temperature) and the model's heads."""
    mc = state["model_config"]
    tc = state.get("train_config")
    if tc:
        cfg = config_from_dict(tc)
        size, row_tau = cfg.eval_size, cfg.row_tau
    else:  # a bare model checkpoint
        size, row_tau = int(mc.get("image_size", 224)), DEFAULT_ROW_TAU
    return {"run_id": run_id, "image_size": int(size), "row_tau": float(row_tau),
            "heads": list(mc["heads"])}


@torch.no_grad()
def _infer(model: nn.Module, dataset: EvalDataset, device: torch.device, batch_size: int,
           row_tau: float, workers: int | None = None, progress: Progress | None = None
           ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Positions that loaded, their float32 embeddings, and per-head probabilities;
    ``progress`` counts images (read or not)."""
    model.eval()
    cuda = device.type == "cuda"
    loader = make_loader(dataset, batch_size, shuffle=False, drop_last=False,
                         workers=default_workers(len(dataset), device) if workers is None else workers,
                         pin_memory=cuda)
    positions, embeddings = [], []
    probs: list[list[np.ndarray]] | None = None
    tally = Tally(progress, len(dataset))
    for batch in loader:
        if batch is not None:
            x, pos = batch
            x = x.to(device, non_blocking=True)
            with autocast(device):
                out = model(x)
            positions.append(pos.numpy())
            embeddings.append(out.embedding.float().cpu().numpy())
            p = [torch.softmax(z.float() / row_tau, dim=1).cpu().numpy() for z in out.logits]
            if probs is None:
                probs = [[] for _ in p]
            for acc, ph in zip(probs, p):
                acc.append(ph)
        tally.add(batch_size)  # a batch of images that all failed comes as None
    tally.finish()
    if not positions:
        heads = getattr(model, "head_sizes", [])
        return (np.zeros(0, np.int64), np.zeros((0, model.config.out_dim), np.float32),
                [np.zeros((0, k), np.float32) for k in heads])
    return (np.concatenate(positions).astype(np.int64), np.concatenate(embeddings),
            [np.concatenate(a) for a in probs])  # type: ignore[union-attr]


def head_prediction(classes: int, probs: np.ndarray) -> HeadPrediction:
    """Cluster (argmax), confidence (top-1 probability) and margin (top-1 − top-2)."""
    if probs.shape[1] >= 2:
        top2 = np.sort(probs, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
    else:
        margin = np.ones(len(probs), np.float32)
    return HeadPrediction(classes, probs.argmax(1).astype(np.int32),
                          probs.max(1).astype(np.float32), margin.astype(np.float32))


def predict(workspace: Workspace | str | os.PathLike, run_id: int | None = None, *,
            batch_size: int = 256, device: str | torch.device = "auto",
            progress: Progress | None = None, model: nn.Module | None = None,
            image_size: int | None = None, folder: str | os.PathLike | None = None,
            out_workspace: str | os.PathLike | None = None, workers: int | None = None,
            save: bool = True, neighbours: int = 0) -> Predictions:
    """Predict every usable catalog image with run ``run_id`` (default: the newest done run).

    Args:
        workspace: the workspace of the trained run.
        batch_size: images per forward pass.
        device: ``auto``, ``cpu``, ``cuda``.
        progress: ``progress(done, total)`` in images (with ``folder``, of the prediction:
            :func:`predict_folder` takes a ``scan_progress`` for the scan).
        model: an in-memory model to use instead of loading the run's checkpoint (the trainer
            passes its own); then ``image_size`` should be given too.
        folder: predict this *other* folder instead (see :func:`predict_folder`).
        out_workspace: with ``folder``, where its workspace goes (default: the folder's).
        save: write ``predictions.npz``/``embeddings.npy`` into the run directory.
        neighbours: each image's class probabilities are the mean of its own and those of
            this many nearest images in the run's embedding (a refit's, as fast mode's
            :data:`~..training.config.PREDICT_NEIGHBOURS`); 0: the model's own.

    Images that fail to load at prediction time are left out with a warning.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size!r}")
    if folder is not None:
        return predict_folder(workspace, folder, run_id, out_workspace=out_workspace,
                              batch_size=batch_size, device=device, progress=progress,
                              workers=workers)[2]
    ws = as_workspace(workspace)
    dev = resolve_device(device)
    if model is None:
        model, info = load_model(ws, run_id, dev)
        run_id = info["run_id"]
    else:
        if run_id is None:
            raise ValueError("predict with an in-memory model needs its run_id")
        state_path = ws.run_dir(run_id) / CHECKPOINT_FILE
        info = _model_info(load_checkpoint(state_path), run_id) if state_path.exists() else {
            "image_size": image_size or model.config.image_size, "row_tau": DEFAULT_ROW_TAU}
    size = int(image_size or info["image_size"])
    items = ws.usable_images()
    dataset = EvalDataset.from_workspace(ws, eval_transform(size, _preprocess(model)), items,
                                         max_side=max(64, 2 * size))
    was_training = model.training
    pos, emb, probs = _infer(model, dataset, dev, batch_size, info["row_tau"], workers, progress)
    model.train(was_training)
    if len(pos) < len(items):
        log.warning("%d of %d images could not be read and have no prediction",
                    len(items) - len(pos), len(items))
    ids = np.array([items[i][0] for i in pos], dtype=np.int64)
    if neighbours > 0 and len(emb) > 1:
        near = knn_graph(torch.from_numpy(emb), neighbours).numpy()
        probs = [(p + p[near].sum(1)) / (1 + near.shape[1]) for p in probs]
    heads = {k: head_prediction(k, p) for k, p in zip(model.head_sizes, probs)}
    preds = Predictions(image_ids=ids, heads=heads, embeddings=emb.astype(np.float16))
    if save:
        save_predictions(ws.run_dir(run_id), preds)
    return preds


def predict_folder(workspace: Workspace | str | os.PathLike, folder: str | os.PathLike,
                   run_id: int | None = None, *, out_workspace: str | os.PathLike | None = None,
                   scan_progress: Progress | None = None,
                   **kwargs: Any) -> tuple[Workspace, int, Predictions]:
    """Predict a new image folder with a trained run.

    The folder is scanned into its own workspace (``out_workspace`` or the folder's default),
    a run is created there holding a copy of the trained checkpoint, and predictions are
    written to it. Returns ``(new workspace, new run id, predictions)``. ``scan_progress``
    follows the scan, ``progress`` (in ``kwargs``, as for :func:`predict`) the prediction.
    """
    src = as_workspace(workspace)
    run = src.resolve_run(run_id)
    ckpt = run.dir / CHECKPOINT_FILE
    if not ckpt.exists():
        raise FileNotFoundError(f"run {run.id} of {src.path} has no checkpoint to predict with")
    dst = Workspace.for_folder(folder, out_workspace)
    scan(folder, dst, progress=scan_progress)
    config = {**run.config, "source": {"workspace": str(src.path), "run": run.id}}
    new_id = dst.create_run(run.mode, config, heads=run.heads, main_head=run.main_head)
    # claimed with a heartbeat like a training: a killed prediction reads "interrupted"
    recorder = RunRecorder(dst, new_id, run.mode)
    recorder.claim()
    dst.update_run(new_id, status="running", message=f"predicting with run {run.id} of {src.path}")
    try:
        with open(ckpt, "rb") as fin, atomic_open(dst.run_dir(new_id) / CHECKPOINT_FILE) as fout:
            shutil.copyfileobj(fin, fout)
        preds = predict(dst, new_id, **kwargs)
    except BaseException as exc:
        dst.update_run(new_id, status="failed", message=str(exc) or type(exc).__name__)
        raise
    finally:
        recorder.release()
    dst.update_run(new_id, status="done",
                   message=f"predicted with run {run.id} of workspace {src.path}")
    return dst, new_id, preds


def embed_files(workspace: Workspace | str | os.PathLike, run_id: int | None,
                items: Sequence[str | os.PathLike | bytes], *, device: str | torch.device = "auto",
                batch_size: int = 64) -> tuple[np.ndarray, list[np.ndarray]]:
    """Embed images that are not in the catalog (file paths or encoded bytes).

    Returns:
        ``(embeddings float32 [n, D], [probabilities float32 [n, K] per head])``; a row whose
        image cannot be read is NaN.
    """
    dev = resolve_device(device)
    model, info = load_model(workspace, run_id, dev)
    sources = [s if isinstance(s, (bytes, bytearray)) else Path(s) for s in items]
    dataset = EvalDataset(sources, eval_transform(info["image_size"], _preprocess(model)))
    pos, emb, probs = _infer(model, dataset, dev, batch_size, info["row_tau"], workers=0)
    n = len(sources)
    out_emb = np.full((n, emb.shape[1]), np.nan, np.float32)
    out_emb[pos] = emb
    out_probs = []
    for k, p in zip(model.head_sizes, probs):
        full = np.full((n, k), np.nan, np.float32)
        full[pos] = p
        out_probs.append(full)
    return out_emb, out_probs
