"""Image transforms: the multi-crop training augmentation and the evaluation transform.

Training uses the DINO family of augmentations (random resized crop, flip, colour jitter,
grayscale, Gaussian blur, solarize) on 2 global and K local crops, as in the Self-Classifier
paper. Crop sizes follow the images: :func:`crop_sizes_for` picks them from the catalog's
widths and heights (28-px digits get 28/12-px crops, photos 224/96).
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch
from PIL import Image
from torchvision import transforms as T

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR,
                  "nearest": T.InterpolationMode.NEAREST}
RESIZE_MODES = ("shortest", "squash")


@dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its pixels (a property of the backbone:
    :func:`selfclassifier_core.engine.backbones.backbone_preprocess`).

    The default is what every torchvision backbone here has always used: ImageNet mean/std,
    bicubic resampling and :func:`eval_transform`'s own crop rule.

    Args:
        mean, std: per-channel normalisation of ``[0, 1]`` pixels.
        interpolation: ``bicubic``, ``bilinear`` or ``nearest`` (resizes and random crops).
        crop_pct: evaluation centre crop: the short side is resized to ``size / crop_pct``, then
            the centre ``size`` square is kept; None: the legacy rule (0.875 from 64 px up,
            none below).
        resize_mode: ``shortest`` (resize the short side, then centre crop) or ``squash``
            (both sides to ``size``, nothing cropped, as SigLIP was trained).
    """

    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float | None = None
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3:
                raise ValueError(f"{name} must have 3 values (RGB), got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got "
                             f"{self.interpolation!r}")
        if self.crop_pct is not None and not 0 < float(self.crop_pct) <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got "
                             f"{self.resize_mode!r}")

    @property
    def mode(self) -> T.InterpolationMode:
        """The torchvision interpolation mode."""
        return INTERPOLATIONS[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocess":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def normalize(self) -> T.Compose:
        """``[0, 255]`` PIL image -> normalised float tensor."""
        return T.Compose([T.ToTensor(), T.Normalize(self.mean, self.std)])

# Largest crops used for photos; local crops keep the paper's 96/224 ratio.
PHOTO_GLOBAL = 224
PHOTO_LOCAL = 96
MIN_GLOBAL = 16
MIN_LOCAL = 8
# Area ranges of the random resized crops (fraction of the image). The one place they are set:
# the trainer passes them to both MultiCropTransform and gpu_augment.GpuMultiCrop.
GLOBAL_SCALE = (0.25, 1.0)
LOCAL_SCALE = (0.05, 0.25)
# Larger areas for tiny images (crops ≤ 32 px trained from scratch on a CPU): a quarter of an
# 8-px image is 4x4 px, too little to tell its class; measured better on sklearn digits.
TINY_GLOBAL_SCALE = (0.5, 1.0)
TINY_LOCAL_SCALE = (0.2, 0.5)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, RGBA, P, I;16 …) to RGB; images from ``load_rgb`` are already RGB."""
    return img if img.mode == "RGB" else img.convert("RGB")


def _blur_kernel(size: int) -> int:
    """An odd Gaussian kernel about 10% of the crop (23 px at 224, as DINO), at least 3.

    Reflect padding needs the kernel's half-width to stay below the image side.
    """
    k = max(3, int(round(0.1 * size)) | 1)
    while k > 3 and k // 2 >= size:
        k -= 2
    return k


def _normalize() -> T.Compose:
    return Preprocess().normalize()


def crop_scale(name: str, value: Any) -> tuple[float, float]:
    """``value`` as an area range ``(low, high)`` of random resized crops, checked
    (ValueError naming ``name`` unless ``0 < low ≤ high ≤ 1``)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {value!r}") from None
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"{name} must satisfy 0 < low ≤ high ≤ 1, got {value!r}")
    return lo, hi


def check_multicrop_args(global_size: int, local_size: int, n_local: int,
                         global_scale: tuple[float, float], local_scale: tuple[float, float],
                         *, blur_probs: Sequence[float] = (), **probs: float) -> None:
    """The argument checks shared by the PIL and the batched multi-crop (ValueError naming
    the bad value)."""
    if int(global_size) < 1:
        raise ValueError(f"global_size must be ≥ 1, got {global_size!r}")
    if int(local_size) < 1:
        raise ValueError(f"local_size must be ≥ 1, got {local_size!r}")
    if int(n_local) < 0:
        raise ValueError(f"n_local must be ≥ 0, got {n_local!r}")
    crop_scale("global_scale", global_scale)
    crop_scale("local_scale", local_scale)
    for name, p in (*probs.items(), *(("blur_probs", b) for b in blur_probs)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {p!r}")


class MultiCropTransform:
    """2 global + ``n_local`` local crops of one image, each a normalised float tensor [3, s, s].

    Args:
        global_size: side of the two global crops.
        local_size: side of the local crops.
        n_local: number of local crops (0 allowed).
        global_scale: area range of global crops (fraction of the image).
        local_scale: area range of local crops.
        hflip_prob: horizontal flip probability.
        cj_prob: probability of colour jitter; ``cj_strength`` scales (0.4, 0.4, 0.2, 0.1).
        gray_prob: probability of converting to grayscale.
        blur_probs: Gaussian blur probability for (global 1, global 2, local) views.
        solarize_prob: solarize probability of the second global view.
    """

    def __init__(self, global_size: int = PHOTO_GLOBAL, local_size: int = PHOTO_LOCAL,
                 n_local: int = 6, global_scale: tuple[float, float] = GLOBAL_SCALE,
                 local_scale: tuple[float, float] = LOCAL_SCALE, hflip_prob: float = 0.5,
                 cj_prob: float = 0.8, cj_strength: float = 1.0, gray_prob: float = 0.2,
                 blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5),
                 solarize_prob: float = 0.2):
        check_multicrop_args(global_size, local_size, n_local, global_scale, local_scale,
                             hflip_prob=hflip_prob, cj_prob=cj_prob, gray_prob=gray_prob,
                             solarize_prob=solarize_prob, blur_probs=blur_probs)
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.n_local = int(n_local)

        s = cj_strength
        color = T.Compose([
            T.RandomApply([T.ColorJitter(0.4 * s, 0.4 * s, 0.2 * s, 0.1 * s)], p=cj_prob),
            T.RandomGrayscale(p=gray_prob),
        ])

        def view(size: int, scale: tuple[float, float], blur_p: float,
                 solarize_p: float = 0.0) -> T.Compose:
            steps = [
                T.RandomResizedCrop(size, scale=scale,
                                    interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                T.RandomHorizontalFlip(p=hflip_prob),
                color,
            ]
            if blur_p > 0 and size >= 3:  # reflect padding needs a side of 3+
                steps.append(T.RandomApply([T.GaussianBlur(_blur_kernel(size), (0.1, 2.0))],
                                           p=blur_p))
            if solarize_p > 0:
                steps.append(T.RandomSolarize(128, p=solarize_p))
            steps.append(_normalize())
            return T.Compose(steps)

        self.global1 = view(self.global_size, global_scale, blur_probs[0])
        self.global2 = view(self.global_size, global_scale, blur_probs[1], solarize_prob)
        self.local = view(self.local_size, local_scale, blur_probs[2])

    @property
    def n_views(self) -> int:
        return 2 + self.n_local

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = _to_rgb(img)
        views = [self.global1(img), self.global2(img)]
        views.extend(self.local(img) for _ in range(self.n_local))
        return views

    def global_view(self, img: Image.Image) -> torch.Tensor:
        """One global-1 view (used for nearest-neighbour positives)."""
        return self.global1(_to_rgb(img))

    def __repr__(self) -> str:
        return (f"MultiCropTransform(global_size={self.global_size}, "
                f"local_size={self.local_size}, n_local={self.n_local})")


def eval_transform(image_size: int, preprocess: Preprocess | None = None) -> T.Compose:
    """Deterministic transform for prediction: resize the short side, centre crop, normalise.

    With the default ``preprocess`` (every torchvision backbone): small images (< 64 px) are
    resized to exactly ``image_size`` on the short side (nothing more cropped away); larger ones
    use the usual 0.875 centre-crop ratio (256 → 224), ImageNet mean/std. A backbone's own
    :class:`Preprocess` sets the crop (``crop_pct``, or ``squash``: both sides to the size),
    the interpolation and the normalisation.
    """
    if int(image_size) < 1:
        raise ValueError(f"image_size must be ≥ 1, got {image_size!r}")
    p = preprocess or Preprocess()
    size = int(image_size)
    if p.resize_mode == "squash":
        resize: int | tuple[int, int] = (size, size)
    elif p.crop_pct is None:
        resize = size if size < 64 else int(round(size / 0.875))
    else:
        resize = int(math.floor(size / p.crop_pct))  # as timm's eval transform
    return T.Compose([
        T.Lambda(_to_rgb),
        T.Resize(resize, interpolation=p.mode, antialias=True),
        T.CenterCrop(size),
        p.normalize(),
    ])


def crop_sizes_for(image_sizes: Iterable[Sequence[int]] | None = None,
                   global_size: int | None = None,
                   local_size: int | None = None) -> tuple[int, int]:
    """Global and local crop sides for images of the given ``(width, height)`` sizes.

    Rule: the global crop is the median short side clamped to [16, 224]; the local crop keeps
    the paper's 96/224 ratio, at least 8 px (28-px images → 28/12, 16 → 16/8, photos → 224/96).
    Explicit ``global_size``/``local_size`` override the rule.
    """
    sides = sorted(min(int(w), int(h)) for w, h in (image_sizes or [])
                   if w is not None and h is not None)
    if global_size is None:
        if sides:
            median = sides[len(sides) // 2]
            global_size = max(MIN_GLOBAL, min(PHOTO_GLOBAL, median))
        else:
            global_size = PHOTO_GLOBAL
    if int(global_size) < 1:
        raise ValueError(f"global crop size must be ≥ 1, got {global_size!r}")
    if local_size is None:
        local_size = min(int(global_size),
                         max(MIN_LOCAL, int(round(global_size * PHOTO_LOCAL / PHOTO_GLOBAL))))
    if int(local_size) < 1:
        raise ValueError(f"local crop size must be ≥ 1, got {local_size!r}")
    return int(global_size), int(local_size)
