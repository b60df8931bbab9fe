"""Starts a real TensorBoard on loopback over a folder of runs, and (with
--screenshot) saves a headless-Chromium picture of its scalars dashboard.

    .venv/bin/python scripts/tensorboard_view.py runs --screenshot=docs/tensorboard.png

Used by tests/test_tensorboard.py; the README's picture comes from it.
Chromium here has no WebGL, so the charts are asked for as SVG (?forceSVG=true).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


class TensorBoard:
    """``tensorboard --logdir FOLDER`` on 127.0.0.1 and a free port."""

    def __init__(self, logdir: str, timeout: float = 90.0):
        exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
        self.process = subprocess.Popen(
            [
                exe,
                "--logdir",
                logdir,
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--reload_interval",
                "1",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + timeout
        self.url = None
        while self.url is None:
            line = self.process.stdout.readline()
            if not line or time.time() > deadline:
                self.close()
                raise RuntimeError(f"TensorBoard did not start within {timeout:g} s")
            found = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            if found:
                self.url = found.group(1)
        # Keep reading what it prints: a full pipe would stop the server.
        self.output: list[str] = []
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def get(self, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            raw = response.read()
            if response.headers.get("Content-Encoding") == "gzip":
                raw = gzip.decompress(raw)
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def wait_for_runs(self, count: int, timeout: float = 90.0) -> list[str]:
        deadline = time.time() + timeout
        while True:
            runs = self.get("/data/runs")
            if len(runs) >= count or time.time() > deadline:
                return runs
            time.sleep(1)

    def close(self) -> None:
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        if self.process.poll() is None:
            self.process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def chromium() -> str | None:
    return next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)


def _headless(url: str, *options: str, height: int = 900) -> str:
    """Runs headless Chromium on ``url`` with ``options``, in a fresh profile
    (nothing left by an earlier Chromium in the way); returns its stdout."""
    browser = chromium()
    if browser is None:
        raise RuntimeError("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="tftrain-chromium-") as profile:
        return subprocess.run(
            [
                browser,
                "--headless",
                f"--user-data-dir={profile}",
                "--no-sandbox",
                "--disable-gpu",
                f"--window-size=1400,{height}",
                "--virtual-time-budget=30000",
                *options,
                url,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout


def screenshot(url: str, path: str) -> None:
    """A picture of ``url`` after its scripts have run (headless Chromium)."""
    _headless(url, "--hide-scrollbars", f"--screenshot={os.path.abspath(path)}")


# A card's legend dots alone colour ~200 pixels; its lines, over a thousand.
DRAWN = 400


def chart_pixels(path: str) -> int:
    """Coloured pixels in a Time Series screenshot's card area (right of the
    run list, left of the settings panel, below the filter bar): the drawn
    lines and the legend's dots (more than ``DRAWN``: the lines are drawn)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    image = tf.io.decode_png(tf.io.read_file(path), channels=3).numpy().astype(int)
    height, width, _ = image.shape
    area = image[int(0.17 * height) :, int(0.21 * width) : int(0.8 * width)]
    return int(np.sum(area.max(axis=2) - area.min(axis=2) > 100))


def screenshot_drawn(url: str, path: str, tries: int = 5) -> int:
    """``screenshot`` again until its chart is drawn (Chromium draws within a
    virtual time budget, mostly); returns the chart's coloured pixels."""
    for _ in range(tries):
        screenshot(url, path)
        drawn = chart_pixels(path)
        if drawn > DRAWN:
            return drawn
        time.sleep(3)
    return 0


def dom(url: str, height: int = 900) -> str:
    """The page's DOM after its scripts have run (headless Chromium; cards
    below ``height`` pixels are not drawn)."""
    return _headless(url, "--dump-dom", height=height)


def time_series_page(base: str, tag_filter: str = "") -> str:
    query = f"&tagFilter={urllib.parse.quote(tag_filter)}" if tag_filter else ""
    return f"{base}/?forceSVG=true{query}#timeseries"


def drawn_series(page_dom: str) -> dict[str, list[int]]:
    """Per scalar card of the Time Series dashboard (drawn as SVG): the number
    of points of each drawn line (smoothed copies left out)."""
    cards = {}
    for chunk in page_dom.split("<scalar-card ")[1:]:
        title = re.search(r'<tb-truncated-path[^>]*title="([^"]+)"', chunk)
        lines = re.findall(
            r'<path d="(M[^"]*)" style="fill: none; stroke: [^;]*; opacity: 1', chunk
        )
        if title:
            cards.setdefault(title.group(1), sorted(line.count("L") + 1 for line in lines))
    return cards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("--screenshot", help="save a picture of the Time Series dashboard here")
    parser.add_argument("--tag", default="loss", help="the scalar shown")
    args = parser.parse_args()
    with TensorBoard(args.logdir) as board:
        runs = board.wait_for_runs(1)
        print(f"TensorBoard at {board.url} over {len(runs)} run(s): {', '.join(sorted(runs))}")
        if args.screenshot:
            page = time_series_page(board.url, f"^{args.tag}$")
            if not screenshot_drawn(page, args.screenshot):
                sys.exit(f"the {args.tag} chart was not drawn in {args.screenshot}")
            print(f"saved {args.screenshot}")


if __name__ == "__main__":
    main()
