"""Trainer with ``augment="device"``: views made by GpuMultiCrop from uniform uint8 images
(run here on the CPU), neighbour positives, exact resume, and the option's validation."""
from __future__ import annotations

import json

import pytest
import torch

from selfclassifier_core.engine import gpu_augment
from selfclassifier_core.training import scratch as trainer_mod
from selfclassifier_core.store.checkpoint import load_checkpoint
from selfclassifier_core.catalog.datasets import MultiCropDataset, _load
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.training.recipes import resolve_augment, resolve_config
from selfclassifier_core.workflows.pipeline import train
from selfclassifier_core.engine.transforms import GLOBAL_SCALE, LOCAL_SCALE
from train_fixtures import FAST, assert_same_weights, make_folder, train_one_epoch_then_cancel

DEVICE_AUG = dict(FAST, augment="device")

pytestmark = [pytest.mark.slow,  # trains models
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def spy(monkeypatch):
    """Records every GpuMultiCrop call, the trainers built and the neighbour maps set."""
    rec = {"calls": [], "trainers": [], "neighbors": []}
    forward = gpu_augment.GpuMultiCrop.forward
    prepare = trainer_mod.Trainer.prepare
    set_neighbors = MultiCropDataset.set_neighbors

    def spy_forward(self, images, generator=None, global1_images=None):
        rec["calls"].append((images.clone(), None if global1_images is None
                             else global1_images.clone()))
        return forward(self, images, generator=generator, global1_images=global1_images)

    def spy_prepare(self, resume_state=None):
        prepare(self, resume_state)
        rec["trainers"].append(self)

    def spy_set_neighbors(self, neighbors):
        set_neighbors(self, neighbors)
        rec["neighbors"].append(dict(self.neighbors))

    monkeypatch.setattr(gpu_augment.GpuMultiCrop, "forward", spy_forward)
    monkeypatch.setattr(trainer_mod.Trainer, "prepare", spy_prepare)
    monkeypatch.setattr(MultiCropDataset, "set_neighbors", spy_set_neighbors)
    return rec


def test_device_augment_trains_end_to_end_with_neighbour_sources(tmp_path, spy):
    folder = make_folder(tmp_path / "imgs", n=16)
    seen = []
    res = train(folder, tmp_path / "ws", classes=2, epochs=2, batch_size=8, nn_positives=True,
                progress=seen.append, **DEVICE_AUG)
    ws = res.workspace
    assert ws.get_run(res.run_id).status == "done"
    usable = dict(ws.usable_images())
    preds = load_predictions(res.run_dir)
    assert sorted(preds.image_ids.tolist()) == sorted(usable)
    assert all(s["augment"] == "device" and s["steps"] == 2 for s in res.stats)
    assert [r for r in seen if r.get("phase") == "training"][-1]["augment"] == "device"
    assert json.loads((res.run_dir / "config.json").read_text())["augment"] == "device"

    (tr,) = spy["trainers"]
    # the PIL transform is not used: workers only decode and resize to a uint8 square
    assert isinstance(tr.dataset.transform, gpu_augment.UniformImage)
    side = gpu_augment.source_size_for(tr.cfg.global_size)
    assert tr.dataset.transform.size == side
    # same crop scales as the PIL path
    assert tr.gpu_aug.global_scale == GLOBAL_SCALE and tr.gpu_aug.local_scale == LOCAL_SCALE
    assert len(spy["calls"]) == 4  # one per step
    for images, _ in spy["calls"]:
        assert images.dtype == torch.uint8 and tuple(images.shape) == (8, 3, side, side)

    # epoch 1: no neighbours yet, so no separate source; epoch 2: global view 1 is cut from
    # the neighbour's image, every other view from the image itself
    assert all(g1 is None for _, g1 in spy["calls"][:2])
    (nbrs,) = spy["neighbors"]
    assert nbrs and any(a != b for a, b in nbrs.items())
    uniform = {i: tr.dataset.transform(_load(ws.root / rel, tr.dataset.max_side))[0]
               for i, rel in usable.items()}

    def which(img):
        (hit,) = [i for i, u in uniform.items() if torch.equal(u, img)]
        return hit

    swapped = 0
    for images, g1 in spy["calls"][2:]:
        assert g1 is not None and g1.dtype == torch.uint8 and g1.shape == images.shape
        for row in range(images.shape[0]):
            own = which(images[row])
            assert which(g1[row]) == nbrs.get(own, own)
            swapped += nbrs.get(own, own) != own
    assert swapped > 0


def test_device_augment_resume_gives_identical_weights(tmp_path):
    opts = dict(classes=2, epochs=2, batch_size=8, seed=5, nn_positives=True, **DEVICE_AUG)
    folder = make_folder(tmp_path / "imgs", n=16)
    straight = train(folder, tmp_path / "ws1", **opts)

    first = train_one_epoch_then_cancel(folder, tmp_path / "ws2", **opts)
    assert first.status == "cancelled"
    assert load_checkpoint(first.run_dir / "checkpoint.pt")["epoch"] == 1
    resumed = train(None, first.workspace, resume=True, run_id=first.run_id, device="cpu")
    assert resumed.status == "done" and [s["augment"] for s in resumed.stats] == ["device"]
    assert_same_weights(straight.run_dir, resumed.run_dir)


def test_resolve_augment_and_bad_values(tmp_path):
    assert resolve_augment("auto", "cpu") == "cpu"
    assert resolve_augment(None, torch.device("cpu")) == "cpu"
    assert resolve_augment("auto", "cuda") == "device"
    assert resolve_augment("auto", "mps") == "cpu"
    assert resolve_augment("device", "cpu") == "device"
    assert resolve_augment("cpu", "cuda") == "cpu"
    with pytest.raises(ValueError, match="'gpu'"):
        resolve_augment("gpu", "cpu")
    # the tiny-crop scratch recipe on a CPU makes its views on the device; other CPU runs use PIL
    cfg = resolve_config(40, [(16, 16)] * 40, torch.device("cpu"), classes=2)
    assert cfg.augment == "device"
    cfg = resolve_config(40, [(16, 16)] * 40, torch.device("cpu"), classes=2, augment="cpu")
    assert cfg.augment == "cpu"
    cfg = resolve_config(40, [(100, 100)] * 40, torch.device("cpu"), classes=2)
    assert cfg.augment == "cpu"
    with pytest.raises(ValueError, match="--augment .*'pil'"):
        resolve_config(40, [], torch.device("cpu"), augment="pil")
    # checked before the folder is scanned
    with pytest.raises(ValueError, match="--augment"):
        train(tmp_path / "missing", tmp_path / "ws", augment="gpu")
