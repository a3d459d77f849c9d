"""The run pipeline: scan -> create the run -> the mode's loop -> predict -> status.

:func:`train` is the one entry for every mode (the CLI's ``train``, the Python API's
``sc.train`` and the background jobs all call it). It reads top to bottom as the recipe:

1. the options become the mode's validated config (:mod:`selfclassifier_core.training.config`),
   before anything is scanned, so a typo fails at once;
2. the folder is scanned (incrementally; rank 0 only under torchrun);
3. the run is created, or a run created earlier is used (``run_id`` of a run still ``created``:
   the background jobs create theirs first so the app can show it at once), or, with
   ``resume``, a scratch/finetune run continues from its checkpoint;
4. the mode's loop trains (:mod:`selfclassifier_core.training.scratch`, ``.fast``), writing
   through one :class:`~selfclassifier_core.store.runfiles.RunRecorder`;
5. every usable image is predicted (:mod:`selfclassifier_core.inference.predict`; fast mode
   predicts from its cached features) and the run's status is recorded.

A failure marks the run ``failed`` with the reason and is raised again. A finished run whose
continuation fails or is cancelled stays ``done`` with its message and predictions; how the
continuation ended is recorded in the run's ``continuation`` field
(:class:`~selfclassifier_core.store.workspace.RunInfo`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from ..catalog.scanner import scan
from ..curation.feedback import apply_refit_labels, read_plan
from ..curation.summary import run_summary
from ..engine import dist
from ..engine.device import resolve_device
from ..inference.predict import predict
from ..store.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint
from ..store.predictions import PREDICTIONS_FILE, save_predictions
from ..store.progress import Progress
from ..store.runfiles import ProgressFn, RunRecorder, busy_message, other_trainer
from ..store.workspace import (RunBusyError, RunInfo, Workspace, WorkspaceError, as_workspace,
                               continuation_text)
from ..training.config import RESUMABLE_MODES, TrainConfig, make_config, run_mode
from ..training.fast import fit_fast
from ..training.recipes import resolve_augment, resolve_config
from ..training.scratch import Trainer, TrainingError, Stopper

log = logging.getLogger(__name__)

_T = TypeVar("_T")

__all__ = ["TrainResult", "TrainingError", "as_workspace", "train"]


@dataclass
class TrainResult:
    workspace: Workspace
    run_id: int
    run_dir: Path
    stats: list[dict[str, Any]] = field(default_factory=list)
    predictions_path: Path | None = None
    status: str = "done"


def train(folder: str | os.PathLike | None, workspace: Workspace | str | os.PathLike | None = None,
          *, mode: str | None = None, resume: bool = False, run_id: int | None = None,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          scan_progress: Progress | None = None, **options: Any) -> TrainResult:
    """Learn classes on ``folder`` and predict every usable image.

    Args:
        folder: the image folder (scanned incrementally first; None to use the workspace's
            catalog as it is, e.g. with ``resume``).
        workspace: a :class:`Workspace` or its directory (default: the folder's workspace).
        mode: ``scratch`` | ``finetune`` | ``fast`` (default ``fast`` with ``pretrained``,
            else ``scratch``; for a run created earlier, its mode).
        resume: continue run ``run_id`` (default: the newest scratch or finetune run with a
            checkpoint) from its checkpoint; ``epochs``/``minutes`` then set the new total.
        run_id: with ``resume``, the run to continue; without, a run created earlier (status
            ``created``) to train.
        progress: called with every progress record (schema in
            :mod:`selfclassifier_core.store.runfiles`); ``progress.json`` gets it every 2 s.
        should_stop: polled every step; True cancels after a clean checkpoint.
        scan_progress: ``(done, total)`` of the folder's scan.
        **options: fields of the mode's config (:class:`~.training.config.TrainConfig`,
            :class:`~.training.config.FastConfig`): classes, backbone, epochs, minutes,
            batch_size, device, pretrained, lr, optimizer, seed, ...

    Returns:
        A :class:`TrainResult`; ``status`` is ``done`` or ``cancelled``.

    Raises:
        ValueError: a bad option (named in the message).
        TrainingError: the loss became NaN/inf (the message names the step).
    """
    dist.init_from_env()
    if resume:
        if mode == "fast":
            raise ValueError("--resume applies to scratch and finetune runs; fast mode re-runs "
                             "in seconds from its feature cache")
        return _resume(_open_workspace(folder, workspace), run_id, progress, should_stop,
                       options)
    handed: RunInfo | None = None
    if run_id is None:  # checked before anything touches the disk
        mode = run_mode(mode, options)
        config = make_config(mode, options)
        ws = _open_workspace(folder, workspace)
    else:
        ws = _open_workspace(folder, workspace)
        handed = ws.get_run(run_id)
        if handed.status != "created":
            raise ValueError(f"run {run_id} is {handed.status}; only a run that has not started "
                             "can be trained into (--resume continues a scratch or finetune run)")
        mode = mode or handed.mode
        try:
            config = make_config(mode, options)
        except ValueError as exc:
            _fail(ws, handed.id, mode, exc)
            raise
    if folder is not None:  # rank 0 scans, the others wait for it
        _main_first(lambda: log.info("%s", scan(folder, ws, progress=scan_progress).summary()),
                    "scan the image folder")
    if mode == "fast":
        if dist.world_size() > 1:  # the ranks share the embedding; rank 0 alone trains
            _shard_features(ws, config)
            if not dist.is_main():
                return TrainResult(ws, 0, ws.runs_dir, status="done")
        run_id = handed.id if handed is not None else ws.create_run("fast", config.to_dict())
        return _guarded(ws, run_id, mode, None, lambda rec: _run_fast(
            ws, run_id, config, rec, should_stop), progress)
    device = resolve_device(config.device)
    try:
        table = ws.image_table()
        sizes = list(zip(table["width"].tolist(), table["height"].tolist()))
        cfg = resolve_config(len(table), sizes, device, world=dist.world_size(), config=config)
    except ValueError as exc:
        if handed is not None:
            _fail(ws, handed.id, mode, exc)
        raise
    if handed is not None:
        run_id = handed.id
    else:  # rank 0 creates the run and tells the others its id
        run_id = _broadcast_int(_main_first(lambda: ws.create_run(
            mode, cfg.to_dict(), heads=cfg.heads, main_head=cfg.classes), "create the run"))
    return _guarded(ws, run_id, mode, None, lambda rec: _run_scratch(
        ws, run_id, cfg, None, rec, should_stop), progress)


# --------------------------------------------------------------------------- the modes
def _shard_features(ws: Workspace, config) -> None:
    """Fast mode under torchrun: every rank embeds its share of the images into the run's
    feature cache (:func:`~..training.features.extract_features` ``sharded``); rank 0 then
    trains the heads on it alone (it finds the cache current), the other ranks are done."""
    from ..training.features import extract_features
    from ..training.recipes import resolve_views

    device = resolve_device(config.device)
    cfg = resolve_views(config, ws, device)
    log.info("rank %d of %d: embedding its share of the images", dist.rank(), dist.world_size())
    extract_features(ws, cfg.backbone, cfg.pretrained, views=cfg.views,
                     image_size=cfg.image_size, seed=cfg.feature_seed, device=device,
                     batch_size=cfg.feature_batch_size, workers=cfg.workers, sharded=True)
    dist.barrier()



def _run_fast(ws: Workspace, run_id: int, config, recorder: RunRecorder,
              should_stop: Callable[[], bool] | None) -> TrainResult:
    recorder.start(config.to_dict())
    fit = fit_fast(ws, run_id, config, recorder, should_stop)
    if fit.predictions is not None:
        save_predictions(recorder.dir, fit.predictions)
    recorder.finish(fit.status, fit.message, **fit.final)
    if fit.status == "done":
        _after_done(ws, run_id)
    preds = recorder.dir / PREDICTIONS_FILE
    return TrainResult(ws, run_id, recorder.dir, recorder.stats(),
                       preds if preds.exists() else None,
                       "cancelled" if fit.status == "cancelled" else "done")


def _run_scratch(ws: Workspace, run_id: int, cfg: TrainConfig,
                 resume_state: dict[str, Any] | None, recorder: RunRecorder,
                 should_stop: Callable[[], bool] | None,
                 finished: RunInfo | None = None) -> TrainResult:
    """Train, then predict and mark the run done; a cancelled run is marked cancelled, or, when
    it continued the ``finished`` run, left done as that run was."""
    recorder.start(cfg.to_dict(), heads=cfg.heads, resume=resume_state is not None,
                   continuing=finished)
    if resume_state is not None:
        recorder.trim_stats(int(resume_state["step"]))
    trainer = Trainer(ws, run_id, cfg, recorder, should_stop)
    trainer.prepare(resume_state)
    deadline = None
    if cfg.minutes is not None:
        deadline = time.monotonic() + max(0.0, cfg.minutes * 60 - trainer.state.elapsed_s)
    if dist.is_main():
        log.info("run %d: %s, heads %s, batch %d, crops %d/%d ×%d local (augment: %s), "
                 "%s on %s", run_id, cfg.backbone, cfg.heads, cfg.batch_size, cfg.global_size,
                 cfg.local_size, cfg.n_local, trainer.augment,
                 f"{cfg.epochs} epochs" if cfg.epochs else f"{cfg.minutes} min", cfg.device)
    stats = trainer.fit(Stopper(recorder, should_stop, deadline))
    result = TrainResult(ws, run_id, recorder.dir, stats)
    if trainer.state.stop_reason == "cancelled":
        if finished is not None:
            _restore(recorder, finished, "cancelled")
        else:
            recorder.finish("cancelled", f"cancelled after {trainer.state.step} steps; "
                            "continue with --resume")
        result.status = "cancelled"
        return result
    if dist.is_main():
        recorder.final_progress("predicting")

        def predicting(done: int, total: int) -> None:
            recorder.progress({"status": "predicting", "phase": "predicting", "done": done,
                               "total": total}, force=done == total)

        predict(ws, run_id, model=trainer.model, device=trainer.device,
                batch_size=max(64, cfg.batch_size), image_size=cfg.global_size,
                progress=predicting,
                neighbours=cfg.prediction_neighbours)
        result.predictions_path = recorder.dir / PREDICTIONS_FILE
        recorder.finish("done", "stopped at the time budget"
                        if trainer.state.stop_reason == "time" else None)
        _after_done(ws, run_id)
    dist.barrier()
    return result


def _after_done(ws: Workspace, run_id: int) -> None:
    """A finished run (a fresh one or a resumed one): a refit gets the person's names and
    checks; every run's summary is computed once, so that it is remembered
    (:data:`~..curation.summary.MEMO`) and the first page that shows it does not read the
    predictions and the catalog for it (~0.4 s at a million images)."""
    if read_plan(ws.run_dir(run_id)) is not None:
        apply_refit_labels(ws, run_id)
    try:
        run_summary(ws, run_id)
    except (WorkspaceError, OSError, ValueError) as exc:  # shown in words where it is asked
        log.debug("run %d: summary not remembered (%s)", run_id, exc)


def _resume(ws: Workspace, run_id: int | None, progress: ProgressFn | None,
            should_stop: Callable[[], bool] | None, options: dict[str, Any]) -> TrainResult:
    """Continue a scratch or finetune run from its checkpoint (the same config; the budget,
    device, workers and augmentation may change)."""
    before = _find_resume_run(ws, run_id)
    state = load_checkpoint(before.dir / CHECKPOINT_FILE)
    saved = state["train_config"]
    cfg = TrainConfig.from_dict(saved)
    if cfg.mode not in RESUMABLE_MODES:
        raise ValueError(f"--resume: the checkpoint of run {before.id} is from a {cfg.mode}-mode "
                         "run, which is not resumed; start it again: its features are cached")
    dev = resolve_device(options.get("device") or "auto")
    if options.get("epochs") is not None or options.get("minutes") is not None:
        cfg.epochs, cfg.minutes = options.get("epochs"), options.get("minutes")
    cfg.device = str(dev)
    if options.get("workers") is not None:
        cfg.workers = options["workers"]
    if "augment" not in saved:
        cfg.augment = "cpu"  # runs from before the option had PIL views
    if options.get("augment") is not None:  # changes the views: no longer exact
        cfg.augment = resolve_augment(options["augment"], dev)
    finished = before if before.status == "done" else None
    return _guarded(ws, before.id, cfg.mode, finished, lambda rec: _run_scratch(
        ws, before.id, cfg, state, rec, should_stop, finished), progress)


def _guarded(ws: Workspace, run_id: int, mode: str, finished: RunInfo | None,
             body: Callable[[RunRecorder], TrainResult],
             progress: ProgressFn | None) -> TrainResult:
    """Run ``body`` with the run's recorder; on an exception record it (or restore the finished
    run it continued) and raise it again."""
    recorder = RunRecorder(ws, run_id, mode, progress, main=dist.is_main())
    try:
        return body(recorder)
    except RunBusyError:  # another live process trains the run: its record is not ours
        raise
    except BaseException as exc:
        if dist.is_main():
            if finished is None:
                _fail(ws, run_id, mode, exc, recorder)
            elif isinstance(exc, KeyboardInterrupt):
                _restore(recorder, finished, "cancelled")
            else:
                _restore(recorder, finished, "failed", _first_line(exc))
        raise


def _fail(ws: Workspace, run_id: int, mode: str, exc: BaseException,
          recorder: RunRecorder | None = None) -> None:
    status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "failed"
    message = _first_line(exc)
    log.error("run %s %s: %s", run_id, status, message)
    (recorder or RunRecorder(ws, run_id, mode, main=dist.is_main())).finish(status, message)


def _restore(recorder: RunRecorder, finished: RunInfo, status: str,
             reason: str | None = None) -> None:
    """The continuation of the ``finished`` run ended with ``status``: the run stays done as it
    was, with the continuation's end recorded (replacing an earlier one)."""
    log.warning("run %d: %s; it stays done with its earlier predictions", finished.id,
                continuation_text({"status": status, "reason": reason}))
    recorder.restore(finished, status, reason)


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------- helpers
def _open_workspace(folder: str | os.PathLike | None,
                    workspace: Workspace | str | os.PathLike | None) -> Workspace:
    """The run's workspace (created when new). Under torchrun rank 0 opens it first and the
    other ranks once it is there, so a new workspace is created by one process."""
    if isinstance(workspace, Workspace):
        return workspace
    opened = _main_first(lambda: _open_one(folder, workspace), "open the workspace")
    return opened if opened is not None else _open_one(folder, workspace)


def _open_one(folder: str | os.PathLike | None,
              workspace: str | os.PathLike | None) -> Workspace:
    if folder is None:
        if workspace is None:
            raise ValueError("give an image folder or a workspace")
        return Workspace.open(workspace)
    return Workspace.for_folder(folder, workspace)


def _find_resume_run(ws: Workspace, run_id: int | None) -> RunInfo:
    """The run ``--resume`` continues: ``run_id``, else the newest scratch or finetune run with a
    checkpoint, whatever its status (an ``interrupted`` one included). Fast runs are never
    resumed, nor a run another live process trains (:class:`RunBusyError`, naming it; the
    recorder's claim makes that check atomic). Raises before anything is changed."""
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
    other = other_trainer(run.dir)
    if other is not None:
        raise RunBusyError(f"--resume: {busy_message(run.id, other)}")
    if not (run.dir / CHECKPOINT_FILE).exists():
        raise CheckpointError(f"--resume: run {run.id} has no checkpoint ({run.dir / CHECKPOINT_FILE}"
                              " missing); start a new run without --resume")
    return run


def _main_first(work: Callable[[], _T], what: str) -> _T | None:
    """``work()`` on rank 0 while the other ranks wait (they get None); in one process, just
    ``work()``. A failure on rank 0 is raised there and stops the other ranks too, with a
    message naming ``what``, instead of leaving them at a barrier until its timeout."""
    result, failure = None, None
    if dist.is_main():
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - raised again below, after the others know
            failure = exc
    if dist.is_dist() and not _broadcast_int(0 if failure is not None else 1) \
            and not dist.is_main():
        raise WorkspaceError(f"rank 0 could not {what}; its log says why")
    if failure is not None:
        raise failure
    return result


def _broadcast_int(value: int | None) -> int:
    if not dist.is_dist():
        return int(value)  # type: ignore[arg-type]
    t = torch.tensor([int(value) if value is not None else -1])
    torch.distributed.broadcast(t, src=0)
    return int(t)
