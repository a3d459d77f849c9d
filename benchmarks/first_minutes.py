"""How long a new user waits: `streamlit run app/main.py` on the demo images with a fresh home,
a real browser (Debian's chromium), nothing pressed — until the groups are there.

    .venv/bin/python benchmarks/first_minutes.py [--folder DIR] [--shot docs/summary.png]

Prints the seconds from the server's start to: the health check, the first page, the run done
(auto-group), its summary, the Clusters screen with its groups. With ``--shot`` the summary is
saved as a PNG (the README's docs/summary.png is made this way from the demo).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default=str(ROOT / "assets" / "demo"))
    ap.add_argument("--shot", help="save the run's summary as this PNG")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for the run")
    args = ap.parse_args()
    from playwright.sync_api import expect, sync_playwright

    home = tempfile.mkdtemp(prefix="sc-first-minutes-")
    port = _port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/main.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", "127.0.0.1",
         "--browser.gatherUsageStats", "false", "--", "--folder", args.folder],
        cwd=ROOT, env=dict(os.environ, SELFCLASSIFIER_HOME=home),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marks: dict[str, float] = {}
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        marks["health"] = time.monotonic() - t0
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1400, "height": 2200})
            page.goto(f"http://127.0.0.1:{port}/")
            expect(page.get_by_text("Usable images")).to_be_visible(timeout=300_000)
            marks["first page"] = time.monotonic() - t0
            expect(page.get_by_text("is done", exact=False).first).to_be_visible(
                timeout=args.timeout * 1000)
            marks["run done"] = time.monotonic() - t0
            expect(page.get_by_text("Start with", exact=False).first).to_be_visible(
                timeout=120_000)
            marks["summary"] = time.monotonic() - t0
            if args.shot:
                _shot(page, Path(args.shot))
            page.locator('[data-testid="stSidebar"]').get_by_text("Clusters", exact=True).click()
            expect(page.locator('[data-testid="stMain"] [aria-label="Name"]').first
                   ).to_be_visible(timeout=120_000)
            marks["clusters"] = time.monotonic() - t0
            browser.close()
    finally:
        proc.terminate()
    print(f"{args.folder}: " + ", ".join(f"{k} {v:.1f} s" for k, v in marks.items()))
    return 0


def _shot(page, out: Path) -> None:
    """The summary block (from its header to its next-step buttons) as a PNG."""
    from PIL import Image

    time.sleep(3)  # charts finish drawing
    full = out.with_suffix(".full.png")
    page.screenshot(path=str(full), full_page=True)
    top = page.get_by_text("images grouped", exact=False).first.bounding_box()
    bottom = page.get_by_role("button", name="Open Clusters").bounding_box()
    side = page.locator('[data-testid="stSidebar"]').bounding_box()
    with Image.open(full) as im:
        im.crop((int(side["width"]) + 20, int(top["y"]) - 20, im.width - 20,
                 int(bottom["y"] + bottom["height"]) + 20)).save(out, optimize=True)
    full.unlink()


if __name__ == "__main__":
    sys.exit(main())
