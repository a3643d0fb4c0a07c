"""A real headless Chromium driven by selenium, for tests of the web page.

Uses Debian's ``chromium`` and ``chromium-driver`` (no downloads: selenium-manager is never
asked, the driver path is given). Without a browser on the machine the tests are skipped —
except in CI (``CI`` set), where a missing browser is a failure, not a silent skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("AUDIOMESH_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("AUDIOMESH_CHROMEDRIVER", "/usr/bin/chromedriver"))
WINDOW = (1280, 900)
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--lang=en-US",
)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator:
    """A selenium Chrome WebDriver on headless Chromium, 1280x900, with a fresh profile.

    Browser console messages are collected (``driver.get_log("browser")``) so tests can
    assert the page logs no errors.
    """
    if not _executable(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(
                f"{CHROMIUM} is missing: CI must run the browser tests (apt-get install chromium chromium-driver)"
            )
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver): browser tests skipped")
    if not _executable(CHROMEDRIVER):
        pytest.fail(f"{CHROMIUM} is here but {CHROMEDRIVER} is not: apt-get install chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    log_path = tmp_path / "chromedriver.log"
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(log_path))
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except Exception as exc:
        log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
        raise RuntimeError(f"could not start headless Chromium ({CHROMIUM}): {exc}\n{log}") from exc
    try:
        driver.set_window_size(*WINDOW)
        driver.set_page_load_timeout(30)
        driver.set_script_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def css(driver, selector: str):
    """The one element ``selector`` finds (NoSuchElementException when none)."""
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def wait(driver, seconds: float, condition, message: str):
    """Poll ``condition(driver)`` until truthy; AssertionError with the page's #alert text otherwise."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(lambda d: condition(d), message)
    except TimeoutException:
        alert = driver.execute_script("return document.getElementById('alert').textContent")
        raise AssertionError(f"{message} (after {seconds} s; #alert says: {alert!r})") from None
