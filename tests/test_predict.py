"""Predictions of a trained run: reload, new folder, files outside the catalog."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from selfclassifier_core.inference.predict import embed_files, head_prediction, load_model, predict
from selfclassifier_core.store.predictions import load_predictions
from selfclassifier_core.workflows.pipeline import train
from selfclassifier_core.store.workspace import Workspace, WorkspaceError

from train_fixtures import FAST, make_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def _module_run():
    return {}


@pytest.fixture
def trained(one_torch_thread, tmp_path_factory, _module_run):
    """``(tmp dir, TrainResult)`` of one tiny run shared by the module's tests.

    It is trained on first use inside a test, so on the one torch thread of ``one_torch_thread``
    (a module-scoped fixture would be set up before that function-scoped one)."""
    if not _module_run:
        tmp = tmp_path_factory.mktemp("pred")
        folder = make_folder(tmp / "imgs", n=16)
        res = train(folder, tmp / "ws", classes=2, epochs=1, batch_size=8, **FAST)
        _module_run["run"] = tmp, res
    return _module_run["run"]


def test_head_prediction_margin():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.45, 0.45]], np.float32)
    h = head_prediction(3, p)
    assert h.cluster.tolist() == [0, 1]
    assert np.allclose(h.confidence, [0.7, 0.45]) and np.allclose(h.margin, [0.5, 0.0])


@pytest.mark.slow  # trains a model (fixture)
def test_predict_reloads_checkpoint_and_matches(trained):
    _, res = trained
    stored = load_predictions(res.run_dir)
    again = predict(res.workspace, device="cpu", save=False)
    assert np.array_equal(again.image_ids, stored.image_ids)
    for k in stored.heads:
        assert np.array_equal(again.heads[k].cluster, stored.heads[k].cluster)
        assert np.allclose(again.heads[k].confidence, stored.heads[k].confidence, atol=1e-5)
    assert np.allclose(again.embeddings.astype(np.float32),
                       stored.embeddings.astype(np.float32), atol=2e-3)
    model, info = load_model(res.workspace, res.run_id, "cpu")
    assert not model.training and info["image_size"] == 8 and info["heads"] == [2, 4, 8]


@pytest.mark.slow  # trains a model (fixture)
def test_embed_files_paths_and_bytes(trained):
    tmp, res = trained
    path = tmp / "imgs" / "dark_00.png"
    emb, probs = embed_files(res.workspace, res.run_id, [path, path.read_bytes(), b"junk"],
                             device="cpu")
    assert emb.shape == (3, 128) and emb.dtype == np.float32
    assert np.allclose(emb[0], emb[1], atol=1e-5) and np.isnan(emb[2]).all()
    assert np.allclose(np.linalg.norm(emb[0]), 1, atol=1e-4)
    assert [p.shape for p in probs] == [(3, 2), (3, 4), (3, 8)]
    assert np.allclose(probs[0][:2].sum(1), 1, atol=1e-5)
    # same numbers as the stored prediction of that catalog image
    stored = load_predictions(res.run_dir)
    image_id = dict((p, i) for i, p in res.workspace.usable_images())["dark_00.png"]
    row = stored.position([image_id])[0]
    assert np.allclose(emb[0], stored.embeddings[row].astype(np.float32), atol=2e-3)


@pytest.mark.slow  # trains a model (fixture)
def test_predict_new_folder(trained, tmp_path):
    _, res = trained
    new = tmp_path / "new"
    new.mkdir()
    for i in range(5):
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(new / f"n{i}.png")
    preds = predict(res.workspace, folder=new, out_workspace=tmp_path / "ws2", device="cpu")
    ws2 = Workspace.open(tmp_path / "ws2")
    run = ws2.resolve_run()
    assert run.status == "done" and run.config["source"]["run"] == res.run_id
    assert (run.dir / "checkpoint.pt").exists()
    assert len(preds.image_ids) == 5
    assert sorted(load_predictions(run.dir).image_ids.tolist()) == [i for i, _ in
                                                                    ws2.usable_images()]


@pytest.mark.slow  # trains a model (fixture)
def test_a_folder_prediction_beats_while_it_runs_and_a_dead_one_reads_interrupted(
        trained, tmp_path, monkeypatch):
    """predict --folder claims its new run with a heartbeat like a training: while it predicts
    the run is this live process's; after it the record is gone; a prediction whose process
    died reads interrupted, with the command that predicts the folder again."""
    from selfclassifier_core.inference import predict as predict_mod
    from selfclassifier_core.store import liveness

    _, res = trained
    new = tmp_path / "new"
    new.mkdir()
    for i in range(3):
        Image.new("RGB", (10, 10), (0, i * 60, 0)).save(new / f"n{i}.png")
    seen = {}
    real = predict_mod.predict

    def watching(ws, run_id, **kw):
        seen["record"] = liveness.read_heartbeat(ws.run_dir(run_id))
        seen["status"] = ws.get_run(run_id).status
        return real(ws, run_id, **kw)

    monkeypatch.setattr(predict_mod, "predict", watching)
    predict_mod.predict_folder(res.workspace, new, out_workspace=tmp_path / "ws2", device="cpu")
    assert seen["status"] == "running" and liveness.is_this_process(seen["record"])
    ws2 = Workspace.open(tmp_path / "ws2")
    run = ws2.resolve_run()
    assert run.status == "done" and liveness.read_heartbeat(run.dir) is None

    def dying(ws, run_id, **kw):  # the process "dies": its record names a pid that is gone
        record = liveness.read_heartbeat(ws.run_dir(run_id))
        raise SystemExit(record)

    monkeypatch.setattr(predict_mod, "predict", dying)
    with pytest.raises(SystemExit) as died:
        predict_mod.predict_folder(res.workspace, new, out_workspace=tmp_path / "ws2",
                                   device="cpu")
    record = died.value.code
    dead = ws2.list_runs()[-1]
    ws2.update_run(dead.id, status="running")  # as a kill -9 leaves it: no failed status
    import json
    (dead.dir / liveness.HEARTBEAT_FILE).write_text(json.dumps({**record, "pid": 2 ** 22 + 7}))
    now = ws2.get_run(dead.id)
    assert now.status == "interrupted"
    assert "predict the folder again" in now.interrupted and f"--run {res.run_id}" in now.interrupted


def test_predict_without_runs_is_clear(tmp_path):
    ws = Workspace.for_folder(make_folder(tmp_path / "f", n=2), tmp_path / "ws")
    with pytest.raises(WorkspaceError, match="no finished training run"):
        predict(ws, device="cpu")


@pytest.mark.slow  # trains a model (fixture)
def test_a_refit_s_predictions_average_each_image_with_its_neighbours(trained, monkeypatch):
    """predict(neighbours=k), as a scratch refit's pipeline calls it: each image's class
    probabilities are the mean of its own and its k nearest images' in the run's embedding;
    the embeddings stay the model's own."""
    from selfclassifier_core.inference import predict as predict_mod

    _, res = trained
    seen = {}
    real = predict_mod._infer

    def spy(*args, **kwargs):
        seen["out"] = real(*args, **kwargs)
        return seen["out"]

    monkeypatch.setattr(predict_mod, "_infer", spy)
    smoothed = predict(res.workspace, device="cpu", save=False, neighbours=3)
    _pos, emb, probs = seen["out"]
    x = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    near = np.argsort(-sim, axis=1, kind="stable")[:, :3]
    for k, p in zip(smoothed.heads, probs):
        want = (p + p[near].sum(1)) / 4
        assert np.array_equal(smoothed.heads[k].cluster, want.argmax(1))
        np.testing.assert_allclose(smoothed.heads[k].confidence, want.max(1), atol=1e-5)
    plain = predict(res.workspace, device="cpu", save=False)
    for k, p in zip(plain.heads, seen["out"][2]):
        assert np.array_equal(plain.heads[k].cluster, p.argmax(1))
    np.testing.assert_allclose(smoothed.embeddings.astype(np.float32), emb, atol=2e-3)


def test_position_finds_each_id_s_row_the_whole_run_in_order_and_names_a_missing_id():
    from selfclassifier_core.store.predictions import HeadPrediction, Predictions

    ids = np.array([3, 8, 9, 20, 41], np.int64)
    preds = Predictions(ids, {2: HeadPrediction(2, np.zeros(5, np.int32), np.ones(5, np.float32),
                                                np.ones(5, np.float32))}, None)
    assert preds.position([20, 3, 41]).tolist() == [3, 0, 4]
    assert preds.position(ids).tolist() == [0, 1, 2, 3, 4]
    assert preds.position(ids[::-1]).tolist() == [4, 3, 2, 1, 0]   # the same ids, not in order
    with pytest.raises(KeyError, match="image id 10 has no prediction"):
        preds.position([8, 10])
