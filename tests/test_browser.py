"""Real browser: headless Chromium (Debian package) drives `streamlit run app/main.py`.

Load the app on a fixture workspace, reach the Clusters screen, rename a cluster, go to Export,
download the CSV and check it carries the new name; screenshots go to pytest's tmp dir and to
``test-artifacts/`` (git-ignored). Skips only when /usr/bin/chromium is absent and CI is unset;
under CI a missing browser is a failure.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from workspace_fixtures import make_workspace_with_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # a Streamlit server and Chromium

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEW_NAME = "Renamed in the browser ✓"


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing on CI: install the Debian package `chromium`")
    pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium); CI runs this test")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _serve(tmp_path: Path, folder: Path, workspace: Path):
    """``streamlit run app/main.py`` on ``folder``; yields its URL once it answers."""
    port = _free_port()
    env = dict(os.environ, SELFCLASSIFIER_HOME=str(tmp_path / "home"))
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
         "--", "--folder", str(folder), "--workspace", str(workspace)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail("streamlit did not start:\n"
                            + (tmp_path / "streamlit.log").read_text()[-3000:])
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def server(tmp_path):
    """The app on a fixture workspace with a finished run (made-up predictions)."""
    _require_chromium()
    ws, run_id = make_workspace_with_run(tmp_path, n_images=24, heads=(3, 6), image_size=16)
    with _serve(tmp_path, ws.root, ws.path) as url:
        yield url, ws, run_id


def _screenshot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    artifacts = ROOT / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copyfile(path, artifacts / path.name)


def test_rename_then_download_csv_in_a_real_browser(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, ws, run_id = server
    expect.set_options(timeout=60_000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000},
                                    accept_downloads=True)
            page.set_default_timeout(60_000)
            page.goto(url)
            sidebar = page.locator('[data-testid="stSidebar"]')
            expect(sidebar.get_by_text("Folder & training", exact=True)).to_be_visible()
            expect(page.get_by_text("Usable images")).to_be_visible()

            sidebar.get_by_text("Clusters", exact=True).click()
            box = page.locator('[data-testid="stMain"] input[type="text"]').and_(
                page.locator('[aria-label="Name"]')).first
            expect(box).to_be_visible()
            inputs = page.locator('[data-testid="stMain"] [aria-label="Name"]')
            expect(inputs).to_have_count(3)
            values = [inputs.nth(i).input_value() for i in range(3)]
            assert sorted(values) == ["cluster_0", "cluster_1", "cluster_2"]
            target = inputs.nth(values.index("cluster_1"))
            target.fill(NEW_NAME)
            target.press("Enter")
            expect(page.get_by_text("Renamed", exact=False).first).to_be_visible()
            expect(page.locator(f'[aria-label="Name"][value="{NEW_NAME}"]')).to_have_count(1)
            _screenshot(page, tmp_path, "browser-clusters")

            sidebar.get_by_text("Export", exact=True).click()
            button = page.get_by_role("button", name="Download labels CSV")
            expect(button).to_be_visible()
            with page.expect_download() as info:
                button.click()
            download = info.value
            csv_path = tmp_path / "downloaded.csv"
            download.save_as(str(csv_path))
            _screenshot(page, tmp_path, "browser-export")
        finally:
            browser.close()
    text = csv_path.read_text(encoding="utf-8")
    lines = text.splitlines()
    assert lines[0] == "path,label,cluster,confidence,margin,head,edited"
    assert len(lines) == 1 + 24
    renamed = [ln for ln in lines[1:] if NEW_NAME in ln]
    from selfclassifier_core.curation.labels import Labels
    assert len(renamed) == int((Labels(ws, run_id).final_table()["cluster"] == 1).sum()) > 0


def test_a_fresh_folder_groups_itself_in_a_real_browser(tmp_path):
    """Open a folder that was never grouped and press nothing: the groups appear."""
    from playwright.sync_api import expect, sync_playwright

    import numpy as np
    from PIL import Image

    _require_chromium()
    folder = tmp_path / "fresh"            # four colours, eight noisy images of each
    folder.mkdir()
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]
    for i in range(32):
        pixels = np.clip(np.array(colours[i % 4]) + rng.normal(0, 12, (32, 32, 3)), 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i:02d}.png")
    with _serve(tmp_path, folder, tmp_path / "ws") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1400})
            page.goto(url)
            expect(page.get_by_text("is done", exact=False).first).to_be_visible(
                timeout=300_000)                           # the job, started on its own
            expect(page.get_by_text("Start with", exact=False).first
                   ).to_be_visible(timeout=60_000)        # the summary of the result
            _screenshot(page, tmp_path, "browser-summary")
            page.locator('[data-testid="stSidebar"]').get_by_text("Clusters", exact=True).click()
            names = page.locator('[data-testid="stMain"] [aria-label="Name"]')
            expect(names.first).to_be_visible(timeout=60_000)
            expect(names.nth(1)).to_be_visible(timeout=60_000)  # cards arrive one by one
            assert names.count() >= 2
        finally:
            browser.close()
    from selfclassifier_core.store.workspace import Workspace

    runs = Workspace.open(tmp_path / "ws").list_runs()
    assert [r.status for r in runs] == ["done"]


def test_a_real_lasso_on_the_map_selects_points(server, tmp_path):
    """A mouse drag on the plotly map (its drag mode is lasso) selects points; their thumbnails
    and the labelling form appear below the map."""
    from playwright.sync_api import expect, sync_playwright

    url, ws, run_id = server
    expect.set_options(timeout=120_000)                  # the map is computed on first view
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1200})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.locator('[data-testid="stSidebar"]').get_by_text("Map", exact=True).click()
            plot = page.locator(".js-plotly-plot .nsewdrag").first   # the drawing area
            expect(plot).to_be_visible()
            box = plot.bounding_box()
            x0, y0, w, h = box["x"], box["y"], box["width"], box["height"]
            ring = [(0.03, 0.03), (0.97, 0.03), (0.97, 0.97), (0.03, 0.97), (0.03, 0.05)]
            page.mouse.move(x0 + w * ring[0][0], y0 + h * ring[0][1])
            page.mouse.down()
            for fx, fy in ring[1:]:
                page.mouse.move(x0 + w * fx, y0 + h * fy, steps=12)
            page.mouse.up()
            heading = page.get_by_text("selected", exact=False).first
            expect(heading).to_be_visible()
            assert heading.inner_text().strip() == "24 selected"   # every point was inside
            expect(page.get_by_role("button", name="Apply label")).to_be_visible()
            thumbs = page.locator('[data-testid="stMain"] [data-testid="stImage"] img')
            expect(thumbs.first).to_be_visible()
            assert thumbs.count() == 24
            _screenshot(page, tmp_path, "browser-lasso")
        finally:
            browser.close()
