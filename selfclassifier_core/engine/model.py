"""The Self-Classifier network: backbone -> projection MLP (L2-normalised) -> classifier heads.

The model's config is a dataclass saved inside every checkpoint, so a checkpoint alone rebuilds
the model (``build_from_checkpoint``), like nanoGPT's ``GPTConfig(**checkpoint["model_args"])``.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .backbones import BACKBONES, build_backbone
from .heads import ClassifierHeads, ProjectionMLP

logger = logging.getLogger(__name__)

__all__ = ["ModelConfig", "ModelOutput", "SelfClassifier", "build_from_checkpoint", "warm_start"]

SMALL_INPUT_MAX_SIZE = 64


@dataclass
class ModelConfig:
    """Everything needed to rebuild a :class:`SelfClassifier` (weights aside).

    ``small_input=None`` means automatic: the small-image stem is used when ``image_size <= 64``.
    ``heads`` lists the class count of each classifier head (distinct positive ints).
    """

    backbone: str = "resnet18"
    image_size: int = 224
    small_input: bool | None = None
    proj_hidden_dim: int = 2048
    proj_layers: int = 2
    proj_bn: bool = True
    out_dim: int = 128
    heads: list[int] = field(default_factory=lambda: [10])

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(
                f"unknown backbone {self.backbone!r}; valid: {', '.join(sorted(BACKBONES))}"
            )
        for name in ("image_size", "proj_hidden_dim", "proj_layers", "out_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.small_input is not None and not isinstance(self.small_input, bool):
            raise ValueError(f"small_input must be True, False or None, got {self.small_input!r}")
        self.heads = list(self.heads)
        if not self.heads:
            raise ValueError("heads is empty: need at least one class count")
        for k in self.heads:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"head sizes must be positive ints, got {k!r} in {self.heads}")
        if len(set(self.heads)) != len(self.heads):
            raise ValueError(f"head sizes must be distinct, got {self.heads}")

    @property
    def use_small_input(self) -> bool:
        """The resolved small-input flag (automatic when ``small_input`` is None)."""
        if self.small_input is None:
            return self.image_size <= SMALL_INPUT_MAX_SIZE
        return self.small_input

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (``small_input`` as given, possibly None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid: {sorted(known)}")
        return cls(**dict(data))


class ModelOutput(NamedTuple):
    """``embedding``: [N, out_dim] L2-normalised; ``logits``: one [N, C_k] tensor per head."""

    embedding: torch.Tensor
    logits: list[torch.Tensor]


class SelfClassifier(nn.Module):
    """Backbone, projection MLP and classifier heads built from a :class:`ModelConfig`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise ValueError(f"config must be a ModelConfig, got {type(config).__name__}")
        self.config = config
        self.backbone, self.feature_dim = build_backbone(
            config.backbone, config.use_small_input, config.image_size
        )
        self.projection = ProjectionMLP(
            self.feature_dim, config.proj_hidden_dim, config.out_dim,
            num_layers=config.proj_layers, batch_norm=config.proj_bn,
        )
        self.heads = ClassifierHeads(config.out_dim, config.heads)

    @property
    def head_sizes(self) -> list[int]:
        return list(self.config.heads)

    def forward_features(self, feats: torch.Tensor) -> ModelOutput:
        """Projection and heads on precomputed backbone features ``[N, feature_dim]``."""
        embedding = self.projection(feats)
        return ModelOutput(embedding, self.heads(embedding))

    def forward(self, x: torch.Tensor) -> ModelOutput:
        return self.forward_features(self.backbone(x))

    def forward_views(self, views: Sequence[torch.Tensor]) -> list[ModelOutput]:
        """Forward a list of view batches (multi-crop), one :class:`ModelOutput` per view.

        The backbone runs once per distinct resolution on the concatenated views of that size,
        then projection and heads run once on all features (like DINO's MultiCropWrapper).
        """
        if not views:
            raise ValueError("views is empty")
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(tuple(v.shape[1:]), []).append(i)
        feats: list[torch.Tensor | None] = [None] * len(views)
        for idx in groups.values():
            out = self.backbone(torch.cat([views[i] for i in idx], dim=0))
            for i, chunk in zip(idx, torch.split(out, [views[i].shape[0] for i in idx], dim=0)):
                feats[i] = chunk
        sizes = [f.shape[0] for f in feats]  # type: ignore[union-attr]
        joint = self.forward_features(torch.cat(feats, dim=0))  # type: ignore[arg-type]
        embeddings = torch.split(joint.embedding, sizes, dim=0)
        per_head = [torch.split(z, sizes, dim=0) for z in joint.logits]
        return [
            ModelOutput(embeddings[v], [chunks[v] for chunks in per_head])
            for v in range(len(views))
        ]

    def checkpoint_dict(self) -> dict[str, Any]:
        """``{"model_config": dict, "model": state_dict}`` -- enough to rebuild the model."""
        return {"model_config": self.config.to_dict(), "model": self.state_dict()}


def warm_start(model: SelfClassifier, state: Mapping[str, torch.Tensor],
               skip_prefixes: Sequence[str] = ()) -> list[str]:
    """Copy a trained model's weights into ``model``, whose heads may have more classes.

    Every tensor of ``state`` whose name and shape match is copied; a head that grew gets the
    old classes in its first rows and keeps its fresh initialisation for the new ones (heads are
    matched by position). Names starting with one of ``skip_prefixes`` are left alone. Returns
    the names of ``model``'s tensors that were not copied (new, grown or skipped).
    """
    own = model.state_dict()
    untouched = []
    with torch.no_grad():
        for name, tensor in own.items():
            src = state.get(name)
            if src is None or any(name.startswith(p) for p in skip_prefixes):
                untouched.append(name)
                continue
            if tuple(src.shape) == tuple(tensor.shape):
                tensor.copy_(src)
            elif (name.startswith("heads.") and src.ndim == tensor.ndim == 2
                  and src.shape[1] == tensor.shape[1] and src.shape[0] < tensor.shape[0]):
                tensor[:src.shape[0]].copy_(src)
                untouched.append(name)
            else:
                raise ValueError(f"cannot start from the earlier run: {name} has shape "
                                 f"{tuple(src.shape)} there and {tuple(tensor.shape)} here")
    return untouched


def build_from_checkpoint(
    ckpt_or_path: Mapping[str, Any] | str | os.PathLike, map_location: Any = "cpu"
) -> SelfClassifier:
    """Rebuild a :class:`SelfClassifier` from a checkpoint dict or file.

    Files are read with ``torch.load(weights_only=True)``. The dict must hold ``"model_config"``
    and ``"model"`` (other keys such as the optimizer state are ignored).
    """
    if isinstance(ckpt_or_path, (str, os.PathLike)):
        path = os.fspath(ckpt_or_path)
        if not os.path.isfile(path):
            raise ValueError(f"checkpoint file not found: {path}")
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    else:
        ckpt = ckpt_or_path
    if not isinstance(ckpt, Mapping) or "model_config" not in ckpt or "model" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise ValueError(f"checkpoint needs 'model_config' and 'model', got {keys}")
    model = SelfClassifier(ModelConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    if isinstance(map_location, (str, torch.device)):
        model.to(map_location)
    return model
