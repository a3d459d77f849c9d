"""The 2-D map: UMAP shape, seeding, fit-on-sample path, tiny-n fallback, per-run caching."""
from __future__ import annotations

import numpy as np
import pytest
from workspace_fixtures import make_workspace_with_run

from selfclassifier_core.curation import projection
from selfclassifier_core.store.predictions import load_predictions, save_predictions
from selfclassifier_core.curation.projection import MAP_FILE, run_map, umap_2d


def blobs(n_per: int = 20, k: int = 3, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 3
    labels = np.repeat(np.arange(k), n_per)
    return (centres[labels] + 0.2 * rng.normal(size=(len(labels), dim))).astype(np.float16), labels


@pytest.mark.slow  # the first UMAP fit in a process pays numba's JIT (~8 s idle, more when busy)
def test_umap_shape_seeded_determinism_and_structure():
    x, labels = blobs()                                  # 60 points in 3 clusters
    a = umap_2d(x, seed=0)
    b = umap_2d(x, seed=0)
    assert a.shape == (60, 2) and a.dtype == np.float32 and np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    # clusters stay apart in the map: every point is nearer its own cluster's centre
    centres = np.stack([a[labels == c].mean(0) for c in range(3)])
    nearest = np.argmin(((a[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels) == 1.0


@pytest.mark.slow
def test_umap_fit_on_sample_then_transform_reports_progress():
    x, labels = blobs(n_per=30)                          # 90 points, fit on 40
    calls = []
    out = umap_2d(x, seed=1, n_neighbors=10, max_fit=40,
                  progress=lambda done, total: calls.append((done, total)))
    assert out.shape == (90, 2) and np.all(np.isfinite(out))
    assert calls[0] == (0, 90) and calls[-1] == (90, 90)
    assert (40, 90) in calls
    dones = [d for d, _ in calls]
    assert dones == sorted(dones)
    centres = np.stack([out[labels == c].mean(0) for c in range(3)])
    nearest = np.argmin(((out[:, None, :] - centres[None]) ** 2).sum(-1), axis=1)
    assert np.mean(nearest == labels) >= 0.95


def test_tiny_inputs_fall_back_to_pca_and_zeros():
    assert umap_2d(np.zeros((0, 8))).shape == (0, 2)
    np.testing.assert_array_equal(umap_2d(np.ones((1, 8))), np.zeros((1, 2), np.float32))

    # unit vectors in a 2-D plane: PCA to 2-D keeps all pairwise distances
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(8, 2)))[0].T       # two orthonormal rows
    angles = rng.uniform(0, 2 * np.pi, 6)
    x = np.cos(angles)[:, None] * basis[0] + np.sin(angles)[:, None] * basis[1]
    out = umap_2d(x, n_neighbors=15)                          # 6 < 15 + 2 -> PCA
    assert out.shape == (6, 2) and out.dtype == np.float32

    def dists(p):
        return np.linalg.norm(p[:, None] - p[None], axis=-1)

    np.testing.assert_allclose(dists(out), dists(x), atol=1e-5)


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="2-D"):
        umap_2d(np.zeros(5))
    with pytest.raises(ValueError, match="n_neighbors"):
        umap_2d(np.zeros((5, 3)), n_neighbors=1)
    with pytest.raises(ValueError, match="max_fit"):
        umap_2d(np.zeros((5, 3)), n_neighbors=15, max_fit=10)


def test_run_map_is_cached_and_recomputed_when_inputs_change(tmp_path, monkeypatch):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=60, write_images=False)
    calls = []

    def fake_umap(embeddings, seed=0, n_neighbors=15, min_dist=0.1, max_fit=50_000,
                  progress=None):
        calls.append((len(embeddings), seed, n_neighbors))
        e = np.asarray(embeddings, np.float32)
        return np.stack([e[:, 0] + seed, e[:, 1] + n_neighbors], axis=1).astype(np.float32)

    monkeypatch.setattr(projection, "umap_2d", fake_umap)
    preds = load_predictions(ws.run_dir(run_id))

    first = run_map(ws, run_id)
    assert len(calls) == 1
    assert list(first.columns) == ["x", "y"] and first.index.name == "id"
    np.testing.assert_array_equal(first.index.to_numpy(), preds.image_ids)
    np.testing.assert_allclose(first["x"], np.asarray(preds.embeddings[:, 0], np.float32))
    cache = ws.run_dir(run_id) / MAP_FILE
    mtime = cache.stat().st_mtime_ns

    again = run_map(ws)                                   # latest run, from the cache
    assert len(calls) == 1 and cache.stat().st_mtime_ns == mtime
    assert again.equals(first)

    other = run_map(ws, run_id, n_neighbors=10)           # other parameters: recomputed
    assert len(calls) == 2 and calls[-1] == (60, 0, 10)
    np.testing.assert_allclose(other["y"], np.asarray(preds.embeddings[:, 1], np.float32) + 10)

    new = load_predictions(ws.run_dir(run_id), embeddings=False)
    new.embeddings = -np.asarray(preds.embeddings)        # re-predicted embeddings
    save_predictions(ws.run_dir(run_id), new)
    changed = run_map(ws, run_id, n_neighbors=10)
    assert len(calls) == 3
    np.testing.assert_allclose(changed["x"], -first["x"], atol=1e-3)
    run_map(ws, run_id, n_neighbors=10)
    assert len(calls) == 3



# --------------------------------------------------------------------------- selections
def _winding_number_inside(points: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Reference: a point is inside a simple polygon when the angles its vertices sweep around
    it add up to a full turn (another algorithm than the crossing count under test)."""
    dx = xs[None, :] - points[:, :1]
    dy = ys[None, :] - points[:, 1:]
    angles = np.arctan2(dy, dx)
    turn = np.diff(np.concatenate([angles, angles[:, :1]], axis=1), axis=1)
    turn = (turn + np.pi) % (2 * np.pi) - np.pi
    return np.abs(turn.sum(axis=1)) > np.pi


def test_in_polygon_agrees_with_the_winding_number_on_a_ragged_lasso():
    from selfclassifier_core.curation.projection import in_polygon

    rng = np.random.default_rng(3)
    angle = np.sort(rng.uniform(0, 2 * np.pi, 150))          # a star-shaped, ragged outline
    radius = rng.uniform(0.3, 1.0, 150)
    xs, ys = radius * np.cos(angle) + 0.2, radius * np.sin(angle) - 0.1
    points = rng.uniform(-1.2, 1.2, (20_000, 2)).astype(np.float32)
    want = _winding_number_inside(points.astype(np.float64), xs, ys)
    got = in_polygon(points, xs, ys)
    assert 0.1 < want.mean() < 0.6                           # the shape cuts the cloud
    np.testing.assert_array_equal(got, want)
    order = np.argsort(points[:, 1], kind="stable")           # a reused order: same answer
    np.testing.assert_array_equal(in_polygon(points, xs[::-1], ys[::-1], order), want)


def test_in_selection_edges_boxes_and_several_shapes():
    from selfclassifier_core.curation.projection import in_polygon, in_selection

    square = {"x": [0, 1, 1, 0], "y": [0, 0, 1, 1]}
    pts = np.array([[0.0, 0.5], [1.0, 0.5], [0.5, 0.0], [0.5, 1.0], [0.5, 0.5], [2.0, 2.0],
                    [-0.1, 0.5]], np.float32)
    # half-open: the lower and left edges are inside, the upper and right ones outside
    assert in_polygon(pts, square["x"], square["y"]).tolist() == [True, False, True, False,
                                                                   True, False, False]
    box = {"x": [2.5, 1.5], "y": [2.5, 1.5]}                  # corners in any order, edges in
    assert in_selection(pts, boxes=[box]).tolist() == [False] * 5 + [True, False]
    both = in_selection(pts, boxes=[box], lassos=[square])
    assert both.tolist() == [True, False, True, False, True, True, False]
    assert not in_selection(pts).any()
    assert not in_polygon(pts, [0, 1], [0, 1]).any()          # two points are no polygon
    with pytest.raises(ValueError, match="as many x as y"):
        in_polygon(pts, [0, 1, 1], [0, 1])
