"""The status page (/ui) in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium) against the real gateway and a real worker: a worker
is listed and a running job's progress moves, without API keys and with them (no key: nothing
shown; a key: its own jobs only; an admin key: everyone's)."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.process]

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@pytest.fixture
def browser():
    """Headless Chromium; fails (does not skip) when it is not installed."""
    binary = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.fail("the status page test needs Chromium and its driver: "
                    "apt-get install -y chromium chromium-driver (scripts/setup.sh does this)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    os.environ.setdefault("SE_AVOID_STATS", "true")
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def wait_for(check, timeout: float = 60, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def job_finished(driver, job_id: str) -> int | None:
    """The finished count the page shows for the job (None while it is not listed)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#jobs tbody tr')]"
        ".map(r => [r.dataset.id, r.dataset.finished, r.dataset.total]);")
    for rid, finished, _ in rows:
        if rid == job_id:
            return int(finished)
    return None


def worker_names(driver) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll('#workers tbody tr[data-name]')]"
        ".map(r => r.dataset.name);")


def see_progress_move(driver, job_id: str, total: int, timeout: float = 90) -> list[int]:
    """Watch the page (no reload) until the job's finished count has changed while the job
    was not done yet; the values seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = job_finished(driver, job_id)
        if value is not None and (not seen or value != seen[-1]):
            seen.append(value)
        if len(seen) >= 2 and seen[-2] < total and seen[-1] > seen[-2] and seen[0] < total:
            return seen
        time.sleep(0.1)
    raise AssertionError(f"the page never showed job {job_id} move: {seen}")


def enter_key(driver, key: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "keysave").click()


def slow_job(http, n: int = 40, headers: dict | None = None) -> str:
    r = http.post("/v1/jobs", json=[{"prompt": f"Story {i}:", "max_new_tokens": 96}
                                    for i in range(n)], headers=headers or {})
    assert r.status_code == 202, r.text
    return r.json()["id"]


def test_status_page_shows_a_worker_and_a_job_moving_without_and_with_keys(
        gateway, start_worker, browser, tiny_model_dir, client):
    # one row at a time, so a job of 40 x 96 tokens takes tens of seconds on the tiny model
    start_worker(GENQ_MODEL=str(tiny_model_dir), GENQ_MAX_BATCH_SIZE="1")
    open_http = gateway()
    keyed_http = gateway(api_keys="alice:ka,bob:kb", admin_keys="root:kr")

    # -- no API keys: everything is shown ------------------------------------------------
    job = slow_job(open_http)
    browser.get(str(open_http.base_url) + "/ui")
    assert wait_for(lambda: "w1@test" in worker_names(browser), what="the worker")
    row = browser.execute_script(
        "return document.querySelector('#workers tr[data-name=\"w1@test\"]').innerText;")
    assert "cpu" in row and "transformers" in row, row
    seen = see_progress_move(browser, job, 40)
    assert seen[-1] > seen[0]
    assert "live" in browser.find_element("id", "state").text
    assert open_http.delete(f"/v1/jobs/{job}").status_code == 200  # leave the worker free
    # its finished rows stay succeeded: the job ends completed (cancelled if none had finished)
    wait_for(lambda: browser.execute_script(
        f"return document.querySelector('#jobs tr[data-id=\"{job}\"] td:nth-child(2)')"
        ".innerText;") in ("completed", "cancelled"), what="the job ended by its cancel")

    # -- a message the worker refuses shows in the recent failures, with its error code ---
    client.app.send_task("not.genq.generate", args=[{}], task_id="poison-1",
                         queue="genq.interactive")
    code = wait_for(lambda: browser.execute_script(
        "const r = document.querySelector('#failures tr[data-id=\"poison-1\"]');"
        "return r && r.children[1].innerText;"), what="the failure")
    assert code == "invalid_request"

    # -- a phone's width: the page itself never scrolls sideways (tables scroll inside) ---
    browser.set_window_size(390, 844)
    time.sleep(2)
    assert browser.execute_script(
        "return document.documentElement.scrollWidth <= window.innerWidth + 1;")
    browser.set_window_size(1280, 900)

    # -- with API keys: nothing without a key, a key's own jobs, an admin everyone's ------
    job = slow_job(keyed_http, headers={"Authorization": "Bearer ka"})  # alice's
    browser.get(str(keyed_http.base_url) + "/ui")
    wait_for(lambda: "API key" in browser.find_element("id", "state").text, what="asking a key")
    assert worker_names(browser) == []
    assert browser.execute_script("return sessionStorage.getItem('genq.apiKey');") is None

    enter_key(browser, "kb")  # bob sees the worker, not alice's job
    assert wait_for(lambda: "w1@test" in worker_names(browser), what="the worker for bob")
    assert "bob" in browser.find_element("id", "who").text
    time.sleep(2)
    assert job_finished(browser, job) is None
    assert browser.execute_script("return sessionStorage.getItem('genq.apiKey');") == "kb"

    enter_key(browser, "ka")  # alice sees her job move
    assert wait_for(lambda: "alice" in browser.find_element("id", "who").text, what="alice")
    see_progress_move(browser, job, 40)
    assert "w1@test" in worker_names(browser)

    enter_key(browser, "kr")  # the admin sees it too, with its owner
    assert wait_for(lambda: "admin" in browser.find_element("id", "who").text, what="admin")
    see_progress_move(browser, job, 40)
    owner = browser.execute_script(
        f"return document.querySelector('#jobs tr[data-id=\"{job}\"] td').title;")
    assert owner == "owner: alice"

    browser.find_element("id", "keyforget").click()  # forgotten: asked again, nothing shown
    wait_for(lambda: "API key" in browser.find_element("id", "state").text, what="key forgotten")
    assert keyed_http.delete(f"/v1/jobs/{job}",
                             headers={"Authorization": "Bearer ka"}).status_code == 200


def test_the_page_says_why_the_overview_cannot_be_read(gateway, browser):
    """A 503 (Redis down) shows its message (genqueue's ``detail`` is a list of ``msg``), not
    ``[object Object]``; the page says it was not updated."""
    http = gateway()
    browser.get(str(http.base_url) + "/ui")
    wait_for(lambda: "live" in browser.find_element("id", "state").text, what="a first overview")
    browser.execute_script("""
        window.fetch = async () => new Response(JSON.stringify({code: "unavailable", detail: [
            {loc: [], msg: "Redis is unavailable: retry later", type: "unavailable"}]}),
            {status: 503, headers: {"content-type": "application/json"}});
        refresh();""")
    shown = wait_for(lambda: browser.find_element("id", "error").text, what="the error")
    assert shown == "cannot read the overview: HTTP 503: Redis is unavailable: retry later"
    assert browser.find_element("id", "state").text == "not updated"
