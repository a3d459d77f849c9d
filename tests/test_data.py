"""Datasets (skip unreadable images, deterministic views), neighbour queue, checkpoints."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from selfclassifier_core.store import checkpoint as ckpt
from selfclassifier_core.catalog.datasets import (EvalDataset, MultiCropDataset, collate_skip_none,
                                      make_loader)
from selfclassifier_core.engine.gpu_augment import UniformImage
from selfclassifier_core.engine.queue import NeighborQueue, queue_size_for
from selfclassifier_core.training.scratch import Trainer
from selfclassifier_core.engine.transforms import MultiCropTransform, eval_transform
from selfclassifier_core.store.workspace import Workspace


def make_workspace(tmp_path, n=6, size=12):
    """A folder of ``n`` images and a workspace whose catalog lists them (inserted directly)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            folder / f"im{i}.png")
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    with ws.transaction() as conn:
        for i in range(n):
            conn.execute("INSERT INTO images (path, width, height, status) VALUES (?,?,?,'ok')",
                         (f"im{i}.png", size, size))
    return folder, ws


def test_dataset_returns_views_and_ids(tmp_path):
    _, ws = make_workspace(tmp_path)
    ds = MultiCropDataset(ws, MultiCropTransform(16, 8, 2), seed=1)
    views, image_id = ds[0]
    assert image_id == ws.usable_images()[0][0]
    assert [tuple(v.shape) for v in views] == [(3, 16, 16)] * 2 + [(3, 8, 8)] * 2


def test_views_depend_on_seed_epoch_index_only(tmp_path):
    _, ws = make_workspace(tmp_path)
    t = MultiCropTransform(16, 8, 1)
    a, b = MultiCropDataset(ws, t, seed=3), MultiCropDataset(ws, t, seed=3)
    torch.manual_seed(123)  # the global generator must not matter
    va = a[2][0]
    torch.manual_seed(999)
    vb = b[2][0]
    assert all(torch.equal(x, y) for x, y in zip(va, vb))
    b.set_epoch(1)
    assert not torch.equal(va[0], b[2][0][0])
    # the global generator is left as it was
    torch.manual_seed(7)
    expected = torch.rand(1)
    torch.manual_seed(7)
    a[0]
    assert torch.equal(torch.rand(1), expected)


def test_deleted_image_is_skipped_with_warning(tmp_path, caplog):
    folder, ws = make_workspace(tmp_path, n=6)
    (folder / "im2.png").unlink()
    (folder / "im4.png").write_bytes(b"not an image any more")
    ds = MultiCropDataset(ws, MultiCropTransform(16, 8, 0))
    loader = make_loader(ds, batch_size=6, shuffle=False, drop_last=False, workers=0)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == 1
    views, ids = batches[0]
    kept = [i for i, (_, rel) in zip(range(6), ws.usable_images()) if rel not in
            ("im2.png", "im4.png")]
    assert ids.tolist() == [ws.usable_images()[i][0] for i in kept]
    assert views[0].shape == (4, 3, 16, 16)
    assert "im2.png" in caplog.text and "im4.png" in caplog.text
    assert collate_skip_none([None, None]) is None


def test_neighbor_view_comes_from_neighbor_image(tmp_path):
    folder, ws = make_workspace(tmp_path, n=3)
    Image.new("RGB", (12, 12), (255, 255, 255)).save(folder / "im1.png")
    t = MultiCropTransform(8, 4, 0, cj_prob=0, gray_prob=0, blur_probs=(0, 0, 0), solarize_prob=0)
    ds = MultiCropDataset(ws, t)
    ids = [i for i, _ in ws.usable_images()]
    ds.set_neighbors({ids[0]: ids[1]})
    views, _ = ds[0]
    white = eval_transform(8)(Image.new("RGB", (8, 8), (255, 255, 255)))
    assert torch.allclose(views[0], white, atol=1e-3)       # view 1: the neighbour (white)
    assert not torch.allclose(views[1], white, atol=0.5)    # view 2: the image itself (noise)


def test_uniform_image_items_carry_each_image_once(tmp_path):
    """Device augmentation: an item holds its image once; only in an epoch with neighbours
    does it also hold the source of global view 1, and the trainer cuts global view 1 from it."""
    folder, ws = make_workspace(tmp_path, n=4)
    Image.new("RGB", (12, 12), (255, 255, 255)).save(folder / "im1.png")
    tf = UniformImage(12)
    ds = MultiCropDataset(ws, tf)
    ids = [i for i, _ in ws.usable_images()]
    own = [tf(Image.open(folder / f"im{i}.png"))[0] for i in range(4)]

    views, image_id = ds[0]
    assert image_id == ids[0] and len(views) == 1 and torch.equal(views[0], own[0])
    loader = make_loader(ds, 4, shuffle=False, drop_last=True, workers=0)
    (images,), batch_ids = next(iter(loader))  # one uint8 batch, no second copy
    assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 3, 12, 12)
    assert batch_ids.tolist() == ids and all(torch.equal(images[i], own[i]) for i in range(4))

    ds.set_neighbors({ids[0]: ids[1]})  # image 0's positive is the white image; 1-3 have none
    views, _ = ds[0]
    assert len(views) == 2 and torch.equal(views[0], own[1]) and torch.equal(views[1], own[0])
    views, _ = ds[2]  # no neighbour: its own image, so the batch stacks
    assert len(views) == 2 and torch.equal(views[0], own[2]) and torch.equal(views[1], own[2])
    (src1, images), _ = next(iter(loader))
    assert torch.equal(src1[0], own[1]) and torch.equal(src1[1:], images[1:])
    assert torch.equal(images, torch.stack(own))

    # what the trainer hands to GpuMultiCrop for each batch layout
    calls = []

    def gpu_aug(images, generator=None, global1_images=None):
        calls.append((images, global1_images))
        return [images]

    stub = SimpleNamespace(device=torch.device("cpu"), cfg=SimpleNamespace(seed=0),
                           gpu_aug=gpu_aug)
    Trainer._device_views(stub, [images], 0, 0)
    Trainer._device_views(stub, [src1, images], 1, 0)
    assert calls[0][0] is images and calls[0][1] is None
    assert calls[1][0] is images and calls[1][1] is src1


def test_eval_dataset_paths_and_bytes(tmp_path):
    folder, ws = make_workspace(tmp_path, n=2)
    data = (folder / "im0.png").read_bytes()
    ds = EvalDataset([folder / "im1.png", data, b"garbage"], eval_transform(16))
    assert ds[0][0].shape == (3, 16, 16) and ds[1][1] == 1
    assert ds[2] is None
    assert len(EvalDataset.from_workspace(ws, eval_transform(16))) == 2


def test_queue_fills_and_excludes_self():
    q = NeighborQueue(dim=2, size=4)
    assert q.filled == 0 and q.neighbor_map() == {}
    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]])
    ids = torch.tensor([10, 11, 12, 13, 14])
    q.enqueue(emb[:3], ids[:3])
    assert q.filled == 3
    q.enqueue(emb[3:], ids[3:])           # wraps around: 10 is overwritten by 14
    assert q.filled == 4 and sorted(q.ids.tolist()) == [11, 12, 13, 14]
    # nearest other image, never the image itself
    assert q.nearest(emb[1:2], ids[1:2]).tolist() == [13]
    nn = q.nearest(torch.tensor([[0.9, 0.1], [0.0, 1.0]]), torch.tensor([11, 12]))
    assert nn.tolist() == [13, 13]
    m = q.neighbor_map()
    assert m[12] == 13 and m[13] == 12 and all(k != v for k, v in m.items())
    # re-queueing an image replaces its old entry
    q.enqueue(torch.tensor([[0.0, -1.0]]), torch.tensor([12]))
    assert q.ids.tolist().count(12) == 1
    # buffers travel in the state dict (checkpoints)
    state = q.state_dict()
    assert set(state) == {"embeddings", "ids", "ptr"}
    q2 = NeighborQueue(2, 4)
    q2.load_state_dict(state)
    assert torch.equal(q2.ids, q.ids)


def test_queue_alone_in_queue_has_no_neighbour():
    q = NeighborQueue(dim=2, size=3)
    q.enqueue(torch.tensor([[1.0, 0.0]]), torch.tensor([5]))
    assert q.nearest(torch.tensor([[1.0, 0.0]]), torch.tensor([5])).tolist() == [-1]


def test_queue_size_capped_below_dataset():
    assert queue_size_for(10) == 5
    assert queue_size_for(10**6, 4096) == 4096
    with pytest.raises(ValueError):
        queue_size_for(1)
    with pytest.raises(ValueError):
        NeighborQueue(0, 4)


def test_checkpoint_roundtrip_and_rng(tmp_path):
    path = tmp_path / "c.pt"
    torch.manual_seed(3)
    np.random.seed(3)
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "rng": ckpt.rng_states(),
             "model_config": {"heads": [2, 4]}}
    expected = (torch.rand(2), np.random.rand(), __import__("random").random())
    ckpt.save_checkpoint(path, state)
    loaded = ckpt.load_checkpoint(path)
    assert loaded["format_version"] == ckpt.FORMAT_VERSION and loaded["epoch"] == 2
    assert torch.equal(loaded["model"]["w"], torch.arange(3.0))
    ckpt.set_rng_states(loaded["rng"])
    got = (torch.rand(2), np.random.rand(), __import__("random").random())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_failing_save_leaves_old_checkpoint(tmp_path):
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 2,
                                    "bad": Unpicklable()})
    loaded = ckpt.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


def test_missing_or_corrupt_checkpoint(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "bad.pt").write_bytes(b"xx")
    with pytest.raises(ckpt.CheckpointError, match="cannot read"):
        ckpt.load_checkpoint(tmp_path / "bad.pt")
