"""Search by text and suggested cluster names from the text tower of a CLIP backbone (issue 12).

The CLIP here is open_clip's ViT-B-32 with random weights that the test makes and saves to a file
(never downloaded); a fast run on a small folder trains on it once per module (slow). Scores are
checked against a hand computation with open_clip's own model built from the same file. The
arithmetic (top-k, cluster means, the softmax), vocabulary files, the one-operation rename and the
one-line errors of runs without a text tower run in the fast lane.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfclassifier_core.curation import names as names_mod
from selfclassifier_core.curation.labels import Labels, default_name
from selfclassifier_core.curation.names import (PROMPT, apply_names, cluster_means,
                                                read_vocabulary, score_names, suggest_names)
from selfclassifier_core.inference.text import (ImageEmbeddings, TextTowerError, run_config,
                                                search_text, text_support, top_k)
from selfclassifier_core.store.workspace import Workspace
from workspace_fixtures import make_workspace_with_run

open_clip = pytest.importorskip("open_clip")
safetensors_torch = pytest.importorskip("safetensors.torch")

HOW = "--backbone clip_b32 --pretrained DEFAULT"


from cli_capture import cli as _cli, error_lines as _error_lines  # noqa: E402


def _unit(x) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embeddings(ids, feats) -> ImageEmbeddings:
    feats = np.asarray(feats, np.float16)
    return ImageEmbeddings(7, np.asarray(ids, np.int64), feats,
                           np.linalg.norm(feats.astype(np.float32), axis=1), "w")


# ------------------------------------------------------------------ the arithmetic (fast)
def test_top_k_is_highest_first_and_ties_keep_their_order():
    scores = np.array([0.1, 0.9, 0.5, 0.9, -1.0, 0.3], np.float32)
    assert top_k(scores, 3).tolist() == [1, 3, 2]
    assert top_k(scores, 10).tolist() == [1, 3, 2, 5, 0, 4]
    assert top_k(scores, 0).tolist() == [] and top_k(np.zeros(0), 3).tolist() == []


def test_image_scores_are_cosine_similarities():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(9, 5)) * rng.uniform(0.5, 3, size=(9, 1))
    images = _embeddings(np.arange(10, 19), feats)
    q = _unit(rng.normal(size=5))
    want = _unit(images.features.astype(np.float64)) @ q
    np.testing.assert_allclose(images.scores(q), want, atol=1e-6)
    with pytest.raises(ValueError, match="4 dimensions, the images 5"):
        images.scores(np.ones(4))


def test_cluster_means_and_the_softmax_over_the_vocabulary():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(8, 6))
    images = _embeddings([2, 3, 5, 7, 11, 13, 17, 19], feats)
    # predictions over images 2..19 (some without an embedding), three clusters, one empty
    pred_ids = np.array([19, 2, 3, 4, 5, 7, 11, 13, 17])
    clusters = np.array([0, 0, 1, 2, 0, 1, 1, 0, 0])
    means, sizes = cluster_means(images, pred_ids, clusters, 4)
    unit = _unit(images.features.astype(np.float64))
    row = {int(i): r for i, r in zip(images.image_ids, unit)}
    for c in range(4):
        members = [row[int(i)] for i, k in zip(pred_ids, clusters) if k == c and int(i) in row]
        assert sizes[c] == len(members)
        if members:
            np.testing.assert_allclose(means[c], _unit(np.sum(members, axis=0)), atol=1e-6)
        else:
            assert not means[c].any()
    assert sizes.tolist() == [5, 3, 0, 0]  # image 4 (cluster 2) has no embedding
    vocab = _unit(rng.normal(size=(5, 6)))
    scored = score_names(means, vocab, 14.0, top=3)
    logits = 14.0 * _unit(means[:2]) @ vocab.T
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for c in range(2):
        best = np.argsort(-probs[c])[:3]
        assert [j for j, _ in scored[c]] == best.tolist()
        np.testing.assert_allclose([p for _, p in scored[c]], probs[c][best], rtol=1e-6)
    assert scored[2] == [] and scored[3] == []
    with pytest.raises(ValueError, match="top must be a whole number"):
        score_names(means, vocab, 14.0, top=0)


def test_vocabulary_files(tmp_path):
    good = tmp_path / "names.txt"
    good.write_text("\ufefftabby cat\n\n  red   sneakers \ntabby cat\n\t\ngoldfish\n",
                    encoding="utf-8")
    assert read_vocabulary(good) == ["tabby cat", "red sneakers", "goldfish"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"vocabulary file {empty} holds no names"):
        read_vocabulary(empty)
    with pytest.raises(ValueError, match=f"cannot read the vocabulary file {tmp_path / 'no.txt'}"):
        read_vocabulary(tmp_path / "no.txt")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    with pytest.raises(ValueError, match=f"cannot read the vocabulary file {binary}.*UTF-8"):
        read_vocabulary(binary)
    builtin = names_mod.builtin_vocabulary()
    assert len(builtin) == 1000 and builtin[1] == "goldfish"


# ------------------------------------------------------------------ one operation (fast)
def test_apply_names_is_one_operation_and_keeps_the_persons_names(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=12, heads=(3,), write_images=False)
    lab = Labels(ws, run_id)
    lab.rename(1, "mine")
    before = len(lab.history())
    hid = apply_names(lab, {0: "tabby", 1: "goldfish", 2: "tabby"})
    assert hid is not None and len(lab.history()) == before + 1
    assert lab.cluster_names() == {0: "tabby", 1: "mine", 2: "tabby"}  # 0 and 2: one label
    assert set(lab.final_table()["label"]) == {"tabby", "mine"}
    assert lab.history()[-1].op == "suggested_names"
    lab.undo()                                                           # one undo: all of it
    assert lab.cluster_names() == {0: "cluster_0", 1: "mine", 2: "cluster_2"}
    assert apply_names(lab, {1: "goldfish"}) is None                     # kept: nothing to do
    apply_names(lab, {1: "goldfish"}, keep_named=False)
    assert lab.cluster_names()[1] == "goldfish"


# ------------------------------------------------------------------ runs without a text tower
def _fast_run(ws: Workspace, run_id: int, mode: str, backbone: str) -> None:
    ws.update_run(run_id, mode=mode, config={"backbone": backbone, "pretrained": "DEFAULT",
                                             "views": 2, "image_size": 32})


@pytest.mark.parametrize("mode, backbone, why", [
    ("fast", "efficientnet_lite0", "run 1 has no text tower (its backbone is efficientnet_lite0"),
    ("fast", "dinov2_s", "run 1 has no text tower (its backbone is dinov2_s"),
    ("scratch", "resnet18", "run 1 has no text tower (its backbone is resnet18"),
    ("scratch", "clip_b32", "run 1 trained its clip_b32 backbone (scratch mode)"),
    (None, None, "run 1 has no text tower (its backbone is not recorded"),
])
def test_a_run_without_a_text_tower_is_one_error_line(tmp_path, mode, backbone, why):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=8, heads=(2,), write_images=False)
    if mode is not None:
        _fast_run(ws, run_id, mode, backbone)
    msg = text_support(ws, run_id)
    assert msg.startswith(why) and HOW in msg and "\n" not in msg
    with pytest.raises(TextTowerError, match="no text tower|trained its"):
        search_text(ws, "red sneakers")
    with pytest.raises(TextTowerError):
        suggest_names(ws, vocab=["cat", "dog"])
    for args in (("neighbors", ws.path, "--text", "red sneakers"),
                 ("labels", ws.path, "suggest-names"),
                 ("labels", ws.path, "suggest-names", "--apply")):
        rc, out, err = _cli(*args)
        lines = _error_lines(err)
        assert rc == 2 and lines == [f"error: {msg}"], err
        assert out == "" and "Traceback" not in err
    assert Labels(ws, run_id).history() == []


def test_neighbors_takes_an_image_or_a_text(tmp_path):
    ws, _ = make_workspace_with_run(tmp_path, n_images=8, heads=(2,), write_images=False)
    for args in ((), ("1", "--text", "cat")):
        rc, _, err = _cli("neighbors", ws.path, *args)
        assert rc == 2 and _error_lines(err) == ["error: give exactly one of IMAGE or --text QUERY"]


def test_siglip_tokenizer_offline_says_how_to_get_it():
    from selfclassifier_core.engine import backbones_hub as hub

    with pytest.raises(ValueError) as err:
        hub.tokenizer("siglip_b16")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("the text tokenizer of backbone siglip_b16")
    assert "hf download timm/ViT-B-16-SigLIP" in msg


def test_the_apps_screens_without_a_text_tower(tmp_path, monkeypatch):
    from test_app import assert_ok, goto, start_app

    ws, run_id = make_workspace_with_run(tmp_path, n_images=12, heads=(3,))
    _fast_run(ws, run_id, "fast", "efficientnet_lite0")
    at = goto(start_app(monkeypatch, ws.root, ws.path), "Neighbours")
    infos = [i.value for i in at.info if "no text tower" in i.value]
    assert len(infos) == 1 and "clip\\_b32" in infos[0]
    assert not [t for t in at.text_input if t.key == "nn_text"]
    goto(at, "Clusters")
    assert_ok(at)
    assert not [t for t in at.toggle if t.key == "cl_suggest"]


# ------------------------------------------------------------------ a CLIP run (slow)
QUERY = "a photo of something red"
VOCAB = ["red square", "blue sky", "", "red square", "a dog", "green leaf", "  blue sky "]


def _folder(root: Path) -> Path:
    """12 noise images: 6 reddish, 6 bluish."""
    folder = root / "images"
    folder.mkdir(parents=True)
    for j in range(12):
        rng = np.random.default_rng(j)
        px = rng.integers(0, 90, (24, 24, 3), dtype=np.uint8)
        px[..., 0 if j % 2 == 0 else 2] += 160
        Image.fromarray(px).save(folder / f"img_{j:02d}.png")
    return folder


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory) -> Path:
    """A random open_clip ViT-B-32, the whole CLIP (text tower too), as one file (fp16)."""
    torch.manual_seed(3)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    sd = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("clip") / "open_clip_model.safetensors"
    safetensors_torch.save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def _clip_run(tmp_path_factory, clip_weights) -> Workspace:
    """A fast run on clip_b32 with those weights, once per module."""
    from selfclassifier_core.catalog.scanner import scan

    root = tmp_path_factory.mktemp("clip-run")
    folder = _folder(root)
    ws = Workspace.for_folder(folder, root / "ws")
    scan(folder, ws, workers=1)
    rc, out, err = _cli("train", folder, "--workspace", ws.path, "--mode", "fast",
                        "--backbone", "clip_b32", "--pretrained", clip_weights,
                        "--image-size", 32, "--views", 2, "--steps", 4, "--classes", 2,
                        "--batch-size", 8, "--device", "cpu", "--workers", 0)
    assert rc == 0, err
    return ws


@pytest.fixture
def clip_run(_clip_run, tmp_path) -> Workspace:
    """The test's own copy of the CLIP run's workspace (labels edited there stay there)."""
    shutil.copytree(_clip_run.path, tmp_path / "ws")
    return Workspace.open(tmp_path / "ws")


@pytest.fixture(scope="module")
def reference(clip_weights):
    """open_clip's own model from the weights file, and its tokenizer: the hand computation."""
    from open_clip.model import resize_pos_embed

    ref = open_clip.create_model("ViT-B-32", pretrained=None, force_image_size=32)
    sd = {k: v.float() for k, v in safetensors_torch.load_file(str(clip_weights)).items()}
    resize_pos_embed(sd, ref)  # 7x7 patches to 1x1, as open_clip.load_checkpoint does
    ref.load_state_dict(sd, strict=True)
    return ref.eval(), open_clip.get_tokenizer("ViT-B-32")


def _cached_image_features(ws: Workspace) -> tuple[np.ndarray, np.ndarray]:
    """(ids, unit rows) of view 0 of the run's feature cache, read straight from its files."""
    key = run_config(ws.get_run(1))["feature_cache"]
    d = ws.features_dir / key
    return np.load(d / "ids.npy"), _unit(np.load(d / "feats.npy")[0].astype(np.float64))


def _ref_text(reference, texts) -> np.ndarray:
    ref, tok = reference
    with torch.no_grad():
        return _unit(ref.encode_text(tok(list(texts))).double().numpy())


@pytest.mark.slow  # a fast run (trains) on a 150 M-parameter CLIP
def test_search_by_text_is_the_cosine_of_text_and_image_embeddings(clip_run, reference):
    ws = clip_run
    assert text_support(ws) is None
    table = search_text(ws, QUERY, k=5)
    assert list(table.columns) == ["image_id", "path", "score"] and len(table) == 5
    scores = table["score"].to_numpy()
    assert (np.diff(scores) <= 0).all() and table["image_id"].is_unique
    paths = dict(ws.usable_images())
    assert table["path"].tolist() == [paths[int(i)] for i in table["image_id"]]
    # by hand: open_clip's text embedding · the images' cached CLIP embeddings
    ids, rows = _cached_image_features(ws)
    hand = dict(zip(ids.tolist(), rows @ _ref_text(reference, [QUERY])[0]))
    np.testing.assert_allclose(scores, [hand[int(i)] for i in table["image_id"]], atol=1e-5)
    np.testing.assert_allclose(scores, sorted(hand.values(), reverse=True)[:5], atol=1e-5)
    # those cached features are open_clip's encode_image of the run's eval view
    from selfclassifier_core.engine.backbones import backbone_preprocess
    from selfclassifier_core.engine.transforms import eval_transform

    tf = eval_transform(32, backbone_preprocess("clip_b32"))
    x = torch.stack([tf(Image.open(ws.abspath(paths[int(i)])).convert("RGB")) for i in ids])
    with torch.no_grad():
        mine = _unit(reference[0].encode_image(x).double().numpy())
    np.testing.assert_allclose(rows, mine, atol=5e-3)
    # the command line prints the same ranking
    rc, out, err = _cli("neighbors", ws.path, "--text", QUERY, "-k", 3)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == f"3 images nearest the text {QUERY!r} (run 1, clip_b32):"
    shown = [ln.split() for ln in lines[2:]]
    assert [int(r[1]) for r in shown] == table["image_id"].tolist()[:3]
    assert [float(r[2]) for r in shown] == pytest.approx(scores[:3], abs=1e-4)
    # more than there are: every image, once
    assert len(search_text(ws, QUERY, k=100)) == len(paths)
    with pytest.raises(ValueError, match="the text query is empty"):
        search_text(ws, "  ")


@pytest.mark.slow  # a fast run (trains) on a 150 M-parameter CLIP
def test_the_text_tower_is_open_clips(clip_run, reference):
    """Prompts of every length (cut at their end-of-text token) embed as open_clip's
    encode_text over the whole context does; the logit scale is the file's."""
    from selfclassifier_core.inference.text import text_model

    model = text_model(clip_run)
    texts = ["a", "a photo of a dog!", "a photo of a Chesapeake Bay retriever, sitting " * 3]
    np.testing.assert_allclose(model.embed(texts), _ref_text(reference, texts), atol=1e-5)
    scale = float(reference[0].logit_scale.detach().exp())
    assert model.logit_scale == pytest.approx(scale, rel=1e-3)


@pytest.mark.slow  # a fast run (trains) on a 150 M-parameter CLIP
def test_suggested_names_from_a_vocabulary_file_and_apply_undo(clip_run, reference, tmp_path):
    from selfclassifier_core.store.predictions import load_predictions

    ws = clip_run
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    names = ["red square", "blue sky", "a dog", "green leaf"]
    sugg = suggest_names(ws, vocab=vocab)
    lab = Labels(ws)
    assert sorted(sugg) == list(range(lab.head))
    # by hand: each cluster's mean CLIP embedding against open_clip's prompt embeddings
    ids, rows = _cached_image_features(ws)
    pred = load_predictions(ws.get_run(1).dir, embeddings=False).head(lab.head)
    assert (pred.cluster == lab.predicted).all()
    text = _ref_text(reference, [PROMPT.format(n) for n in names])
    scale = float(reference[0].logit_scale.detach().exp())
    row_of = {int(i): r for i, r in zip(ids, rows)}
    used = 0
    for c in range(lab.head):
        members = [row_of[int(i)] for i, k in zip(lab.image_ids, pred.cluster) if k == c]
        if not members:
            assert sugg[c] == []
            continue
        used += 1
        logits = scale * _unit(np.sum(members, axis=0)) @ text.T
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        assert len(sugg[c]) == 3 and sugg[c][0][0] == names[int(np.argmax(probs))]
        assert [p for _, p in sugg[c]] == pytest.approx(np.sort(probs)[::-1][:3], abs=1e-4)
    assert used >= 1
    assert list((ws.features_dir / "text").glob("clip_b32-*.npy"))  # embedded once, kept
    # the command line: the same top names, then --apply renames in one operation
    rc, out, err = _cli("labels", ws.path, "suggest-names", "--vocab", vocab)
    assert rc == 0, err
    for c, items in sugg.items():
        if items:
            assert f"{items[0][0]} ({items[0][1]:.3f})" in out
    before = lab.cluster_names()
    rc, out, err = _cli("labels", ws.path, "suggest-names", "--vocab", vocab, "--apply")
    assert rc == 0, err
    assert "in one operation" in out
    after = Labels(ws).cluster_names()
    assert after == {c: (s[0][0] if s else before[c]) for c, s in sugg.items()}
    assert [e.op for e in Labels(ws).history()] == ["suggested_names"]
    rc, out, err = _cli("labels", ws.path, "undo")
    assert rc == 0 and Labels(ws).cluster_names() == before


@pytest.mark.slow  # a fast run (trains) on a 150 M-parameter CLIP
def test_the_weights_decide_what_the_text_side_may_do(clip_run, clip_weights, tmp_path):
    from safetensors.torch import load_file, save_file

    from selfclassifier_core.inference.text import image_embeddings, load_text_model

    ws = clip_run
    visual_only = tmp_path / "visual.safetensors"
    save_file({k: v for k, v in load_file(str(clip_weights)).items()
               if k.startswith("visual.")}, str(visual_only))
    with pytest.raises(ValueError, match="holds no text tower for clip_b32"):
        load_text_model("clip_b32", visual_only)
    config = ws.get_run(1).dir / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "pretrained": str(visual_only)}))
    with pytest.raises(ValueError, match="not the ones it was trained with"):
        image_embeddings(ws)  # other weights than the features were made with
    config.write_text(json.dumps({**cfg, "pretrained": str(tmp_path / "gone.safetensors")}))
    msg = text_support(ws)
    assert "gone.safetensors, which is not there any more" in msg and "\n" not in msg


@pytest.mark.slow  # a fast run (trains) on a 150 M-parameter CLIP, and the app
def test_the_apps_text_box_and_suggested_names(clip_run, monkeypatch):
    from test_app import assert_ok, goto, grid_order, start_app

    from app import ui
    from app.screens.neighbours import RESULT_COLUMNS

    ws = clip_run
    at = goto(start_app(monkeypatch, ws.root, ws.path), "Neighbours")
    at.text_input(key="nn_text").input(QUERY).run()
    assert_ok(at)
    want = search_text(ws, QUERY, k=12)
    captions = grid_order([c.value for c in at.caption if c.value.startswith("score ")],
                          RESULT_COLUMNS)
    assert len(captions) == len(want) == 12
    assert [float(c.split()[1]) for c in captions] == pytest.approx(want["score"].tolist(),
                                                                    abs=1e-3)  # best first
    names_shown = [c.split("\n")[-1] for c in captions]
    assert names_shown == [ui.esc(Path(p).name) for p in want["path"]]
    # Clusters: the suggestions on each card, applied with one click, undone from the sidebar
    monkeypatch.setattr(names_mod, "builtin_vocabulary", lambda: ["red square", "blue sky",
                                                                  "a dog"])
    goto(at, "Clusters")
    at.toggle(key="cl_suggest").set_value(True).run()
    assert_ok(at)
    sugg = suggest_names(ws, vocab=["red square", "blue sky", "a dog"])
    buttons = [b for b in at.button if b.key and b.key.startswith("sg|")]
    expect = {(c, j) for c, items in sugg.items() for j in range(len(items))}
    assert {(int(b.key.split("|")[2]), int(b.key.split("|")[3])) for b in buttons} == expect
    first = buttons[0]
    c, j = int(first.key.split("|")[2]), int(first.key.split("|")[3])
    name, score = sugg[c][j]
    assert first.label == f"{name} · {score:.2f}"
    first.click().run()
    assert_ok(at)
    lab = Labels(ws)
    assert lab.cluster_names()[c] == name and [e.op for e in lab.history()] == ["rename"]
    at.sidebar.button(key="undo").click().run()
    assert_ok(at)
    assert Labels(ws).cluster_names()[c] == default_name(c, lab.head)
