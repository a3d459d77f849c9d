"""Every screen in a real browser at scale: what a person waits for, not only the server.

    python benchmarks/browser_screens.py --keep /big/disk/scale-1m [--runs 3] [--pause 1]

On a workspace that ``scale.py --keep DIR`` built (with its map made once), each run starts a
fresh ``streamlit run`` server, opens its first page in headless Chromium (Debian's) and then
every screen from the sidebar menu, one after the other. Each time is from the click (or the
page's address being asked for) until the page has settled: its heading is the screen's,
nothing on it is stale, Streamlit's running indicator is gone, and on the map the plot is
drawn. ``--pause`` waits that long before each click, as a person reads a page. Prints a line
a screen and run, then each screen's range over the runs.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENS = ("Clusters", "Review", "Map", "Neighbours", "Export", "Folder & training")
# settled: the heading asked for, nothing stale, no "Running…" indicator (and a drawn plot on
# the map: its WebGL canvas is there once plotly has drawn)
SETTLED = """(want) => {
  const main = document.querySelector('[data-testid="stMain"]');
  if (!main) return false;
  const h = main.querySelector('h1, h2');
  if (!h || !h.textContent.trim().startsWith(want)) return false;
  if (document.querySelector('[data-stale="true"]')) return false;
  const running = document.querySelector('[data-testid="stStatusWidget"]');
  if (running && running.offsetParent !== null) return false;
  if (want === 'Map' && !main.querySelector('.js-plotly-plot canvas, .js-plotly-plot .scatterlayer'))
    return false;
  return true;
}"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(base: Path) -> tuple[subprocess.Popen, str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
         "--", "--folder", str(base / "images"), "--workspace", str(base / "ws")],
        cwd=ROOT, env=dict(os.environ, SELFCLASSIFIER_HOME=str(base / "home")),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("streamlit did not start")
            time.sleep(0.1)


def one_run(base: Path, pause: float) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    from selfclassifier_core.store.settings import set_setting

    os.environ["SELFCLASSIFIER_HOME"] = str(base / "home")
    set_setting("auto_group", False)
    proc, url = _serve(base)
    times: dict[str, float] = {}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})

            def settle(want: str, since: float) -> None:
                page.wait_for_function(SETTLED, arg=want, polling=20, timeout=600_000)
                times[want] = time.perf_counter() - since

            t0 = time.perf_counter()
            page.goto(url)
            settle("Folder & training", t0)
            times["first page"] = times.pop("Folder & training")
            menu = page.locator('[data-testid="stSidebarNav"]')
            for screen in SCREENS:
                time.sleep(pause)
                t0 = time.perf_counter()
                menu.get_by_text(screen, exact=True).click()
                settle(screen, t0)
            browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", required=True, help="the directory scale.py --keep built")
    ap.add_argument("--runs", type=int, default=3, help="fresh servers, one after another")
    ap.add_argument("--pause", type=float, default=0.0, help="seconds before each click")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    base = Path(args.keep)
    if not (base / "ws").is_dir():
        raise SystemExit(f"no workspace in {base / 'ws'}: build it with scale.py --keep")
    runs = []
    for i in range(args.runs):
        times = one_run(base, args.pause)
        runs.append(times)
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()),
              flush=True)
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"{key:<20} {min(values):.2f}–{max(values):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
