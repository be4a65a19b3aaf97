"""Fixtures for the documentation-site tests: one strict build per session, a local HTTP server
and headless Chromium.

The build reuses the executed notebooks in ``.executed/`` (``scripts/execute_notebooks.py`` only
re-executes a notebook whose sources changed) and writes the site to a temporary folder, so the
tests never touch ``site/``. Without Chromium the browser tests skip, except with ``CI`` or
``REQUIRE_ALL=1`` in the environment, where they fail.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from site_helpers import CHROMIUM_FLAGS, ROOT, SCREENSHOTS, missing


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    execute = subprocess.run(
        [sys.executable, "scripts/execute_notebooks.py"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if execute.returncode != 0:
        pytest.fail(f"scripts/execute_notebooks.py failed:\n{execute.stdout}\n{execute.stderr}")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        pytest.fail(f"mkdocs build --strict failed:\n{build.stdout}\n{build.stderr}")
    return out


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="session")
def site_url(site_dir):
    """The built site served by http.server on 127.0.0.1 (a free port)."""
    handler = functools.partial(_QuietHandler, directory=str(site_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def _find(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed")
    # CHROMIUM_BIN / CHROMEDRIVER_BIN point at other binaries (or at nothing, to try the skip/fail rule)
    chromium = _find(os.environ["CHROMIUM_BIN"]) if "CHROMIUM_BIN" in os.environ else _find("/usr/bin/chromium", "chromium", "chromium-browser")
    driver_path = _find(os.environ["CHROMEDRIVER_BIN"]) if "CHROMEDRIVER_BIN" in os.environ else _find("/usr/bin/chromedriver", "chromedriver")
    if not chromium or not driver_path:
        missing("headless Chromium not found: install Debian `chromium chromium-driver` (scripts/setup.sh --browser)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.add_argument("--window-size=1280,1000")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
    except Exception as exc:  # driver/browser mismatch, missing libraries, ...
        missing(f"headless Chromium did not start: {exc}")
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
