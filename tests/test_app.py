"""AppTest for every screen of the Streamlit app (headless, no browser).

Most tests run on a fixture workspace (a finished run with made-up predictions, see
``workspace_fixtures``); one opens the bundled demo and one starts a real short training.
"""
from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from selfclassifier_core.curation import export
from selfclassifier_core.workflows import jobs
from selfclassifier_core.store import recent
from selfclassifier_core.curation.feedback import read_plan
from selfclassifier_core.curation.labels import Labels
from workspace_fixtures import cluster_assignments, make_workspace_with_run

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
APP = str(ROOT / "app" / "main.py")
TIMEOUT = 120


@pytest.fixture(autouse=True)
def _fast_map(monkeypatch):
    """UMAP itself is tested in the core; here a PCA stands in (no numba JIT in every test)."""
    import selfclassifier_core.curation.projection as projection

    monkeypatch.setattr(projection, "umap_2d",
                        lambda emb, **kw: projection.pca_2d(np.asarray(emb, np.float32)))


def start_app(monkeypatch, folder=None, workspace=None, query=None,
              auto_group=False) -> AppTest:
    """The app on ``folder`` (default: the demo). Auto-group is off unless asked for: a test
    that opens a folder without runs would otherwise start a real training job."""
    from selfclassifier_core.store.settings import set_setting

    set_setting("auto_group", auto_group)
    argv = [APP]
    if folder is not None:
        argv += ["--folder", str(folder)]
    if workspace is not None:
        argv += ["--workspace", str(workspace)]
    monkeypatch.setattr(sys, "argv", argv)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(query or {})
    at.run()
    assert_ok(at)
    return at


def assert_ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# the screens by title, with their page files (relative to app/main.py)
PAGE_FILES = {"Folder & training": "screens/folder_training.py", "Clusters": "screens/clusters.py",
              "Review": "screens/review.py",
              "Map": "screens/map.py", "Neighbours": "screens/neighbours.py",
              "Export": "screens/export.py"}


def goto(at: AppTest, page: str) -> AppTest:
    """Open a screen by its title, as a click in the page menu does."""
    at.switch_page(PAGE_FILES[page]).run()
    assert_ok(at)
    return at


def headers(at: AppTest) -> list[str]:
    return [h.value for h in at.header]


# --------------------------------------------------------------------------- navigation
def test_every_screen_has_its_page(fixture_app):
    at, ws, run_id = fixture_app
    assert headers(at) == ["Folder & training"]        # the default page
    for title in PAGE_FILES:
        goto(at, title)
        assert headers(at) == [title]
        assert at.sidebar.button(key="undo")           # the sidebar frames every page


def test_old_page_links_land_on_their_screen(tmp_path, monkeypatch):
    """``/?page=clusters`` (the links of the radio menu before st.navigation) still work."""
    ws, run_id = make_workspace_with_run(tmp_path, n_images=12, heads=(3,))
    for title in PAGE_FILES:
        slug = title.split()[0].lower()                # folder, clusters, map, ...
        at = start_app(monkeypatch, ws.root, ws.path, query={"page": slug})
        assert headers(at) == [title], slug
        assert "page" not in at.query_params
    at = start_app(monkeypatch, ws.root, ws.path, query={"page": "nonsense"})
    assert headers(at) == ["Folder & training"] and "page" not in at.query_params


@pytest.fixture
def fixture_app(tmp_path, monkeypatch):
    ws, run_id = make_workspace_with_run(tmp_path, n_images=40, heads=(3, 6), n_unreadable=2)
    at = start_app(monkeypatch, ws.root, ws.path)
    return at, ws, run_id


def name_input(at: AppTest, value: str):
    """The rename field of the card whose group is called ``value``."""
    found = [t for t in at.text_input if t.value == value and t.key and t.key.startswith("rn|")]
    assert found, f"no card named {value!r}: {[t.value for t in at.text_input]}"
    return found[0]


def export_labels(ws, run_id, head=None) -> pd.Series:
    return export.export_table(ws, run_id, head)["label"]


# --------------------------------------------------------------------------- start / screen 1
@pytest.mark.slow  # scans 306 images with worker processes
def test_opens_the_demo_by_default(monkeypatch):
    at = start_app(monkeypatch)
    assert at.session_state.folder == str(ROOT / "assets" / "demo")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Usable images"] == "306"          # every demo emoji scanned
    assert metrics["Ignored files"] == "1"            # LICENSE-emoji is not an image
    assert metrics["Unreadable"] == "0"
    assert at.selectbox(key="opt_mode").value in ("fast", "scratch")
    if at.selectbox(key="opt_mode").value == "fast":   # the core's default length: empty
        assert at.number_input(key="opt_epochs").value is None
        assert at.number_input(key="opt_steps").value is None
        assert at.number_input(key="opt_minutes").value is None
    assert recent.load_recent()[0]["folder"] == str((ROOT / "assets" / "demo").resolve())
    # no run yet: the other screens say so in words instead of failing
    for page in ("Clusters", "Map", "Neighbours", "Export"):
        goto(at, page)
        assert any("run" in i.value for i in at.info), page


def test_training_choices_come_from_the_core(fixture_app):
    from selfclassifier_core.engine.backbones import BACKBONES
    from selfclassifier_core.engine.device import DEVICES
    from selfclassifier_core.training.config import MODES

    at, ws, run_id = fixture_app
    modes = at.selectbox(key="opt_mode").options       # shown in words, one per core mode
    assert len(modes) == len(MODES) and modes[0].startswith("Fast")
    backbones = at.selectbox(key="opt_backbone").options
    assert backbones[0] == "automatic" and backbones[1] == "resnet18"
    assert sorted(backbones[1:]) == sorted(BACKBONES)
    assert at.selectbox(key="opt_device").options == list(DEVICES)   # mps included


@pytest.mark.parametrize("mode", ["fast", "scratch"])
def test_training_form_has_one_input_per_option_of_the_mode(fixture_app, mode):
    from selfclassifier_core.training.config import option_specs

    at, ws, run_id = fixture_app
    at.selectbox(key="opt_mode").set_value(mode).run()
    assert_ok(at)
    shown = {w.key[len("opt_"):] for kind in ("selectbox", "number_input", "text_input",
                                               "checkbox")
             for w in getattr(at, kind) if w.key and w.key.startswith("opt_")}
    assert shown == {s.name for s in option_specs(mode)} | {"mode"}
    helps = {w.key: w.help for w in at.number_input if w.key}
    assert "--batch-size" in helps["opt_batch_size"]          # the help names the CLI flag


def test_training_form_values_reach_the_job(fixture_app, monkeypatch):
    started = []
    monkeypatch.setattr(jobs, "start_training",
                        lambda folder, ws, options: started.append(options) or 99)
    at, ws, run_id = fixture_app
    at.selectbox(key="opt_mode").set_value("scratch").run()
    at.selectbox(key="opt_backbone").set_value("resnet18")
    at.number_input(key="opt_classes").set_value(3)
    at.number_input(key="opt_lr").set_value(0.25)            # under "More settings"
    at.selectbox(key="opt_optimizer").set_value("adamw")
    at.selectbox(key="opt_nn_positives").set_value(False)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert_ok(at)
    # what was set, and nothing left to the recipe (empty, "default", the field's default)
    assert started == [{"mode": "scratch", "backbone": "resnet18", "classes": 3, "lr": 0.25,
                        "optimizer": "adamw", "nn_positives": False, "minutes": 1.0}]


def test_unreadable_images_listed_with_reasons(fixture_app):
    at, ws, run_id = fixture_app
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Usable images"] == "40" and metrics["Unreadable"] == "2"
    table = at.dataframe[0].value
    assert list(table.columns) == ["file", "reason"]
    assert table["reason"].str.contains("cannot identify").all()


def test_unreadable_files_read_again_on_request(tmp_path, monkeypatch):
    from PIL import Image

    from selfclassifier_core.catalog.scanner import scan

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8), (80 * i, 0, 0)).save(folder / f"ok{i}.png")
    flaky = folder / "flaky.png"
    flaky.write_bytes(b"\0" * 4096)                   # unreadable at the first scan
    scan(folder, tmp_path / "ws", workers=1)
    st = os.stat(flaky)
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(png, format="PNG")
    flaky.write_bytes(png.getvalue().ljust(st.st_size, b"\0"))  # now readable: same size and
    os.utime(flaky, ns=(st.st_atime_ns, st.st_mtime_ns))      # mtime, so a rescan skips it
    at = start_app(monkeypatch, folder, tmp_path / "ws")

    def metrics():
        return {m.label: m.value for m in at.metric}

    assert (metrics()["Usable images"], metrics()["Unreadable"]) == ("3", "1")
    next(b for b in at.button if b.label == "Rescan folder").click().run()
    assert metrics()["Unreadable"] == "1"
    at.button(key="retry_unreadable").click().run()
    assert_ok(at)
    assert (metrics()["Usable images"], metrics()["Unreadable"]) == ("4", "0")


def test_open_missing_folder_is_an_error_in_words(fixture_app, tmp_path):
    at, ws, run_id = fixture_app
    at.sidebar.text_input(key="folder_input").set_value(str(tmp_path / "nope"))
    at.sidebar.button[0].click().run()  # the form's "Open folder"
    assert any("not a folder that exists" in e.value for e in at.sidebar.error)
    assert not at.exception


def test_workspace_that_cannot_be_opened_is_an_error_in_words(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    not_a_dir = tmp_path / "ws-file"
    not_a_dir.write_text("a file where the workspace should be")
    monkeypatch.setattr(sys, "argv", [APP, "--folder", str(folder), "--workspace", str(not_a_dir)])
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    assert not at.exception
    assert any("Cannot open" in e.value and "not a directory" in e.value for e in at.error)
    assert any(b.label == "Back to the demo images" for b in at.button)
    assert not at.header                                # no screen without a workspace


def test_open_another_folder_and_recent(fixture_app, tmp_path, monkeypatch):
    at, ws, run_id = fixture_app
    other = tmp_path / "other"
    other.mkdir()
    from PIL import Image
    Image.new("RGB", (8, 8), (1, 2, 3)).save(other / "x.png")
    at.sidebar.text_input(key="folder_input").set_value(str(other))
    at.sidebar.text_input(key="workspace_input").set_value(str(tmp_path / "ws-other"))
    at.sidebar.button[0].click().run()
    assert_ok(at)
    assert at.session_state.folder == str(other)
    assert {m.label: m.value for m in at.metric}["Usable images"] == "1"
    folders = [e["folder"] for e in recent.load_recent()]
    assert folders[:2] == [str(other.resolve()), str(ws.root.resolve())]


@pytest.mark.slow  # a background training process
def test_start_short_training_from_the_app(tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "AFTER_TRAINING", ("neighbors",))  # no UMAP in the job here
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(32):
        base = 40 if i % 2 else 210
        arr = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")
    at = start_app(monkeypatch, folder, tmp_path / "ws")
    at.selectbox(key="opt_mode").set_value("scratch").run()   # the form follows the mode
    at.selectbox(key="opt_backbone").set_value("resnet18")
    at.selectbox(key="opt_device").set_value("cpu")
    at.number_input(key="opt_classes").set_value(2)
    at.number_input(key="opt_minutes").set_value(0.1)
    at.number_input(key="opt_epochs").set_value(None)
    at.number_input(key="opt_batch_size").set_value(16)
    next(b for b in at.button if b.label == "Start training").click().run()
    assert_ok(at)
    from selfclassifier_core.store.workspace import Workspace
    ws = Workspace.open(tmp_path / "ws")
    run = ws.list_runs()[-1]
    assert (run.dir / jobs.JOB_FILE).exists()
    assert {k: run.config.get(k) for k in ("backbone", "classes", "minutes", "batch_size")} == {
        "backbone": "resnet18", "classes": 2, "minutes": 0.1, "batch_size": 16}
    try:
        assert any(s.value == f"Run {run.id}" for s in at.subheader)
        st = jobs.wait(ws, run.id, timeout=300)
    finally:
        if jobs.job_status(ws, run.id).alive:
            jobs.cancel(ws, run.id)
    assert st.status == "done", st.log_tail
    at.run()
    assert_ok(at)
    assert any("is done" in s.value for s in at.success)
    assert at.sidebar.selectbox(key="run_id").value == run.id
    goto(at, "Clusters")
    from selfclassifier_core.store.predictions import load_predictions
    preds = load_predictions(run.dir)
    groups = set()
    for head in ws.get_run(run.id).heads:                  # every granularity of the new run
        at.sidebar.radio(key="head").set_value(head).run()
        assert_ok(at)
        used = np.unique(preds.head(head).cluster)
        groups.add(len(used))
        cards = [t.value for t in at.text_input if t.key and t.key.startswith("rn|")]
        assert sorted(cards) == sorted(f"cluster_{k}" for k in used), head  # a card per group
    assert max(groups) > 1                                 # so a missing card would show


# --------------------------------------------------------------------------- screen 2
def test_rename_cluster_changes_export(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Clusters")
    cards = [t for t in at.text_input if t.key and t.key.startswith("rn|")]
    assert sorted(t.value for t in cards) == ["cluster_0", "cluster_1", "cluster_2"]
    before = export_labels(ws, run_id)
    name_input(at, "cluster_1").set_value("Cats <b>**x**</b>").run()
    assert_ok(at)
    assert name_input(at, "Cats <b>**x**</b>")
    after = export_labels(ws, run_id)
    assert (after == "Cats <b>**x**</b>").sum() == (before == "cluster_1").sum() > 0
    # the label is shown escaped, never as markup
    assert any("Cats" in s.value and "\\<b\\>" in s.value for s in at.success)
    goto(at, "Export")
    preview = at.dataframe[0].value
    assert "Cats <b>**x**</b>" in set(preview["label"])
    counts = at.dataframe[1].value
    assert int(counts.set_index("label").loc["Cats <b>**x**</b>", "images"]) == \
        (before == "cluster_1").sum()
    csv = export.build_csv_bytes(ws, run_id).decode()
    assert "Cats <b>**x**</b>" in csv


def test_cards_filtered_sorted_and_empty_groups_on_request(fixture_app):
    """The overview's cards against a group-by of the exported table: by size (largest first),
    mean confidence (lowest first) or name; a filter on the name in any case; a label without
    images only when empty groups are asked for; captions with the counts."""
    at, ws, run_id = fixture_app
    lab = Labels(ws, run_id)
    lab.rename(0, "Cats")
    lab.create_label("Nothing yet")
    lab.exclude(ids_in_cluster(ws, run_id, 2)[:3])
    df = lab.final_table()
    kept = df[~df["excluded"]]
    size = kept.groupby("label").size()
    conf = kept.groupby("label")["confidence"].mean()
    goto(at, "Clusters")

    def cards() -> list[str]:
        return [t.value for t in at.text_input if t.key and t.key.startswith("rn|")]

    assert sorted(cards()) == sorted(size.index)
    assert [size[name] for name in cards()] == sorted(size, reverse=True)
    assert at.caption[0].value.startswith(f"4 groups · {len(kept):,} images · 3 excluded")
    at.selectbox(key="cl_sort").set_value("confidence (low first)").run()
    assert cards() == conf.sort_values().index.tolist()
    at.selectbox(key="cl_sort").set_value("name").run()
    assert cards() == ["Cats", "cluster_1", "cluster_2"]
    at.toggle(key="cl_empty").set_value(True).run()
    assert cards() == ["Cats", "Nothing yet", "cluster_1", "cluster_2"]
    at.text_input(key="cl_filter").input("CLUSTER").run()
    assert cards() == ["cluster_1", "cluster_2"]
    assert_ok(at)


def ids_in_cluster(ws, run_id, cluster, head=3) -> list[int]:
    df = Labels(ws, run_id, head).final_table()
    return df.index[df["predicted_cluster"] == cluster].tolist()


def test_empty_name_is_refused(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Clusters")
    name_input(at, "cluster_0").set_value("   ").run()
    assert any("cannot be empty" in e.value for e in at.error)
    assert "cluster_0" in set(export_labels(ws, run_id))


def _open_group(at: AppTest, name: str) -> None:
    at.button(key=f"open|{name}").click().run()
    assert_ok(at)


def grid_order(items: list, columns: int) -> list:
    """Elements of a grid filled row by row come column by column in the element tree."""
    n = len(items)
    tree = [j for c in range(columns) for j in range(c, n, columns)]
    out = [None] * n
    for pos, j in enumerate(tree):
        out[j] = items[pos]
    return out


def _image_boxes(at: AppTest):
    """The image checkboxes of the open group, in page order."""
    from app.screens.clusters import GRID_COLUMNS

    return grid_order([c for c in at.checkbox if c.key and c.key.startswith("img|")],
                      GRID_COLUMNS)


def test_move_images_undo_redo(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Clusters")
    _open_group(at, "cluster_0")
    boxes = _image_boxes(at)
    lab = Labels(ws, run_id)
    in_c0 = set(lab.final_table().query("label == 'cluster_0'").index)
    assert len(boxes) == len(in_c0)
    # least confident first on request
    at.toggle(key="least_first").set_value(True).run()
    boxes = _image_boxes(at)
    ids = [int(b.key.rsplit("|", 1)[1]) for b in boxes]
    conf = lab.final_table()["confidence"]
    assert list(conf.loc[ids]) == sorted(conf.loc[ids])
    moved = ids[:2]
    for b in boxes[:2]:
        b.check()
    at.run()
    at.selectbox(key="move_target").set_value("cluster_2")
    at.button(key="move_btn").click().run()
    assert_ok(at)
    table = Labels(ws, run_id).final_table()
    assert list(table.loc[moved, "label"]) == ["cluster_2", "cluster_2"]
    assert table.loc[moved, "edited"].all()
    def shown_ids() -> set[int]:
        return {int(b.key.rsplit("|", 1)[1]) for b in _image_boxes(at)}

    assert shown_ids() == in_c0 - set(moved)             # exactly those left the open group
    at.sidebar.button(key="undo").click().run()
    assert_ok(at)
    assert list(Labels(ws, run_id).final_table().loc[moved, "label"]) == ["cluster_0"] * 2
    assert shown_ids() == in_c0                          # and are back in it
    at.sidebar.button(key="redo").click().run()
    assert list(Labels(ws, run_id).final_table().loc[moved, "label"]) == ["cluster_2"] * 2


def test_move_to_new_label_and_exclude(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Clusters")
    _open_group(at, "cluster_2")
    boxes = _image_boxes(at)
    first = int(boxes[0].key.rsplit("|", 1)[1])
    second = int(boxes[1].key.rsplit("|", 1)[1])
    boxes[0].check().run()
    at.selectbox(key="move_target").set_value(next(o for o in at.selectbox(key="move_target")
                                                   .options if "New label" in o)).run()
    at.text_input(key="move_new").set_value("junk-ish")
    at.button(key="move_btn").click().run()
    assert_ok(at)
    assert Labels(ws, run_id).final_table().at[first, "label"] == "junk-ish"
    next(b for b in _image_boxes(at) if b.key.endswith(f"|{second}")).check().run()
    at.button(key="exclude_btn").click().run()
    assert_ok(at)
    assert second not in export.export_table(ws, run_id).index
    assert second in export.export_table(ws, run_id, include_excluded=True).index
    # the new label has its own card in the overview
    at.button(key="back").click().run()
    assert name_input(at, "junk-ish")


def test_merge_selected_clusters(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Clusters")
    boxes = {c.key.rsplit("|", 1)[1]: c for c in at.checkbox if c.key.startswith("mg|")}
    boxes["cluster_0"].check()
    boxes["cluster_2"].check()
    at.run()
    merge_name = next(t for t in at.text_input if t.key.startswith("merge_name|"))
    merge_name.set_value("animals")
    at.button(key="merge_btn").click().run()
    assert_ok(at)
    names = Labels(ws, run_id).cluster_names()
    assert names[0] == names[2] == "animals" and names[1] == "cluster_1"
    cards = sorted(t.value for t in at.text_input if t.key.startswith("rn|"))
    assert cards == ["animals", "cluster_1"]
    assert [e.op for e in Labels(ws, run_id).history()] == ["merge_labels"]   # one undo step


def test_granularity_switch(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Clusters")
    assert len([t for t in at.text_input if t.key.startswith("rn|")]) == 3
    at.sidebar.radio(key="head").set_value(6).run()
    assert_ok(at)
    cards = sorted(t.value for t in at.text_input if t.key.startswith("rn|"))
    assert cards == [f"cluster_{i}" for i in range(6)]
    goto(at, "Export")
    assert set(at.dataframe[0].value["head"]) == {6}


# --------------------------------------------------------------------------- screen 3
def label_map_selection(at, name: str) -> None:
    """Give the map's selection a new label ``name`` through its form."""
    at.selectbox(key="map_target").set_value(
        next(o for o in at.selectbox(key="map_target").options if "New label" in o))
    at.text_input(key="map_new").set_value(name)
    next(b for b in at.button if b.label == "Apply label").click().run()


def test_map_selection_labels_points(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Map")
    charts = [k for k in at.session_state.keys() if str(k).startswith("map|")]
    assert len(charts) == 1, charts
    chosen = [3, 5, 8]
    at.session_state[charts[0]] = {"selection": {
        "points": [{"customdata": [i], "curve_number": 0, "point_index": n}
                   for n, i in enumerate(chosen)],
        "point_indices": list(range(len(chosen))), "box": [], "lasso": []}}
    at.run()
    assert_ok(at)
    assert any(s.value == "3 selected" for s in at.subheader)
    label_map_selection(at, "from the map")
    assert_ok(at)
    table = Labels(ws, run_id).final_table()
    assert list(table.loc[chosen, "label"]) == ["from the map"] * 3


def test_a_map_lasso_selects_every_image_inside_its_outline(fixture_app):
    """A lasso is read as a shape in the map's coordinates, not as the points the browser drew
    (a big map draws a sample): with no points in the event, the images inside the outline are
    selected, and only they."""
    from selfclassifier_core.curation.projection import run_map

    at, ws, run_id = fixture_app
    goto(at, "Map")
    key = next(k for k in at.session_state.keys() if str(k).startswith("map|"))
    pts = run_map(ws, run_id)
    xs, ys = np.sort(pts["x"].to_numpy()), np.sort(pts["y"].to_numpy())
    x1, y1 = (xs[14] + xs[15]) / 2, (ys[20] + ys[21]) / 2      # between points: no ties
    x0, y0 = xs[0] - 1, ys[0] - 1
    want = sorted(pts.index[(pts["x"] < x1) & (pts["y"] < y1)].tolist())
    assert 0 < len(want) < len(pts)
    at.session_state[key] = {"selection": {"points": [], "point_indices": [], "box": [],
                                           "lasso": [{"xref": "x", "yref": "y",
                                                      "x": [x0, x1, x1, x0],
                                                      "y": [y0, y0, y1, y1]}]}}
    at.run()
    assert_ok(at)
    assert any(s.value == f"{len(want)} selected" for s in at.subheader)
    label_map_selection(at, "lower left")
    assert_ok(at)
    table = Labels(ws, run_id).final_table()
    assert sorted(table.index[table["label"] == "lower left"].tolist()) == want


def test_map_selection_exclude(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Map")
    key = next(k for k in at.session_state.keys() if str(k).startswith("map|"))
    at.session_state[key] = {"selection": {"points": [{"customdata": [7]}],
                                           "point_indices": [0]}}
    at.run()
    next(b for b in at.button if b.label == "Exclude all").click().run()
    assert_ok(at)
    assert Labels(ws, run_id).final_table().at[7, "excluded"]


def test_clicking_a_map_point_shows_its_panel(fixture_app):
    from selfclassifier_core.curation.neighbors import NeighborIndex

    at, ws, run_id = fixture_app
    goto(at, "Map")
    key = next(k for k in at.session_state.keys() if str(k).startswith("map|"))
    at.session_state[key] = {"selection": {"points": [{"customdata": [12]}],
                                           "point_indices": [0]}}
    at.run()
    assert_ok(at)
    row = Labels(ws, run_id).final_table().loc[12]
    text = (" ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
            ).replace("\\", "")                                # markdown escapes
    assert "img_0011.png" in text                               # image 12 is the 12th file
    assert f"label **{row['label']}** · confidence {row['confidence']:.2f}" in text
    want = NeighborIndex.for_run(ws, run_id).search(12, 6)["image_id"].tolist()
    captions = [i.caption for img in at.get("image") for i in img.proto.imgs]
    labels = Labels(ws, run_id).final_table()["label"]
    assert [c for c in captions if " · " in c] == [            # one thumbnail per neighbour
        f"{sim:.2f} · {str(labels[i])[:12]}" for i, sim in zip(
            want, NeighborIndex.for_run(ws, run_id).search(12, 6)["similarity"])]


# --------------------------------------------------------------------------- screen 4
def test_neighbours_listed(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Neighbours")
    at.button(key="nn_pick_4").click().run()
    assert_ok(at)
    assert any("nearest neighbours" in m.value for m in at.markdown)
    from app.screens.neighbours import RESULT_COLUMNS
    sims = grid_order([c.value for c in at.caption if c.value.startswith("similarity")],
                      RESULT_COLUMNS)
    assert len(sims) == 12
    values = [float(s.split()[1]) for s in sims]
    assert values == sorted(values, reverse=True)
    # the neighbours of image 4 are mostly of its own (fixture) cluster
    from selfclassifier_core.curation.neighbors import NeighborIndex
    expected = NeighborIndex.for_run(ws, run_id).search(4, 12)
    shown = grid_order([int(b.key.rsplit("_", 1)[1]) for b in at.button
                        if b.key and b.key.startswith("nn_again_")], RESULT_COLUMNS)
    assert shown == expected["image_id"].tolist()      # the index's neighbours, in its order
    assert [float(s.split()[1]) for s in sims] == pytest.approx(
        expected["similarity"].tolist(), abs=1e-3)     # each under its own similarity
    cluster = cluster_assignments(40, 3)               # the fixture's; image id i is row i - 1
    assert [cluster[i - 1] for i in shown[:4]] == [cluster[4 - 1]] * 4  # its own cluster first
    # near-duplicates view runs on the same index
    at.toggle(key="dup_on").set_value(True).run()
    assert_ok(at)


def test_neighbours_upload_is_handled(fixture_app, monkeypatch):
    """An upload is searched in memory (embedding stubbed); nothing is written to the folder."""
    at, ws, run_id = fixture_app
    before = sorted(p.name for p in ws.root.rglob("*"))
    from selfclassifier_core.curation import neighbors

    def fake_search_file(self, data, k=10, **kw):
        assert isinstance(data, bytes) and data[:4] == b"\x89PNG"
        return self.search(1, k, include_self=True)

    monkeypatch.setattr(neighbors.NeighborIndex, "search_file", fake_search_file)
    goto(at, "Neighbours")
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="PNG")
    at.file_uploader(key="nn_upload").set_value(("q.png", buf.getvalue(), "image/png")).run()
    assert_ok(at)
    assert len([c for c in at.caption if c.value.startswith("similarity")]) == 12
    assert sorted(p.name for p in ws.root.rglob("*")) == before


# --------------------------------------------------------------------------- screen 5
def test_clicking_an_export_row_shows_its_image(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Export")
    at.session_state["exp_table"] = {"selection": {"rows": [4], "columns": []}}
    at.run()
    assert_ok(at)
    row = Labels(ws, run_id).final_table().loc[5]                 # the 5th row is image 5
    text = (" ".join(m.value for m in at.markdown) + " ".join(c.value for c in at.caption)
            ).replace("\\", "")
    assert "img_0004.png" in text
    assert f"label **{row['label']}** · confidence {row['confidence']:.2f}" in text


def test_export_imagefolder_from_the_app(fixture_app, tmp_path):
    at, ws, run_id = fixture_app
    goto(at, "Export")
    out = tmp_path / "exported"
    at.text_input(key="exp_out").set_value(str(out))
    at.radio(key="exp_link").set_value("sym")
    next(b for b in at.button if b.label == "Write folders").click().run()
    assert_ok(at)
    assert any("Wrote" in s.value for s in at.success)
    files = [p for p in out.rglob("*.png")]
    assert len(files) == 40 and all(p.is_symlink() for p in files)
    assert {p.parent.name for p in files} == {"cluster_0", "cluster_1", "cluster_2"}
    # writing into the image folder is refused in words
    at.text_input(key="exp_out").set_value(str(ws.root / "out"))
    next(b for b in at.button if b.label == "Write folders").click().run()
    assert any("overlaps the image folder" in e.value for e in at.error)


# --------------------------------------------------------------------------- deleting labels
def test_delete_label_of_the_open_group_and_undo(fixture_app):
    at, ws, run_id = fixture_app
    Labels(ws, run_id).rename(1, "Cats")
    size = int((export_labels(ws, run_id) == "Cats").sum())
    goto(at, "Clusters")
    _open_group(at, "Cats")
    assert at.button(key="delete_btn").disabled         # nothing happens before confirming
    next(c for c in at.checkbox if c.key.startswith("del_ok|")).check().run()
    at.button(key="delete_btn").click().run()
    assert_ok(at)
    assert Labels(ws, run_id).cluster_names()[1] == "cluster_1"
    labels = export_labels(ws, run_id)
    assert "Cats" not in set(labels) and int((labels == "cluster_1").sum()) == size > 0
    assert any("Deleted" in s.value and "Cats" in s.value for s in at.success)
    assert name_input(at, "cluster_1")                  # back to the overview: the group is gone
    at.sidebar.button(key="undo").click().run()
    assert_ok(at)
    assert Labels(ws, run_id).cluster_names()[1] == "Cats"
    assert name_input(at, "Cats")


def test_delete_selected_labels_with_confirmation(fixture_app):
    at, ws, run_id = fixture_app
    lab = Labels(ws, run_id)
    lab.rename(0, "Cats")
    lab.move([1, 2], label="Birds")
    goto(at, "Clusters")
    boxes = {c.key.rsplit("|", 1)[1]: c for c in at.checkbox if c.key.startswith("mg|")}
    boxes["Cats"].check()
    boxes["Birds"].check()
    at.run()
    assert at.button(key="delete_sel_btn").disabled
    next(c for c in at.checkbox if c.key.startswith("del_sel_ok|")).check().run()
    assert not at.button(key="delete_sel_btn").disabled
    next(c for c in at.checkbox if c.key.endswith("|cluster_2")).check().run()
    assert at.button(key="delete_sel_btn").disabled     # another selection: confirm again
    next(c for c in at.checkbox if c.key.startswith("del_sel_ok|")).check().run()
    at.button(key="delete_sel_btn").click().run()
    assert not at.exception
    # the renamed cluster and the image label are gone; a default name cannot be deleted
    (err,) = at.error
    assert "Cats" in err.value and "Birds" in err.value and "default name of cluster 2" in err.value
    lab = Labels(ws, run_id)
    assert lab.cluster_names() == {0: "cluster_0", 1: "cluster_1", 2: "cluster_2"}
    assert "Birds" not in lab.label_names()
    assert [e.op for e in lab.history()][-2:] == ["delete_label", "delete_label"]
    cards = sorted(t.value for t in at.text_input if t.key.startswith("rn|"))
    assert cards == ["cluster_0", "cluster_1", "cluster_2"]


# --------------------------------------------------------------------------- auto-group
def _recording_start(monkeypatch):
    """jobs.start_training that records its call and creates the run, without a process."""
    calls = []

    def start(folder, ws, options):
        calls.append((Path(folder), dict(options)))
        return ws.create_run(options["mode"], dict(options))

    monkeypatch.setattr(jobs, "start_training", start)
    return calls


def _plain_folder(path: Path, n: int = 6) -> Path:
    from PIL import Image

    path.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(path / f"{i}.png")
    return path


def test_a_folder_without_runs_groups_itself(tmp_path, monkeypatch):
    from selfclassifier_core.training.recipes import default_run_options

    calls = _recording_start(monkeypatch)
    folder = _plain_folder(tmp_path / "imgs")
    at = start_app(monkeypatch, folder, tmp_path / "ws", auto_group=True)
    assert calls == [(folder, default_run_options(6))]       # the default grouping, at once
    assert any("Grouping this folder" in i.value for i in at.info)
    at.run()                                                  # once, not at every rerun
    assert_ok(at)
    assert len(calls) == 1


def test_auto_group_switched_off_or_folder_with_a_run_waits(tmp_path, monkeypatch):
    calls = _recording_start(monkeypatch)
    folder = _plain_folder(tmp_path / "imgs")
    at = start_app(monkeypatch, folder, tmp_path / "ws", auto_group=False)
    assert calls == [] and at.toggle(key="auto_group").value is False
    ws, _ = make_workspace_with_run(tmp_path / "with-run")
    at = start_app(monkeypatch, ws.root, ws.path, auto_group=True)
    assert calls == []                                        # it has a finished run


def test_auto_group_switch_is_remembered(fixture_app):
    from selfclassifier_core.store.settings import get_setting

    at, ws, run_id = fixture_app
    at.toggle(key="auto_group").set_value(False).run()
    assert_ok(at)
    assert get_setting("auto_group") is False
    at.toggle(key="auto_group").set_value(True).run()
    assert get_setting("auto_group") is True


# --------------------------------------------------------------------------- run summary
def _summary_script(ws_path: str, folder: str, run_id: int, head: int) -> None:
    """A page that only draws the run summary (app/run_summary.py) for a fixture workspace."""
    from pathlib import Path

    import streamlit as st

    from app.run_summary import render_summary
    from app.session import Context
    from selfclassifier_core.store.workspace import Workspace

    ws = Workspace.open(ws_path)
    st.session_state.setdefault("head", head)
    render_summary(Context(Path(folder), ws, ws.get_run(run_id), st.session_state["head"]),
                   run_id)


def test_run_summary_shows_the_core_numbers_and_switches_granularity(tmp_path):
    from selfclassifier_core.curation.summary import run_summary

    ws, run_id = make_workspace_with_run(tmp_path, n_images=40, heads=(3, 6), n_unreadable=2,
                                         write_images=False)
    s = run_summary(ws, run_id)
    assert s.suggested == 3           # the fixture's 6-group head is shuffled: it does not nest
    at = AppTest.from_function(_summary_script, args=(str(ws.path), str(ws.root), run_id, 6),
                               default_timeout=TIMEOUT)
    at.run()
    assert_ok(at)

    def metrics():
        return {m.label: m.value for m in at.metric}

    h3, h6 = s.head(3), s.head(6)
    shown = metrics()
    assert shown["Groups of the 3-class head"] == str(h3.groups) == "3"
    assert shown["Groups of the 6-class head"] == str(h6.groups) == "6"
    assert shown["Low margin"] == f"{h6.low_margin:.0%}"           # the sidebar's head: 6
    assert shown["Balance"] == f"{h6.balance:.2f}"
    assert shown["Nesting in the 3-class head"] == f"{h6.agreement:.0%}"
    assert any("Start with 3 classes" in i.value for i in at.info)
    assert len(at.get("plotly_chart")) == 2                         # group sizes, confidence
    switch = at.button(key=f"sum_switch|{run_id}")
    assert not switch.disabled
    switch.click().run()
    assert_ok(at)
    assert at.session_state["head"] == 3                             # the sidebar's granularity
    shown = metrics()
    assert shown["Low margin"] == f"{h3.low_margin:.0%}" and shown["Nesting"] == "—"
    assert at.button(key=f"sum_switch|{run_id}").disabled            # already there
    assert at.button(key=f"sum_clusters|{run_id}") and at.button(key=f"sum_export|{run_id}")


def test_interrupted_run_shows_with_its_resume(tmp_path, monkeypatch):
    """A background run whose process is gone: the Folder screen says interrupted, with the
    command that continues it and a Resume button; the runs table says interrupted too."""
    from selfclassifier_core.store import liveness
    from selfclassifier_core.store.fsutil import atomic_write_json

    ws, _ = make_workspace_with_run(tmp_path, n_images=12, heads=(3,))
    run_id = ws.create_run("scratch", {"folder": str(ws.root)})
    ws.update_run(run_id, status="running")
    dead = {"pid": 2 ** 22 + 41, "host": liveness.this_host(), "proc_start": None,
            "started": 1.0, "updated": 1.0}                   # beyond pid_max: no such process
    atomic_write_json(ws.run_dir(run_id) / liveness.JOB_FILE, {**dead, "argv": []})
    atomic_write_json(ws.run_dir(run_id) / liveness.HEARTBEAT_FILE, dead)
    (ws.run_dir(run_id) / "checkpoint.pt").write_bytes(b"")
    resumed = []
    monkeypatch.setattr(jobs, "resume", lambda w, r: resumed.append(r))
    at = start_app(monkeypatch, ws.root, ws.path)
    shown = [w.value.replace("\\", "") for w in at.warning]   # the markdown, unescaped
    warning = [w for w in shown if w.startswith(f"Run {run_id} was interrupted: its training "
                                                f"process (pid {dead['pid']}")]
    assert len(warning) == 1, shown
    assert (f"python -m selfclassifier_core train {ws.root} --workspace {ws.path} --resume "
            f"--run {run_id}") in warning[0]
    assert warning[0].endswith("Resume (below) continues it from its last checkpoint.")
    assert not at.dataframe                      # the runs table is folded: not drawn
    at.session_state["runs_table"] = True        # opened, it is drawn
    at.run()
    table = at.dataframe[0].value
    assert table.set_index("run").at[run_id, "status"] == "interrupted"
    at.button(key=f"resume_{run_id}").click().run()
    assert resumed == [run_id]


# --------------------------------------------------------------------------- review
def _review_ids(at: AppTest) -> list[int]:
    return [int(b.key.rsplit("|", 1)[1]) for b in at.button
            if b.key and b.key.startswith("rv_ok|")]


def test_review_confirms_and_moves_and_never_shows_a_checked_image_again(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Review")
    shown = _review_ids(at)
    assert len(shown) == 12
    lab = Labels(ws, run_id)
    at.button(key=f"rv_ok|{ws.path}|{run_id}|3|{shown[0]}").click().run()
    assert_ok(at)
    assert lab.confirmed_ids().tolist() == [shown[0]]
    target = next(n for n in lab.label_names() if n != lab.final_table().loc[shown[1], "label"])
    at.selectbox(key=f"rv_to|{ws.path}|{run_id}|3|{shown[1]}").set_value(target).run()
    assert_ok(at)
    assert lab.final_table().loc[shown[1], "label"] == target
    again = _review_ids(at)
    assert shown[0] not in again and shown[1] not in again
    assert [m.value for m in at.metric][0] == "2"              # checked
    at.sidebar.button(key="undo").click().run()                # an ordinary undoable edit
    assert lab.final_table().loc[shown[1], "label"] != target
    page = _review_ids(at)
    assert shown[1] in page                                    # unchecked again: back in the queue
    at.button(key="rv_all_right").click().run()
    assert set(_review_ids(at)).isdisjoint(page)
    assert set(page) <= set(lab.confirmed_ids().tolist())


def test_review_refit_button_waits_for_something_to_learn(fixture_app):
    at, ws, run_id = fixture_app
    goto(at, "Review")
    assert at.button(key="rv_refit").disabled                  # nothing named or checked yet
    Labels(ws, run_id).rename(0, "first")
    at.run()
    assert not at.button(key="rv_refit").disabled


@pytest.mark.slow
def test_retrain_with_my_corrections_from_the_app(tmp_path, monkeypatch):
    """The app's button path: a fast run on a real folder, a correction, the refit job."""
    monkeypatch.setattr(jobs, "AFTER_TRAINING", ())
    import selfclassifier_core as sc
    from train_fixtures import make_folder
    folder = make_folder(tmp_path / "imgs", n=24)
    import torch
    import torchvision
    weights = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    first = sc.train(folder, tmp_path / "ws", mode="fast", backbone="resnet18",
                     pretrained=str(weights), views=2, image_size=32, classes=2, steps=20,
                     device="cpu", workers=0)
    lab = Labels(first.workspace, first.run_id)
    used = int(lab.final_table()["cluster"].iloc[0])
    lab.rename(used, "one")
    at = start_app(monkeypatch, folder, tmp_path / "ws")
    goto(at, "Review")
    at.button(key="rv_refit").click().run()
    assert_ok(at)
    ws = first.workspace
    new = ws.list_runs()[-1]
    assert new.refit_of == first.run_id
    try:
        st = jobs.wait(ws, new.id, timeout=300)
    finally:
        if jobs.job_status(ws, new.id).alive:
            jobs.cancel(ws, new.id)
    assert st.status == "done", st.log_tail
    at.run()
    assert_ok(at)
    changed = read_plan(new.dir)["applied"]
    assert at.sidebar.selectbox(key="run_id").value == new.id      # opened by itself, once
    assert any(f"Refit run {new.id} is done and open: {changed['changed']:,} of "
               f"{changed['compared']:,} images changed group" in s.value.replace("\\", "")
               for s in at.success)
    at.sidebar.selectbox(key="run_id").set_value(first.run_id).run()   # back to the first run
    assert at.sidebar.selectbox(key="run_id").value == first.run_id
    assert any(f"Refit run {new.id} is done" in s.value for s in at.success)
    at.button(key="rv_open_refit").click().run()
    assert at.sidebar.selectbox(key="run_id").value == new.id
    assert "one" in Labels(ws, new.id).cluster_names().values()  # the name came along


# --------------------------------------------------------------------------- computed once
def test_every_screen_shares_one_label_table_predictions_read_and_queue_basis(tmp_path,
                                                                              monkeypatch):
    """What is expensive at a million images is made once per run or label version and shared
    by every screen and rerun: the final labels and their table (once per edit), the run's
    predictions (once), what the review queue needs from the run (once), the queue (once per
    edit); the map and the neighbour index open the embeddings once each, reading no more of
    the predictions than their ids."""
    from collections import Counter

    import selfclassifier_core.curation.labelstate as labelstate
    import selfclassifier_core.curation.neighbors as neighbors
    import selfclassifier_core.curation.projection as projection
    import selfclassifier_core.curation.review as review
    import selfclassifier_core.store.predictions as predictions
    from selfclassifier_core.curation.summary import run_summary

    made: Counter = Counter()

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            made[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    ws, run_id = make_workspace_with_run(tmp_path, n_images=40, heads=(3, 6))
    run_summary(ws, run_id)            # remembered, as every finished run's is
    from selfclassifier_core.curation.final import FinalLabels

    monkeypatch.setattr(Labels, "final_labels", counted("labels", Labels.final_labels))
    whole = len(ws.usable_images())
    frame = FinalLabels._frame

    def table(self):                       # the whole table, not a review queue's few rows
        made["table"] += len(self) == whole
        return frame(self)

    monkeypatch.setattr(FinalLabels, "_frame", table)
    load = counted("predictions", predictions.load_predictions)
    monkeypatch.setattr(predictions, "load_predictions", load)
    monkeypatch.setattr(labelstate, "load_predictions", load)
    opened = counted("embeddings", predictions.load_run_embeddings)
    monkeypatch.setattr(neighbors, "load_run_embeddings", opened)
    monkeypatch.setattr(projection, "load_run_embeddings", opened)
    monkeypatch.setattr(review, "review_basis", counted("basis", review.review_basis))
    monkeypatch.setattr(review, "review_queue", counted("queue", review.review_queue))
    at = start_app(monkeypatch, ws.root, ws.path)
    for page in ["Clusters", "Review", "Export"]:
        goto(at, page)
        at.run()                                               # a rerun of the same screen
        assert_ok(at)
    assert made == {"labels": 1, "table": 1, "predictions": 1, "basis": 1, "queue": 1}
    goto(at, "Map")
    goto(at, "Neighbours")                 # starts opening the index in the background
    deadline = time.monotonic() + 60
    while made["embeddings"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    for page in ["Clusters", "Review", "Map", "Neighbours", "Export"]:
        goto(at, page)
        at.run()
    assert made == {"labels": 1, "table": 1, "predictions": 1, "embeddings": 2, "basis": 1,
                    "queue": 1}
    goto(at, "Review")
    shown = _review_ids(at)
    at.button(key=f"rv_ok|{ws.path}|{run_id}|3|{shown[0]}").click().run()   # an edit
    assert_ok(at)
    for page in ["Clusters", "Map", "Export", "Review"]:
        goto(at, page)
    assert made == {"labels": 2, "table": 2, "predictions": 1, "embeddings": 2, "basis": 1,
                    "queue": 2}
