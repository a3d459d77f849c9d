"""Hub backbone names and their weight files: what a name stands for (:class:`HubSpec`), where
the Hugging Face cache is and whether a backbone's weights are in it -- without importing torch,
timm or open_clip (the libraries are imported only to check a ``timm:``/``open_clip:`` name or
to ask a library where its weights are), so the app can say which backbones are ready before
anything loads. Building towers and loading weights is :mod:`.backbones_hub`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_NAMES", "HubSpec", "HubWeightsError", "INSTALL_HINT", "SHORT_NAMES",
           "WEIGHT_SUFFIXES", "download_command", "has_text_tower", "hub_cache_dir",
           "hub_offline", "is_hub_name", "is_known", "is_weights_file", "library_hub_files",
           "spec", "weights_available", "weights_file", "weights_identity"]

INSTALL_HINT = "pip install 'timm>=1.0' 'open_clip_torch>=3.0'"
TRUE_VALUES = {"1", "on", "yes", "true"}  # as huggingface_hub reads HF_HUB_OFFLINE
# what --pretrained may say for a hub backbone's own pretrained weights (besides its name/tag)
DEFAULT_NAMES = {"default"}


class HubWeightsError(ValueError):
    """The library's pretrained weights are not on this machine and cannot be downloaded."""


@dataclass(frozen=True)
class HubSpec:
    """What a hub backbone name stands for.

    Args:
        name: the registry name (``dinov2_s``, ``timm:MODEL``, ``open_clip:ARCH:TAG``).
        library: ``timm`` or ``open_clip``.
        model: timm model name (with its pretrained tag) or open_clip architecture.
        tag: open_clip pretrained tag (None for timm).
        family: shown in the app and the README (DINOv2, CLIP, SigLIP, timm, open_clip).
        licence: licence of the pretrained weights.
        hub_repo: the Hugging Face repo of the weights, written out for the short names so the
            app can tell which are cached without importing timm / open_clip (a test checks it
            against the library); None: asked from the library.
    """

    name: str
    library: str
    model: str
    tag: str | None = None
    family: str = ""
    licence: str = ""
    hub_repo: str | None = None

    @property
    def hub_files(self) -> tuple[str, ...]:
        """Weights file names in a repo, in the order the library tries them."""
        return (("model.safetensors", "pytorch_model.bin") if self.library == "timm"
                else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


SHORT_NAMES: dict[str, HubSpec] = {s.name: s for s in (
    HubSpec("dinov2_s", "timm", "vit_small_patch14_dinov2.lvd142m", None, "DINOv2", "Apache-2.0",
            "timm/vit_small_patch14_dinov2.lvd142m"),
    HubSpec("dinov2_b", "timm", "vit_base_patch14_dinov2.lvd142m", None, "DINOv2", "Apache-2.0",
            "timm/vit_base_patch14_dinov2.lvd142m"),
    HubSpec("dinov2_l", "timm", "vit_large_patch14_dinov2.lvd142m", None, "DINOv2", "Apache-2.0",
            "timm/vit_large_patch14_dinov2.lvd142m"),
    HubSpec("clip_b32", "open_clip", "ViT-B-32", "laion2b_s34b_b79k", "CLIP", "MIT",
            "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    HubSpec("clip_b16", "open_clip", "ViT-B-16", "datacomp_xl_s13b_b90k", "CLIP", "MIT",
            "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    HubSpec("clip_l14", "open_clip", "ViT-L-14", "datacomp_xl_s13b_b90k", "CLIP", "MIT",
            "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
    HubSpec("siglip_b16", "open_clip", "ViT-B-16-SigLIP", "webli", "SigLIP", "Apache-2.0",
            "timm/ViT-B-16-SigLIP"),
)}


def _import(library: str):
    try:
        if library == "timm":
            import timm
            import timm.data  # noqa: F401 - resolve_data_config

            return timm
        import open_clip

        return open_clip
    except ImportError as exc:
        raise ValueError(f"the {library} backbones need {library}: {INSTALL_HINT} ({exc})") from exc


def is_hub_name(name: Any) -> bool:
    """True for a short hub name or the general forms ``timm:…`` / ``open_clip:…`` (syntax only;
    :func:`spec` checks that the library knows the model)."""
    return isinstance(name, str) and (name in SHORT_NAMES or name.startswith(("timm:",
                                                                               "open_clip:")))


def spec(name: str) -> HubSpec:
    """The :class:`HubSpec` of ``name``, checked against the library (ValueError naming it)."""
    if name in SHORT_NAMES:
        return SHORT_NAMES[name]
    if not is_hub_name(name):
        raise ValueError(f"{name!r} is not a hub backbone; use {', '.join(SHORT_NAMES)}, "
                         "timm:MODEL_NAME or open_clip:ARCH:TAG")
    library, _, rest = name.partition(":")
    if library == "timm":
        if not rest:
            raise ValueError(f"backbone {name!r}: give a timm model after 'timm:', e.g. "
                             "timm:vit_small_patch14_reg4_dinov2.lvd142m")
        timm = _import("timm")
        if not timm.is_model(rest):
            raise ValueError(f"backbone {name!r}: timm has no model {rest!r} "
                             "(timm.list_models() lists them)")
        cfg = timm.models.get_pretrained_cfg(rest)
        return HubSpec(name, "timm", rest, None, "timm", (cfg.license or "") if cfg else "")
    arch, _, tag = rest.partition(":")
    open_clip = _import("open_clip")
    if arch not in open_clip.list_models():
        raise ValueError(f"backbone {name!r}: open_clip has no architecture {arch!r} "
                         "(open_clip.list_models() lists them)")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if not tag or tag not in tags:
        raise ValueError(f"backbone {name!r}: give a pretrained tag of {arch} as "
                         f"open_clip:{arch}:TAG, one of {', '.join(tags) or '(none known)'}")
    return HubSpec(name, "open_clip", arch, tag, "open_clip", "")


def is_known(name: str) -> bool:
    """True when ``name`` is a hub backbone the installed libraries can build."""
    if not is_hub_name(name):
        return False
    try:
        spec(name)
    except ValueError:
        return False
    return True


def _open_clip_cfg(s: HubSpec) -> dict[str, Any]:
    return dict(_import("open_clip").get_pretrained_cfg(s.model, s.tag))


# --------------------------------------------------------------------------- weights
def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` says not to use the network (read at call time)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE_VALUES


def _hub_files(s: HubSpec) -> tuple[str, str | None, list[str]]:
    """``(repo id, revision, file names in the order tried)`` of the weights of ``s``."""
    if s.hub_repo:
        return s.hub_repo, None, list(s.hub_files)
    return library_hub_files(s)


def library_hub_files(s: HubSpec) -> tuple[str, str | None, list[str]]:
    """:func:`_hub_files` as the library's pretrained config says (imports it)."""
    if s.library == "timm":
        cfg = _import("timm").models.get_pretrained_cfg(s.model)
        hub_id = cfg.hf_hub_id if cfg else None
        if not hub_id or hub_id.endswith("/"):
            raise HubWeightsError(f"timm has no Hugging Face weights for {s.model}; pass a "
                                  "weights file with --pretrained PATH")
        repo, _, revision = hub_id.partition("@")
        files = ([cfg.hf_hub_filename] if cfg.hf_hub_filename
                 else ["model.safetensors", "pytorch_model.bin"])
        return repo, revision or None, files
    hub = _open_clip_cfg(s).get("hf_hub", "")
    if not hub:
        raise HubWeightsError(f"open_clip has no Hugging Face weights for {s.model}:{s.tag}; "
                              "pass a weights file with --pretrained PATH")
    repo, filename = os.path.split(hub)  # "org/repo/" or "org/repo/file", as open_clip reads it
    files = [filename] if filename else ["open_clip_pytorch_model.bin"]
    if files[0].endswith((".bin", ".pth")):
        files.insert(0, files[0][:-4] + ".safetensors")
    if files[0] == "open_clip_pytorch_model.safetensors":
        files[0] = "open_clip_model.safetensors"
    return repo, None, files


def weights_file(name: str) -> Path | None:
    """The cached weights file of ``name`` in the hub cache, or None (never uses the network)."""
    repo, revision, files = _hub_files(spec(name))
    if not (hub_cache_dir() / f"models--{repo.replace('/', '--')}").is_dir():
        return None  # the hub cache's folder of the repo: none, so no import (0.2-0.4 s)
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        found = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir(),
                                       revision=revision)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    return None


def weights_available(name: str) -> bool:
    """True when the library weights of ``name`` are in the hub cache (no network)."""
    try:
        return weights_file(name) is not None
    except (ValueError, ImportError):
        return False


def download_command(name: str) -> str:
    """The one command that puts the weights of ``name`` into the hub cache."""
    repo, revision, files = _hub_files(spec(name))
    rev = f" --revision {revision}" if revision else ""
    return f"hf download {repo} {files[0]}{rev}"


def weights_identity(name: str, value: str) -> str:
    """Identity of the library weights named ``value`` (DEFAULT, the backbone's name or its
    open_clip tag) for cache keys; ValueError for any other name."""
    s = spec(name)
    allowed = DEFAULT_NAMES | {s.name.lower()} | ({s.tag.lower()} if s.tag else set())
    if str(value).strip().lower() not in allowed:
        raise HubWeightsError(f"unknown weights {value!r} for {name}; use DEFAULT (the "
                              f"{s.library} pretrained weights from the Hugging Face hub) or a "
                              "local weights file (.safetensors, .pth, .pt, .bin)")
    return f"{s.library}:{s.model}" + (f":{s.tag}" if s.tag else "")


def has_text_tower(name: str) -> bool:
    """True for the open_clip backbones (CLIP, SigLIP): their weights come with a text tower."""
    return is_hub_name(name) and spec(name).library == "open_clip"


WEIGHT_SUFFIXES = (".pt", ".pth", ".pth.tar", ".ckpt", ".bin", ".tar", ".safetensors")


def is_weights_file(name_or_path: str | os.PathLike) -> bool:
    """True when ``name_or_path`` (a ``--pretrained`` value) reads as a file path rather than a
    weights name."""
    s = str(name_or_path)
    return (Path(s).expanduser().exists() or os.sep in s or "/" in s
            or s.lower().endswith(WEIGHT_SUFFIXES))
