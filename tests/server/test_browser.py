"""The chat page end to end in headless Chromium (Selenium): streaming, stop, new chat.

Needs `selenium` (pip) and Debian's `chromium` and `chromium-driver`. When they are missing the
test skips, unless it runs as root with CI or GRAFTLM_INSTALL_BROWSER set: then it installs them
with apt-get first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.server.conftest import MODEL_NAME, LiveServer

INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1200,900",
]


def _browser_paths() -> tuple[str | None, str | None]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    return browser, shutil.which("chromedriver")


def _ensure_browser() -> tuple[str, str]:
    browser, driver = _browser_paths()
    if browser and driver:
        return browser, driver
    may_install = os.geteuid() == 0 and (os.environ.get("CI") or os.environ.get("GRAFTLM_INSTALL_BROWSER"))
    if not may_install:
        pytest.skip(
            f"chromium/chromedriver not found: install them with `{INSTALL}` "
            "(or run as root with GRAFTLM_INSTALL_BROWSER=1 to let this test do it)"
        )
    done = subprocess.run(["sh", "-c", INSTALL], capture_output=True, text=True, timeout=900)
    browser, driver = _browser_paths()
    if done.returncode != 0 or not (browser and driver):
        pytest.skip(f"installing chromium failed (exit {done.returncode}): {done.stderr[-500:]}")
    return browser, driver


@pytest.fixture(scope="module")
def driver(live_server: LiveServer) -> Iterator[Any]:
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="the browser test needs `pip install selenium`"
    )
    browser, chromedriver = _ensure_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    profile = tempfile.mkdtemp(prefix="graftlm-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=chromedriver)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
        drv = webdriver.Chrome(options=options, service=service)
    drv.set_page_load_timeout(30)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def until(drv: Any, script: str, what: str, timeout: float = 20) -> Any:
    """Wait for a JavaScript expression to become truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout, poll_frequency=0.05).until(
        lambda d: d.execute_script(f"return {script};"), message=f"waiting for {what}"
    )


def send(drv: Any, text: str, max_tokens: int) -> None:
    drv.execute_script(
        "document.getElementById('temperature').value = '0';"
        "document.getElementById('max-tokens').value = arguments[0];",
        str(max_tokens),
    )
    box = drv.find_element("id", "input")
    box.send_keys(text)
    drv.find_element("id", "send").click()


def shown_messages(drv: Any) -> list[tuple[str, str]]:
    rows = drv.execute_script(
        "return [...document.querySelectorAll('#messages .msg')]"
        ".map(m => [m.classList.contains('user') ? 'user' : 'assistant', m.querySelector('.content').textContent]);"
    )
    return [tuple(row) for row in rows]


def test_chat_page_streams_stops_and_starts_over(
    driver: Any, live_server: LiveServer, reference: Any, slow_model: dict[str, float]
) -> None:
    slow_model["seconds"] = 0.0
    question = "Hello world"
    expected = reference.chat([{"role": "user", "content": question}], max_new_tokens=12).text
    driver.get(live_server.url + "/")
    until(driver, f"document.getElementById('model').textContent === '{MODEL_NAME}'", "the model name")

    # 1. A greedy answer streams in and equals graftlm's own.
    send(driver, question, 12)
    until(driver, "window.graftlmChat.finished === 1", "the first reply")
    assert driver.execute_script("return window.graftlmChat.history;") == [
        {"role": "user", "content": question},
        {"role": "assistant", "content": expected},
    ]
    assert shown_messages(driver) == [("user", question), ("assistant", expected)]
    assert driver.find_element("id", "status").text == "done"

    # 2. A slow, long answer: text shows while it streams; Stop cancels it on the server too.
    slow_model["seconds"] = 0.05
    cancelled = live_server.stats()["cancelled"]
    send(driver, "Tell me more", 150)
    until(
        driver,
        "window.graftlmChat.busy && document.querySelectorAll('#messages .msg.assistant .content')[1].textContent.length > 0",
        "streamed text while the reply is still running",
    )
    assert driver.find_element("id", "send").get_attribute("disabled") is not None
    driver.find_element("id", "stop").click()
    until(driver, "window.graftlmChat.finished === 2", "the stopped reply")
    assert driver.find_element("id", "status").text == "stopped"
    live_server.wait_for(
        lambda: live_server.stats()["cancelled"] == cancelled + 1, 10, "the server to cancel"
    )
    partial = driver.execute_script("return window.graftlmChat.history[3].content;")
    assert 0 < len(partial) and live_server.stats()["recent"][-1]["completion_tokens"] < 150
    slow_model["seconds"] = 0.0

    # 3. New chat clears the page and the history: the same question gets the same first answer.
    driver.find_element("id", "new-chat").click()
    assert shown_messages(driver) == []
    assert driver.execute_script("return window.graftlmChat.history;") == []
    live_server.wait_idle()
    send(driver, question, 12)
    until(driver, "window.graftlmChat.finished === 3", "the reply in the new chat")
    assert shown_messages(driver) == [("user", question), ("assistant", expected)]
