"""Suggested names for a run's clusters, from the text tower of its CLIP/SigLIP backbone.

Each cluster of a head is the set of images the model put in it (its predicted clusters: label
edits do not change the suggestions). Its *mean embedding* is the mean of the unit-length CLIP
image embeddings of those images (the run's cached features, :mod:`..inference.text`),
L2-normalised. Every name of a vocabulary is embedded as the prompt ``"a photo of a {name}."``;
a cluster's *scores* are CLIP's zero-shot probabilities: the softmax over the vocabulary of the
model's logit scale times the cosine similarity of the prompt and the mean embedding (so a
cluster's scores over the whole vocabulary sum to 1). The top 3 are its suggestions.

Vocabularies: built in, the 1,000 ImageNet-1k category names torchvision ships in its weights
metadata (no download); or a text file of one name a line (blank lines and repeats skipped).
The vocabulary's embeddings are kept in the workspace, so it is embedded once per backbone.

:func:`apply_names` gives clusters their suggested names as one operation: one undo takes it all
back. Clusters that get the same name become one label, as a rename to a name in use always does.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np

from ..store.ids import find_ids
from ..store.progress import Progress
from ..store.workspace import Workspace, as_workspace
from .labels import Labels
from .labelstate import ChangeSet, normalize_name

if TYPE_CHECKING:  # pragma: no cover
    from ..inference.text import ImageEmbeddings, TextModel

log = logging.getLogger(__name__)

__all__ = ["BUILTIN_NAME", "PROMPT", "SCORE_TEXT", "apply_names", "builtin_vocabulary",
           "cluster_means", "read_vocabulary", "score_names", "suggest_names", "top_names"]

PROMPT = "a photo of a {}."
BUILTIN_NAME = "ImageNet-1k"
SCORE_TEXT = ("the zero-shot probability: softmax over the vocabulary of the model's logit "
              "scale × cosine similarity")
_CHUNK = 65_536

Suggestions = dict[int, list[tuple[str, float]]]


# --------------------------------------------------------------------------- vocabularies
def builtin_vocabulary() -> list[str]:
    """The ImageNet-1k category names of torchvision's weights metadata (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(dict.fromkeys(ResNet50_Weights.IMAGENET1K_V2.meta["categories"]))


def read_vocabulary(path: str | os.PathLike) -> list[str]:
    """The names in a text file, one a line (surrounding spaces, blank lines and repeats
    dropped, first occurrence kept). ValueError naming the file when it cannot be read as
    UTF-8 text or holds no name."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ValueError(f"cannot read the vocabulary file {p}: {reason} (expected UTF-8 "
                         "text, one name a line)") from None
    names = list(dict.fromkeys(" ".join(line.split()) for line in text.splitlines()))
    names = [n for n in names if n]
    if not names:
        raise ValueError(f"the vocabulary file {p} holds no names (expected one name a line)")
    return names


def _vocabulary(vocab: str | os.PathLike | Sequence[str] | None) -> tuple[list[str], str]:
    """``(names, where they come from)`` for :func:`suggest_names`'s ``vocab``."""
    if vocab is None:
        return builtin_vocabulary(), BUILTIN_NAME
    if isinstance(vocab, (str, os.PathLike)):
        return read_vocabulary(vocab), str(vocab)
    names = [n for n in dict.fromkeys(" ".join(str(v).split()) for v in vocab) if n]
    if not names:
        raise ValueError("the vocabulary is empty: give at least one name")
    return names, "the given names"


# --------------------------------------------------------------------------- the arithmetic
def cluster_means(images: "ImageEmbeddings", image_ids: np.ndarray, clusters: np.ndarray,
                  n_clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Each cluster's mean of its images' unit-length embeddings, L2-normalised.

    Args:
        images: the embeddings (:class:`~selfclassifier_core.inference.text.ImageEmbeddings`).
        image_ids, clusters: ``[M]`` the images and their clusters (a head's predictions);
            images without an embedding are left out.
        n_clusters: the head's size.

    Returns:
        ``(means float32 [n_clusters, D], sizes int64 [n_clusters])``; a cluster without
        images has a zero row and size 0.
    """
    ids = np.asarray(image_ids, np.int64)
    cl = np.asarray(clusters, np.int64)
    pos, have = find_ids(images.image_ids, ids)
    pos, cl = pos[have], cl[have]
    order = np.argsort(pos, kind="stable")  # sorted reads suit a memory map
    pos, cl = pos[order], cl[order]
    sums = np.zeros((int(n_clusters), images.dim), np.float64)
    for s in range(0, len(pos), _CHUNK):
        rows, c = images.rows(pos[s:s + _CHUNK]), cl[s:s + _CHUNK]
        for k in np.unique(c):
            sums[k] += rows[c == k].sum(axis=0)
    sizes = np.bincount(cl, minlength=int(n_clusters)).astype(np.int64)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    means = np.divide(sums, norms, out=np.zeros_like(sums), where=norms > 0)
    return means.astype(np.float32), sizes


def score_names(means: np.ndarray, name_vectors: np.ndarray, logit_scale: float,
                top: int = 3) -> list[list[tuple[int, float]]]:
    """Per row of ``means``: the ``top`` vocabulary entries ``(index, probability)``, best first.

    The probability is the softmax over the vocabulary of ``logit_scale × cosine``
    (``means`` and ``name_vectors`` are unit-length rows); a zero row (an empty cluster) gets
    no suggestions.
    """
    if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
        raise ValueError(f"top must be a whole number >= 1, got {top!r}")
    m = np.asarray(means, np.float64)
    v = np.asarray(name_vectors, np.float64)
    logits = float(logit_scale) * (m @ v.T)
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    k = min(int(top), v.shape[0])
    out: list[list[tuple[int, float]]] = []
    for row, p in zip(m, probs):
        if not np.any(row):
            out.append([])
            continue
        best = np.lexsort((np.arange(len(p)), -p))[:k]
        out.append([(int(j), float(p[j])) for j in best])
    return out


# --------------------------------------------------------------------------- a run's clusters
def suggest_names(workspace: Workspace | str | os.PathLike, run_id: int | None = None,
                  head: int | None = None,
                  vocab: str | os.PathLike | Sequence[str] | None = None, top: int = 3, *,
                  prompt: str = PROMPT, model: "TextModel | None" = None,
                  images: "ImageEmbeddings | None" = None, device: str = "auto",
                  progress: Progress | None = None) -> Suggestions:
    """Suggested names for every cluster of a run's head.

    Args:
        workspace: the workspace (or its directory).
        run_id: the run (default: the newest finished one); it needs a text tower (a fast run
            on a CLIP/SigLIP backbone), else :class:`~..inference.text.TextTowerError`.
        head: the head's class count (default: the run's main head).
        vocab: None for the built-in ImageNet-1k names, a path to a file of one name a line,
            or the names themselves.
        top: suggestions per cluster.
        prompt: how a name is put into words for the text tower (``{}`` is the name).
        model, images: a text model and image embeddings made before (the app keeps them).
        progress: counts vocabulary names embedded (once per vocabulary and backbone).

    Returns:
        ``{cluster: [(name, score), ...]}`` for every cluster of the head, best first, with
        :data:`SCORE_TEXT` as the score; empty for a cluster without images.
    """
    from ..inference.text import (check_same_weights, image_embeddings, text_embeddings,
                                  text_model, text_source)

    if "{}" not in prompt:
        raise ValueError(f"prompt must hold {{}} where the name goes, got {prompt!r}")
    names, _ = _vocabulary(vocab)
    ws = as_workspace(workspace)
    run = ws.resolve_run(run_id if images is None else images.run_id)
    text_source(run)  # a run without a text tower fails here, before anything is built
    labels = Labels(ws, run.id, head)
    model = model or text_model(ws, run.id, device)
    images = images or image_embeddings(ws, run.id, device=device)
    check_same_weights(model, images)
    vectors = text_embeddings(ws, model, [prompt.format(n) for n in names], progress=progress)
    means, _ = cluster_means(images, labels.image_ids, labels.predicted, labels.head)
    scored = score_names(means, vectors, model.logit_scale, top)
    return {c: [(names[j], p) for j, p in row] for c, row in enumerate(scored)}


def top_names(suggestions: Mapping[int, Sequence[tuple[str, float]]]) -> dict[int, str]:
    """``{cluster: its best suggestion}`` (clusters without one left out)."""
    return {int(c): s[0][0] for c, s in suggestions.items() if s}


def apply_names(labels: Labels, names: Mapping[int, str], *, keep_named: bool = True
                ) -> int | None:
    """Rename clusters as one operation (one history row: one undo takes it all back).

    Args:
        labels: the run and head.
        names: ``{cluster: new name}`` (e.g. :func:`top_names` of the suggestions).
        keep_named: leave clusters alone whose name a person gave (any name but the default).

    Returns:
        The history id, or None when nothing changed. Clusters given the same name become one
        label (as :meth:`Labels.rename` to a name in use does).
    """
    wanted = {labels._check_cluster(c): normalize_name(n) for c, n in names.items()}
    with labels.workspace.transaction() as conn:
        stored = labels._names(conn)  # only names that differ from the default are stored
        ops = ChangeSet()
        done: dict[str, str] = {}
        for c, name in sorted(wanted.items()):
            if keep_named and c in stored:
                continue
            default = labels._defaults[c]
            ops.set("names", c, stored.get(c), None if name == default else name)
            done[str(c)] = name
        return labels._commit(conn, "suggested_names", {"names": done}, ops)
