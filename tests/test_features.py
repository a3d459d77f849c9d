"""Feature cache: one pass over the images, reuse, invalidation on catalog change, atomicity."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from selfclassifier_core.catalog import scanner as catalog
from selfclassifier_core.training import features
from selfclassifier_core.store.workspace import Workspace

SIZE = 32


def _write(path: Path, seed: int, bright: bool = False) -> None:
    rng = np.random.default_rng(seed)
    arr = rng.integers(150 if bright else 0, 256 if bright else 100, (20, 24, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def setup(tmp_path):
    folder = tmp_path / "images"
    for i in range(6):
        _write(folder / f"img_{i}.png", i, bright=i % 2 == 1)
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    catalog.scan(folder, ws, workers=1)
    torch.manual_seed(0)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return folder, ws, weights


def _extract(ws, weights, **kw):
    kw = {"views": 3, "image_size": SIZE, "device": "cpu", "batch_size": 4, "workers": 0, **kw}
    return features.extract_features(ws, "resnet18", str(weights), **kw)


def test_extract_shapes_and_view0_is_eval_transform(setup):
    folder, ws, weights = setup
    seen = []
    cache = _extract(ws, weights, progress=lambda d, t: seen.append((d, t)))
    assert cache.features.shape == (3, 6, 512) and cache.features.dtype == np.float16
    assert list(cache.image_ids) == [i for i, _ in ws.usable_images()]
    assert cache.computed == 6 and seen[-1] == (6, 6)
    assert isinstance(np.load(cache.dir / "feats.npy", mmap_mode="r"), np.memmap)
    # view 0 = the backbone on the prediction transform of the full image
    from selfclassifier_core.catalog.imageio import load_rgb
    from selfclassifier_core.engine.transforms import eval_transform

    module, _, _ = features.build_extractor("resnet18", str(weights), SIZE)
    rel = dict(ws.usable_images())[int(cache.image_ids[2])]
    x = eval_transform(SIZE)(load_rgb(folder / rel)).unsqueeze(0)
    with torch.no_grad():
        expected = module(x)[0].numpy()
    np.testing.assert_allclose(cache.full[2].astype(np.float32), expected, rtol=2e-2, atol=2e-2)
    # the random views differ from the full image and from each other
    f = np.asarray(cache.features, np.float32)
    assert not np.allclose(f[0], f[1], atol=1e-2) and not np.allclose(f[1], f[2], atol=1e-2)
    # no temporary directories left behind
    assert sorted(p.name for p in ws.features_dir.iterdir()) == [cache.key]


def test_reused_without_recomputing(setup, monkeypatch):
    _, ws, weights = setup
    first = _extract(ws, weights)

    def boom(*a, **k):
        raise AssertionError("backbone built again: cache not reused")

    monkeypatch.setattr(features, "build_extractor", boom)
    again = _extract(ws, weights)
    assert again.computed == 0 and again.key == first.key
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(first.features))


def test_key_depends_on_recipe_and_weights(setup, tmp_path):
    _, ws, weights = setup
    a = _extract(ws, weights)
    b = _extract(ws, weights, views=2)
    assert a.key != b.key and b.features.shape[0] == 2
    other = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), other)
    c = _extract(ws, other)
    assert c.key not in (a.key, b.key) and c.computed == 6


def test_catalog_change_recomputes_only_new_and_changed(setup, monkeypatch):
    folder, ws, weights = setup
    first = _extract(ws, weights)
    old = {int(i): np.asarray(first.features[:, p]) for p, i in enumerate(first.image_ids)}
    v1 = ws.catalog_version()
    _write(folder / "new.png", 100, bright=True)
    _write(folder / "img_0.png", 200, bright=True)   # changed content (and size/mtime)
    catalog.scan(folder, ws, workers=1)
    assert ws.catalog_version() != v1

    embedded = []
    real = features._ViewsDataset.__getitem__

    def counting(self, i):
        embedded.append(self.paths[i].name)
        return real(self, i)

    monkeypatch.setattr(features._ViewsDataset, "__getitem__", counting)
    second = _extract(ws, weights)
    assert sorted(embedded) == ["img_0.png", "new.png"] and second.computed == 2
    assert second.key == first.key and len(second) == 7
    ids = dict((rel, i) for i, rel in ws.usable_images())
    pos = {int(i): p for p, i in enumerate(second.image_ids)}
    for rel in ("img_1.png", "img_4.png"):  # unchanged rows copied
        np.testing.assert_array_equal(second.features[:, pos[ids[rel]]], old[ids[rel]])
    assert not np.allclose(np.asarray(second.features[0, pos[ids["img_0.png"]]], np.float32),
                           old[ids["img_0.png"]][0].astype(np.float32), atol=1e-3)
    assert sorted(p.name for p in ws.features_dir.iterdir()) == [first.key]


def test_unreadable_at_extraction_is_left_out(setup, caplog):
    folder, ws, weights = setup
    (folder / "img_3.png").write_bytes(b"broken now")
    with caplog.at_level("WARNING", logger="selfclassifier_core.training.features"):
        cache = _extract(ws, weights)
    rels = dict(ws.usable_images())
    assert len(cache) == 5 and "img_3.png" not in {rels[int(i)] for i in cache.image_ids}
    assert cache.features.shape == (3, 5, 512) and "img_3.png" in caplog.text


def test_stop_leaves_nothing(setup):
    _, ws, weights = setup
    with pytest.raises(InterruptedError):
        _extract(ws, weights, should_stop=lambda: True)
    assert not ws.features_dir.exists() or list(ws.features_dir.iterdir()) == []


def test_bad_arguments(setup):
    _, ws, weights = setup
    with pytest.raises(ValueError, match="n_views"):
        _extract(ws, weights, views=0)
    with pytest.raises(ValueError, match="crop_scale"):
        _extract(ws, weights, crop_scale=(0.5, 1.5))
