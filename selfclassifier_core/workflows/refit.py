"""Refit: a new run that learns from what the person named, moved, confirmed and excluded.

:func:`refit` reads the labels of a finished run (:func:`~..curation.feedback.read_feedback`),
fixes the class of every label before training (:func:`~..curation.feedback.plan_refit`),
creates a new run of the same mode with those heads, starting from the earlier run's weights
(fast mode: its projection and heads on the same cached features; scratch and finetune: its
whole checkpoint), and trains it with the Self-Classifier loss on every usable image plus a
supervised term on the labelled ones. A refit's predictions are each image's probabilities
averaged with its :data:`~..training.config.PREDICT_NEIGHBOURS` nearest neighbours' (fast mode:
in the backbone's feature space; scratch and finetune: in the new run's embedding). When it
is done the new run's clusters carry the names (no carry-over guessing) and every image the
person checked keeps its label (:func:`~..curation.feedback.apply_refit_labels`). The earlier
run is not touched.

A refit is an ordinary run: it shows in ``runs``, can be cancelled, and a scratch or finetune
refit that stopped midway resumes with ``train --resume --run N`` (its targets are in its
directory); a fast refit starts again in seconds.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

from ..curation.feedback import (NAMED_WEIGHT, NAMED_WEIGHTS, NEIGHBOUR_WEIGHT, NEIGHBOURS,
                                 RefitPlan, plan_refit, read_feedback, read_plan, save_plan)
from ..curation.labels import Labels
from ..store.runfiles import ProgressFn
from ..store.workspace import Workspace, WorkspaceError, as_workspace
from ..training.config import config_class
from ..training.recipes import default_minutes
from .pipeline import TrainResult, train

log = logging.getLogger(__name__)

__all__ = ["RefitResult", "refit", "prepare_refit"]


@dataclass
class RefitResult:
    """What :func:`refit` did."""

    run_id: int                  # the new run
    from_run: int
    status: str                  # done | cancelled
    checked: int                 # images the person checked (full weight)
    named: int                   # unchecked images of named clusters (weak weight)
    labels: int                  # labels that got a class
    heads: list[int]
    changed: int | None          # images whose label differs from the earlier run's
    compared: int | None
    train: TrainResult

    def summary(self) -> str:
        text = (f"refit run {self.run_id} of run {self.from_run}: {self.status}; learned from "
                f"{self.checked} checked images and {self.named} more in named clusters, "
                f"{self.labels} labels on heads {self.heads}")
        if self.changed is not None:
            text += f"; {self.changed} of {self.compared} images changed label"
        return text


def prepare_refit(workspace: Workspace | str | os.PathLike, run_id: int | None = None, *,
                  head: int | None = None, named_weight: float | None = None,
                  neighbours: int = NEIGHBOURS, neighbour_weight: float = NEIGHBOUR_WEIGHT,
                  **options: Any) -> tuple[int, RefitPlan, dict[str, Any]]:
    """Plan a refit of ``run_id`` (default: the newest finished run) and create its run
    (status ``created``, targets and plan in its directory). Returns ``(new run id, plan,
    training options)``; the app's background job trains it, :func:`refit` does both.

    Raises ValueError when the labels teach nothing (no checked image and no named cluster) or
    an option is bad, before anything is created."""
    ws = as_workspace(workspace)
    source = ws.resolve_run(run_id)
    if source.status != "done":
        raise WorkspaceError(f"run {source.id} is {source.status}; only a finished run can be "
                             "refit")
    labels = Labels(ws, source.id, head)
    fb = read_feedback(labels)
    if fb.n_checked == 0 and fb.n_named == 0:
        raise ValueError(f"run {source.id} has nothing to learn from yet: name some clusters, "
                         "move or confirm some images first (`labels WS next` lists the "
                         "images worth checking)")
    if named_weight is None:
        named_weight = NAMED_WEIGHTS.get(source.mode, NAMED_WEIGHT)
    plan = plan_refit(fb, source.heads, source.dir, named_weight, neighbours, neighbour_weight)
    opts = refit_options(source.config, plan, options)
    cls = config_class(source.mode)
    config = cls.from_options({**opts, "mode": source.mode})
    new_id = ws.create_run(source.mode, config.to_dict(), heads=plan.heads,
                           main_head=plan.heads[0])
    save_plan(ws.run_dir(new_id), plan)
    log.info("refit of run %d -> run %d: %s", source.id, new_id, plan.summary())
    return new_id, plan, opts


def refit_options(source_config: dict[str, Any], plan: RefitPlan,
                  options: dict[str, Any]) -> dict[str, Any]:
    """The training options of a refit: the earlier run's (as it was asked for, so the recipe
    decides the rest again), its heads and start, and ``options`` over them (a budget: epochs,
    minutes or steps; a device, ...). A scratch or finetune refit without a budget gets the
    default time budget for the folder; a fast one the recipe's steps."""
    mode = source_config.get("mode") or "scratch"
    cls = config_class(mode)
    known = set(cls.field_names())
    opts = {k: v for k, v in source_config.items() if k in known and k != "mode"}
    for resolved in ("feature_cache", "n_images", "steps", "epochs", "minutes"):
        opts.pop(resolved, None)
    opts.update(heads=plan.heads, classes=plan.heads[0], refit_of=plan.feedback.run_id)
    budget = {k: options.get(k) for k in ("epochs", "minutes", "steps")}
    opts.update({k: v for k, v in options.items() if v is not None})
    if mode != "fast" and not any(v is not None for v in budget.values()):
        opts["minutes"] = default_minutes(len(plan.feedback.ids))
    return opts


def refit(workspace: Workspace | str | os.PathLike, run_id: int | None = None, *,
          head: int | None = None, named_weight: float | None = None,
          neighbours: int = NEIGHBOURS, neighbour_weight: float = NEIGHBOUR_WEIGHT,
          progress: ProgressFn | None = None, should_stop: Callable[[], bool] | None = None,
          **options: Any) -> RefitResult:
    """Train a new run from the labels of run ``run_id`` (default: the newest finished run).

    Args:
        workspace: the workspace, or its directory.
        run_id: the run whose labels teach (it stays as it is).
        head: its head whose labels are read (default: its main head).
        named_weight: how much an unchecked image of a named cluster counts (a checked one: 1;
            default: the run's mode's, :data:`~..curation.feedback.NAMED_WEIGHTS`).
        neighbours, neighbour_weight: a checked image lends its label to this many nearest
            unchecked images, which count this much
            (:func:`~..curation.feedback.plan_refit`).
        progress, should_stop: as for :func:`~.pipeline.train`.
        **options: training options over the earlier run's: ``epochs``, ``minutes``, ``steps``
            (fast mode), ``device``, ``supervised_weight`` ...

    Returns:
        A :class:`RefitResult` (the new run, what it learned from, how many images changed).
    """
    ws = as_workspace(workspace)
    new_id, plan, opts = prepare_refit(ws, run_id, head=head, named_weight=named_weight,
                                       neighbours=neighbours,
                                       neighbour_weight=neighbour_weight, **options)
    run = ws.get_run(new_id)
    result = train(None, ws, mode=run.mode, run_id=new_id, progress=progress,
                   should_stop=should_stop, **opts)
    record = read_plan(ws.run_dir(new_id)) or {}
    outcome = record.get("applied") or {}
    return RefitResult(new_id, plan.feedback.run_id, result.status, plan.targets.n_checked,
                       len(plan.targets) - plan.targets.n_checked, plan.n_labels, plan.heads,
                       outcome.get("changed"), outcome.get("compared"), result)
