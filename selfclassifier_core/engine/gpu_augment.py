"""Batched multi-crop augmentation on the training device (GPU or CPU).

The PIL pipeline of :class:`~selfclassifier_core.engine.transforms.MultiCropTransform` augments one
image at a time in DataLoader workers; on a GPU machine it delivers about half of what a
resnet50 consumes. Here the workers only decode and resize each image to a fixed square
(:class:`UniformImage`, :func:`to_uniform_batch`); :class:`GpuMultiCrop` then makes all views of
the whole batch on the device with tensor ops:

- random resized crop: boxes sampled vectorised with torchvision's rule (10 tries of area/ratio,
  then the centre-crop fallback), cut out and resized by **one** ``torchvision.ops.roi_align``
  call per view size. ``sampling_ratio=0`` averages ceil(box/out) bilinear samples per output
  pixel, an area filter that stands in for PIL's antialiased bicubic resize;
- horizontal flip, colour jitter (brightness, contrast, saturation, hue), random grayscale,
  Gaussian blur (per-sample sigma, separable grouped convolution, reflect padding), solarize,
  with DINO's per-view probabilities, then ImageNet normalisation.

The output has the PIL path's contract: a list of ``2 + n_local`` float32 batches
``[B, 3, s, s]``, global views first, normalised with ImageNet mean/std, so the trainer can use
either. Differences from the PIL path, by design:

- the views are cut from the uniform source square (see :func:`uniform_resize`: short side
  resized to ``size`` and centre-cropped), not from the full decoded image;
- colour jitter ops run in a random order drawn once per call for each view size (global
  views, local views), not per sample; hue uses torchvision's RGB↔HSV formulas on tensors;
- pixels stay float between the ops (the PIL path rounds to uint8 after each).

Randomness: every parameter is derived from uniforms drawn from ``generator`` (on the
generator's device, CPU by default) in a fixed order, so a generator seeded per batch gives
the same views on every run — what exact resume needs — and a CPU generator gives the same
parameters whatever the image device.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from .transforms import IMAGENET_MEAN, IMAGENET_STD, _blur_kernel, check_multicrop_args

log = logging.getLogger(__name__)

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
CROP_TRIES = 10  # torchvision RandomResizedCrop.get_params
# Columns of the per-sample uniforms: CROP_TRIES area + CROP_TRIES ratio, then these.
_U_TOP, _U_LEFT, _U_FLIP, _U_CJ, _U_BRIGHT, _U_CONTRAST, _U_SAT, _U_HUE, _U_GRAY, _U_BLUR, \
    _U_SIGMA, _U_SOLAR = range(2 * CROP_TRIES, 2 * CROP_TRIES + 12)
_N_UNIFORMS = 2 * CROP_TRIES + 12
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


# --------------------------------------------------------------------------- CPU side (workers)
def source_size_for(global_size: int) -> int:
    """Side of the uniform source square for a global crop size: 8/7 of it (224 → 256)."""
    if int(global_size) < 1:
        raise ValueError(f"global_size must be ≥ 1, got {global_size!r}")
    return max(int(global_size), int(round(int(global_size) * 8 / 7)))


def uniform_resize(img: Image.Image, size: int) -> torch.Tensor:
    """One image as a uint8 tensor ``[3, size, size]``: short side resized to ``size``
    (bilinear, antialiased), long side centre-cropped.

    The aspect ratio is kept (random-resized-crop ratios stay those of the content); what lies
    outside the central square of an elongated image is not seen by the augmentation.
    """
    if int(size) < 1:
        raise ValueError(f"size must be ≥ 1, got {size!r}")
    size = int(size)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (size, size):
        img = ImageOps.fit(img, (size, size), method=Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def to_uniform_batch(pil_images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Variable-size PIL images as one uint8 batch ``[B, 3, size, size]``.

    Each image goes through :func:`uniform_resize`; run it in DataLoader workers.
    """
    if len(pil_images) == 0:
        raise ValueError("to_uniform_batch needs at least one image")
    return torch.stack([uniform_resize(img, size) for img in pil_images])


class UniformImage:
    """A per-image transform for :class:`~selfclassifier_core.catalog.datasets.MultiCropDataset` that defers
    the augmentation to :class:`GpuMultiCrop`.

    ``__call__`` returns ``[image]``, one uint8 ``[3, size, size]`` tensor. In an epoch with
    nearest-neighbour positives the dataset puts the source of global view 1 in front
    (:meth:`global_view` of the neighbour, see ``adds_global1_source``). After collation
    ``views`` is ``[images]``, or ``[sources of global view 1, images]`` in such an epoch:
    ``gpu_aug(views[-1], generator, global1_images=views[0] if len(views) == 2 else None)``.
    """

    # MultiCropDataset adds the neighbour's source in front instead of replacing views[0]
    adds_global1_source = True

    def __init__(self, size: int):
        if int(size) < 1:
            raise ValueError(f"size must be ≥ 1, got {size!r}")
        self.size = int(size)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [uniform_resize(img, self.size)]

    def global_view(self, img: Image.Image) -> torch.Tensor:
        return uniform_resize(img, self.size)

    def __repr__(self) -> str:
        return f"UniformImage(size={self.size})"


# --------------------------------------------------------------------------- tensor ops
def sample_boxes(u: torch.Tensor, height: int, width: int, scale: tuple[float, float],
                 ratio: tuple[float, float]) -> torch.Tensor:
    """Random-resized-crop boxes ``[K, 4]`` (x1, y1, x2, y2; integer pixel edges) from uniforms.

    Vectorised torchvision ``RandomResizedCrop.get_params``: the first of ``CROP_TRIES``
    (area, log-ratio) tries that fits the ``height × width`` image, else the centre crop with
    the ratio clamped. ``u`` holds at least ``2 * CROP_TRIES + 2`` uniforms per row.
    """
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    u = u.double()
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :CROP_TRIES])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, CROP_TRIES:2 * CROP_TRIES])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    top = torch.floor(u[:, _U_TOP] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u[:, _U_LEFT] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    return torch.stack([left, top, left + w, top + h], dim=1).float()


def roi_resized_crop(images: torch.Tensor, boxes: torch.Tensor, batch_index: torch.Tensor,
                     size: int, sampling_ratio: int = 0) -> torch.Tensor:
    """Crop ``boxes`` (x1, y1, x2, y2 in pixel edges) of ``images[batch_index]`` and resize them
    to ``size × size`` in one ``roi_align`` call; returns float ``[K, C, size, size]``.

    With ``sampling_ratio=1`` this is bilinear resizing (``align_corners=False``, no antialias)
    of the box; ``0`` averages ceil(box/size) samples per output pixel (an area filter).
    """
    from torchvision.ops import roi_align

    rois = torch.cat([batch_index.to(images.dtype).unsqueeze(1), boxes.to(images.dtype)], dim=1)
    return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=True)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[N, 1, H, W]`` of RGB ``[N, 3, H, W]`` (torchvision's weights)."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor)).clamp_(0, 1)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(factor)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = _per_sample(factor)
    return (f * x + (1 - f) * grayscale(x)).clamp_(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``[N, 3, H, W]`` → HSV, every channel in [0, 1] (torchvision's formulas)."""
    r, g, b = x.unbind(dim=1)
    maxc = x.amax(dim=1)
    minc = x.amin(dim=1)
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
    is_r = maxc == r
    is_g = (maxc == g) & ~is_r
    is_b = ~is_g & ~is_r
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = torch.fmod(h / 6.0 + 1.0, 1.0)
    return torch.stack([h, s, maxc], dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """HSV ``[N, 3, H, W]`` in [0, 1] → RGB, closed form ``v - v·s·clamp(min(k, 4 - k), 0, 1)``
    with ``k = (n + 6h) mod 6`` for n = 5, 3, 1 (R, G, B)."""
    h, s, v = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h, 6.0)
    return v - v * s * torch.minimum(k, 4.0 - k).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per sample, in [-0.5, 0.5])."""
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0:1] + _per_sample(shift), 1.0)
    return hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1)).clamp_(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each sample with its own ``sigma`` (0 leaves it unchanged): separable grouped
    convolution with reflect padding, kernel as torchvision's ``gaussian_blur``."""
    n, c, hgt, wid = x.shape
    half = kernel_size // 2
    if half == 0 or half >= min(hgt, wid):
        raise ValueError(f"kernel {kernel_size} does not fit a {hgt}×{wid} image")
    pos = torch.linspace(-half, half, kernel_size, device=x.device, dtype=x.dtype)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma)).to(x.dtype)
    k = torch.exp(-0.5 * (pos.view(1, -1) / safe.view(-1, 1)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)
    delta = (pos == 0).to(x.dtype).expand_as(k)
    k = torch.where((sigma > 0).view(-1, 1), k, delta)  # [N, k]
    k = k.repeat_interleave(c, dim=0)  # one kernel per (sample, channel) group
    y = F.pad(x.reshape(1, n * c, hgt, wid), (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def solarize(x: torch.Tensor, mask: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    """Invert pixels ≥ ``threshold`` of the samples where ``mask`` is True (PIL's rule)."""
    hit = (x >= threshold) & _per_sample(mask)
    return torch.where(hit, 1.0 - x, x)


# --------------------------------------------------------------------------- the module
@dataclass
class ViewParams:
    """Random parameters of one stack of views (all views of one size), one row per view sample.

    ``jitter`` holds (brightness, contrast, saturation, hue) factors, the identity
    (1, 1, 1, 0) where jitter was not drawn; ``blur_sigma`` is 0 where there is no blur.
    """

    boxes: torch.Tensor  # [K, 4] float, x1 y1 x2 y2
    flip: torch.Tensor  # [K] bool
    jitter: torch.Tensor  # [K, 4] float
    jitter_order: list[int]  # indices into JITTER_OPS, one order for the stack
    gray: torch.Tensor  # [K] bool
    blur_sigma: torch.Tensor  # [K] float
    solarize: torch.Tensor  # [K] bool

    def to(self, device: torch.device) -> "ViewParams":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in moved.items()
                                if isinstance(v, torch.Tensor)})


class GpuMultiCrop(nn.Module):
    """2 global + ``n_local`` local augmented views of a whole batch, on the batch's device.

    Same augmentations and probabilities as
    :class:`~selfclassifier_core.engine.transforms.MultiCropTransform` (DINO's: global view 1 blur
    p=1; global view 2 blur p=0.1, solarize p=0.2; locals blur p=0.5). No parameters;
    ``forward`` works on any device whatever the module's.

    Args:
        global_size: side of the two global views.
        local_size: side of the local views.
        n_local: number of local views (0 allowed).
        global_scale: area range of global crops (fraction of the source image).
        local_scale: area range of local crops.
        ratio: aspect-ratio range of the crops.
        hflip_prob: horizontal flip probability.
        cj_prob: colour jitter probability; ``cj_strength`` scales (0.4, 0.4, 0.2, 0.1).
        gray_prob: grayscale probability.
        blur_probs: Gaussian blur probability of (global 1, global 2, local) views.
        blur_sigma: range of the blur's sigma (pixels of the view).
        solarize_prob: solarize probability of global view 2.
        sampling_ratio: ``roi_align`` samples per output pixel and axis; 0 = adaptive (area
            filter against aliasing), 1 = plain bilinear.
    """

    def __init__(self, global_size: int, local_size: int, n_local: int,
                 global_scale: tuple[float, float] = (0.4, 1.0),
                 local_scale: tuple[float, float] = (0.05, 0.4),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip_prob: float = 0.5,
                 cj_prob: float = 0.8, cj_strength: float = 1.0, gray_prob: float = 0.2,
                 blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
                 blur_sigma: tuple[float, float] = (0.1, 2.0), solarize_prob: float = 0.2,
                 sampling_ratio: int = 0):
        super().__init__()
        if len(blur_probs) != 3:
            raise ValueError(f"blur_probs needs 3 values (global 1, global 2, local), "
                             f"got {blur_probs!r}")
        check_multicrop_args(global_size, local_size, n_local, global_scale, local_scale,
                             hflip_prob=hflip_prob, cj_prob=cj_prob, gray_prob=gray_prob,
                             solarize_prob=solarize_prob, blur_probs=blur_probs)
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low ≤ high, got {ratio!r}")
        if cj_strength < 0:
            raise ValueError(f"cj_strength must be ≥ 0, got {cj_strength!r}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low ≤ high, got {blur_sigma!r}")
        if int(sampling_ratio) < 0:
            raise ValueError(f"sampling_ratio must be ≥ 0, got {sampling_ratio!r}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)
        self.global_scale = tuple(map(float, global_scale))
        self.local_scale = tuple(map(float, local_scale))
        self.ratio = tuple(map(float, ratio))
        self.hflip_prob = float(hflip_prob)
        self.cj_prob = float(cj_prob)
        s = float(cj_strength)
        self.cj_ranges = (0.4 * s, 0.4 * s, 0.2 * s, min(0.5, 0.1 * s))
        self.gray_prob = float(gray_prob)
        self.blur_probs = tuple(map(float, blur_probs))
        self.blur_sigma = tuple(map(float, blur_sigma))
        self.solarize_prob = float(solarize_prob)
        self.sampling_ratio = int(sampling_ratio)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    # ---------------------------------------------------------------- parameters
    def _stack_params(self, u: torch.Tensor, order_u: torch.Tensor, height: int, width: int,
                      scale: tuple[float, float], blur_p: torch.Tensor,
                      solarize_p: torch.Tensor) -> ViewParams:
        boxes = sample_boxes(u, height, width, scale, self.ratio)
        b, c, sat, hue = self.cj_ranges
        apply_cj = u[:, _U_CJ] < self.cj_prob
        factors = torch.stack([
            1 - b + 2 * b * u[:, _U_BRIGHT],
            1 - c + 2 * c * u[:, _U_CONTRAST],
            1 - sat + 2 * sat * u[:, _U_SAT],
            -hue + 2 * hue * u[:, _U_HUE],
        ], dim=1)
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=u.device).expand_as(factors)
        jitter = torch.where(apply_cj.unsqueeze(1), factors, identity)
        lo, hi = self.blur_sigma
        sigma = lo + (hi - lo) * u[:, _U_SIGMA]
        blur = u[:, _U_BLUR] < blur_p
        return ViewParams(
            boxes=boxes,
            flip=u[:, _U_FLIP] < self.hflip_prob,
            jitter=jitter,
            jitter_order=torch.argsort(order_u).tolist(),
            gray=u[:, _U_GRAY] < self.gray_prob,
            blur_sigma=torch.where(blur, sigma, torch.zeros_like(sigma)),
            solarize=u[:, _U_SOLAR] < solarize_p,
        )

    def sample_params(self, batch: int, height: int, width: int,
                      generator: torch.Generator | None = None) -> tuple[ViewParams, ViewParams]:
        """Random parameters for the global stack (rows: view 1 of every sample, then view 2)
        and the local stack (rows: local view 1 of every sample, then view 2, …).

        Drawn on the generator's device (CPU when ``generator`` is None, from torch's global RNG).
        """
        if batch < 1 or height < 1 or width < 1:
            raise ValueError(f"need a non-empty batch, got B={batch}, H={height}, W={width}")
        dev = generator.device if generator is not None else torch.device("cpu")
        u_global = torch.rand(2 * batch, _N_UNIFORMS, generator=generator, device=dev)
        u_local = torch.rand(self.n_local * batch, _N_UNIFORMS, generator=generator, device=dev)
        orders = torch.rand(2, len(JITTER_OPS), generator=generator, device=dev)
        p1, p2, pl = self.blur_probs
        rows = torch.arange(2 * batch, device=dev)
        blur_g = torch.where(rows < batch, p1, p2)
        solar_g = torch.where(rows < batch, 0.0, self.solarize_prob)
        glob = self._stack_params(u_global, orders[0], height, width, self.global_scale,
                                  blur_g, solar_g)
        loc = self._stack_params(u_local, orders[1], height, width, self.local_scale,
                                 torch.full((self.n_local * batch,), pl, device=dev),
                                 torch.zeros(self.n_local * batch, device=dev))
        return glob, loc

    # ---------------------------------------------------------------- application
    def apply_stack(self, x: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Flip, colour jitter, grayscale, blur, solarize and normalise cropped views
        ``[K, 3, s, s]`` in [0, 1] with ``params`` (on ``x``'s device)."""
        x = torch.where(_per_sample(params.flip), x.flip(-1), x)
        if self.cj_prob > 0:
            ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
            for k in params.jitter_order:
                if k == 3 and self.cj_ranges[3] == 0:
                    continue
                x = ops[k](x, params.jitter[:, k])
        if self.gray_prob > 0:
            x = torch.where(_per_sample(params.gray), grayscale(x).expand_as(x), x)
        size = x.shape[-1]
        if size >= 3 and bool(max(self.blur_probs) > 0):
            x = gaussian_blur(x, params.blur_sigma, _blur_kernel(size))
        if self.solarize_prob > 0:
            x = solarize(x, params.solarize)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                global1_images: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Views of ``images`` (uint8 in [0, 255] or float in [0, 1], ``[B, 3, H, W]``, any device).

        Args:
            images: the batch.
            generator: source of all randomness (seed it per batch for reproducible views);
                None uses torch's global CPU RNG.
            global1_images: optional ``[B, 3, H, W]`` images to cut global view 1 from instead
                of ``images`` (nearest-neighbour positives).

        Returns:
            ``[global 1, global 2, local 1, …]``, float32 ``[B, 3, s, s]`` on ``images``' device,
            normalised with ImageNet mean/std.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if global1_images is not None and global1_images.shape != images.shape:
            raise ValueError(f"global1_images {tuple(global1_images.shape)} must match "
                             f"images {tuple(images.shape)}")
        batch, _, height, width = images.shape
        dev = images.device
        glob, loc = self.sample_params(batch, height, width, generator)
        glob, loc = glob.to(dev), loc.to(dev)

        src = images
        idx = torch.arange(batch, device=dev)
        g_index = torch.cat([idx, idx])
        if global1_images is not None and global1_images is not images:
            src = torch.cat([images, global1_images.to(dev)])
            g_index = torch.cat([idx + batch, idx])
        src = src.float() / 255 if src.dtype == torch.uint8 else src.float()

        g = roi_resized_crop(src, glob.boxes, g_index, self.global_size, self.sampling_ratio)
        views = list(self.apply_stack(g, glob).chunk(2))
        if self.n_local:
            l_index = idx.repeat(self.n_local)
            lv = roi_resized_crop(src, loc.boxes, l_index, self.local_size, self.sampling_ratio)
            views.extend(self.apply_stack(lv, loc).chunk(self.n_local))
        return views

    def extra_repr(self) -> str:
        return (f"global_size={self.global_size}, local_size={self.local_size}, "
                f"n_local={self.n_local}, global_scale={self.global_scale}, "
                f"local_scale={self.local_scale}")
