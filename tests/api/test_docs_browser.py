"""``/docs`` in a real headless browser (Debian's chromium, driven by selenium through Debian's
chromium-driver) with every host but the test server unresolvable, as on a machine without
internet access: Swagger UI loads from the installation, lists every operation of the OpenAPI
schema, and "Try it out" -> "Execute" gets the server's answer. A missing browser fails the test
(``.ci/run`` and ``make test`` install both packages)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from support.live_server import serve_app

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser")
DRIVER_CANDIDATES = ("chromedriver", "/usr/lib/chromium/chromedriver")


def _find(candidates: tuple[str, ...]) -> str | None:
    for name in candidates:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _find(CHROMIUM_CANDIDATES), _find(DRIVER_CANDIDATES)
    if chromium is None or driver is None:
        pytest.fail("the docs test needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,2000",
                 # offline: no name resolves except the loopback server's address
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--no-proxy-server"):
        options.add_argument(flag)
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    chrome.set_page_load_timeout(60)
    try:
        yield chrome
    finally:
        chrome.quit()


def _wait(condition, timeout_s: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_swagger_ui_lists_the_operations_and_try_it_out_works(api_settings, browser, tmp_path):
    from selenium.webdriver.common.by import By

    with serve_app(create_app(api_settings)) as base_url:
        schema = httpx.get(f"{base_url}/openapi.json").json()
        expected = {(method.upper(), path) for path, item in schema["paths"].items() for method in item}
        assert httpx.get(f"{base_url}/redoc").status_code == 404  # it would load from a CDN
        browser.get(f"{base_url}/docs")

        def operations() -> set[tuple[str, str]]:
            found = set()
            for block in browser.find_elements(By.CSS_SELECTOR, ".opblock"):
                method = block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text.strip()
                path = block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path")
                found.add((method, path))
            return found

        listed = _wait(lambda: operations() if len(operations()) >= len(expected) else None, what="the operations")
        assert listed == expected
        assert ("POST", "/v1/chat/completions") in listed and ("GET", "/v1/models") in listed

        block = next(b for b in browser.find_elements(By.CSS_SELECTOR, ".opblock")
                     if b.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path") == "/healthz")
        block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
        _wait(lambda: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"), what="Try it out").pop().click()
        _wait(lambda: block.find_elements(By.CSS_SELECTOR, ".execute"), what="Execute").pop().click()
        status = _wait(lambda: [e.text for e in block.find_elements(
            By.CSS_SELECTOR, ".live-responses-table tr.response td.response-col_status") if e.text.strip()], what="the response")
        assert status[0].strip().startswith("200")
        body = block.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response td.response-col_description").text
        assert '"status": "ok"' in body
        browser.save_screenshot(str(tmp_path / "docs.png"))
