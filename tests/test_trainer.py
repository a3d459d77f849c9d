"""Trainer: end to end on tiny folders, resume equivalence, NaN, time budget, cancellation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from selfclassifier_core.training import scratch as trainer_mod
from selfclassifier_core.store.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from selfclassifier_core.engine.model import ModelConfig, SelfClassifier
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.training.recipes import resolve_config
from selfclassifier_core.workflows.pipeline import TrainingError, train
from selfclassifier_core.store.workspace import Workspace
from train_fixtures import FAST, assert_same_weights, make_folder, train_one_epoch_then_cancel

pytestmark = [pytest.mark.slow,  # trains models
              pytest.mark.usefixtures("one_torch_thread")]


def test_resolve_config_defaults_and_errors():
    cpu = torch.device("cpu")
    cfg = resolve_config(100, [(28, 28)] * 100, cpu, classes=5)
    assert (cfg.global_size, cfg.local_size, cfg.small_input) == (28, 12, True)
    assert cfg.heads == [5, 10, 20] and cfg.batch_size == 100
    assert cfg.epochs >= 10 and cfg.n_local == 2
    # tiny crops (≤ 32 px) from scratch on a CPU: the small convnet unless a backbone is asked for
    assert cfg.backbone == "convnet_small"
    assert resolve_config(100, [(28, 28)] * 100, cpu, backbone="resnet18").backbone == "resnet18"
    assert resolve_config(100, [(28, 28)] * 100, cpu, mode="finetune",
                          pretrained="DEFAULT").backbone == "resnet18"
    assert resolve_config(100, [(28, 28)] * 100, torch.device("cuda")).backbone == "resnet18"
    assert (cfg.optimizer, cfg.augment) == ("adamw", "device")
    assert (tuple(cfg.global_scale), tuple(cfg.local_scale)) == ((0.5, 1.0), (0.2, 0.5))
    cfg = resolve_config(100, [(48, 48)] * 100, cpu, global_size=48)  # 48-px crops: as before
    assert (cfg.backbone, cfg.optimizer, cfg.augment) == ("resnet18", "lars", "cpu")
    assert (tuple(cfg.global_scale), tuple(cfg.local_scale)) == ((0.25, 1.0), (0.05, 0.25))
    cfg = resolve_config(100, [(28, 28)] * 100, cpu, optimizer="lars", augment="cpu",
                         global_scale=(0.3, 0.9))
    assert (cfg.optimizer, cfg.augment, cfg.global_scale) == ("lars", "cpu", (0.3, 0.9))
    with pytest.raises(ValueError, match="global_scale"):
        resolve_config(100, [], cpu, global_scale=(0.5, 1.5))
    cfg = resolve_config(5000, [(640, 480)] * 10, cpu, classes=10, batch_size=32)
    # photos: 224/96 crops on a GPU, capped at 128 px on a CPU unless asked for
    assert cfg.heads == [10, 20] and (cfg.global_size, cfg.local_size) == (128, 55)
    assert not cfg.small_input
    cfg = resolve_config(5000, [(640, 480)] * 10, torch.device("cuda"), classes=10)
    assert (cfg.global_size, cfg.local_size) == (224, 96)
    cfg = resolve_config(5000, [(640, 480)] * 10, cpu, classes=10, global_size=224)
    assert (cfg.global_size, cfg.local_size) == (224, 96)
    # 64-px icons: the small-image stem at 32 px on a CPU, at 64 px on a GPU
    cfg = resolve_config(300, [(64, 64)] * 300, cpu, classes=10)
    assert (cfg.global_size, cfg.small_input) == (32, True)
    cfg = resolve_config(300, [(64, 64)] * 300, torch.device("cuda"), classes=10)
    assert (cfg.global_size, cfg.small_input) == (64, True)
    with pytest.raises(ValueError, match="--classes"):
        resolve_config(100, [], cpu, classes=0)
    with pytest.raises(ValueError, match="--batch-size 8 is smaller than --classes 10"):
        resolve_config(100, [], cpu, classes=10, batch_size=8)
    with pytest.raises(ValueError, match="optimizer"):
        resolve_config(100, [], cpu, optimizer="sgdx")
    with pytest.raises(ValueError, match="unknown training option"):
        resolve_config(100, [], cpu, colour="red")
    with pytest.raises(ValueError, match="at least 2"):
        resolve_config(1, [], cpu)


def test_end_to_end_predictions_stats_and_csv(tmp_path):
    folder = make_folder(tmp_path / "imgs")
    seen = []
    res = train(folder, tmp_path / "ws", classes=2, epochs=2, batch_size=8,
                progress=seen.append, **FAST)
    ws = res.workspace
    run = ws.get_run(res.run_id)
    assert run.status == "done" and run.mode == "scratch" and run.heads == [2, 4, 8]
    usable = ws.usable_images()
    assert len(usable) == 24  # the broken file is not usable
    preds = load_predictions(res.run_dir)
    assert sorted(preds.image_ids.tolist()) == sorted(i for i, _ in usable)
    assert preds.embeddings.shape == (24, 128) and preds.embeddings.dtype == np.float16
    for k, h in preds.heads.items():
        assert h.cluster.min() >= 0 and h.cluster.max() < k
        assert np.all((h.margin >= 0) & (h.margin <= h.confidence + 1e-6))
    lines = (res.run_dir / "stats.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2] == [s["epoch"] for s in res.stats]
    assert all(json.loads(x)["steps"] == 3 for x in lines)
    training = [r for r in seen if r.get("phase") == "training"]
    assert training and {"epoch", "step", "loss", "images_per_s", "eta_s",
                         "classes_in_use"} <= set(training[-1])
    predicting = [(r["done"], r["total"]) for r in seen if r.get("phase") == "predicting"]
    assert predicting[0] == (0, 24) and predicting[-1] == (24, 24)   # after the training
    prog = json.loads((res.run_dir / "progress.json").read_text())
    assert prog["status"] == "done"
    ckpt = load_checkpoint(res.run_dir / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["train_config"]["classes"] == 2
    assert {"python", "numpy", "torch", "cuda"} <= set(ckpt["rng"])

    from selfclassifier_core.curation.export import export_csv

    out = tmp_path / "labels.csv"
    export_csv(ws, out)
    import pandas as pd

    df = pd.read_csv(out)
    cols = [c for c in df.columns if c != "edited"]
    assert cols == ["path", "label", "cluster", "confidence", "margin", "head"]
    assert len(df) == 24 and set(df["head"]) == {2}


def test_resume_gives_identical_weights(tmp_path):
    opts = dict(classes=2, epochs=2, batch_size=8, seed=3, nn_positives=True, **FAST)
    folder = make_folder(tmp_path / "imgs")
    straight = train(folder, tmp_path / "ws1", **opts)

    first = train_one_epoch_then_cancel(folder, tmp_path / "ws2", **opts)
    assert first.status == "cancelled"
    assert first.workspace.get_run(first.run_id).status == "cancelled"
    assert load_checkpoint(first.run_dir / "checkpoint.pt")["epoch"] == 1
    resumed = train(None, first.workspace, resume=True, run_id=first.run_id, device="cpu")
    assert resumed.status == "done" and resumed.run_id == first.run_id
    assert_same_weights(straight.run_dir, resumed.run_dir)
    qa = load_checkpoint(straight.run_dir / "checkpoint.pt")["queue"]
    qb = load_checkpoint(resumed.run_dir / "checkpoint.pt")["queue"]
    assert torch.equal(qa["ids"], qb["ids"]) and int((qa["ids"] >= 0).sum()) == 12  # filled


def test_resume_without_checkpoint_is_an_error(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=8)
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    with pytest.raises(CheckpointError, match="no run with a checkpoint"):
        train(None, ws, resume=True)
    run_id = ws.create_run("scratch", {})
    with pytest.raises(CheckpointError, match=f"run {run_id} has no checkpoint"):
        train(None, ws, resume=True, run_id=run_id)


def _finished_fast_run(ws: Workspace) -> int:
    """A done fast-mode run with a checkpoint shaped like fastmode's: its ``train_config`` lacks
    ``proj_hidden_dim``, so a scratch model rebuilt from it does not fit the saved weights."""
    heads = [2, 4, 8]
    model = SelfClassifier(ModelConfig(backbone="convnet_small", image_size=8, small_input=True,
                                       proj_hidden_dim=64, heads=heads))
    run_id = ws.create_run("fast", {"classes": 2}, heads=heads, main_head=2)
    save_checkpoint(ws.run_dir(run_id) / "checkpoint.pt", {
        **model.checkpoint_dict(), "mode": "fast",
        "train_config": {"mode": "fast", "backbone": "convnet_small", "classes": 2,
                         "heads": heads, "global_size": 8, "batch_size": 8}})
    ws.update_run(run_id, status="done")
    return run_id


def test_resume_skips_fast_runs_and_leaves_them_alone(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=16)
    first = train(folder, tmp_path / "ws", classes=2, epochs=1, batch_size=8, **FAST)
    ws = first.workspace
    fast_id = _finished_fast_run(ws)               # the newest run with a checkpoint
    before = ws.get_run(fast_id)
    ckpt = (before.dir / "checkpoint.pt").read_bytes()
    with pytest.raises(ValueError, match=f"run {fast_id} is a fast-mode run; fast mode is not "
                                         "resumed, start it again: its features are cached"):
        train(None, ws, resume=True, run_id=fast_id, device="cpu")
    resumed = train(None, ws, resume=True, device="cpu")   # picks the scratch run
    assert resumed.run_id == first.run_id and resumed.status == "done"
    assert ws.get_run(fast_id) == before
    assert (before.dir / "checkpoint.pt").read_bytes() == ckpt
    # no scratch or finetune run to continue: one error that says why
    ws2 = Workspace.for_folder(folder, tmp_path / "ws2")
    _finished_fast_run(ws2)
    with pytest.raises(CheckpointError, match="no run with a checkpoint .*fast-mode runs are not "
                                              "resumed"):
        train(None, ws2, resume=True)


def test_failed_resume_leaves_a_finished_run_done(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "imgs", n=16)
    first = train(folder, tmp_path / "ws", classes=2, epochs=1, batch_size=8, **FAST)
    ws = first.workspace
    before = ws.get_run(first.run_id)
    config = (first.run_dir / "config.json").read_text()

    def boom(self, epoch, stopper):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(trainer_mod.Trainer, "train_one_epoch", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(None, ws, resume=True, epochs=2, device="cpu")
    after = ws.get_run(first.run_id)               # done, same finish time and config
    assert (after.status, after.finished, after.config) == ("done", before.finished, before.config)
    assert after.message == before.message and after.continuation["status"] == "failed"
    assert after.continuation["reason"] == "disk on fire"
    assert after.summary == "continuing it failed (disk on fire)"
    assert (first.run_dir / "config.json").read_text() == config
    assert json.loads((first.run_dir / "progress.json").read_text())["status"] == "done"
    assert load_predictions(first.run_dir).image_ids.size == 16


def test_cancelled_continuation_leaves_a_finished_run_done(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=16)
    first = train(folder, tmp_path / "ws", classes=2, epochs=1, batch_size=8, **FAST)
    ws = first.workspace
    before = ws.get_run(first.run_id)
    preds = load_predictions(first.run_dir)
    res = train(None, ws, resume=True, run_id=first.run_id, epochs=3, device="cpu",
                should_stop=lambda: True)
    assert res.status == "cancelled"
    run = ws.get_run(first.run_id)
    assert run.status == "done" and run.finished == before.finished
    assert run.message == before.message and run.config == before.config
    assert run.continuation["status"] == "cancelled" and "cancelled" in run.summary
    assert json.loads((first.run_dir / "progress.json").read_text())["status"] == "done"
    assert np.array_equal(load_predictions(first.run_dir).image_ids, preds.image_ids)
    train(None, ws, resume=True, run_id=first.run_id, epochs=3, device="cpu",
          should_stop=lambda: True)                  # cancelled again: said once, not twice
    again = ws.get_run(first.run_id)
    assert again.summary == run.summary and again.continuation["at"] >= run.continuation["at"]
    done = train(None, ws, resume=True, run_id=first.run_id, epochs=2, device="cpu")
    after = ws.get_run(first.run_id)              # nothing left about the continuations
    assert done.status == "done" and after.continuation is None and after.summary is None
    assert load_checkpoint(first.run_dir / "checkpoint.pt")["epoch"] == 2


def test_nan_loss_names_the_step(tmp_path, monkeypatch):
    real = trainer_mod.SelfClassifierLoss

    class NanOnSecondStep(real):
        calls = 0

        def forward(self, logits, n_global=2):
            NanOnSecondStep.calls += 1
            loss = super().forward(logits, n_global)
            return loss * float("nan") if NanOnSecondStep.calls == 2 else loss

    monkeypatch.setattr(trainer_mod, "SelfClassifierLoss", NanOnSecondStep)
    folder = make_folder(tmp_path / "imgs", n=16)
    with pytest.raises(TrainingError, match=r"loss became nan at step 2 "):
        train(folder, tmp_path / "ws", classes=2, epochs=1, batch_size=8, **FAST)
    ws = Workspace.open(tmp_path / "ws")
    run = ws.list_runs()[-1]
    assert run.status == "failed" and "step 2" in run.message


def test_minutes_budget_stops_and_predicts(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=16)
    import time

    t0 = time.monotonic()
    res = train(folder, tmp_path / "ws", classes=2, minutes=0.03, batch_size=8, **FAST)
    assert time.monotonic() - t0 < 30
    run = res.workspace.get_run(res.run_id)
    assert run.status == "done" and "time budget" in run.message
    assert len(load_predictions(res.run_dir).image_ids) == 16
    ckpt = load_checkpoint(res.run_dir / "checkpoint.pt")
    assert ckpt["train_config"]["epochs"] is None and ckpt["step"] >= 1


def test_cancel_file_cancels_then_resume_finishes(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=16)
    ws = Workspace.for_folder(folder, tmp_path / "ws")

    def progress(info):
        ws.runs_dir.joinpath("1", "CANCEL").touch()

    res = train(folder, ws, classes=2, epochs=3, batch_size=8, progress=progress, **FAST)
    assert res.status == "cancelled" and res.predictions_path is None
    run = ws.get_run(res.run_id)
    assert run.status == "cancelled" and "--resume" in run.message
    ckpt = load_checkpoint(res.run_dir / "checkpoint.pt")
    assert ckpt["partial"] and ckpt["step"] == 1 and ckpt["epoch"] == 0
    done = train(None, ws, resume=True, device="cpu")
    assert done.run_id == res.run_id and ws.get_run(res.run_id).status == "done"
    assert load_checkpoint(res.run_dir / "checkpoint.pt")["epoch"] == 3


def test_separates_dark_from_bright(tmp_path):
    folder = make_folder(tmp_path / "imgs", n=32)
    res = train(folder, tmp_path / "ws", classes=2, epochs=4, batch_size=16, seed=0,
                optimizer="adamw", lr=2e-3, **FAST)
    preds = load_predictions(res.run_dir)
    paths = dict(res.workspace.usable_images())
    bright = np.array([paths[int(i)].startswith("bright") for i in preds.image_ids])
    cluster = preds.head(2).cluster
    # purity of the 2-class head: each cluster's majority kind
    purity = sum(max(np.sum(bright[cluster == c]), np.sum(~bright[cluster == c]))
                 for c in np.unique(cluster)) / len(cluster)
    assert len(np.unique(cluster)) == 2
    assert purity >= 0.9, purity


def test_finetune_gives_backbone_lower_lr():
    from selfclassifier_core.engine.schedules import set_lr
    from selfclassifier_core.training.scratch import build_model, build_optimizer

    cfg = resolve_config(40, [(16, 16)] * 40, torch.device("cpu"), classes=2, mode="finetune",
                         pretrained="x.pt", proj_hidden_dim=16)
    assert cfg.backbone_lr_scale == 0.1
    opt = build_optimizer(build_model(cfg), cfg)
    set_lr(opt, 1.0)
    lrs = {(g["lr"], g["weight_decay"] == 0) for g in opt.param_groups}
    assert lrs == {(0.1, True), (0.1, False), (1.0, True), (1.0, False)}
    with pytest.raises(ValueError, match="finetune' needs --pretrained"):
        train(None, None, mode="finetune")
