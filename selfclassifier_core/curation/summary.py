"""How good a run's grouping is, in a few numbers: the summary shown after a run finishes.

:func:`run_summary` reads a finished run's predictions and says, for every head, how many groups
the model uses, how large they are, how sure it is, and which granularity to start with;
:func:`format_summary` puts the same into a few lines of text for the command line.

The numbers (all computed over the same images, see *Which images* below):

- **groups**: the classes of a head that hold at least one image (a head may leave some empty).
- **sizes**: the sizes of those groups, largest first.
- **confidence**: the model's top-1 probability; a histogram in :data:`CONFIDENCE_BINS` equal
  bins over [0, 1] (the last bin includes 1.0), with its mean and median.
- **low margin**: the share of images whose margin (top-1 minus top-2 probability) is below
  :data:`LOW_MARGIN`, i.e. the model nearly tied between two groups; those are the images worth
  a second look.
- **balance**: the normalised entropy of the class sizes, ``H(p) / log K`` with ``p`` the share
  of images in each of the head's ``K`` classes, empty ones included. 1.0 means every class
  holds as many images as the others (the uniform prior Self-Classifier trains towards); it
  falls as a few groups take most images or classes stay empty. A one-class head has balance 1.
- **agreement** (nesting) of a head with the next coarser head: for each of its groups, the
  share of its images that fall in that group's most common coarse group, averaged over images
  (``sum_f max_c n[f, c] / N`` for the contingency table ``n``). 1.0 means every fine group lies
  inside one coarse group (the finer head splits the coarser one, never mixes it); groups that
  straddle coarse groups pull it down. The coarsest head has none.

The suggested granularity (:data:`MIN_BALANCE`, :data:`MIN_GROUP_IMAGES`, :data:`MIN_AGREEMENT`):
the *finest* head whose balance is at least ``MIN_BALANCE``, whose median group holds at least
``MIN_GROUP_IMAGES`` images, and whose agreement with the next coarser head is at least
``MIN_AGREEMENT`` (the coarsest head passes that test by itself). Finer groups are purer and
merging them later is one step (give them one name), so the finest head that is still sound is
the best place to start. When no head passes, the run's main head (the class count asked for).
The reason says in words which test picked it and why finer heads were passed over.

Which images: every image of the run's predictions that is still usable in the catalog, the rows
of :meth:`~.labels.Labels.final_table`. Images the person has excluded are counted in: the summary
says what the model found, and exclusions are made per head, so leaving them out would compare
heads on different images. How many a head has excluded is reported beside (``excluded``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from shlex import quote

import numpy as np

from ..store.fsutil import atomic_write_json, file_identity
from ..store.predictions import load_predictions, prediction_ids, predictions_path
from ..store.workspace import Workspace, WorkspaceError, as_workspace
from .pathcache import cached_catalog, catalog_rows

LOW_MARGIN = 0.1
"""An image whose margin (top-1 minus top-2 probability) is below this is a near tie."""

CONFIDENCE_BINS = 20
"""Equal-width bins of the confidence histogram over [0, 1]."""

MIN_BALANCE = 0.85
"""A head whose balance is below this is too lopsided to suggest."""

MIN_AGREEMENT = 0.8
"""A head whose groups nest less than this in the next coarser head's is not suggested."""

MIN_GROUP_IMAGES = 5
"""A head whose median group holds fewer images than this is too fine to review."""

CLI = "python -m selfclassifier_core"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSummary:
    """One head of a run (see the module docs for each number).

    Attributes:
        classes: the head's class count.
        groups: classes holding at least one image.
        sizes: sizes of those groups, largest first.
        confidence_hist: image counts in :data:`CONFIDENCE_BINS` equal bins over [0, 1].
        mean_confidence, median_confidence: of the images' top-1 probabilities.
        low_margin: share of images with margin below :data:`LOW_MARGIN`.
        balance: normalised entropy of the class sizes (1.0 = uniform).
        coarser: class count of the next coarser head (None for the coarsest).
        agreement: nesting in the ``coarser`` head (None for the coarsest).
        excluded: images the person has excluded in this head's labels.
    """

    classes: int
    groups: int
    sizes: tuple[int, ...]
    confidence_hist: tuple[int, ...]
    mean_confidence: float
    median_confidence: float
    low_margin: float
    balance: float
    coarser: int | None
    agreement: float | None
    excluded: int = 0

    @property
    def median_size(self) -> float:
        """The median size of the groups in use."""
        return float(np.median(self.sizes)) if self.sizes else 0.0

    @staticmethod
    def bin_edges() -> np.ndarray:
        """The ``CONFIDENCE_BINS + 1`` edges of :attr:`confidence_hist`."""
        return np.linspace(0.0, 1.0, CONFIDENCE_BINS + 1)


@dataclass(frozen=True)
class RunSummary:
    """What :func:`run_summary` found about one run.

    Attributes:
        run_id, mode: the run.
        images: images summarised (usable images with a prediction).
        main_head: the run's main head (the class count asked for).
        heads: one :class:`HeadSummary` per head, coarsest first.
        suggested: the class count of the head to start with.
        reason: why, in words.
        workspace, folder: where the run lives (for the commands of :func:`format_summary`).
        newest: True if this is the workspace's newest finished run (the commands' default).
    """

    run_id: int
    mode: str
    images: int
    main_head: int
    heads: tuple[HeadSummary, ...]
    suggested: int
    reason: str
    workspace: Path
    folder: Path | None = None
    newest: bool = True

    def head(self, classes: int) -> HeadSummary:
        """The summary of the head with ``classes`` classes."""
        for h in self.heads:
            if h.classes == classes:
                return h
        raise ValueError(f"run {self.run_id} has no head with {classes} classes; its heads are "
                         f"{[h.classes for h in self.heads]}")

    @property
    def agreements(self) -> list[tuple[int, int, float]]:
        """``(coarse, fine, agreement)`` for each pair of neighbouring heads."""
        return [(h.coarser, h.classes, h.agreement) for h in self.heads if h.coarser is not None]


# --------------------------------------------------------------------------- the numbers
def balance(sizes, classes: int) -> float:
    """Normalised entropy ``H(p) / log(classes)`` of class sizes (empty classes count as 0)."""
    counts = np.asarray(sizes, dtype=np.float64)
    total = counts.sum()
    if classes <= 1 or total <= 0:
        return 1.0
    p = counts[counts > 0] / total
    value = -float((p * np.log(p)).sum()) / math.log(classes)
    return min(1.0, value) + 0.0  # rounding can pass 1; + 0.0 turns a -0.0 into 0.0


def agreement(fine, coarse) -> float:
    """How well groups of ``fine`` nest in those of ``coarse`` (cluster arrays over the same
    images): the share of images in their fine group's most common coarse group."""
    fine = np.asarray(fine, dtype=np.int64)
    coarse = np.asarray(coarse, dtype=np.int64)
    if len(fine) != len(coarse):
        raise ValueError(f"fine and coarse must cover the same images, got {len(fine)} and "
                         f"{len(coarse)}")
    if not len(fine):
        return 1.0
    kc = int(coarse.max()) + 1
    table = np.bincount(fine * kc + coarse, minlength=(int(fine.max()) + 1) * kc).reshape(-1, kc)
    return float(table.max(axis=1).sum() / len(fine))


def _head_summary(classes: int, cluster: np.ndarray, confidence: np.ndarray, margin: np.ndarray,
                  coarser: int | None, agree: float | None, excluded: int) -> HeadSummary:
    counts = np.bincount(cluster, minlength=classes)
    used = np.sort(counts[counts > 0])[::-1]
    hist, _ = np.histogram(confidence, bins=CONFIDENCE_BINS, range=(0.0, 1.0))
    return HeadSummary(
        classes=classes, groups=int(len(used)), sizes=tuple(int(s) for s in used),
        confidence_hist=tuple(int(c) for c in hist),
        mean_confidence=float(np.mean(confidence)), median_confidence=float(np.median(confidence)),
        low_margin=float(np.mean(margin < LOW_MARGIN)), balance=balance(counts, classes),
        coarser=coarser, agreement=agree, excluded=excluded)


def _failure(h: HeadSummary) -> str | None:
    """Why ``h`` is not suggested, in words (None if it passes every test)."""
    if h.groups == 1 and h.classes > 1:
        return "it put every image in one group"
    if h.balance < MIN_BALANCE:
        return f"its groups are unbalanced ({h.balance:.2f} < {MIN_BALANCE})"
    if h.median_size < MIN_GROUP_IMAGES:
        return (f"its median group holds {h.median_size:g} images (fewer than "
                f"{MIN_GROUP_IMAGES})")
    if h.agreement is not None and h.agreement < MIN_AGREEMENT:
        return (f"its groups nest only {h.agreement:.0%} in the {h.coarser}-group head "
                f"(below {MIN_AGREEMENT:.0%})")
    return None


def suggest(heads: tuple[HeadSummary, ...], main_head: int) -> tuple[int, str]:
    """The head to start with and why (the rule in the module docs); ``heads`` coarsest first."""
    failures = {h.classes: _failure(h) for h in heads}
    if len(heads) == 1:
        only = heads[0].classes
        return only, "the run has one head" + (f"; {failures[only]}" if failures[only] else "")
    passing = [h for h in heads if failures[h.classes] is None]
    if not passing:
        main = failures.get(main_head) or "it fails the same tests"
        return main_head, (f"no head passes the tests, so the main head (the class count asked "
                           f"for); {main}")
    best = passing[-1]
    reason = (f"the finest head that is balanced ({best.balance:.2f}), with a median group of "
              f"{best.median_size:g} images")
    if best.agreement is not None:
        reason += f", whose groups nest {best.agreement:.0%} in the {best.coarser}-group head"
    finer = [h for h in heads if h.classes > best.classes]
    if finer:
        reason += "; " + "; ".join(f"the {h.classes}-group head is passed over: "
                                   f"{failures[h.classes]}" for h in finer)
    return best.classes, reason


def _excluded(conn, run_id: int, usable_ids) -> dict[int, int]:
    """Excluded images per head among the run's usable predicted images (``usable_ids()``,
    called only when the person has excluded something; the labels tables may not exist yet)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' "
                        "AND name='label_overrides'").fetchone():
        return {}
    rows = conn.execute("SELECT head, image_id FROM label_overrides WHERE run_id=? AND excluded",
                        (int(run_id),)).fetchall()
    if not rows:
        return {}
    ids = usable_ids()
    out: dict[int, int] = {}
    for head in {r[0] for r in rows}:
        img = np.fromiter((r[1] for r in rows if r[0] == head), np.int64)
        out[int(head)] = int(np.isin(img, ids).sum())
    return out


def _usable(ws: Workspace, conn, ids: np.ndarray) -> np.ndarray:
    """Which of the predicted ``ids`` (ascending) are usable images of the catalog."""
    return catalog_rows(cached_catalog(ws, conn), ids)[1]


def _usable_predicted(ws: Workspace, conn, run_dir: Path) -> np.ndarray:
    """The run's predicted ids that are usable images (only the ids are read)."""
    ids = prediction_ids(run_dir)
    return ids[_usable(ws, conn, ids)]


MEMO = "run-{}-summary.json"
"""In ``Workspace.cache_dir``: a run's grouping numbers (all but the exclusions), with the
predictions file's size and time and the catalog version they were computed from. Reading a
million predictions and the catalog again takes ~0.4 s; the memo, a few milliseconds."""


def _memo_read(ws: Workspace, run_id: int, key: dict) -> tuple[int, list[HeadSummary]] | None:
    path = ws.cache_dir / MEMO.format(int(run_id))
    try:
        memo = json.loads(path.read_text())
        if memo.get("key") != key:
            return None
        heads = [HeadSummary(**{**h, "sizes": tuple(h["sizes"]),
                                "confidence_hist": tuple(h["confidence_hist"])})
                 for h in memo["heads"]]
        return int(memo["images"]), heads
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged: computed again
        log.warning("run summary memo %s not used (%s); it will be written again", path, exc)
        return None


def _memo_write(ws: Workspace, run_id: int, key: dict, images: int,
                heads: list[HeadSummary]) -> None:
    rows = [{f: getattr(h, f) for f in HeadSummary.__dataclass_fields__ if f != "excluded"}
            for h in heads]
    try:
        atomic_write_json(ws.cache_dir / MEMO.format(int(run_id)),
                          {"key": key, "images": images, "heads": rows})
    except OSError as exc:  # a read-only workspace: computed again next time
        log.debug("run summary memo not written (%s)", exc)


def _grouping(ws: Workspace, run, conn) -> tuple[int, list[HeadSummary], np.ndarray]:
    """Images summarised, the heads' numbers (exclusions at 0) and the usable predicted ids."""
    preds = load_predictions(run.dir, embeddings=False)
    ids = np.asarray(preds.image_ids, np.int64)
    keep = _usable(ws, conn, ids)
    if not keep.any():
        raise WorkspaceError(f"run {run.id} has no predictions for images still in the catalog; "
                             "run `predict` on it")
    order = sorted(preds.heads)
    heads = []
    for i, k in enumerate(order):
        hp = preds.heads[k]
        cluster = np.asarray(hp.cluster, np.int64)[keep]
        coarser = order[i - 1] if i else None
        agree = (agreement(cluster, np.asarray(preds.heads[coarser].cluster, np.int64)[keep])
                 if coarser is not None else None)
        heads.append(_head_summary(int(k), cluster, np.asarray(hp.confidence, np.float64)[keep],
                                   np.asarray(hp.margin, np.float64)[keep], coarser, agree, 0))
    return int(keep.sum()), heads, ids[keep]


def run_summary(workspace: Workspace | str | os.PathLike,
                run_id: int | None = None) -> RunSummary:
    """Summarise a finished run's grouping (see the module docs for every number).

    The numbers are remembered in the workspace's cache (:data:`MEMO`) until the run's
    predictions or the catalog's usable images change; the exclusions are counted every time.

    Args:
        workspace: a :class:`Workspace` or the path of its directory.
        run_id: the run (default: the newest finished run).

    Raises:
        WorkspaceError: no such run, the run is not done, or no usable image has a prediction.
        FileNotFoundError: the run has no predictions file.
    """
    ws = as_workspace(workspace)
    run = ws.resolve_run(run_id)
    if run.status != "done":
        raise WorkspaceError(f"run {run.id} is {run.status}; a summary needs a finished run")
    # the key is taken before the data is read: data newer than its key is only read again
    key = {"predictions": file_identity(predictions_path(run.dir)),
           "catalog": ws.catalog_version()}
    conn = ws.connect()
    try:
        conn.execute("BEGIN")  # one read snapshot: the catalog and the exclusions
        memo = _memo_read(ws, run.id, key)
        if memo is None:
            images, heads, usable = _grouping(ws, run, conn)
            _memo_write(ws, run.id, key, images, heads)
        else:
            (images, heads), usable = memo, None
        excluded = _excluded(conn, run.id, lambda: usable if usable is not None
                             else _usable_predicted(ws, conn, run.dir))
        conn.execute("COMMIT")
    finally:
        conn.close()
    heads_t = tuple(dataclasses.replace(h, excluded=excluded.get(h.classes, 0)) for h in heads)
    classes = [h.classes for h in heads_t]
    main = run.main_head if run.main_head in classes else classes[0]
    suggested, reason = suggest(heads_t, int(main))
    newest = ws.latest_run("done")
    return RunSummary(run_id=run.id, mode=run.mode, images=images, main_head=int(main),
                      heads=heads_t, suggested=suggested, reason=reason, workspace=ws.path,
                      folder=ws.root, newest=newest is not None and newest.id == run.id)


# --------------------------------------------------------------------------- in words
def next_commands(summary: RunSummary) -> list[tuple[str, str]]:
    """``(what, command)`` of the next steps, for the suggested head (defaults left out)."""
    ws = quote(str(summary.workspace))
    pick = ("" if summary.newest else f" --run {summary.run_id}") + (
        "" if summary.suggested == summary.main_head else f" --head {summary.suggested}")
    app = "streamlit run app/main.py --" + (
        f" --folder {quote(str(summary.folder))}" if summary.folder else "") + f" --workspace {ws}"
    return [("look at the groups in the app", app),
            ("or list and name them here", f"{CLI} labels {ws}{pick} list"),
            ("export the labels", f"{CLI} export {ws}{pick} --csv labels.csv")]


def format_summary(summary: RunSummary) -> str:
    """The summary as a few plain-text lines, ending with the next commands."""
    main = summary.main_head
    lines = [f"Run {summary.run_id} ({summary.mode}): {summary.images:,} images, "
             f"{len(summary.heads)} head{'s' if len(summary.heads) > 1 else ''} "
             f"(* the main head)"]
    rows = [("head", "groups", "sizes max/median/min", "confidence", "low margin", "balance",
             "nests")]
    for h in summary.heads:
        rows.append((
            f"{h.classes}{'*' if h.classes == main else ''}",
            f"{h.groups} of {h.classes}",
            f"{h.sizes[0]}/{h.median_size:g}/{h.sizes[-1]}" if h.sizes else "-",
            f"{h.median_confidence:.2f}",
            f"{h.low_margin:.0%}",
            f"{h.balance:.2f}",
            f"{h.agreement:.0%} in {h.coarser}" if h.agreement is not None else "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"  confidence: median top-1 probability; low margin: top-1 minus top-2 below "
                 f"{LOW_MARGIN} (near ties)")
    lines.append("  balance: 1.00 = groups of equal size; nests: images in their group's most "
                 "common coarser group")
    excluded = [h for h in summary.heads if h.excluded]
    if excluded:
        lines.append("  excluded by you (counted above): " + ", ".join(
            f"{h.excluded} in the {h.classes}-group head" for h in excluded))
    lines.append(f"Start with {summary.suggested} groups: {summary.reason}.")
    lines.append("Next:")
    steps = next_commands(summary)
    width = max(len(what) for what, _ in steps) + 1
    lines += [f"  {(what + ':').ljust(width)}  {cmd}" for what, cmd in steps]
    return "\n".join(lines)
