"""Where other tests stub the model, the real one: an uploaded image is embedded by the run's own
trained model and finds itself (or its duplicate) first among its neighbours."""
from __future__ import annotations

import shutil

import pytest

from selfclassifier_core.curation.neighbors import NeighborIndex
from selfclassifier_core.workflows.pipeline import train
from train_fixtures import FAST, make_folder

pytestmark = [pytest.mark.slow,  # trains a model
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-e2e")
    folder = make_folder(root / "imgs", n=16)
    result = train(folder, root / "ws", classes=2, epochs=1, batch_size=8, seed=0, **FAST)
    return folder, result.workspace, result.run_id, root


def test_an_uploaded_catalog_image_finds_itself_first(trained):
    folder, ws, run_id, _ = trained
    index = NeighborIndex.for_run(ws, run_id)
    paths = dict(ws.usable_images())
    for image_id in (1, 6, 11):
        data = (folder / paths[image_id]).read_bytes()   # as the app's uploader hands it over
        result = index.search_file(data, k=3)
        assert int(result["image_id"].iloc[0]) == image_id
        assert float(result["similarity"].iloc[0]) == pytest.approx(1.0, abs=2e-3)
        # the same file by path gives the same answer as by bytes
        by_path = index.search_file(folder / paths[image_id], k=3)
        assert by_path["image_id"].tolist() == result["image_id"].tolist()


def test_a_copy_outside_the_folder_finds_its_original(trained):
    folder, ws, run_id, root = trained
    index = NeighborIndex.for_run(ws, run_id)
    image_id, rel = next(iter(ws.usable_images()))
    copy = root / "elsewhere" / "copy.png"
    copy.parent.mkdir()
    shutil.copyfile(folder / rel, copy)
    result = index.search_file(copy, k=2)
    assert int(result["image_id"].iloc[0]) == image_id      # its duplicate in the catalog
    assert float(result["similarity"].iloc[0]) > float(result["similarity"].iloc[1])
