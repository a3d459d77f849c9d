"""Multi-crop shapes for odd inputs, crop-size rule, evaluation transform."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selfclassifier_core.engine.transforms import (IMAGENET_MEAN, IMAGENET_STD, MultiCropTransform,
                                            crop_sizes_for, eval_transform)


def _images():
    rng = np.random.default_rng(0)
    return {
        "gray": Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L"),
        "rgba": Image.fromarray(rng.integers(0, 255, (17, 9, 4), dtype=np.uint8), "RGBA"),
        "rgb": Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), "RGB"),
        "one_pixel": Image.new("RGB", (1, 1), (200, 10, 10)),
        "thin": Image.new("RGB", (1, 37), (0, 0, 0)),
    }


@pytest.mark.parametrize("name", list(_images()))
def test_multicrop_shapes(name):
    img = _images()[name]
    t = MultiCropTransform(global_size=16, local_size=8, n_local=3)
    views = t(img)
    assert len(views) == 5 == t.n_views
    for v in views[:2]:
        assert v.shape == (3, 16, 16) and v.dtype == torch.float32
    for v in views[2:]:
        assert v.shape == (3, 8, 8)
    assert all(torch.isfinite(v).all() for v in views)


def test_views_differ_and_normalised():
    torch.manual_seed(0)
    img = _images()["rgb"]
    views = MultiCropTransform(24, 12, 2)(img)
    assert not torch.equal(views[0], views[1])
    # a white image with every augmentation off maps to (1 - mean) / std
    plain = MultiCropTransform(8, 4, 0, cj_prob=0, gray_prob=0, blur_probs=(0, 0, 0),
                               solarize_prob=0)
    v = plain(Image.new("RGB", (10, 10), (255, 255, 255)))[0]
    expect = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(v[:, 4, 4], expect, atol=1e-3)


def test_same_seed_same_views():
    img = _images()["rgb"]
    t = MultiCropTransform(16, 8, 2)
    torch.manual_seed(5)
    a = t(img)
    torch.manual_seed(5)
    b = t(img)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_photo_size_defaults_include_big_blur():
    views = MultiCropTransform(n_local=1)(Image.new("RGB", (300, 200)))
    assert views[0].shape == (3, 224, 224) and views[2].shape == (3, 96, 96)


@pytest.mark.parametrize("kwargs", [dict(global_size=0), dict(n_local=-1),
                                    dict(global_scale=(0.5, 0.2)), dict(hflip_prob=1.5)])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        MultiCropTransform(**kwargs)


def test_crop_sizes_for():
    assert crop_sizes_for([(28, 28)] * 10) == (28, 12)
    assert crop_sizes_for([(4000, 3000), (640, 480), (1024, 768)]) == (224, 96)
    assert crop_sizes_for([(8, 8)] * 3) == (16, 8)
    assert crop_sizes_for([(64, 48)]) == (48, 21)
    assert crop_sizes_for([]) == (224, 96)
    assert crop_sizes_for([(28, 28)], global_size=32) == (32, 14)
    assert crop_sizes_for([(28, 28)], local_size=10) == (28, 10)
    with pytest.raises(ValueError):
        crop_sizes_for([(28, 28)], global_size=0)


def test_eval_transform():
    t = eval_transform(16)
    assert t(Image.new("L", (1, 1))).shape == (3, 16, 16)
    assert t(Image.new("RGBA", (50, 20))).shape == (3, 16, 16)
    big = eval_transform(224)(Image.new("RGB", (300, 400)))
    assert big.shape == (3, 224, 224)
    with pytest.raises(ValueError):
        eval_transform(0)
