"""The names of the backbones the trainer builds, without importing torch: the app lists them
in its form before anything loads. The builders are :data:`.backbones.BACKBONES`, keyed by
exactly these names in this order (a test checks it); ``timm:MODEL`` and
``open_clip:ARCH:TAG`` are accepted besides (:func:`.hub_weights.is_hub_name`).
"""
from __future__ import annotations

from .hub_weights import SHORT_NAMES

__all__ = ["BUILT_IN", "NAMES"]

BUILT_IN = ("resnet18", "resnet34", "resnet50", "vit_b_16", "convnext_tiny", "efficientnet_b0",
            "efficientnet_lite0", "convnet_small")
NAMES = BUILT_IN + tuple(SHORT_NAMES)
