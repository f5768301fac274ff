"""Screenshots of `fracray review` on a scoring run, in Debian's headless Chromium: the worklist,
the first flagged study that has findings, and the monitoring page (the pictures in README.md and
docs/review.md come from this, on a scoring run of real FracAtlas images).

    .venv/bin/fracray score --input FRACATLAS_IMAGES --output /tmp/rv/scores
    .venv/bin/python scripts/review_screenshots.py /tmp/rv/scores --output docs/

Needs chromium and chromium-driver (scripts/install_review_tools.sh) and the test extras (selenium).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a scoring output folder")
    parser.add_argument("--output", default="docs", help="folder for review_worklist.png, review_study.png, "
                                                         "review_monitoring.png (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1400, help="browser window width (default: %(default)s)")
    return parser


def main(args: argparse.Namespace) -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        print("Chromium not found: bash scripts/install_review_tools.sh", file=sys.stderr)
        return 2
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    port, token = _free_port(), secrets.token_hex(8)
    env = dict(os.environ, FRACRAY_API_TOKEN=token)
    app = subprocess.Popen([str(Path(sys.executable).parent / "fracray"), "review", args.run, "--port", str(port),
                            "--feedback", str(Path(args.run) / "review" / "screenshots.sqlite")], env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={args.width},1000",
                 "--disable-gpu", "--no-first-run", "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    css = By.CSS_SELECTOR

    def until(condition, what: str, timeout: float = 120):
        return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda b: condition(b), message=what)

    def full_page(name: str, max_height: int = 2400) -> None:
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(args.width, min(max(height, 600), max_height))
        browser.save_screenshot(str(out / name))
        print(f"wrote {out / name}")

    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if app.poll() is not None or time.time() > deadline:
                    print("fracray review did not start", file=sys.stderr)
                    return 1
                time.sleep(0.3)
        browser.get(f"{url}/?token={token}")
        until(lambda b: b.find_elements(css, "#worklist tbody tr.flagged"), "the worklist")
        full_page("review_worklist.png", 1100)
        # The first flagged study whose image shows findings.
        flagged = [row.get_attribute("data-study") for row in browser.find_elements(css, "#worklist tbody tr.flagged")]
        for study in flagged:
            browser.get(f"{url}/study?id={study}")
            until(lambda b: b.execute_script("return document.querySelectorAll('.viewer img').length > 0 && "
                                              "[...document.querySelectorAll('.viewer img')]"
                                              ".every(i => i.complete && i.naturalWidth > 0)"), "the images")
            if browser.find_elements(css, ".viewer rect.finding"):
                break
        browser.set_window_size(args.width, 1000)
        full_page("review_study.png")
        browser.get(f"{url}/monitoring")
        until(lambda b: b.find_elements(css, "img") or "unavailable" in b.page_source, "the monitoring page", 300)
        until(lambda b: b.execute_script("return [...document.images].every(i => i.complete)"), "the plots", 300)
        full_page("review_monitoring.png", 1500)
    finally:
        browser.quit()
        app.terminate()
        app.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
