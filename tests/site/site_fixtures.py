"""Fixtures of the documentation-site tests: one strict build per session, a local HTTP server
and headless Chromium. Test modules import the fixtures they use from here.

Why not a ``conftest.py``: ``tests/`` has no ``__init__.py``, so a second ``conftest.py`` here would
replace ``tests/conftest.py`` in ``sys.modules["conftest"]`` and break the core tests' ``from
conftest import tiny_model``. Fixtures imported into several modules get one definition per
module, so each is memoized for the session here and torn down at the end of the run.

The build reuses the executed notebooks in ``.executed/`` (``scripts/execute_notebooks.py`` only
re-executes what changed) and writes the site to a temporary folder, never to ``site/``. Without
Chromium the browser tests skip, except with ``CI`` or ``REQUIRE_ALL=1``, where they fail.
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

_SESSION: dict[str, object] = {}  # key -> value, or ("failed", message)


def _once(request, key: str, make):
    """``make()`` -> (value, cleanup or None), run once per test session."""
    if key not in _SESSION:
        try:
            value, cleanup = make()
        except pytest.fail.Exception as exc:
            _SESSION[key] = ("failed", str(exc))
            request.config.add_cleanup(lambda: _SESSION.pop(key, None))
            raise
        _SESSION[key] = value

        def finish():
            _SESSION.pop(key, None)
            if cleanup is not None:
                cleanup()

        request.config.add_cleanup(finish)
    value = _SESSION[key]
    if isinstance(value, tuple) and value and value[0] == "failed":
        pytest.fail(value[1])
    return value


@pytest.fixture(scope="session")
def site_dir(request, tmp_path_factory) -> Path:
    def build():
        out = tmp_path_factory.mktemp("site")
        env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
        execute = subprocess.run(
            [sys.executable, "scripts/execute_notebooks.py"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if execute.returncode != 0:
            pytest.fail(f"scripts/execute_notebooks.py failed:\n{execute.stdout}\n{execute.stderr}")
        result = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.fail(f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}")
        return out, None

    return _once(request, "site_dir", build)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="session")
def site_url(request, site_dir) -> str:
    """The built site served by http.server on 127.0.0.1 (a free port)."""

    def serve():
        handler = functools.partial(_QuietHandler, directory=str(site_dir))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()

        def stop():
            server.shutdown()
            server.server_close()

        return f"http://127.0.0.1:{server.server_address[1]}/", stop

    return _once(request, "site_url", serve)


def _find(*names: str) -> str | None:
    for name in names:
        if os.path.isabs(name):
            if os.path.isfile(name) and os.access(name, os.X_OK):
                return name
        elif shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def browser(request, tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium is not installed")
    # CHROMIUM_BIN / CHROMEDRIVER_BIN select other binaries (or none, to try the skip/fail rule)
    chromium = _find(os.environ["CHROMIUM_BIN"]) if "CHROMIUM_BIN" in os.environ else _find("/usr/bin/chromium", "chromium", "chromium-browser")
    driver_path = _find(os.environ["CHROMEDRIVER_BIN"]) if "CHROMEDRIVER_BIN" in os.environ else _find("/usr/bin/chromedriver", "chromedriver")
    if not chromium or not driver_path:
        missing("headless Chromium not found: install Debian `chromium chromium-driver` (scripts/setup.sh --browser)")

    def start():
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
        return driver, driver.quit

    return _once(request, "browser", start)


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS
