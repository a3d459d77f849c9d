"""Pretrained modes through ``trainer.train``: fine-tune end to end from a weights file, and
the dispatch to fast mode."""
from __future__ import annotations

import pytest
import torch
import torchvision

from selfclassifier_core.training import scratch as trainer_mod
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.workflows.pipeline import train
from train_fixtures import FAST, make_folder

pytestmark = [pytest.mark.slow,  # trains models
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def weights_file(tmp_path):
    """A real-format torchvision resnet18 state dict (random weights: no download)."""
    torch.manual_seed(123)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def test_finetune_end_to_end_from_a_weights_file(tmp_path, weights_file, monkeypatch):
    captured = {}
    prepare = trainer_mod.Trainer.prepare

    def spy_prepare(self, resume_state=None):
        prepare(self, resume_state)
        captured["trainer"] = self
        captured["start"] = {k: v.detach().clone()
                             for k, v in self.model.backbone.state_dict().items()}

    monkeypatch.setattr(trainer_mod.Trainer, "prepare", spy_prepare)
    folder = make_folder(tmp_path / "imgs", n=16)
    res = train(folder, tmp_path / "ws", mode="finetune", pretrained=str(weights_file),
                backbone="resnet18", epochs=1, classes=2, batch_size=8, **FAST)

    run = res.workspace.get_run(res.run_id)
    assert res.status == "done" and run.status == "done" and run.mode == "finetune"
    preds = load_predictions(res.run_dir)
    assert sorted(preds.image_ids.tolist()) == sorted(i for i, _ in res.workspace.usable_images())
    assert res.stats and res.stats[0]["steps"] == 2

    tr = captured["trainer"]
    assert tr.cfg.small_input and tr.cfg.backbone_lr_scale == 0.1
    # the small-input stem replaces conv1 (3x3 instead of 7x7): reported, left at init
    report = tr.pretrained_report
    assert report.missing == ["conv1.weight"]
    assert report.ignored == ["fc.bias", "fc.weight"]
    file_state = torch.load(weights_file, weights_only=True)
    start = captured["start"]
    assert start["conv1.weight"].shape == (64, 3, 3, 3)
    loaded = [k for k in start if k != "conv1.weight"]
    assert report.loaded == len(loaded) == len(start) - 1
    differ = [k for k in loaded if not torch.equal(start[k], file_state[k])]
    assert not differ, differ

    # training moved the backbone, at a tenth of the head's learning rate
    end = tr.model.backbone.state_dict()
    assert not torch.equal(end["layer1.0.conv1.weight"], file_state["layer1.0.conv1.weight"])
    backbone_ids = {id(p) for p in tr.model.backbone.parameters()}
    lrs = {"backbone": set(), "head": set()}
    for g in tr.optimizer.param_groups:
        is_backbone = {id(p) in backbone_ids for p in g["params"]}
        assert len(is_backbone) == 1  # a group is all backbone or all head
        lrs["backbone" if is_backbone.pop() else "head"].add(g["lr"])
    (bb_lr,), (head_lr,) = lrs["backbone"], lrs["head"]
    assert head_lr > 0 and bb_lr == pytest.approx(0.1 * head_lr)


def test_finetune_rejects_weights_of_another_architecture(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    folder = make_folder(tmp_path / "imgs", n=8)
    with pytest.raises(ValueError, match="weights do not fit"):
        train(folder, tmp_path / "ws", mode="finetune", pretrained=str(path),
              backbone="resnet18", epochs=1, classes=2, batch_size=8, **FAST)


def test_pretrained_without_mode_dispatches_to_fast_mode(tmp_path, weights_file):
    folder = make_folder(tmp_path / "imgs", n=16)
    res = train(folder, tmp_path / "ws", pretrained=str(weights_file), backbone="resnet18",
                classes=2, batch_size=8, device="cpu", workers=0, image_size=32, views=2,
                steps=4, proj_hidden_dim=32, nn_k=2)
    run = res.workspace.get_run(res.run_id)
    assert res.status == "done" and run.status == "done" and run.mode == "fast"
    assert res.predictions_path is not None and res.predictions_path.exists()
    preds = load_predictions(res.run_dir)
    assert sorted(preds.image_ids.tolist()) == sorted(i for i, _ in res.workspace.usable_images())
    assert res.stats and res.stats[-1]["step"] == 4
