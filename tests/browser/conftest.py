"""The browser tier: Debian's headless Chromium (driven by selenium through /usr/bin/chromedriver, so
selenium-manager downloads nothing) against a real `sgl serve` on 127.0.0.1.

Skips, with the reason, only when Chromium or its driver is not installed (`make setup` installs them
with apt where it can). Every test ends with the server's KV integrity check.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterator

import pytest

from tests.e2e.conftest import _check_server
from tests.e2e.server_helpers import ServerHandle, running_server

CHROMIUM = os.environ.get("SGL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SGL_CHROMEDRIVER", "/usr/bin/chromedriver")
API_KEY = "console-test-key"


def _missing() -> str:
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        return f"Chromium not installed ({CHROMIUM}); `apt-get install -y chromium chromium-driver` (make setup does)"
    if not (os.path.exists(CHROMEDRIVER) or shutil.which("chromedriver")):
        return f"chromedriver not installed ({CHROMEDRIVER}); `apt-get install -y chromium-driver`"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return ""


@pytest.fixture(scope="session")
def server() -> Iterator[ServerHandle]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    with running_server(api_key=API_KEY) as handle:
        yield handle


@pytest.fixture(scope="session")
def browser(server: ServerHandle) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="sgl-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,900", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(autouse=True)
def kv_integrity_after_each_test(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "server" in request.fixturenames:
        _check_server(request.getfixturevalue("server"))
