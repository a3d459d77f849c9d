"""Backbones by name: torchvision networks (``weights=None``) that return pooled features.

Every builder keeps torchvision's parameter names: the classifier is replaced by
``nn.Identity`` instead of wrapping the network, so a torchvision state dict loads straight in
(:func:`selfclassifier_core.engine.pretrained.load_backbone_weights` does, strictly). What each backbone does with small images (``small_input``,
chosen by the model config for ``image_size <= 64``):

* ``resnet18/34/50``: CIFAR-style stem -- ``conv1`` becomes a 3x3 stride-1 conv and the max-pool
  is removed, so the total down-sampling is 8 instead of 32 (a 32-px image ends on a 4x4 map).
  ``conv1`` then no longer matches ImageNet weights (3x3 instead of 7x7); the rest does.
* ``convnext_tiny``: the 4x4 stride-4 patchify stem becomes a 3x3 stride-1 conv (same names),
  total down-sampling 8. Without it, 32 px is the smallest input (1x1 final map).
* ``efficientnet_b0``: the stem conv keeps its 3x3 weights but uses stride 1 (ImageNet weights
  still load), total down-sampling 16. Without it, works from 32 px.
* ``vit_b_16``: built for ``image_size`` rounded to a multiple of 16 (at least 16); inputs of
  any size >= 16 px are accepted, the position embeddings are interpolated (bicubic, as in DINO)
  to the input's patch grid, so multi-crop views of several sizes share one network. There is
  no small-input change: a 32-px image is a 2x2 patch grid.
* ``efficientnet_lite0``: built by ``selfclassifier_core.engine.backbones_lite`` (imported only when
  asked for).
* ``convnet_small``: not from torchvision -- a small VGG-style network for tiny images on a CPU
  (a 32-channel 3x3 stem, then two stages of two 3x3 conv-BN-ReLU layers at 64 and 128
  channels, the first of each with stride 2, and global average pooling; 128 features, about
  0.3 M parameters). With the small-image stem the total down-sampling is 4 (a 16-px crop ends
  on a 4x4 map); without it the stem has stride 2 and a 2x2 max-pool (down-sampling 16). It is
  the trainer's default for crops <= 32 px on a CPU, where it trains an order of magnitude
  faster than resnet18 with the small-image stem. No pretrained weights exist for it.
* ``dinov2_s/b/l``, ``clip_b32/b16/l14``, ``siglip_b16`` and the general forms ``timm:MODEL`` and
  ``open_clip:ARCH:TAG``: pretrained image towers from timm and open_clip, built by
  :mod:`selfclassifier_core.engine.backbones_hub` (the libraries are imported only when one is
  asked for). They have no small-input variant; they are built for ``image_size`` (a multiple of
  :func:`size_multiple`, their patch), and bring their own pixel statistics
  (:func:`backbone_preprocess`). Meant for fast mode (frozen, one view size).

Every backbone's preprocessing is :func:`backbone_preprocess`: ImageNet mean/std and bicubic
resampling for the torchvision ones (as always), the library's own for the hub ones.
"""
from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models
from torchvision.models.vision_transformer import VisionTransformer

from . import backbones_hub
from .transforms import Preprocess

logger = logging.getLogger(__name__)

__all__ = ["BACKBONES", "ConvNetSmall", "backbone_preprocess", "build_backbone",
           "is_hub_backbone", "min_input_size", "resize_pos_embedding", "size_multiple"]

Builder = Callable[[bool, int], tuple[nn.Module, int]]


def _resnet(factory: Callable[..., models.ResNet]) -> Builder:
    def build(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
        net = factory(weights=None)
        if small_input:
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
            net.maxpool = nn.Identity()
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim

    return build


def _convnext_tiny(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
    net = models.convnext_tiny(weights=None)
    if small_input:
        stem = net.features[0][0]
        net.features[0][0] = nn.Conv2d(3, stem.out_channels, kernel_size=3, stride=1, padding=1)
        nn.init.trunc_normal_(net.features[0][0].weight, std=0.02)
        nn.init.zeros_(net.features[0][0].bias)
    dim = net.classifier[2].in_features
    net.classifier[2] = nn.Identity()  # keeps classifier.0 (LayerNorm2d) and Flatten
    return net, dim


def _efficientnet_b0(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
    net = models.efficientnet_b0(weights=None)
    if small_input:
        net.features[0][0].stride = (1, 1)
    dim = net.classifier[1].in_features
    net.classifier = nn.Identity()  # Dropout + Linear; Dropout has no parameters
    return net, dim


class _AnySizeViT(VisionTransformer):
    """torchvision's ViT (same parameter names) accepting any input size >= one patch.

    The position embeddings (learnt for ``image_size``) are interpolated to the input's grid.
    """

    def _pos_embedding(self, n_h: int, n_w: int) -> torch.Tensor:
        pos = self.encoder.pos_embedding
        grid = self.image_size // self.patch_size
        if n_h == grid and n_w == grid:
            return pos
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        patch_pos = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos.float(), size=(n_h, n_w), mode="bicubic",
                                  align_corners=False).to(pos.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, n_h * n_w, -1)
        return torch.cat([cls_pos, patch_pos], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        if h < p or w < p:
            raise ValueError(f"vit_b_16 needs inputs of at least {p}x{p} px, got {h}x{w}")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x).reshape(n, self.hidden_dim, n_h * n_w).permute(0, 2, 1)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        enc = self.encoder
        x = x + self._pos_embedding(n_h, n_w)
        x = enc.ln(enc.layers(enc.dropout(x)))
        return self.heads(x[:, 0])


def _vit_b_16(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
    size = max(16, int(round(image_size / 16)) * 16)
    # the same arguments as torchvision.models.vit_b_16
    net = _AnySizeViT(image_size=size, patch_size=16, num_layers=12, num_heads=12,
                      hidden_dim=768, mlp_dim=3072)
    dim = net.hidden_dim
    net.heads = nn.Identity()
    return net, dim


def _efficientnet_lite0(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
    try:
        lite = importlib.import_module("selfclassifier_core.engine.backbones_lite")
    except ImportError as exc:
        raise ValueError(
            f"backbone 'efficientnet_lite0' is not available: {exc}"
        ) from exc
    return lite.build(small_input, image_size)


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ConvNetSmall(nn.Module):
    """Small VGG-style network for tiny images (see the module docstring); returns ``[N, 128]``.

    Args:
        small_input: keep full resolution in the stem (for images of 8 to 64 px).
        widths: channels of the stem and the two stages.
    """

    def __init__(self, small_input: bool = True, widths: tuple[int, int, int] = (32, 64, 128)):
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {widths!r}")
        c0, c1, c2 = (int(w) for w in widths)
        stem: list[nn.Module] = [*_conv_bn_relu(3, c0, stride=1 if small_input else 2)]
        if not small_input:
            stem.append(nn.MaxPool2d(2))
        self.stem = nn.Sequential(*stem)
        self.stage1 = nn.Sequential(_conv_bn_relu(c0, c1, 2), _conv_bn_relu(c1, c1))
        self.stage2 = nn.Sequential(_conv_bn_relu(c1, c2, 2), _conv_bn_relu(c2, c2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = c2
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return torch.flatten(self.pool(x), 1)


def _convnet_small(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
    net = ConvNetSmall(small_input)
    return net, net.out_dim


def _hub(name: str) -> Builder:
    def build(small_input: bool, image_size: int) -> tuple[nn.Module, int]:
        return backbones_hub.build(name, image_size)  # no small-input variant

    return build


class _Registry(dict):
    """The named builders; ``in`` and ``[]`` also accept the general forms ``timm:MODEL`` and
    ``open_clip:ARCH:TAG`` that the installed library knows (iteration lists the named ones)."""

    def __contains__(self, name: object) -> bool:
        return dict.__contains__(self, name) or (
            isinstance(name, str) and backbones_hub.is_hub_name(name)
            and backbones_hub.is_known(name))

    def __missing__(self, name: str) -> Builder:
        if isinstance(name, str) and backbones_hub.is_hub_name(name):
            backbones_hub.spec(name)  # ValueError naming what is wrong with it
            return _hub(name)
        raise KeyError(name)


BACKBONES: dict[str, Builder] = _Registry({
    "resnet18": _resnet(models.resnet18),
    "resnet34": _resnet(models.resnet34),
    "resnet50": _resnet(models.resnet50),
    "vit_b_16": _vit_b_16,
    "convnext_tiny": _convnext_tiny,
    "efficientnet_b0": _efficientnet_b0,
    "efficientnet_lite0": _efficientnet_lite0,
    "convnet_small": _convnet_small,
    **{name: _hub(name) for name in backbones_hub.SHORT_NAMES},
})

# smallest input side each backbone handles (normal stem, small stem); hub backbones: their patch
_MIN_SIZE = {
    "resnet18": (32, 8), "resnet34": (32, 8), "resnet50": (32, 8),
    "vit_b_16": (16, 16), "convnext_tiny": (32, 8), "efficientnet_b0": (32, 16),
    "efficientnet_lite0": (32, 16), "convnet_small": (32, 8),
}


def is_hub_backbone(name: str) -> bool:
    """True for the timm / open_clip backbones (short names and general forms)."""
    return backbones_hub.is_hub_name(name)


def min_input_size(name: str, small_input: bool) -> int:
    """Smallest image side in pixels that ``name`` is meant to take (for checks and tests)."""
    _check_name(name)
    if is_hub_backbone(name):
        return backbones_hub.patch_size(name)
    return _MIN_SIZE[name][1 if small_input else 0]


def size_multiple(name: str) -> int:
    """Input sides of ``name`` should be multiples of this: the patch of a timm / open_clip ViT
    (14 for DINOv2), 1 for the others (torchvision's ``vit_b_16`` rounds by itself)."""
    _check_name(name)
    return backbones_hub.patch_size(name) if is_hub_backbone(name) else 1


def backbone_preprocess(name: str) -> Preprocess:
    """The pixel statistics, resampling and evaluation crop ``name`` expects: the library's own
    for the hub backbones, today's ImageNet default for the others."""
    _check_name(name)
    return backbones_hub.preprocess(name) if is_hub_backbone(name) else Preprocess()


def _check_name(name: str) -> None:
    if is_hub_backbone(name) and name not in backbones_hub.SHORT_NAMES:
        backbones_hub.spec(name)  # a general form: ValueError naming what the library lacks
        return
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(BACKBONES))}, "
                         "timm:MODEL_NAME, open_clip:ARCH:TAG")


def build_backbone(name: str, small_input: bool, image_size: int = 224) -> tuple[nn.Module, int]:
    """Build backbone ``name`` with random weights.

    Args:
        name: one of :data:`BACKBONES` (or ``timm:MODEL`` / ``open_clip:ARCH:TAG``).
        small_input: use the small-image variant described in the module docstring (the hub
            backbones have none and ignore it).
        image_size: training image side (used by the ViTs for their position embeddings).

    Returns:
        ``(module, feature_dim)``; ``module(x)`` gives ``[N, feature_dim]``.
    """
    _check_name(name)
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    net, dim = BACKBONES[name](bool(small_input), int(image_size))
    logger.debug("built backbone %s (small_input=%s, dim=%d)", name, small_input, dim)
    return net, dim


def resize_pos_embedding(pos: torch.Tensor, length: int) -> torch.Tensor:
    """Bicubically resize ViT position embeddings ``[1, 1 + g*g, D]`` to ``length = 1 + h*h``."""
    old_grid, new_grid = math.isqrt(pos.shape[1] - 1), math.isqrt(length - 1)
    patch = pos[:, 1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos.dtype)
    return torch.cat([pos[:, :1], patch], dim=1)
