"""Fast mode: heads trained on cached features of a frozen backbone, predictions for every image."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from selfclassifier_core.catalog import scanner as catalog
from selfclassifier_core.engine.neighbours import knn_graph
from selfclassifier_core.training import fast as fastmode
from selfclassifier_core.training import recipes
from selfclassifier_core.workflows.pipeline import train
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.store.workspace import Workspace


def train_fast(ws, run_id, options, progress=None, should_stop=None):
    """Train the fast-mode run ``run_id`` created earlier, as the background jobs do."""
    return train(None, ws, run_id=run_id, progress=progress, should_stop=should_stop, **options)

SIZE = 32  # the cached views of the dark_bright fixture (conftest.DARK_BRIGHT_VIEWS)


def _options(weights, **kw):
    return {"backbone": "resnet18", "pretrained": str(weights), "image_size": SIZE, "views": 3,
            "classes": 2, "steps": 60, "batch_size": 32, "proj_hidden_dim": 64, "device": "cpu",
            "workers": 0, "nn_k": 3, **kw}


@pytest.mark.slow  # trains
def test_fast_mode_predicts_every_image_and_separates_kinds(dark_bright):
    folder, ws, weights, kinds = dark_bright
    opts = _options(weights)
    run_id = ws.create_run("fast", opts)
    seen = []
    train_fast(ws, run_id, opts, progress=seen.append)

    run = ws.get_run(run_id)
    assert run.status == "done" and run.heads == [2, 4, 8] and run.main_head == 2
    usable = dict(ws.usable_images())
    assert len(usable) == 32 and "broken.png" not in usable.values()
    preds = load_predictions(run.dir)
    assert sorted(preds.image_ids.tolist()) == sorted(usable)
    assert preds.embeddings.shape == (32, 128)
    np.testing.assert_allclose(np.linalg.norm(preds.embeddings.astype(np.float32), axis=1), 1,
                               atol=1e-2)
    for k in (2, 4, 8):
        h = preds.head(k)
        assert h.cluster.min() >= 0 and h.cluster.max() < k
        assert np.all((h.confidence > 0) & (h.confidence <= 1)) and np.all(h.margin >= 0)

    # dark and bright noise end up in different classes of the 2-class head
    truth = np.array([kinds[usable[int(i)]] for i in preds.image_ids])
    cl = preds.head(2).cluster
    agree = max(np.mean(cl == truth), np.mean(cl != truth))
    assert agree == 1.0, (cl, truth)

    # run files like the trainer's
    stats = [json.loads(x) for x in (run.dir / "stats.jsonl").read_text().splitlines()]
    assert stats[-1]["step"] == 60 and all(np.isfinite(s["loss"]) for s in stats)
    progress = json.loads((run.dir / "progress.json").read_text())
    assert progress["status"] == "done" and progress["step"] == 60
    assert any(p.get("phase") == "features" for p in seen) and seen[-1]["status"] == "done"
    cfg = json.loads((run.dir / "config.json").read_text())
    assert cfg["mode"] == "fast" and cfg["heads"] == [2, 4, 8]
    # its summary is remembered, for the first page that shows it
    memo = json.loads((ws.cache_dir / f"run-{run_id}-summary.json").read_text())
    assert memo["images"] == 32 and [h["classes"] for h in memo["heads"]] == [2, 4, 8]


@pytest.mark.slow  # trains
def test_checkpoint_rebuilds_model_that_embeds_like_the_predictions(dark_bright):
    """The checkpoint holds the whole model (pretrained backbone included): a model rebuilt from
    it embeds raw images like the saved predictions (which came from cached features)."""
    from selfclassifier_core.store.checkpoint import load_checkpoint
    from selfclassifier_core.catalog.imageio import load_rgb
    from selfclassifier_core.engine.model import build_from_checkpoint
    from selfclassifier_core.engine.transforms import eval_transform

    folder, ws, weights, _ = dark_bright
    opts = _options(weights, steps=20)
    run_id = ws.create_run("fast", opts)
    train_fast(ws, run_id, opts)
    ckpt = load_checkpoint(ws.run_dir(run_id) / "checkpoint.pt")
    assert ckpt["format_version"] == 1 and ckpt["mode"] == "fast"
    assert ckpt["views"]["n_views"] == 3 and ckpt["feature_cache"]
    src = torchvision.models.resnet18(weights=None)
    src.load_state_dict(torch.load(weights, weights_only=True))
    assert torch.equal(ckpt["model"]["backbone.layer3.0.conv1.weight"], src.layer3[0].conv1.weight)
    model = build_from_checkpoint(ckpt).eval()
    preds = load_predictions(ws.run_dir(run_id))
    rel = dict(ws.usable_images())
    ids = preds.image_ids[:5]
    x = torch.stack([eval_transform(SIZE)(load_rgb(folder / rel[int(i)])) for i in ids])
    with torch.no_grad():
        out = model(x)
    # Both sides see the same pixels (view 0 of the feature cache is eval_transform(SIZE)), so
    # the gap is float16 rounding only: the cached features and the saved embeddings are
    # float16 (2^-11 relative, under 2.5e-4 for the elements of a unit vector); measured about
    # 8e-5. A different eval view (e.g. bilinear instead of bicubic resizing) gives ~2e-2.
    np.testing.assert_allclose(out.embedding.numpy(), preds.embeddings[:5].astype(np.float32),
                               rtol=0, atol=1e-3)
    probs = torch.softmax(out.logits[0] / ckpt["train_config"]["row_tau"], dim=1)
    assert np.array_equal(probs.argmax(1).numpy(), preds.head(2).cluster[:5])


@pytest.mark.slow  # trains
def test_second_run_reuses_features(dark_bright, monkeypatch):
    from selfclassifier_core.training import features

    _, ws, weights, _ = dark_bright
    opts = _options(weights, steps=5)
    train_fast(ws, ws.create_run("fast", opts), opts)

    def boom(*a, **k):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(features, "build_extractor", boom)
    run2 = ws.create_run("fast", opts)
    train_fast(ws, run2, {**opts, "classes": 3})
    assert ws.get_run(run2).status == "done" and ws.get_run(run2).heads == [3, 6, 12]


@pytest.mark.slow  # trains
def test_cancel_keeps_a_usable_state(dark_bright):
    _, ws, weights, _ = dark_bright
    opts = _options(weights, steps=500)
    run_id = ws.create_run("fast", opts)
    calls = {"n": 0}

    def stop_after_features():
        calls["n"] += 1
        return calls["n"] > 8  # a few polls during extraction, then during training

    train_fast(ws, run_id, opts, should_stop=stop_after_features)
    run = ws.get_run(run_id)
    assert run.status == "cancelled" and "step" in run.message
    preds = load_predictions(run.dir)
    assert len(preds.image_ids) == 32


def test_cancel_file_during_extraction(dark_bright_cold):
    _, ws, weights, _ = dark_bright_cold
    opts = _options(weights)
    run_id = ws.create_run("fast", opts)
    (ws.run_dir(run_id) / "CANCEL").write_text("")
    train_fast(ws, run_id, opts)
    run = ws.get_run(run_id)
    assert run.status == "cancelled" and not (run.dir / "predictions.npz").exists()


def test_bad_options_fail_the_run_with_message(dark_bright):
    _, ws, weights, _ = dark_bright
    opts = _options(weights, optimizer="sgd")
    run_id = ws.create_run("fast", opts)
    with pytest.raises(ValueError, match="optimizer"):
        train_fast(ws, run_id, opts)
    run = ws.get_run(run_id)
    assert run.status == "failed" and "sgd" in run.message
    opts = _options(weights, heads=[40])
    run_id = ws.create_run("fast", opts)
    with pytest.raises(ValueError, match="40 classes"):
        train_fast(ws, run_id, opts)
    assert ws.get_run(run_id).status == "failed"


def test_default_heads():
    assert recipes.head_sizes(10, 2000) == [10, 20, 40]
    assert recipes.head_sizes(10, 50) == [10, 20]
    assert recipes.head_sizes(None, 2000) == [32, 64, 128]
    with pytest.raises(ValueError, match="classes"):
        recipes.head_sizes(1, 100)


def test_knn_graph_excludes_self():
    x = torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]])
    nn = knn_graph(x, 1)
    assert nn[:, 0].tolist() == [1, 0, 3, 2]


def test_knn_graph_in_small_chunks_matches_the_full_matrix():
    x = torch.randn(203, 16, generator=torch.Generator().manual_seed(0))
    xn = x / x.norm(dim=1, keepdim=True)
    sim = xn @ xn.T
    sim.fill_diagonal_(-2.0)
    expected = sim.topk(5, dim=1).indices
    for max_elements in (203 * 7, 203, 1):          # 7 rows, one row, still one row a chunk
        assert torch.equal(knn_graph(x, 5, max_elements=max_elements), expected)


def test_default_recipe_fits_cpu_budget():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert recipes.default_recipe(10_000, gpu) == (8, 224)
    views, size = recipes.default_recipe(200, cpu)     # a small folder: full resolution
    assert size == 224 and 200 * views / recipes.CPU_IMAGES_PER_S[224] <= \
        recipes.CPU_EXTRACT_BUDGET_S
    views, size = recipes.default_recipe(2000, cpu)
    assert 2 <= views <= 4 and 96 <= size < 224
    assert 2000 * views / recipes.CPU_IMAGES_PER_S[size] <= recipes.CPU_EXTRACT_BUDGET_S
    assert recipes.default_recipe(1_000_000, cpu) == (2, 96)


def test_default_recipe_small_images_not_upscaled_on_cpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    big = recipes.default_recipe(300, cpu, median_side=800)
    small = recipes.default_recipe(300, cpu, median_side=64)
    assert big[1] > recipes.SMALL_IMAGE_VIEW and small[1] <= recipes.SMALL_IMAGE_VIEW
    assert small[0] >= big[0]                         # the time saved goes into views
    assert recipes.default_recipe(300, gpu, median_side=64) == (8, 224)


def test_default_steps_follow_folder_size():
    assert recipes.default_steps(306, 256) == 100     # small folder: the floor
    assert recipes.default_steps(2000, 256) == 700    # 100 passes of 7 steps
    assert recipes.default_steps(10_000_000, 1024) == 3000


def test_median_side_from_catalog(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, (w, h) in enumerate([(10, 40), (30, 20), (50, 50)]):
        Image.new("RGB", (w, h), (i * 50, 0, 0)).save(folder / f"{i}.png")
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    assert recipes.median_side(ws) is None            # nothing scanned yet
    catalog.scan(folder, ws)
    assert recipes.median_side(ws) == 40.0


@pytest.mark.slow  # trains
def test_training_seed_reuses_cached_views_feature_seed_does_not(dark_bright):
    _, ws, weights, _ = dark_bright
    keys, embeddings = [], []
    for extra in ({"seed": 0}, {"seed": 1}, {"seed": 1, "feature_seed": 7}):
        opts = _options(weights, steps=5, **extra)
        run_id = ws.create_run("fast", opts)
        train_fast(ws, run_id, opts)
        cfg = json.loads((ws.run_dir(run_id) / "config.json").read_text())
        keys.append(cfg["feature_cache"])
        embeddings.append(load_predictions(ws.run_dir(run_id)).embeddings)
    assert keys[0] == keys[1] != keys[2]
    assert not np.array_equal(embeddings[0], embeddings[1])   # the training seed does change the model


def test_smoothed_predictions_average_each_image_with_its_neighbours():
    """A refit's predictions (training/config.py, PREDICT_NEIGHBOURS): each row's probabilities
    are the mean of its own and its neighbours' (in whatever batch it falls), its embedding
    stays its own; without neighbours nothing changes."""
    from selfclassifier_core.engine.model import ModelConfig, SelfClassifier

    torch.manual_seed(0)
    model = SelfClassifier(ModelConfig(backbone="resnet18", image_size=32, small_input=True,
                                       proj_hidden_dim=16, proj_layers=2, proj_bn=True,
                                       out_dim=8, heads=[3, 5])).eval()
    feats = torch.randn(37, 512)
    nn = knn_graph(feats, 4)
    emb0, plain = fastmode._predict(model, feats, 0.1)
    emb, heads = fastmode._predict(model, feats, 0.1, batch=7, neighbours=nn)   # 1 row a batch
    emb2, heads2 = fastmode._predict(model, feats, 0.1, batch=22, neighbours=nn)  # 4 rows
    np.testing.assert_allclose(emb, emb0, atol=1e-6)
    np.testing.assert_allclose(emb2, emb0, atol=1e-6)
    for a, b in zip(heads, heads2):
        np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    with torch.no_grad():
        out = model.forward_features(feats)
    for h, z in enumerate(out.logits):
        p = fastmode._head_probs(z, 0.1)
        want = (p + p[nn].sum(1)) / 5
        assert np.array_equal(heads[h][0], want.argmax(1).numpy())
        np.testing.assert_allclose(heads[h][1], want.max(1).values.numpy(), atol=1e-5)
        assert np.array_equal(plain[h][0], p.argmax(1).numpy())


def test_a_larger_neighbour_search_starts_with_the_smaller_one():
    """fit_fast searches once for training's positives and a refit's averaged predictions
    and takes each one's first k columns: they must be the k-nearest search itself."""
    torch.manual_seed(1)
    x = torch.randn(700, 48)
    wide = knn_graph(x, 20, max_elements=700 * 64)   # several chunks
    assert torch.equal(wide[:, :10], knn_graph(x, 10, max_elements=700 * 64))
