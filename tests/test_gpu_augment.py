"""Batched device-side multi-crop augmentation (GpuMultiCrop): contract, ops against references,
determinism. Tiny tensors only (4 images of 32 px, views of 16/8 px)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from selfclassifier_core.engine.gpu_augment import (
    CROP_TRIES, GpuMultiCrop, UniformImage, adjust_brightness, adjust_contrast, adjust_hue,
    adjust_saturation, gaussian_blur, roi_resized_crop, sample_boxes, solarize,
    source_size_for, to_uniform_batch, uniform_resize)
from selfclassifier_core.engine.transforms import MultiCropTransform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
NO_COLOUR = dict(cj_prob=0.0, gray_prob=0.0, blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0)
FULL_CROP = dict(global_scale=(1.0, 1.0), local_scale=(1.0, 1.0), ratio=(1.0, 1.0))


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(b: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=_gen(seed))


def _unnormalise(v: torch.Tensor) -> torch.Tensor:
    return v * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_views_shapes_dtypes_device(dtype):
    x = _images()
    if dtype is torch.float32:
        x = x.float() / 255
    views = GpuMultiCrop(16, 8, 3)(x, generator=_gen())
    assert len(views) == 5
    assert [tuple(v.shape) for v in views] == [(4, 3, 16, 16)] * 2 + [(4, 3, 8, 8)] * 3
    assert all(v.dtype == torch.float32 and v.device == x.device for v in views)
    assert all(torch.isfinite(v).all() for v in views)


def test_same_contract_as_pil_multicrop():
    """Same number, order and sizes of views as the PIL path, and the same value range."""
    pil = MultiCropTransform(16, 8, 2)
    img = Image.fromarray(_images(1)[0].permute(1, 2, 0).numpy())
    torch.manual_seed(0)
    ref = pil(img)
    views = GpuMultiCrop(16, 8, 2)(to_uniform_batch([img], 32), generator=_gen())
    assert [tuple(v.shape[1:]) for v in views] == [tuple(r.shape) for r in ref]
    lo = (0 - max(MEAN)) / min(STD) - 1e-4
    hi = (1 - min(MEAN)) / min(STD) + 1e-4
    assert all(lo <= float(v.min()) and float(v.max()) <= hi for v in views)


def test_constant_gray_maps_to_imagenet_normalised_value():
    x = torch.full((2, 3, 32, 32), 128, dtype=torch.uint8)
    views = GpuMultiCrop(16, 8, 2, **NO_COLOUR)(x, generator=_gen())
    for v in views:
        for c in range(3):
            expected = (128 / 255 - MEAN[c]) / STD[c]
            assert torch.allclose(v[:, c], torch.full_like(v[:, c], expected), atol=1e-5)


def test_no_local_views_batch_of_one_and_tiny_inputs():
    assert len(GpuMultiCrop(16, 8, 0)(_images(2), generator=_gen())) == 2
    views = GpuMultiCrop(16, 8, 2)(_images(1, size=8), generator=_gen())
    assert [tuple(v.shape) for v in views] == [(1, 3, 16, 16)] * 2 + [(1, 3, 8, 8)] * 2
    assert all(torch.isfinite(v).all() for v in views)
    # views smaller than a blur kernel fits (1-2 px) are still made
    views = GpuMultiCrop(2, 1, 1)(_images(1, size=8), generator=_gen())
    assert [tuple(v.shape) for v in views] == [(1, 3, 2, 2)] * 2 + [(1, 3, 1, 1)]


def test_invalid_arguments_raise_value_error():
    for kwargs in (dict(global_size=0), dict(n_local=-1), dict(global_scale=(0.5, 0.2)),
                   dict(local_scale=(0.0, 0.4)), dict(hflip_prob=1.5),
                   dict(blur_probs=(1.0, 0.1)), dict(ratio=(2.0, 1.0)), dict(cj_strength=-1)):
        args = dict(global_size=16, local_size=8, n_local=2) | kwargs
        with pytest.raises(ValueError):
            GpuMultiCrop(**args)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        GpuMultiCrop(16, 8, 2)(torch.zeros(3, 32, 32))


# ----------------------------------------------------------------------------- crops
def test_roi_align_bilinear_equals_crop_then_interpolate():
    x = torch.rand(3, 3, 32, 32, generator=_gen())
    boxes = torch.tensor([[0, 0, 32, 32], [5, 3, 25, 23], [10, 4, 26, 28]], dtype=torch.float)
    out = roi_resized_crop(x, boxes, torch.arange(3), 16, sampling_ratio=1)
    for i, (x1, y1, x2, y2) in enumerate(boxes.long().tolist()):
        ref = F.interpolate(x[i:i + 1, :, y1:y2, x1:x2], size=(16, 16), mode="bilinear",
                            align_corners=False, antialias=False)
        assert torch.allclose(out[i], ref[0], atol=1e-5), i


def test_roi_align_adaptive_sampling_is_an_area_filter():
    """sampling_ratio=0 averages the pixels under each output pixel (antialiasing)."""
    x = torch.rand(2, 3, 32, 32, generator=_gen())
    boxes = torch.tensor([[0, 0, 32, 32], [8, 4, 24, 20]], dtype=torch.float)
    out = roi_resized_crop(x, boxes, torch.tensor([1, 0]), 8, sampling_ratio=0)
    assert torch.allclose(out[0], F.avg_pool2d(x[1:2], 4)[0], atol=1e-5)
    assert torch.allclose(out[1], F.avg_pool2d(x[0:1, :, 4:20, 8:24], 2)[0], atol=1e-5)


def test_sampled_boxes_follow_scale_and_ratio_and_stay_inside():
    u = torch.rand(2000, 2 * CROP_TRIES + 12, generator=_gen())
    h, w = 40, 60
    boxes = sample_boxes(u, h, w, scale=(0.1, 0.5), ratio=(3 / 4, 4 / 3))
    x1, y1, x2, y2 = boxes.unbind(1)
    assert (x1 >= 0).all() and (y1 >= 0).all() and (x2 <= w).all() and (y2 <= h).all()
    assert torch.equal(boxes, boxes.round())
    bw, bh = x2 - x1, y2 - y1
    area = bw * bh / (h * w)
    assert area.min() > 0.08 and area.max() < 0.53  # rounding to whole pixels
    assert (bw / bh).min() > 0.7 and (bw / bh).max() < 1.4
    assert area.std() > 0.05 and x1.std() > 3  # spread, not constant


def test_impossible_crop_falls_back_to_centre_crop():
    """A 4:1 image with ratio (1, 1) and scale (1, 1) never fits: torchvision's fallback."""
    u = torch.rand(5, 2 * CROP_TRIES + 12, generator=_gen())
    boxes = sample_boxes(u, 10, 40, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert boxes.tolist() == [[15.0, 0.0, 25.0, 10.0]] * 5


def test_full_crop_views_are_resized_images():
    x = _images(2)
    views = GpuMultiCrop(16, 8, 1, hflip_prob=0.0, **NO_COLOUR, **FULL_CROP)(x, generator=_gen())
    src = x.float() / 255
    assert torch.allclose(_unnormalise(views[0]), F.avg_pool2d(src, 2), atol=1e-5)
    assert torch.allclose(_unnormalise(views[2]), F.avg_pool2d(src, 4), atol=1e-5)


def test_global1_images_feed_only_global_view_one():
    x = _images(2)
    nn_imgs = torch.full_like(x, 200)
    views = GpuMultiCrop(16, 8, 2, **NO_COLOUR)(x, generator=_gen(), global1_images=nn_imgs)
    assert torch.allclose(_unnormalise(views[0]), torch.full_like(views[0], 200 / 255), atol=1e-5)
    for v in views[1:]:
        assert _unnormalise(v).std() > 0.1


# ----------------------------------------------------------------------------- per-view ops
def test_flip_flips():
    x = _images(3)
    kw = dict(**NO_COLOUR, **FULL_CROP)
    plain = GpuMultiCrop(16, 8, 2, hflip_prob=0.0, **kw)(x, generator=_gen(1))
    flipped = GpuMultiCrop(16, 8, 2, hflip_prob=1.0, **kw)(x, generator=_gen(1))
    for a, b in zip(plain, flipped):
        assert not torch.allclose(a, b)
        assert torch.allclose(a.flip(-1), b, atol=1e-6)


def test_flip_is_per_sample():
    m = GpuMultiCrop(16, 8, 2, **NO_COLOUR, **FULL_CROP)
    x = _images(4)
    glob, _ = m.sample_params(4, 32, 32, _gen(3))
    views = m(x, generator=_gen(3))
    ref = F.avg_pool2d(x.float() / 255, 2)
    for i, f in enumerate(glob.flip[:4].tolist()):
        expected = ref[i].flip(-1) if f else ref[i]
        assert torch.allclose(_unnormalise(views[0])[i], expected, atol=1e-5)
    assert 0 < int(glob.flip.sum()) < 8  # seed 3 mixes flipped and not


def test_grayscale_gives_equal_channels():
    m = GpuMultiCrop(16, 8, 2, cj_prob=0.0, gray_prob=1.0, blur_probs=(1.0, 0.1, 0.5),
                     solarize_prob=0.0)
    for v in m(_images(), generator=_gen()):
        rgb = _unnormalise(v)
        assert torch.allclose(rgb[:, 0], rgb[:, 1], atol=1e-5)
        assert torch.allclose(rgb[:, 1], rgb[:, 2], atol=1e-5)


def test_solarize_inverts_above_threshold():
    x = torch.tensor([0.1, 0.49, 0.5, 0.9]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    out = solarize(x, torch.tensor([True, False]))
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.1, 0.49, 0.5, 0.1]))
    assert torch.equal(out[1], x[1])


def test_solarize_only_touches_global_view_two():
    x = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    x[:, :, :, 16:] = 230  # right half bright
    m = GpuMultiCrop(16, 8, 2, hflip_prob=0.0, cj_prob=0.0, gray_prob=0.0,
                     blur_probs=(0.0, 0.0, 0.0), solarize_prob=1.0, **FULL_CROP)
    v1, v2, *locs = [_unnormalise(v) for v in m(x, generator=_gen())]
    assert torch.allclose(v1[..., 12:], torch.full_like(v1[..., 12:], 230 / 255), atol=1e-5)
    assert torch.allclose(v2[..., 12:], torch.full_like(v2[..., 12:], 25 / 255), atol=1e-5)
    assert torch.allclose(v2[..., :4], torch.zeros_like(v2[..., :4]), atol=1e-5)
    for v in locs:
        assert v.max() > 0.85


def test_blur_of_constant_is_constant_and_blur_smooths_noise():
    const = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(const, torch.tensor([0.5, 2.0]), 5), const, atol=1e-6)
    noise = torch.rand(3, 3, 16, 16, generator=_gen())
    out = gaussian_blur(noise, torch.tensor([0.0, 0.7, 2.0]), 5)
    assert torch.equal(out[0], noise[0])  # sigma 0: no blur
    v = [float(t.var()) for t in out]
    assert v[2] < v[1] < 0.6 * float(noise[1].var())


def test_blur_matches_torchvision_gaussian_blur():
    x = torch.rand(2, 3, 16, 16, generator=_gen())
    sigmas = [0.6, 1.7]
    out = gaussian_blur(x, torch.tensor(sigmas), 5)
    for i, s in enumerate(sigmas):
        ref = TF.gaussian_blur(x[i], [5, 5], [s, s])
        assert torch.allclose(out[i], ref, atol=1e-5), i


def test_blur_on_first_global_view_always():
    """Global view 1 has blur p=1: its pixels vary less than the unblurred pipeline's."""
    x = _images(4)
    blurred = GpuMultiCrop(16, 8, 0, hflip_prob=0.0, cj_prob=0.0, gray_prob=0.0,
                           blur_probs=(1.0, 0.0, 0.0), solarize_prob=0.0)(x, generator=_gen(2))
    sharp = GpuMultiCrop(16, 8, 0, hflip_prob=0.0, **NO_COLOUR)(x, generator=_gen(2))
    for i in range(4):
        assert blurred[0][i].var() < sharp[0][i].var()
    assert torch.equal(blurred[1], sharp[1])


def test_colour_jitter_ops_match_torchvision():
    x = torch.rand(3, 3, 8, 10, generator=_gen())
    f = torch.tensor([0.6, 1.0, 1.4])
    hue = torch.tensor([-0.1, 0.0, 0.08])
    for ours, theirs, fac in ((adjust_brightness, TF.adjust_brightness, f),
                              (adjust_contrast, TF.adjust_contrast, f),
                              (adjust_saturation, TF.adjust_saturation, f),
                              (adjust_hue, TF.adjust_hue, hue)):
        out = ours(x.clone(), fac)
        for i in range(3):
            ref = theirs(x[i], float(fac[i]))
            assert torch.allclose(out[i], ref, atol=1e-5), (ours.__name__, i)


def test_colour_jitter_changes_colours_only_where_drawn():
    m = GpuMultiCrop(16, 8, 1, hflip_prob=0.0, cj_prob=0.5, gray_prob=0.0,
                     blur_probs=(0.0, 0.0, 0.0), solarize_prob=0.0, **FULL_CROP)
    x = _images(8)
    glob, _ = m.sample_params(8, 32, 32, _gen(5))
    views = m(x, generator=_gen(5))
    ref = F.avg_pool2d(x.float() / 255, 2)
    drawn = (glob.jitter != torch.tensor([1.0, 1.0, 1.0, 0.0])).any(1)[:8]
    assert 0 < int(drawn.sum()) < 8
    for i in range(8):
        same = torch.allclose(_unnormalise(views[0])[i], ref[i], atol=1e-4)
        assert same != bool(drawn[i]), i


# ----------------------------------------------------------------------------- randomness
def test_deterministic_given_generator_and_varies_with_seed():
    m = GpuMultiCrop(16, 8, 2)
    x = _images()
    a = m(x, generator=_gen(7))
    b = m(x, generator=_gen(7))
    c = m(x, generator=_gen(8))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(not torch.allclose(u, v) for u, v in zip(a, c))


def test_views_and_samples_differ_from_each_other():
    m = GpuMultiCrop(16, 8, 3)
    x = _images(1).expand(4, -1, -1, -1).contiguous()  # the same image four times
    views = m(x, generator=_gen())
    assert not torch.allclose(views[0], views[1])
    assert not torch.allclose(views[2], views[3])
    assert not torch.allclose(views[0][0], views[0][1])  # per-sample, not per-batch parameters


def test_probabilities_follow_dino_per_view():
    m = GpuMultiCrop(16, 8, 2)
    glob, loc = m.sample_params(4000, 32, 32, _gen())
    blur = glob.blur_sigma > 0
    assert blur[:4000].all()
    assert 0.08 < blur[4000:].float().mean() < 0.12
    assert not glob.solarize[:4000].any()
    assert 0.17 < glob.solarize[4000:].float().mean() < 0.23
    assert not loc.solarize.any()
    assert 0.46 < (loc.blur_sigma > 0).float().mean() < 0.54
    assert 0.46 < glob.flip.float().mean() < 0.54
    assert 0.17 < glob.gray.float().mean() < 0.23
    sig = glob.blur_sigma[blur]
    assert sig.min() >= 0.1 and sig.max() <= 2.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_views():
    m = GpuMultiCrop(16, 8, 2)
    x = _images()
    cpu = m(x, generator=_gen(4))
    gpu = m(x.cuda(), generator=_gen(4))
    assert all(g.device.type == "cuda" for g in gpu)
    assert all(torch.allclose(c, g.cpu(), atol=1e-3) for c, g in zip(cpu, gpu))


# ----------------------------------------------------------------------------- CPU side
def test_uniform_resize_keeps_aspect_and_crops_the_centre():
    img = Image.new("RGB", (20, 40), (0, 0, 255))  # tall: 20 wide, 40 high
    img.paste((255, 0, 0), (0, 0, 20, 8))  # red top band, outside the central square
    t = uniform_resize(img, 16)
    assert t.dtype == torch.uint8 and tuple(t.shape) == (3, 16, 16)
    assert int(t[0].max()) < 40 and int(t[2].min()) > 215  # blue only, no red band


def test_to_uniform_batch_and_dataset_transform():
    imgs = [Image.new("RGB", (50, 30), (10, 20, 30)), Image.new("L", (12, 12), 99)]
    batch = to_uniform_batch(imgs, 16)
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (2, 3, 16, 16)
    assert batch[0, :, 0, 0].tolist() == [10, 20, 30] and batch[1].unique().tolist() == [99]
    with pytest.raises(ValueError):
        to_uniform_batch([], 16)
    tf = UniformImage(16)
    (own,) = tf(imgs[0])  # the image once: a neighbour's source is the dataset's business
    assert torch.equal(own, batch[0]) and torch.equal(tf.global_view(imgs[1]), batch[1])
    assert source_size_for(224) == 256 and source_size_for(16) == 18
    assert math.isclose(source_size_for(28), 32)


def test_loader_integration_with_multicrop_dataset_and_neighbours(tmp_path):
    """The trainer recipe: MultiCropDataset(UniformImage) → make_loader → GpuMultiCrop,
    with nearest-neighbour positives feeding global view 1."""
    import numpy as np

    from selfclassifier_core.catalog.datasets import MultiCropDataset, make_loader
    from selfclassifier_core.store.workspace import Workspace

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(20, 14), (14, 20), (16, 16), (30, 18)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.new("RGB", (16, 16), (255, 255, 255)).save(folder / "2.png")
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    with ws.transaction() as conn:
        for i, (w, h) in enumerate(sizes):
            conn.execute("INSERT INTO images (path, width, height, status) VALUES (?,?,?,'ok')",
                         (f"{i}.png", w, h))
    ds = MultiCropDataset(ws, UniformImage(16))
    ids = [i for i, _ in ws.usable_images()]
    ds.set_neighbors({ids[0]: ids[2]})  # image 0's positive is the white image
    loader = make_loader(ds, 4, shuffle=False, drop_last=True, workers=0)
    (src1, images), batch_ids = next(iter(loader))
    assert images.dtype == torch.uint8 and tuple(images.shape) == (4, 3, 16, 16)
    assert batch_ids.tolist() == ids
    aug = GpuMultiCrop(8, 4, 2, **NO_COLOUR)
    views = aug(images, generator=_gen(), global1_images=src1)
    assert [tuple(v.shape) for v in views] == [(4, 3, 8, 8)] * 2 + [(4, 3, 4, 4)] * 2
    white = torch.ones(3, 8, 8)
    assert torch.allclose(_unnormalise(views[0])[0], white, atol=1e-5)  # neighbour's crop
    assert not torch.allclose(_unnormalise(views[1])[0], white, atol=0.3)  # image 0 itself
