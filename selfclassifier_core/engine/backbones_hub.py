"""Pretrained image towers from timm and open_clip: DINOv2, CLIP and SigLIP for fast mode.

Names (the registry in :mod:`.backbones` lists the short ones):

* ``dinov2_s``, ``dinov2_b``, ``dinov2_l``: timm ``vit_{small,base,large}_patch14_dinov2.lvd142m``
  (patch 14, 384/768/1024-d CLS features after the final norm).
* ``clip_b32``, ``clip_b16``, ``clip_l14``: open_clip ``ViT-B-32`` / ``laion2b_s34b_b79k``,
  ``ViT-B-16`` / ``datacomp_xl_s13b_b90k``, ``ViT-L-14`` / ``datacomp_xl_s13b_b90k``.
* ``siglip_b16``: open_clip ``ViT-B-16-SigLIP`` / ``webli`` (a timm trunk with attention pooling).
* ``timm:MODEL_NAME`` (any timm model, e.g. ``timm:vit_small_patch14_reg4_dinov2.lvd142m``) and
  ``open_clip:ARCH:TAG`` (e.g. ``open_clip:ViT-B-32:openai``).

:func:`build` makes the image tower with random weights and no network: a timm model with
``num_classes=0`` (its forward is the model's own pooled embedding; ViTs are built for the view
size with ``dynamic_img_size=True``, so other sizes work too), or :class:`OpenClipImageTower`
around open_clip's ``model.visual`` (forward = ``encode_image``; open_clip towers take exactly
the size they were built for). Parameter names are the libraries' own, so their checkpoints load
with :func:`selfclassifier_core.engine.pretrained.load_backbone_weights`.

:func:`preprocess` reads mean, std, interpolation and the evaluation crop from the library (timm's
data config, open_clip's pretrained config), never from constants here.

:func:`build_text_tower` makes the text side of an open_clip backbone (:class:`OpenClipTextTower`,
forward = ``encode_text``; the image tower is not built), :func:`text_state` picks its part of a
whole-CLIP checkpoint and :func:`tokenizer` is open_clip's (CLIP's ships in the wheel, SigLIP's
comes from the hub).

Weights (``--pretrained DEFAULT``) come from the Hugging Face hub cache (``HF_HUB_CACHE``, else
``HF_HOME/hub``, else ``~/.cache/huggingface/hub``), read at call time; they are downloaded only
when they are not cached and ``HF_HUB_OFFLINE`` is not set. timm and open_clip are imported inside
the functions that need them, never when this module is imported. Names and weight files
(:class:`HubSpec`, :func:`spec`, :func:`weights_file`, …) are :mod:`.hub_weights`, which imports
no torch, re-exported here.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

# names and weight files (no torch) live in .hub_weights; re-exported here for the callers
from .hub_weights import (SHORT_NAMES, HubSpec, HubWeightsError, _hub_files,  # noqa: F401
                          _import, _open_clip_cfg, download_command, has_text_tower,
                          hub_cache_dir, hub_offline, is_hub_name, is_known, library_hub_files,
                          spec, weights_available, weights_file, weights_identity)
from .transforms import Preprocess

log = logging.getLogger(__name__)

__all__ = ["HubSpec", "HubWeightsError", "OpenClipImageTower", "OpenClipTextTower", "SHORT_NAMES",
           "build", "build_text_tower", "download_command", "has_text_tower", "hub_cache_dir",
           "hub_offline", "is_hub_name", "load_state", "load_text_state", "patch_size",
           "prepare_state", "preprocess", "resize_positions", "spec", "text_state", "tokenizer",
           "weights_available", "weights_file", "weights_identity"]

# --------------------------------------------------------------------------- building
@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger
    for every build; the weights are loaded right after, so that line would only mislead."""
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()

    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


class OpenClipImageTower(nn.Module):
    """open_clip's image tower; ``forward`` is ``CLIP.encode_image`` (not L2-normalised).

    The tower is kept under ``visual`` so the names match open_clip's full-model checkpoints.
    Its position embeddings are built for ``image_size``: other sizes are an error.
    """

    def __init__(self, visual: nn.Module, image_size: int, name: str):
        super().__init__()
        self.visual = visual
        self.image_size = int(image_size)
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"backbone {self.name} was built for {self.image_size}x"
                             f"{self.image_size} px inputs, got {x.shape[-2]}x{x.shape[-1]}; "
                             "build it for that size (open_clip towers take one size)")
        return self.visual(x)


def build(name: str, image_size: int) -> tuple[nn.Module, int]:
    """The image tower of ``name`` with random weights for ``image_size`` px inputs (no network).

    ``image_size`` is used as given (the recipes keep it a multiple of :func:`patch_size`).

    Returns:
        ``(module, feature_dim)``; ``module(x)`` gives the pooled image embedding ``[N, dim]``.
    """
    s = spec(name)
    size = int(image_size)
    if size < patch_size(name):
        raise ValueError(f"backbone {name} needs inputs of at least {patch_size(name)} px "
                         f"(its patch), got image_size={image_size!r}")
    if s.library == "timm":
        timm = _import("timm")
        try:  # ViT-like: built for the view size, other sizes interpolate the positions
            net = timm.create_model(s.model, pretrained=False, num_classes=0, img_size=size,
                                    dynamic_img_size=True)
        except TypeError:  # a convnet: no such arguments, any size works
            net = timm.create_model(s.model, pretrained=False, num_classes=0)
        return net, int(net.num_features)
    open_clip = _import("open_clip")
    cfg = _open_clip_cfg(s)
    pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    with _quiet_random_init():
        model = open_clip.create_model(s.model, pretrained=None, force_image_size=size,
                                       force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                                       force_preprocess_cfg=pp)
    dim = int(open_clip.get_model_config(s.model)["embed_dim"])
    visual = model.visual
    del model  # the text tower is not needed for image features
    return OpenClipImageTower(visual, size, name), dim


def patch_size(name: str) -> int:
    """The side view sizes should be a multiple of (the ViT patch; 1 for convnets)."""
    s = spec(name)
    if s.library == "open_clip":
        vision = _import("open_clip").get_model_config(s.model)["vision_cfg"]
        if "patch_size" in vision:
            return int(vision["patch_size"])
        model = vision.get("timm_model_name", "")
    else:
        model = s.model
    found = re.search(r"patch(\d+)", model)
    return int(found.group(1)) if found else 1


def native_size(name: str) -> int:
    """The input side the library's pretrained weights were trained at."""
    s = spec(name)
    if s.library == "open_clip":
        size = _import("open_clip").get_model_config(s.model)["vision_cfg"]["image_size"]
        return int(size if isinstance(size, int) else size[-1])
    return int(_timm_data_config(s)["input_size"][-1])


def fixed_size(name: str) -> bool:
    """True when the built tower takes only the size it was built for (open_clip towers)."""
    return spec(name).library == "open_clip"


def _timm_data_config(s: HubSpec) -> dict[str, Any]:
    timm = _import("timm")
    cfg = timm.models.get_pretrained_cfg(s.model)
    return timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg else {})


def preprocess(name: str) -> Preprocess:
    """Mean, std, interpolation and evaluation crop as the library reports them for ``name``."""
    s = spec(name)
    if s.library == "timm":
        data = _timm_data_config(s)
        mode = data.get("crop_mode", "center")
        return Preprocess(mean=tuple(float(v) for v in data["mean"]),
                          std=tuple(float(v) for v in data["std"]),
                          interpolation=str(data["interpolation"]),
                          crop_pct=float(data.get("crop_pct") or 1.0),
                          resize_mode="squash" if mode == "squash" else "shortest")
    from open_clip.transform import PreprocessCfg

    base = PreprocessCfg()
    cfg = _open_clip_cfg(s)
    resize_mode = cfg.get("resize_mode", base.resize_mode)
    if resize_mode not in ("shortest", "squash"):
        raise ValueError(f"backbone {name}: open_clip resize_mode {resize_mode!r} is not "
                         "supported (shortest, squash)")
    return Preprocess(mean=tuple(float(v) for v in cfg.get("mean", base.mean)),
                      std=tuple(float(v) for v in cfg.get("std", base.std)),
                      interpolation=str(cfg.get("interpolation", base.interpolation)),
                      crop_pct=1.0, resize_mode=resize_mode)


def load_state(name: str) -> tuple[dict[str, torch.Tensor], str, Path]:
    """The library's pretrained weights of ``name``: ``(state dict, source, file)``.

    Read from the hub cache; downloaded when not cached and not offline.

    Raises:
        HubWeightsError: offline (or the hub unreachable) with nothing cached; the message says
            how to download them once or pass a file.
    """
    s = spec(name)
    repo, revision, files = _hub_files(s)
    path = weights_file(name)
    if path is None:
        cache = hub_cache_dir()
        how = (f"download them once with `{download_command(name)}` (on a machine online, "
               "then copy its Hugging Face cache here; HF_HOME or HF_HUB_CACHE point at it), "
               f"or pass a weights file: --pretrained /path/to/{files[0]}")
        if hub_offline():
            raise HubWeightsError(f"no weights for backbone {name} ({repo}) in the Hugging Face "
                                  f"cache {cache} and HF_HUB_OFFLINE is set; {how}")
        path = _download(repo, revision, files, cache, name, how)
    return _read_weights(path), f"{repo}/{path.name}", path


def _unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub (``HF_ENDPOINT``) cannot be reached, or None: one TCP connection, so an
    offline machine gets its answer in seconds, not after huggingface_hub's retries (~25 s).
    Behind a proxy (``HTTPS_PROXY`` …) nothing is probed: huggingface_hub goes through it."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY",
                                       "http_proxy", "ALL_PROXY", "all_proxy")):
        return None

    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http"
                                                                else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"{host} cannot be reached: {exc}"
    return None


def _download(repo: str, revision: str | None, files: list[str], cache: Path, name: str,
              how: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    reason = _unreachable()
    if reason is not None:
        raise HubWeightsError(f"cannot download the weights of backbone {name} ({repo}: "
                              f"{reason}); {how}")
    reason = "not found"
    for filename in files:
        try:
            log.info("downloading %s/%s into %s", repo, filename, cache)
            return Path(hf_hub_download(repo, filename, revision=revision, cache_dir=cache))
        except LocalEntryNotFoundError as exc:  # offline / unreachable: another name won't help
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            break
        except EntryNotFoundError:
            continue
        except Exception as exc:  # noqa: BLE001 - HTTP errors, timeouts, gated repos ...
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            break
    raise HubWeightsError(f"cannot download the weights of backbone {name} ({repo}: {reason}); "
                          f"{how}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def prepare_state(name: str, state: Mapping[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The part of a checkpoint that belongs to the image tower: ``(state, ignored keys)``.

    open_clip checkpoints hold the whole CLIP model: only its ``visual.*`` keys are kept (text
    tower, ``logit_scale`` … ignored). timm: Meta's original DINOv2 files name the register
    tokens ``register_tokens`` and carry a ``mask_token`` that timm's model has no place for.
    """
    s = spec(name)
    state = dict(state)
    ignored: list[str] = []
    if s.library == "open_clip":
        def lead(k: str) -> str:
            for p in ("module.", "_orig_mod."):
                k = k[len(p):] if k.startswith(p) else k
            return k

        if any(lead(k).startswith("visual.") for k in state):
            ignored = sorted(k for k in state if not lead(k).startswith("visual."))
            state = {k: v for k, v in state.items() if lead(k).startswith("visual.")}
        return state, ignored
    for k in list(state):  # under any prefix (module., backbone., ...)
        if k == "mask_token" or k.endswith(".mask_token"):
            del state[k]
            ignored.append(k)
        elif k == "register_tokens" or k.endswith(".register_tokens"):
            state[k[:-len("register_tokens")] + "reg_token"] = state.pop(k)
    return state, ignored


def resize_positions(module: nn.Module, key: str, weights: torch.Tensor,
                     target: torch.Tensor) -> torch.Tensor | None:
    """``weights`` (position embeddings trained at another size) resampled to ``target``'s grid,
    or None when ``key`` is no position embedding this knows."""
    owner_name, _, leaf = key.rpartition(".")
    try:
        owner = module.get_submodule(owner_name) if owner_name else module
    except AttributeError:
        return None
    if leaf == "pos_embed" and weights.ndim == 3 and hasattr(owner, "patch_embed"):
        from timm.layers import resample_abs_pos_embed

        prefix = 0 if getattr(owner, "no_embed_class", False) else int(
            getattr(owner, "num_prefix_tokens", 1))
        out = resample_abs_pos_embed(weights, new_size=list(owner.patch_embed.grid_size),
                                     num_prefix_tokens=prefix)
    elif leaf == "positional_embedding" and weights.ndim == 2 and hasattr(owner, "grid_size"):
        grid = owner.grid_size if isinstance(owner.grid_size, tuple) else (owner.grid_size,) * 2
        old = int(round((weights.shape[0] - 1) ** 0.5))
        patch = weights[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
        patch = torch.nn.functional.interpolate(patch, size=tuple(grid), mode="bicubic",
                                                antialias=True, align_corners=False)
        patch = patch.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(weights.dtype)
        out = torch.cat([weights[:1], patch], dim=0)
    else:
        return None
    return out if tuple(out.shape) == tuple(target.shape) else None


# --------------------------------------------------------------------------- text towers
# the vision tower open_clip builds next to a text tower that is all we want (removed right after)
_NO_VISION = {"image_size": 32, "patch_size": 32, "layers": 1, "width": 64, "head_width": 64}


class OpenClipTextTower(nn.Module):
    """open_clip's text side of a CLIP model: ``forward(tokens)`` is ``encode_text`` (not
    L2-normalised); :attr:`logit_scale` (and SigLIP's :attr:`logit_bias`) as trained.

    The model is open_clip's own (``CLIP`` or ``CustomTextCLIP``) without its image tower, so a
    whole-CLIP checkpoint's non-``visual.*`` keys load into it under their own names. A CLIP
    text transformer with a causal mask pooled at the end-of-text token reads each prompt only up
    to that token, so batches are cut there (prompts are short, the context is 77 tokens): the
    result is the same, several times faster.
    """

    def __init__(self, model: nn.Module, name: str):
        super().__init__()
        self.model = model
        self.name = name
        self._cut = (hasattr(model, "transformer") and hasattr(model, "positional_embedding")
                     and getattr(model, "text_pool_type", None) == "argmax"
                     and getattr(model, "attn_mask", None) is not None)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().reshape(-1)[0])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if not self._cut:
            return m.encode_text(tokens)
        from open_clip.transformer import text_global_pool

        n = int(tokens.argmax(dim=-1).max()) + 1  # the last end-of-text token (highest id)
        tokens = tokens[:, :n]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        x = x + m.positional_embedding[:n].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = text_global_pool(x, tokens, m.text_pool_type,
                             eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = m.text_projection(x) if isinstance(m.text_projection, nn.Linear) \
                else x @ m.text_projection
        return x


def build_text_tower(name: str) -> OpenClipTextTower:
    """The text tower of the open_clip backbone ``name`` with random weights (no network).

    ValueError naming the backbone for one without a text tower (timm, torchvision)."""
    if not has_text_tower(name):
        raise ValueError(f"backbone {name!r} has no text tower (only the open_clip CLIP and "
                         "SigLIP backbones have one, e.g. clip_b32)")
    s = spec(name)
    open_clip = _import("open_clip")
    cfg = _open_clip_cfg(s)
    with _quiet_random_init(), _quiet_root_info():
        model = open_clip.create_model(s.model, pretrained=None,
                                       force_quick_gelu=bool(cfg.get("quick_gelu", False)),
                                       vision_cfg=dict(_NO_VISION))
    model.visual = None  # out of the state dict and of memory; encode_text never uses it
    return OpenClipTextTower(model.eval(), name)


def text_state(name: str, state: Mapping[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The text side of a whole-CLIP checkpoint of ``name``: ``(state, ignored keys)``.

    ``module.`` / ``_orig_mod.`` prefixes are stripped, ``visual.*`` keys left out; checkpoints
    that keep a SigLIP-style text tower under flat names are converted as open_clip does."""
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in state.items():
        key = k
        for p in ("module.", "_orig_mod."):
            key = key[len(p):] if key.startswith(p) else key
        if key.startswith("visual."):
            ignored.append(k)
        else:
            out[key] = v
    open_clip = _import("open_clip")
    if open_clip.get_model_config(spec(name).model).get("custom_text") and not any(
            k.startswith("text.") for k in out):
        from open_clip.model import convert_to_custom_text_state_dict

        out = convert_to_custom_text_state_dict(out)
    return out, ignored


def load_text_state(tower: OpenClipTextTower, state: Mapping[str, torch.Tensor],
                    source: str) -> int:
    """Copy ``state`` (from :func:`text_state`) into ``tower`` strictly; returns the tensors
    loaded. ValueError in one line when the weights hold no text tower or do not fit it."""
    own = tower.model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if len(missing) == len(own):
        raise ValueError(f"{source} holds no text tower for {tower.name} (only "
                         f"{len(state)} non-image keys, none of the text tower's: "
                         f"{', '.join(missing[:3])} …); use the whole CLIP checkpoint")
    wrong = [f"{k} (weights {tuple(state[k].shape)} vs model {tuple(own[k].shape)})"
             for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = ([f"{len(missing)} missing ({', '.join(missing[:3])})"] if missing else []) + \
                ([f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})"]
                 if unexpected else []) + \
                ([f"{len(wrong)} of other shapes ({', '.join(wrong[:2])})"] if wrong else [])
        raise ValueError(f"the weights in {source} do not fit the text tower of {tower.name}: "
                         + "; ".join(parts))
    with torch.no_grad():
        for k, t in state.items():
            own[k].copy_(t.to(dtype=own[k].dtype))
    return len(own)


@contextlib.contextmanager
def _quiet_root_info() -> Iterator[None]:
    """open_clip's tokenizer look-up logs each step at INFO on the root logger."""
    root = logging.getLogger()

    def drop(record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or record.name != "root"

    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def tokenizer(name: str):
    """open_clip's tokenizer of ``name``: ``tokenizer(list of texts) -> LongTensor [n, context]``.

    CLIP's BPE vocabulary ships inside the open_clip wheel (offline); SigLIP's tokenizer comes
    from the Hugging Face hub through ``transformers``: when it cannot be had, a ValueError in
    one line says how to get it."""
    s = spec(name)
    open_clip = _import("open_clip")
    text_cfg = open_clip.get_model_config(s.model).get("text_cfg", {})
    hf_name = text_cfg.get("hf_tokenizer_name")
    try:
        with _quiet_root_info():
            return open_clip.get_tokenizer(s.model)
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError offline, HTTP errors ...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not hf_name:
            raise ValueError(f"the text tokenizer of backbone {name} cannot be made: "
                             f"{reason}") from None
        raise ValueError(f"the text tokenizer of backbone {name} ({hf_name}) comes from the "
                         f"Hugging Face hub and is not available here ({reason}); install "
                         f"transformers (pip install transformers) and download it once with "
                         f"`hf download {hf_name}` on a machine online (then copy its Hugging "
                         "Face cache here; HF_HOME or HF_HUB_CACHE point at it)") from None
