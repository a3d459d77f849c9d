"""Nearest neighbours and near-duplicates (FAISS), per-run index caching, CLI commands."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from workspace_fixtures import image_path, make_workspace_with_run

from selfclassifier_core.curation import neighbors
from selfclassifier_core.curation.neighbors import INDEX_FILE, NeighborIndex, faiss_threads
from selfclassifier_core.store.predictions import load_predictions, save_predictions

REPO = Path(__file__).resolve().parents[1]


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def set_embeddings(ws, run_id: int, emb: np.ndarray) -> None:
    """Replace the stored embeddings of a run (as a re-prediction would)."""
    preds = load_predictions(ws.run_dir(run_id), embeddings=False)
    preds.embeddings = np.asarray(emb, np.float16)
    save_predictions(ws.run_dir(run_id), preds)


def planted_embeddings(n: int = 200, dim: int = 64, seed: int = 0):
    """Random unit vectors with two planted near-duplicate groups (positions, not ids)."""
    rng = np.random.default_rng(seed)
    emb = unit(rng.normal(size=(n, dim)))
    group_a = [0, 10, 20, 30, 40]            # 10..40 are noisy copies of 0
    group_b = [50, 60, 70]                   # exact copies of 50
    for p in group_a[1:]:
        emb[p] = unit(emb[0] + 0.01 * rng.normal(size=dim))
    for p in group_b[1:]:
        emb[p] = emb[50]
    return emb, group_a, group_b


# ---------------------------------------------------------------------------- in memory
def test_exact_duplicate_comes_first_and_query_is_excluded():
    rng = np.random.default_rng(1)
    emb = unit(rng.normal(size=(60, 16)))
    ids = np.arange(100, 160)
    emb[37] = emb[12]                      # id 137 duplicates id 112
    index = NeighborIndex(emb.astype(np.float16), ids, use_gpu=False)

    res = index.search(112, k=5)
    assert list(res.columns) == ["image_id", "similarity"]
    assert len(res) == 5
    assert res["image_id"].iloc[0] == 137
    assert res["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-3)
    assert 112 not in set(res["image_id"])
    assert np.all(np.diff(res["similarity"].to_numpy()) <= 1e-6)

    with_self = index.search(112, k=5, include_self=True)
    assert set(with_self["image_id"].iloc[:2]) == {112, 137}


def test_search_vectors_matches_brute_force():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(500, 32)).astype(np.float32) * 3.0   # not normalised on purpose
    ids = rng.permutation(np.arange(10_000, 10_500))             # ids in no particular order
    queries = rng.normal(size=(20, 32)).astype(np.float32)
    index = NeighborIndex(emb, ids, use_gpu=False)

    sims, got = index.search_vectors(queries, k=7)

    sim_all = unit(queries) @ unit(emb).T
    order = np.argsort(-sim_all, axis=1)[:, :7]
    np.testing.assert_array_equal(got, ids[order])
    np.testing.assert_allclose(sims, np.take_along_axis(sim_all, order, axis=1), atol=1e-5)


def test_search_vectors_with_more_k_than_vectors_pads():
    emb = unit(np.eye(3, 8))
    index = NeighborIndex(emb, [5, 6, 7], use_gpu=False)
    sims, ids = index.search_vectors(emb[0], k=5)
    assert ids.shape == (1, 5)
    assert ids[0, 0] == 5 and set(ids[0, :3]) == {5, 6, 7}
    assert list(ids[0, 3:]) == [-1, -1]
    assert np.all(np.isneginf(sims[0, 3:]))


def test_ivf_index_agrees_with_exact_on_top1():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(40, 32))
    emb = centres[rng.integers(0, 40, 4000)] + 0.3 * rng.normal(size=(4000, 32))
    ids = np.arange(1, 4001)
    queries = emb[rng.choice(4000, 200, replace=False)] + 0.05 * rng.normal(size=(200, 32))

    exact = NeighborIndex(emb, ids, use_gpu=False)
    ivf = NeighborIndex(emb, ids, ivf_threshold=1000, nprobe=4, use_gpu=False)
    assert exact.kind == "flat" and ivf.kind == "ivf"
    import faiss
    assert faiss.extract_index_ivf(ivf.cpu_index).nlist > 4   # really approximate at nprobe=4

    _, top_exact = exact.search_vectors(queries, k=1)
    _, top_ivf = ivf.search_vectors(queries, k=1)
    assert np.mean(top_exact[:, 0] == top_ivf[:, 0]) >= 0.9


def test_duplicates_finds_planted_groups_and_respects_threshold():
    emb, group_a, group_b = planted_embeddings()
    ids = np.arange(1000, 1200)
    # a pair at similarity exactly 0.9: grouped at 0.85, not at 0.95
    rng = np.random.default_rng(9)
    u = emb[100]
    w = rng.normal(size=u.shape)
    w = unit(w - (w @ u) * u)
    emb[101] = 0.9 * u + np.sqrt(1 - 0.81) * w
    index = NeighborIndex(emb, ids, use_gpu=False)

    groups = index.duplicates(threshold=0.95)
    assert groups == [sorted(ids[group_a].tolist()), sorted(ids[group_b].tolist())]

    loose = index.duplicates(threshold=0.85)
    assert [1100, 1101] in loose
    # noisy copies (similarity ~0.997) drop out at 0.9999; exact copies stay
    assert index.duplicates(threshold=0.9999) == [sorted(ids[group_b].tolist())]


def test_bad_arguments_raise_value_errors_naming_the_value():
    index = NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu=False)
    with pytest.raises(ValueError, match="99"):
        index.search(99)
    with pytest.raises(ValueError, match="k must be"):
        index.search(1, k=0)
    with pytest.raises(ValueError, match="threshold"):
        index.duplicates(threshold=2.0)
    with pytest.raises(ValueError, match="appears more than once"):
        NeighborIndex(unit(np.eye(3)), [1, 1, 2], use_gpu=False)
    with pytest.raises(ValueError, match=r"\[m, 4\]"):
        index.search_vectors(np.ones((2, 5)))


def test_search_file_uses_the_embedding_function():
    rng = np.random.default_rng(4)
    emb = unit(rng.normal(size=(30, 16)))
    index = NeighborIndex(emb, np.arange(1, 31), use_gpu=False)
    seen = []

    def fake_embed(items):
        seen.append(items)
        return emb[[17]] * 5.0          # the new image looks exactly like id 18

    res = index.search_file(b"\x89PNG...", k=3, embed_fn=fake_embed)
    assert seen == [[b"\x89PNG..."]]
    assert res["image_id"].iloc[0] == 18
    assert res["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="embed_fn"):
        index.search_file(b"x", k=3)   # not made with for_run: no model to embed with
    with pytest.raises(ValueError, match="could not read"):
        index.search_file(b"x", k=3, embed_fn=lambda items: np.full((1, 16), np.nan))


# ---------------------------------------------------------------------------- threads
@pytest.fixture
def faiss_on_three_threads():
    """faiss on 3 OpenMP threads during the test (neither 1 nor the default), restored after."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(3)
    yield faiss
    faiss.omp_set_num_threads(before)


class ThreadsSeen:
    """Stands in for a faiss index: records the OpenMP thread count of each search, then
    searches the real index (or raises ``error``)."""

    def __init__(self, index, error: Exception | None = None):
        self.index, self.error, self.threads = index, error, []

    def search(self, x, k):
        import faiss

        self.threads.append(faiss.omp_get_max_threads())
        if self.error is not None:
            raise self.error
        return self.index.search(x, k)


def test_faiss_threads_restores_the_count_also_on_error(faiss_on_three_threads):
    faiss = faiss_on_three_threads
    with faiss_threads(1):
        assert faiss.omp_get_max_threads() == 1
    assert faiss.omp_get_max_threads() == 3
    with pytest.raises(RuntimeError, match="boom"):
        with faiss_threads(2):
            assert faiss.omp_get_max_threads() == 2
            raise RuntimeError("boom")
    assert faiss.omp_get_max_threads() == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="faiss threads"):
            with faiss_threads(bad):
                pass
    assert faiss.omp_get_max_threads() == 3


def test_few_queries_run_on_one_thread_with_the_multithreaded_results(faiss_on_three_threads,
                                                                      monkeypatch):
    faiss = faiss_on_three_threads
    rng = np.random.default_rng(5)
    emb = rng.normal(size=(3000, 32)).astype(np.float32)
    ids = rng.permutation(np.arange(1, 3001))
    queries = rng.normal(size=(3, 32)).astype(np.float32)
    index = NeighborIndex(emb, ids, use_gpu=False)
    spy = index.index = ThreadsSeen(index.cpu_index)

    def one_off_searches():
        return (index.search_vectors(queries, k=8),
                index.search(int(ids[7]), k=5),
                index.search_file(b"img", k=4, embed_fn=lambda items: emb[[11]]))

    (sims, got), near, near_file = one_off_searches()
    assert spy.threads == [1, 1, 1] and faiss.omp_get_max_threads() == 3

    monkeypatch.setattr(neighbors, "FEW_QUERIES", 0)   # the same searches, multi-threaded
    spy.threads.clear()
    (sims_mt, got_mt), near_mt, near_file_mt = one_off_searches()
    assert spy.threads == [3, 3, 3]
    np.testing.assert_array_equal(sims, sims_mt)
    np.testing.assert_array_equal(got, got_mt)
    pd.testing.assert_frame_equal(near, near_mt)
    pd.testing.assert_frame_equal(near_file, near_file_mt)
    assert near_file["image_id"].iloc[0] == ids[11]


def test_bulk_searches_keep_the_thread_count(faiss_on_three_threads):
    emb, _, group_b = planted_embeddings()
    ids = np.arange(1000, 1200)
    index = NeighborIndex(emb, ids, use_gpu=False)
    spy = index.index = ThreadsSeen(index.cpu_index)
    index.knn_all(k=3)
    assert sorted(ids[group_b].tolist()) in index.duplicates(threshold=0.9999)
    index.search_vectors(emb[:neighbors.FEW_QUERIES + 1], k=3)
    assert spy.threads == [3, 3, 3]


def test_thread_count_is_restored_when_a_search_raises(faiss_on_three_threads):
    faiss = faiss_on_three_threads
    index = NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu=False)
    spy = index.index = ThreadsSeen(index.cpu_index, error=RuntimeError("search failed"))
    with pytest.raises(RuntimeError, match="search failed"):
        index.search(1, k=2)
    with pytest.raises(RuntimeError, match="search failed"):
        index.search_vectors(np.ones(4), k=2)
    assert spy.threads == [1, 1] and faiss.omp_get_max_threads() == 3


# ---------------------------------------------------------------------------- per run
def test_for_run_saves_reloads_and_rebuilds_when_embeddings_change(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=200, write_images=False)
    emb, group_a, _ = planted_embeddings()
    set_embeddings(ws, run_id, emb)

    first = NeighborIndex.for_run(ws, run_id, use_gpu=False)
    assert not first.loaded_from_disk
    assert (ws.run_dir(run_id) / INDEX_FILE).exists()
    top_first = first.search(1, k=4)
    assert set(top_first["image_id"]) == {11, 21, 31, 41}        # ids are positions + 1

    again = NeighborIndex.for_run(ws)                            # latest run, from disk
    assert again.loaded_from_disk and again.run_id == run_id
    assert again.search(1, k=4).equals(top_first)

    emb2 = emb.copy()
    emb2[150] = emb2[0]                                          # id 151 now duplicates id 1
    set_embeddings(ws, run_id, emb2)
    rebuilt = NeighborIndex.for_run(ws, run_id, use_gpu=False)
    assert not rebuilt.loaded_from_disk
    assert rebuilt.search(1, k=1)["image_id"].iloc[0] == 151
    assert NeighborIndex.for_run(ws, run_id).loaded_from_disk


def test_for_run_rebuilds_from_a_damaged_index_file(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=50, write_images=False)
    NeighborIndex.for_run(ws, run_id, use_gpu=False)
    (ws.run_dir(run_id) / INDEX_FILE).write_bytes(b"garbage")
    index = NeighborIndex.for_run(ws, run_id, use_gpu=False)
    assert not index.loaded_from_disk
    assert len(index.search(3, k=5)) == 5


def test_for_run_and_the_map_refuse_embeddings_that_do_not_match_the_ids_in_words(tmp_path):
    from selfclassifier_core.curation.projection import run_map
    from selfclassifier_core.store.predictions import EMBEDDINGS_FILE
    from selfclassifier_core.store.workspace import WorkspaceError

    ws, run_id = make_workspace_with_run(tmp_path, n_images=50, write_images=False)
    path = ws.run_dir(run_id) / EMBEDDINGS_FILE
    np.save(path, np.load(path)[:49])                  # a row short: not these images' vectors
    for build in (lambda: NeighborIndex.for_run(ws, run_id, use_gpu=False),
                  lambda: run_map(ws, run_id)):
        with pytest.raises(WorkspaceError, match=r"49 rows for 50 predicted images.*predict"):
            build()
    path.unlink()
    with pytest.raises(WorkspaceError, match=r"no embeddings.*predict"):
        NeighborIndex.for_run(ws, run_id, use_gpu=False)


# ---------------------------------------------------------------------------- CLI
def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "selfclassifier_core", *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


@pytest.mark.slow  # the command line in a subprocess
def test_cli_neighbors_and_duplicates(tmp_path):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=200, write_images=False)
    emb, group_a, group_b = planted_embeddings()
    emb[123] = emb[7]                                            # id 124 duplicates id 8
    set_embeddings(ws, run_id, emb)

    out = run_cli("neighbors", str(ws.path), "8", "-k", "3")
    assert out.returncode == 0, out.stderr
    lines = [ln.split() for ln in out.stdout.splitlines()[2:]]
    assert len(lines) == 3
    assert lines[0][:2] == ["1", "124"] and float(lines[0][2]) == pytest.approx(1.0, abs=1e-3)
    assert lines[0][3] == image_path(123)

    by_path = run_cli("neighbors", str(ws.path), image_path(7), "-k", "3")  # same image by path
    assert by_path.returncode == 0, by_path.stderr
    assert by_path.stdout.splitlines()[2:] == out.stdout.splitlines()[2:]

    dup = run_cli("duplicates", str(ws.path), "--threshold", "0.95", "--run", str(run_id))
    assert dup.returncode == 0, dup.stderr
    assert "3 group(s)" in dup.stdout
    text = dup.stdout
    groups = text.split("\ngroup ")[1:]                          # after the summary line
    ids_in = [[int(ln.split()[0]) for ln in g.splitlines()[1:] if ln.strip()] for g in groups]
    assert ids_in[0] == [p + 1 for p in group_a]
    assert sorted(map(sorted, ids_in[1:])) == sorted([[p + 1 for p in group_b], [8, 124]])

    bad = run_cli("neighbors", str(ws.path), "no/such/image.png")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]   # one line
    assert bad.stderr.startswith("error:") and "no/such/image.png" in bad.stderr

    bad_t = run_cli("duplicates", str(ws.path), "--threshold", "3")
    assert bad_t.returncode == 2 and "threshold" in bad_t.stderr


def test_cli_neighbors_of_a_file_outside_the_catalog(tmp_path, monkeypatch, capsys):
    """A file that is not in the catalog is embedded with the run's model (predict.embed_files)."""
    import types

    from selfclassifier_core.cli import main

    ws, run_id = make_workspace_with_run(tmp_path, n_images=200, write_images=False)
    emb, _, _ = planted_embeddings()
    set_embeddings(ws, run_id, emb)
    outside = tmp_path / "new.png"
    outside.write_bytes(b"not needed by the fake model")
    calls = []

    def embed_files(workspace, rid, items):
        calls.append((workspace.path, rid, [str(i) for i in items]))
        return emb[[99]].astype(np.float32), []           # looks exactly like id 100

    fake = types.ModuleType("selfclassifier_core.inference.predict")
    fake.embed_files = embed_files
    monkeypatch.setitem(sys.modules, "selfclassifier_core.inference.predict", fake)
    import selfclassifier_core
    monkeypatch.setattr(selfclassifier_core, "predict", fake, raising=False)

    assert main(["neighbors", str(ws.path), str(outside), "-k", "2"]) == 0
    assert calls == [(ws.path, run_id, [str(outside)])]
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[2:]]
    assert rows[0][1] == "100" and float(rows[0][2]) == pytest.approx(1.0, abs=1e-3)


# ---------------------------------------------------------------------- use_gpu=True
def _faiss():
    return neighbors._import_faiss()


def _no_build(monkeypatch):
    """Fail the test if the index gets built: a GPU that cannot be had is refused first."""
    def build(*args, **kwargs):
        raise AssertionError("the index was built before use_gpu=True was refused")
    monkeypatch.setattr(NeighborIndex, "_build", build)


def test_use_gpu_with_a_cpu_only_faiss_is_refused_in_words(monkeypatch):
    monkeypatch.delattr(_faiss(), "StandardGpuResources", raising=False)  # as faiss-cpu has
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match=r"use_gpu=True but the installed faiss .*CPU-only "
                                         r"build \(faiss-cpu\)"):
        NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu=True)
    assert neighbors.gpu_available() is False


def test_use_gpu_without_a_cuda_device_is_refused_in_words(monkeypatch):
    faiss = _faiss()
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)  # a GPU build
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)      # ... no GPU
    _no_build(monkeypatch)
    with pytest.raises(ValueError, match="use_gpu=True but faiss has GPU support but sees no "
                                         "CUDA device"):
        NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu=True)

    def broken():
        raise RuntimeError("CUDA driver version is insufficient")
    monkeypatch.setattr(faiss, "get_num_gpus", broken)
    with pytest.raises(ValueError, match="could not query CUDA devices .*insufficient"):
        NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu=True)
    assert neighbors.gpu_available() is False


def test_use_gpu_none_chooses_the_cpu_when_no_gpu_can_be_had(monkeypatch):
    monkeypatch.delattr(_faiss(), "StandardGpuResources", raising=False)
    index = NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4])
    assert index.device == "cpu"
    assert index.search(1, 1, include_self=True)["image_id"].tolist() == [1]


def test_gpu_index_that_cannot_be_made_is_an_error_in_words(monkeypatch, caplog):
    """A GPU is there but faiss fails to move the index onto it (out of memory, say)."""
    faiss = _faiss()
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)

    def to_gpu(res, device, index):
        raise RuntimeError("Error in virtual void* faiss::gpu::StandardGpuResourcesImpl::"
                           "allocMemory(...) at faiss/gpu/StandardGpuResources.cpp:452: "
                           "Error: 'err == cudaSuccess' failed: out of memory\n(C++ trace)")
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    with pytest.raises(RuntimeError, match="use_gpu=True but the index could not be moved to "
                                           "the GPU: .*out of memory$"):
        NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu=True)
    index = NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4])     # automatic: the CPU, said so
    assert index.device == "cpu"
    assert any("searching on the CPU" in r.getMessage() for r in caplog.records)


def test_use_gpu_must_be_none_or_a_bool():
    with pytest.raises(ValueError, match="use_gpu must be None .* got 'yes'"):
        NeighborIndex(unit(np.eye(4)), [1, 2, 3, 4], use_gpu="yes")
