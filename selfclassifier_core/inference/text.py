"""Text in a fast run's CLIP space: its backbone's text tower, and search of its images by text.

A fast run on an open_clip backbone (``clip_b32``, ``clip_b16``, ``clip_l14``, ``siglip_b16``,
``open_clip:ARCH:TAG``) keeps the backbone frozen, so its cached image features (view 0 of the
feature cache: the pooled ``encode_image`` embedding of the whole image) live in the space the
model's text tower maps text into. The checkpoint holds only the image tower; the text tower is
loaded from the same weights the run used (its ``pretrained``: a file with the whole CLIP state
dict, or ``DEFAULT`` from the Hugging Face cache), and a check that their identity is the one the
run's features were made with keeps the two sides from drifting apart.

- :func:`text_support`: why a run cannot embed text, in one line (None when it can), without
  building anything.
- :func:`text_model` / :func:`load_text_model`: the :class:`TextModel` (tokenizer, tower, logit
  scale); :meth:`TextModel.embed` gives unit-length text embeddings.
- :func:`image_embeddings`: the run's images in CLIP space (:class:`ImageEmbeddings`, from its
  feature cache; images added since are embedded into it).
- :func:`search_text`: the images nearest a text query by cosine similarity.
- :func:`text_embeddings`: embeddings of a list of texts (a vocabulary), cached in the workspace
  under ``features/text/``.

The projection-head embeddings in the run's predictions are *not* in CLIP space and are not used
here. A run without a text tower (another backbone, or a scratch / finetune run whose backbone was
trained) raises :class:`TextTowerError`, whose message says how to get a run that has one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..engine.device import autocast, resolve_device
from ..store.fsutil import atomic_open
from ..store.progress import Progress, Tally
from ..store.workspace import RunInfo, Workspace, as_workspace

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
# torch is imported where text is embedded, not here: the app asks text_support on its first
# Clusters page, and that needs only the run's files.

log = logging.getLogger(__name__)

__all__ = ["HOW_TO_GET", "ImageEmbeddings", "TextModel", "TextTowerError", "check_same_weights",
           "image_embeddings", "load_text_model", "run_config", "search_text", "text_embeddings",
           "text_model", "text_source", "text_support", "top_k"]

HOW_TO_GET = ("train a fast run on a CLIP backbone: `selfclassifier train FOLDER --mode fast "
              "--backbone clip_b32 --pretrained DEFAULT` (or --pretrained PATH, a file with the "
              "whole CLIP state dict)")
TEXT_DIR = "text"            # under the workspace's features directory
TEXT_FORMAT = 1              # bump when what a text-embedding file holds changes
_CHUNK = 65_536              # image rows normalised / scored at a time


class TextTowerError(ValueError):
    """The run cannot embed text; the message says why and how to get a run that can."""


# --------------------------------------------------------------------------- which runs
def run_config(run: RunInfo) -> dict:
    """The run's config as it was resolved for training: its ``config.json`` (backbone, views
    and feature cache as the recipe chose them), else the checkpoint's ``train_config`` (a run
    that predicted a new folder holds only a copy of the checkpoint), else the options it was
    started with."""
    from ..store.checkpoint import CHECKPOINT_FILE
    from ..store.runfiles import CONFIG_FILE

    path = Path(run.dir) / CONFIG_FILE
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                return data
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s (%s); using the run's recorded options", path, exc)
    started = run.config if isinstance(run.config, dict) else {}
    ckpt = Path(run.dir) / CHECKPOINT_FILE
    if not started.get("backbone") and ckpt.is_file():
        import torch

        try:  # memory-mapped: the config is read, the weights are not
            data = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - corrupt or foreign file: the options it has
            log.warning("cannot read %s (%s); using the run's recorded options", ckpt, exc)
            data = {}
        if isinstance(data, dict) and isinstance(data.get("train_config"), dict):
            return dict(data["train_config"])
    return started


def text_source(run: RunInfo) -> tuple[str, str]:
    """``(backbone, pretrained)`` of a run whose backbone has a text tower aligned with its
    image features (a fast run on a CLIP/SigLIP backbone); :class:`TextTowerError` otherwise."""
    from ..engine.hub_weights import has_text_tower

    cfg = run_config(run)
    backbone = cfg.get("backbone")
    try:
        has_text = bool(backbone) and has_text_tower(str(backbone))
    except ValueError:  # an open_clip name the installed library does not know
        has_text = False
    if not has_text:
        raise TextTowerError(f"run {run.id} has no text tower (its backbone is "
                             f"{backbone or 'not recorded'}; only CLIP and SigLIP have one); "
                             f"to search by text or suggest names, {HOW_TO_GET}")
    if run.mode != "fast":
        raise TextTowerError(f"run {run.id} trained its {backbone} backbone ({run.mode} mode), "
                             "so its images are no longer in the space of the text tower; to "
                             f"search by text or suggest names, {HOW_TO_GET}")
    pretrained = cfg.get("pretrained")
    if not pretrained:
        raise TextTowerError(f"run {run.id} records no pretrained weights for {backbone}; "
                             f"{HOW_TO_GET}")
    return str(backbone), str(pretrained)


def text_support(workspace: Workspace | str | os.PathLike, run_id: int | None = None
                 ) -> str | None:
    """None when the run (default: the newest finished one) can embed text, else why not and
    what to do, in one line. Builds nothing and reads no weights: it checks the run's mode and
    backbone, that its weights file is still there, and, offline, that ``DEFAULT`` weights are
    in the Hugging Face cache."""
    from ..engine import hub_weights as hub
    from ..engine.hub_weights import is_weights_file

    run = as_workspace(workspace).resolve_run(run_id)
    try:
        backbone, pretrained = text_source(run)
    except TextTowerError as exc:
        return str(exc)
    if is_weights_file(pretrained):
        if not Path(pretrained).expanduser().is_file():
            return (f"the text tower of run {run.id} comes from its weights file {pretrained}, "
                    "which is not there any more; put the file back to search by text")
    elif hub.hub_offline() and not hub.weights_available(backbone):
        return (f"the text tower of run {run.id} needs the {backbone} weights, which are not "
                f"in the Hugging Face cache {hub.hub_cache_dir()} and HF_HUB_OFFLINE is set; "
                f"download them once with `{hub.download_command(backbone)}`")
    return None


# --------------------------------------------------------------------------- the text model
@dataclass
class TextModel:
    """A backbone's text tower with its tokenizer, ready to embed text.

    Attributes:
        backbone: the registry name (``clip_b32``, ``open_clip:ARCH:TAG``, ...).
        pretrained: the weights as the run gives them (``DEFAULT`` or a file).
        identity: the weights' identity (:func:`engine.pretrained.weights_identity`), the same
            string the run's feature cache key was made from.
        tower: the :class:`~selfclassifier_core.engine.backbones_hub.OpenClipTextTower`.
        tokenize: ``tokenize(list of texts) -> LongTensor [n, context]``.
        dim: embedding size (the image embedding's).
        device: where the tower runs.
    """

    backbone: str
    pretrained: str
    identity: str
    tower: torch.nn.Module
    tokenize: Callable[[list[str]], torch.Tensor]
    dim: int
    device: torch.device

    @property
    def logit_scale(self) -> float:
        """The temperature CLIP was trained with (``exp(logit_scale)``, 100 for trained CLIPs)."""
        return float(self.tower.logit_scale)

    def embed(self, texts: Sequence[str], *, batch_size: int = 128,
              progress: Progress | None = None) -> np.ndarray:
        """Unit-length embeddings ``float32 [n, dim]`` of ``texts``, in their order."""
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), np.float32)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        order = np.argsort([len(t) for t in texts], kind="stable")  # short with short: cut more
        import torch

        tally = Tally(progress, len(texts))
        with torch.inference_mode(), autocast(self.device):
            for s in range(0, len(texts), batch_size):
                rows = order[s:s + batch_size]
                tokens = self.tokenize([texts[i] for i in rows]).to(self.device)
                z = torch.nn.functional.normalize(self.tower(tokens).float(), dim=-1)
                out[rows] = z.cpu().numpy()
                tally.add(len(rows))
        tally.finish()
        return out


def load_text_model(backbone: str, pretrained: str | os.PathLike,
                    device: str | torch.device = "auto") -> TextModel:
    """The text tower of ``backbone`` with the weights ``pretrained`` (``DEFAULT``: the Hugging
    Face cache, or a file holding the whole CLIP state dict).

    Raises:
        TextTowerError: ``backbone`` has no text tower.
        ValueError: the tokenizer or the weights cannot be had (offline, a missing file, a file
            holding only an image tower), in one line.
    """
    from ..engine import backbones_hub as hub
    from ..engine.pretrained import extract_state_dict, resolve_weights

    try:
        has_text = hub.has_text_tower(backbone)
    except ValueError:
        has_text = False
    if not has_text:
        raise TextTowerError(f"backbone {backbone} has no text tower (only CLIP and SigLIP have "
                             f"one); {HOW_TO_GET}")
    dev = resolve_device(device)
    tokenize = hub.tokenizer(backbone)  # first: fails fast, before any weights are read
    obj, source, identity = resolve_weights(backbone, pretrained)
    state, _ = hub.text_state(backbone, extract_state_dict(obj, source))
    del obj
    tower = hub.build_text_tower(backbone)
    loaded = hub.load_text_state(tower, state, source)
    del state
    log.info("text tower of %s: loaded %d tensors from %s", backbone, loaded, source)
    import open_clip  # present: the tower was built with it

    dim = int(open_clip.get_model_config(hub.spec(backbone).model)["embed_dim"])
    return TextModel(backbone, str(pretrained), identity, tower.to(dev).eval(), tokenize, dim,
                     dev)


def text_model(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
               device: str | torch.device = "auto") -> TextModel:
    """The text tower of a run's backbone (default run: the newest finished one), from the
    weights the run was trained with; :class:`TextTowerError` for a run without one."""
    run = as_workspace(workspace).resolve_run(run_id)
    backbone, pretrained = text_source(run)
    return load_text_model(backbone, pretrained, device)


def text_embeddings(workspace: Workspace | str | os.PathLike, model: TextModel,
                    texts: Sequence[str], *, progress: Progress | None = None) -> np.ndarray:
    """:meth:`TextModel.embed` of ``texts``, kept in ``<workspace>/features/text/`` (keyed by
    the backbone, its weights and the texts) so a vocabulary is embedded once."""
    ws = as_workspace(workspace)
    texts = [str(t) for t in texts]
    blob = json.dumps({"format": TEXT_FORMAT, "backbone": model.backbone,
                       "weights": model.identity, "texts": texts}, ensure_ascii=False)
    digest = hashlib.sha1(blob.encode()).hexdigest()[:20]
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", model.backbone)
    path = ws.features_dir / TEXT_DIR / f"{stem}-{digest}.npy"
    if path.is_file():
        try:
            vectors = np.load(path)
            if vectors.shape == (len(texts), model.dim):
                if progress:
                    progress(len(texts), len(texts))
                return vectors.astype(np.float32, copy=False)
        except (OSError, ValueError) as exc:
            log.warning("text embeddings %s unreadable (%s); embedding again", path, exc)
    vectors = model.embed(texts, progress=progress)
    with atomic_open(path, "wb") as fh:
        np.save(fh, vectors)
    return vectors


# --------------------------------------------------------------------------- the images
@dataclass
class ImageEmbeddings:
    """A run's images in CLIP space: the backbone's pooled image embeddings.

    Attributes:
        run_id: the run.
        image_ids: ``int64 [N]`` catalog ids, ascending (every usable image of the catalog).
        features: ``float16 [N, D]`` (memory-mapped): view 0 of the run's feature cache.
        norms: ``float32 [N]`` the rows' L2 norms.
        identity: the weights' identity the features were made with.
    """

    run_id: int
    image_ids: np.ndarray
    features: np.ndarray
    norms: np.ndarray
    identity: str

    def __len__(self) -> int:
        return int(self.image_ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def rows(self, positions: np.ndarray | slice) -> np.ndarray:
        """Unit-length rows ``float32 [m, D]`` at ``positions`` (zero rows stay zero)."""
        x = np.asarray(self.features[positions], np.float32)
        n = self.norms[positions][:, None]
        return np.divide(x, n, out=np.zeros_like(x), where=n > 0)

    def scores(self, vector: np.ndarray) -> np.ndarray:
        """Cosine similarity ``float32 [N]`` of every image with the unit-length ``vector``."""
        q = np.asarray(vector, np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query vector has {q.shape[0]} dimensions, the images {self.dim}")
        out = np.empty(len(self), np.float32)
        for s in range(0, len(self), _CHUNK):
            out[s:s + _CHUNK] = self.rows(slice(s, s + _CHUNK)) @ q
        return out


def _fast_config(run: RunInfo):
    from ..training.config import config_from_dict

    cfg = config_from_dict({**run_config(run), "mode": "fast"})
    if not cfg.views or not cfg.image_size:
        raise ValueError(f"run {run.id} does not record the views of its feature cache "
                         "(views, image_size); train it again")
    return cfg


def image_embeddings(workspace: Workspace | str | os.PathLike, run_id: int | None = None, *,
                     device: str | torch.device = "auto", workers: int | None = None,
                     progress: Progress | None = None) -> ImageEmbeddings:
    """The run's images in CLIP space, from its feature cache.

    The cache is the one the run trained on (same backbone, weights and views); when the
    catalog changed since, images added or changed are embedded into it (``progress`` counts
    them), as a refit would. Raises :class:`TextTowerError` for a run without a text tower, and
    ValueError when the run's weights are not those its features were made with (a weights
    file replaced since).
    """
    from ..engine.backbones import backbone_preprocess
    from ..engine.pretrained import weights_identity
    from ..training.features import ViewRecipe, extract_features, feature_key

    ws = as_workspace(workspace)
    run = ws.resolve_run(run_id)
    backbone, pretrained = text_source(run)
    cfg = _fast_config(run)
    recipe = ViewRecipe(n_views=int(cfg.views), image_size=int(cfg.image_size),
                        seed=int(cfg.feature_seed), preprocess=backbone_preprocess(backbone))
    identity = weights_identity(backbone, pretrained)
    key = feature_key(backbone, identity, recipe, False)
    if cfg.feature_cache and key != cfg.feature_cache:
        raise ValueError(f"the weights of run {run.id} ({pretrained}) are not the ones it was "
                         f"trained with (its features are {cfg.feature_cache}, these weights give "
                         f"{key}); put the original weights back or train a new run")
    cache = extract_features(ws, backbone, pretrained, views=int(cfg.views),
                             image_size=int(cfg.image_size), seed=int(cfg.feature_seed),
                             device=device, workers=workers, progress=progress)
    full = cache.full
    norms = np.empty(len(cache), np.float32)
    for s in range(0, len(cache), _CHUNK):
        norms[s:s + _CHUNK] = np.linalg.norm(np.asarray(full[s:s + _CHUNK], np.float32), axis=1)
    return ImageEmbeddings(run.id, np.asarray(cache.image_ids, np.int64), full, norms,
                           cache.weights)


# --------------------------------------------------------------------------- search
def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest ``scores``, highest first (ties: lower position first)."""
    scores = np.asarray(scores)
    k = min(int(k), len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    return part[np.lexsort((part, -scores[part]))].astype(np.int64)


def _paths(ws: Workspace, ids: Sequence[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    ids = [int(i) for i in ids]
    conn = ws.connect()
    try:
        for s in range(0, len(ids), 500):
            chunk = ids[s:s + 500]
            out.update((int(r[0]), r[1]) for r in conn.execute(
                f"SELECT id, path FROM images WHERE id IN ({','.join('?' * len(chunk))})",
                chunk))
    finally:
        conn.close()
    return out


def check_same_weights(model: TextModel, images: ImageEmbeddings) -> None:
    """ValueError when the text tower and the image features come from different weights."""
    if model.identity != images.identity:
        raise ValueError(f"the text tower ({model.backbone}, weights {model.identity}) is not "
                         f"from the weights run {images.run_id}'s images were embedded with "
                         f"({images.identity})")


def search_text(workspace: Workspace | str | os.PathLike, query: str, k: int = 10,
                run_id: int | None = None, *, model: TextModel | None = None,
                images: ImageEmbeddings | None = None, device: str | torch.device = "auto",
                progress: Progress | None = None) -> "pd.DataFrame":
    """The ``k`` images nearest a text query, by cosine similarity in the run's CLIP space.

    Args:
        workspace: the workspace (or its directory).
        query: the text, e.g. ``"red sneakers"`` (as typed: no prompt is added).
        k: how many images.
        run_id: the run (default: the newest finished one).
        model, images: a :class:`TextModel` and :class:`ImageEmbeddings` made before (the app
            keeps them); made here when not given.
        progress: counts images embedded when the run's feature cache lacks some.

    Returns:
        DataFrame with ``image_id`` (int64), ``path`` and ``score`` (float32, the cosine
        similarity of the text and image embeddings), highest score first.
    """
    import pandas as pd

    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"the text query is empty ({query!r}); type what to look for, e.g. "
                         "\"red sneakers\"")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a whole number >= 1, got {k!r}")
    ws = as_workspace(workspace)
    run = ws.resolve_run(run_id if images is None else images.run_id)
    text_source(run)  # a run without a text tower fails here, before anything is built
    model = model or text_model(ws, run.id, device)
    images = images or image_embeddings(ws, run.id, device=device, progress=progress)
    check_same_weights(model, images)
    q = model.embed([query.strip()])[0]
    scores = images.scores(q)
    top = top_k(scores, int(k))
    ids = images.image_ids[top]
    paths = _paths(ws, ids)
    return pd.DataFrame({"image_id": ids.astype(np.int64),
                         "path": [paths.get(int(i), "") for i in ids],
                         "score": scores[top].astype(np.float32)})

