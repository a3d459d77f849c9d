"""Progress of the long steps: every step reports ``progress(done, total)`` with a count that
never goes down and ends at ``total``; the command line shows it as log lines (not a terminal)
or tqdm bars (a terminal)."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from selfclassifier_core.cli import main
from selfclassifier_core.cli.progress import Reporter
from selfclassifier_core.curation import export, formats, neighbors, projection
from selfclassifier_core.store.progress import Tally, TimeLeft, format_seconds

from workspace_fixtures import make_workspace_with_run

N = 40  # images of the fixture workspace


class Recorder:
    """A progress callback that keeps every ``(done, total)`` it gets."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))

    def check(self, total: int) -> list[int]:
        """The counts, after checking they rise monotonically to ``total`` (same total in every
        call, each within [0, total], the last one ``total``)."""
        assert self.calls, "progress was never called"
        assert {t for _, t in self.calls} == {total}
        done = [d for d, _ in self.calls]
        assert all(0 <= d <= total for d in done)
        assert done == sorted(done), f"not monotone: {done}"
        assert done[-1] == total
        return done


@pytest.fixture
def fixture_ws(tmp_path):
    return make_workspace_with_run(tmp_path, n_images=N, heads=(3, 6))


# ----------------------------------------------------------------------- the core's one type
def test_tally_reports_start_every_n_and_end_once():
    rec = Recorder()
    tally = Tally(rec, 10, every=3)
    for _ in range(10):
        tally.add()
    tally.finish()
    assert rec.calls == [(0, 10), (3, 10), (6, 10), (9, 10), (10, 10)]
    empty = Recorder()
    Tally(empty, 0).finish()
    assert empty.calls == [(0, 0)]
    Tally(None, 5).add(2)  # no callback: nothing to call


def test_time_left_from_the_rate_since_the_first_report():
    now = [100.0]
    left = TimeLeft(clock=lambda: now[0])
    assert left(10, 110) is None          # the first report starts the clock
    now[0] = 110.0
    assert left(35, 110) == pytest.approx(30.0)   # 25 in 10 s, 75 to go
    assert left(35, 110) == pytest.approx(30.0)
    assert [format_seconds(s) for s in (4.4, 65, 3725)] == ["4 s", "1 min 05 s", "1 h 02 min"]


# ----------------------------------------------------------------------- each long step
def test_scan_counts_the_files_it_reads(tmp_path):
    from selfclassifier_core.catalog.scanner import scan

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(70):  # more than one decode chunk of 64
        Image.new("RGB", (4, 4), (i, 0, 0)).save(folder / f"{i:03d}.png")
    rec = Recorder()
    report = scan(folder, tmp_path / "ws", progress=rec, workers=1)
    assert report.usable == 70
    assert len(set(rec.check(70))) >= 3
    again = Recorder()
    scan(folder, tmp_path / "ws", progress=again, workers=1)  # nothing new: nothing to read
    again.check(0)


def test_feature_extraction_counts_images(tmp_path):
    import torch
    import torchvision

    from selfclassifier_core.catalog.scanner import scan
    from selfclassifier_core.store.workspace import Workspace
    from selfclassifier_core.training.features import extract_features

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")
    ws = Workspace.for_folder(folder, tmp_path / "ws")
    scan(folder, ws, workers=1)
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    rec = Recorder()
    extract_features(ws, "resnet18", str(weights), views=2, image_size=32, device="cpu",
                     batch_size=2, workers=0, progress=rec)
    assert rec.check(5) == [0, 2, 4, 5]
    cached = Recorder()
    extract_features(ws, "resnet18", str(weights), views=2, image_size=32, device="cpu",
                     batch_size=2, workers=0, progress=cached)
    assert cached.calls == [(5, 5)]  # current cache: done at once


def _tiny_model():
    import torch

    from selfclassifier_core.engine.model import ModelConfig, SelfClassifier

    torch.manual_seed(0)
    return SelfClassifier(ModelConfig(backbone="convnet_small", image_size=8, proj_hidden_dim=16,
                                      out_dim=8, heads=[3, 6])).eval()


def test_predict_counts_images(fixture_ws):
    from selfclassifier_core.inference.predict import predict

    ws, run_id = fixture_ws
    rec = Recorder()
    preds = predict(ws, run_id, model=_tiny_model(), image_size=8, device="cpu", batch_size=16,
                    workers=0, save=False, progress=rec)
    assert len(preds.image_ids) == N
    assert rec.check(N) == [0, 16, 32, N]


def test_index_build_counts_vectors_and_a_saved_index_is_done_at_once(fixture_ws, monkeypatch):
    ws, run_id = fixture_ws
    monkeypatch.setattr(neighbors, "_CHUNK", 16)
    built = Recorder()
    index = neighbors.NeighborIndex.for_run(ws, run_id, progress=built)
    assert not index.loaded_from_disk
    assert built.check(N) == [0, 16, 32, N]
    loaded = Recorder()
    assert neighbors.NeighborIndex.for_run(ws, run_id, progress=loaded).loaded_from_disk
    assert loaded.calls == [(N, N)]
    compared = Recorder()
    index.duplicates(0.99, progress=compared)
    assert compared.check(N) == [0, 16, 32, N]


def test_small_map_reports_its_points(fixture_ws):
    ws, run_id = fixture_ws
    rec = Recorder()
    points = projection.run_map(ws, run_id, progress=rec, n_neighbors=N)  # n < k + 2: PCA
    assert len(points) == N
    rec.check(N)


@pytest.mark.slow  # fits UMAP
def test_umap_map_counts_points_placed(fixture_ws, monkeypatch):
    ws, run_id = fixture_ws
    monkeypatch.setattr(projection, "TRANSFORM_CHUNK", 5)
    rec = Recorder()
    projection.run_map(ws, run_id, progress=rec, n_neighbors=5, max_fit=20)
    assert rec.check(N) == [0, 20, 25, 30, 35, N]


def test_thumbnails_count_images_and_cached_ones_are_done_at_once(fixture_ws):
    from selfclassifier_core.catalog.thumbnails import ensure_thumbnails

    ws, _ = fixture_ws
    ids = list(range(1, 11))
    made = Recorder()
    ensure_thumbnails(ws, ids, 32, workers=1, progress=made)
    assert made.check(10) == list(range(11))
    cached = Recorder()
    ensure_thumbnails(ws, ids, 32, workers=1, progress=cached)
    assert cached.calls == [(10, 10)]


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_table_exports_count_rows(fixture_ws, tmp_path, monkeypatch, fmt):
    import pandas as pd

    ws, run_id = fixture_ws
    monkeypatch.setattr(formats, "WRITE_CHUNK", 16)
    out = tmp_path / f"labels.{fmt}"
    rec = Recorder()
    getattr(export, f"export_{fmt}")(ws, out, progress=rec)
    rows = {"csv": lambda: len(pd.read_csv(out)), "parquet": lambda: len(pd.read_parquet(out)),
            "jsonl": lambda: len(out.read_text().splitlines())}[fmt]()
    assert rows == N
    done = rec.check(N)
    assert done == ([0, N] if fmt == "parquet" else [0, 16, 32, N])


def test_imagefolder_export_counts_images_placed(fixture_ws, tmp_path):
    ws, _ = fixture_ws
    rec = Recorder()
    report = export.export_imagefolder(ws, tmp_path / "out", progress=rec)
    assert report.files == N
    assert rec.check(N) == list(range(N + 1))
    assert len([p for p in (tmp_path / "out").rglob("*.png")]) == N


# ----------------------------------------------------------------------- the command line
def _lines(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + ":")]


def _percents(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for m in (re.search(r"\((\d+)%\)", line) for line in lines) if m]


def test_cli_predict_logs_a_line_every_tenth(fixture_ws, capsys):
    from selfclassifier_core.store.checkpoint import CHECKPOINT_FILE, save_checkpoint

    ws, run_id = fixture_ws
    save_checkpoint(ws.run_dir(run_id) / CHECKPOINT_FILE, _tiny_model().checkpoint_dict())
    code = main(["predict", str(ws.path), "--run", str(run_id), "--batch-size", "4",
                 "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = _lines(captured.err, "predicting")
    assert lines[0] == f"predicting: 0/{N} images"
    assert _percents(lines) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert all(f"/{N} images" in line for line in lines)
    assert any(re.search(r"about \d+ s left$", line) for line in lines[1:-1])
    assert re.fullmatch(rf"predicting: {N}/{N} images \(100%\) in \d+ s", lines[-1])
    assert "\r" not in captured.err  # no bar drawn into a log


def test_cli_export_and_neighbors_log_their_steps(fixture_ws, tmp_path, capsys, monkeypatch):
    ws, _ = fixture_ws
    monkeypatch.setattr(formats, "WRITE_CHUNK", 4)
    out = tmp_path / "labels.jsonl"
    assert main(["export", str(ws.path), "--jsonl", str(out)]) == 0
    lines = _lines(capsys.readouterr().err, f"writing {out}")
    assert _percents(lines) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()][:1] == \
        ["a/img_0000.png"]

    monkeypatch.setattr(neighbors, "_CHUNK", 20)
    assert main(["neighbors", str(ws.path), "1", "-k", "3"]) == 0
    err = capsys.readouterr().err
    assert _percents(_lines(err, "building the neighbour index")) == [50, 100]
    assert main(["neighbors", str(ws.path), "1", "-k", "3"]) == 0
    assert "building the neighbour index" not in capsys.readouterr().err  # loaded: no work


def test_a_terminal_gets_a_bar_instead_of_lines():
    stream = io.StringIO()
    with Reporter(stream, tty=True) as shown:
        step = shown.step("reading images", "files")
        for done in range(0, 101, 5):
            step(done, 100)
    text = stream.getvalue()
    assert "reading images" in text and "100/100" in text and "100%" in text
    assert "\r" in text and "|" in text        # tqdm redraws its bar
    assert "0/100 files\n" not in text and "files (50%)" not in text  # no log lines


def test_run_records_become_steps():
    """A training run's records (schema of store/runfiles.py) as the steps people read."""
    stream = io.StringIO()
    shown = Reporter(stream, tty=False)
    on_record = shown.run_progress()
    for done in range(0, 101, 10):
        on_record({"status": "running", "mode": "fast", "phase": "features", "done": done,
                   "total": 100, "fraction": 0.0, "step": 0})
    for step in range(1, 41):
        on_record({"status": "running", "mode": "fast", "phase": "training", "step": step,
                   "steps": 40, "loss": 5.0 - step / 10, "eta_s": 40.0 - step})
    on_record({"status": "predicting", "mode": "scratch", "phase": "training", "step": 40,
               "steps": 40})
    for done in range(0, 51, 5):
        on_record({"status": "predicting", "mode": "scratch", "phase": "predicting",
                   "done": done, "total": 50})
    on_record({"status": "done", "mode": "fast", "phase": "done"})
    text = stream.getvalue()
    features = _lines(text, "embedding images")
    assert features[0] == "embedding images: 0/100 images"
    assert _percents(features) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    training = _lines(text, "training")
    assert _percents(training) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert "training: 20/40 steps (50%), loss 3.0000, about 20 s left" in training
    predicting = _lines(text, "predicting every image")
    assert predicting[0] == "predicting every image: 0/50 images"
    assert _percents(predicting) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]


def test_a_time_budget_shows_its_share():
    stream = io.StringIO()
    on_record = Reporter(stream, tty=False).run_progress()
    for fraction in (0.01, 0.25, 0.5, 1.0):
        on_record({"status": "running", "phase": "training", "step": int(fraction * 99),
                   "steps": None, "fraction": fraction, "eta_s": 60 * (1 - fraction)})
    lines = _lines(stream.getvalue(), "training")
    assert lines[0] == "training: 1% of the time budget"
    assert "training: 50% of the time budget, about 30 s left" in lines
    assert lines[-1].startswith("training: 100% of the time budget in ")


@pytest.mark.slow  # trains a model
def test_cli_train_logs_its_steps(tmp_path, capsys, one_torch_thread):
    from train_fixtures import make_folder

    folder = make_folder(tmp_path / "imgs", n=16)
    assert main(["train", str(folder), "--workspace", str(tmp_path / "ws"), "--classes", "2",
                 "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--n-local", "0",
                 "--workers", "0"]) == 0
    err = capsys.readouterr().err
    lines = _lines(err, "training")
    assert lines[0].startswith("training: 1/4 steps")
    assert lines[-1].startswith("training: 4/4 steps (100%) in ")
    predicting = _lines(err, "predicting every image")
    assert predicting[-1].startswith("predicting every image: 16/16 images (100%) in ")


# ----------------------------------------------------------------------- the app
class _FakeBar:
    def __init__(self):
        self.shown: list[tuple[float, str]] = []
        self.emptied = False

    def progress(self, value: float, text: str) -> None:
        self.shown.append((value, text))

    def empty(self) -> None:
        self.emptied = True


def test_app_bar_names_the_step_and_the_time_left(monkeypatch):
    from app import caches

    bars: list[_FakeBar] = []

    def empty():
        bars.append(_FakeBar())
        return bars[-1]

    now = [0.0]
    monkeypatch.setattr(caches.st, "empty", empty)
    monkeypatch.setattr(caches, "BAR_EVERY_S", 0.0)  # every report is drawn
    monkeypatch.setattr(caches, "TimeLeft", lambda: TimeLeft(clock=lambda: now[0]))
    with caches.progress_bar("Making thumbnails", "images") as progress:
        progress(32, 32)  # all made earlier: nothing to show
    assert not bars
    with caches.progress_bar("Building the neighbour index", "images") as progress:
        for done in (0, 250, 500, 1000):
            progress(done, 1000)
            now[0] += 10.0
    (bar,) = bars
    assert bar.shown[0] == (0.0, "Building the neighbour index… 0/1,000 images")
    assert bar.shown[2] == (0.5, "Building the neighbour index… 500/1,000 images "
                                 "· about 20 s left")
    assert bar.shown[-1][0] == 1.0 and bar.emptied
