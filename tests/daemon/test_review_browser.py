"""The review page in a real headless Chromium (Debian's chromium + chromium-driver, Selenium):
sign in, open the worklist, open the flagged case, resolve it, see it leave the open list."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from pacs_sentinel.daemon.config import parse_config
from pacs_sentinel.daemon.jobs import FINISHED_STATES
from pacs_sentinel.daemon.review import ReviewStatus
from pacs_sentinel.daemon.web import TOKEN_ENV
from pacs_sentinel.dicom_io.scu import Peer, send_files
from pacs_sentinel.inference.phantoms import make_ct_phantom, write_ct_series
from tests.conftest import free_port, require_program
from tests.daemon.conftest import make_config

TOKEN = "browser-test-token"


@pytest.fixture
def chromium() -> Iterator:  # type: ignore[type-arg]
    """A headless Chromium driven through chromedriver (both from Debian packages)."""
    browser = require_program("/usr/bin/chromium", "chromium")
    driver_path = require_program("/usr/bin/chromedriver", "chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1024"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_resolve_a_flagged_case_in_the_browser(tmp_path: Path, pacs, sentinel_factory, chromium,  # type: ignore[no-untyped-def]
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv(TOKEN_ENV, TOKEN)  # the token from the environment, as an operator would set it
    config = make_config(tmp_path, pacs.port).model_dump(mode="json")
    config["review"] = {"viewer_url": "https://viewer.example.org/view?study={StudyInstanceUID}",
                        "web": {"enabled": True, "port": free_port()}}
    sentinel = sentinel_factory(parse_config(config))
    flagged = write_ct_series(make_ct_phantom(8, variant="metal-artifact"), tmp_path / "metal", seed=8)
    assert all(r.delivered for r in send_files(flagged, Peer("SENTINEL", "127.0.0.1", sentinel.scp.port)))
    study_uid = str(pydicom.dcmread(flagged[0]).StudyInstanceUID)
    deadline = time.monotonic() + 180
    while not (sentinel.jobs.jobs() and all(j.state in FINISHED_STATES for j in sentinel.jobs.jobs())):
        assert time.monotonic() < deadline, sentinel.jobs.jobs()
        time.sleep(0.2)
    item = sentinel.review.find(study_uid, "organ-seg")
    assert item is not None and item.status is ReviewStatus.OPEN
    base = f"http://127.0.0.1:{sentinel.web.port}"

    # Without the token: the sign-in page.
    chromium.get(base + "/")
    assert chromium.find_elements(By.ID, "token"), chromium.page_source
    chromium.find_element(By.ID, "token").send_keys(TOKEN)
    chromium.find_element(By.ID, "sign-in").click()
    wait = WebDriverWait(chromium, 20)  # a click submits a form; the next page loads after it returns

    # The worklist, with the flagged study.
    wait.until(ec.presence_of_element_located((By.ID, "worklist")))
    rows = chromium.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    assert [r.get_attribute("data-item") for r in rows] == [str(item.id)]
    assert study_uid in rows[0].text
    rows[0].find_element(By.LINK_TEXT, f"#{item.id}").click()
    wait.until(ec.presence_of_element_located((By.ID, "score")))

    # The case: score, reasons in words, the overlay image loaded, the viewer link.
    assert chromium.find_element(By.ID, "score").text == f"{item.quality_score:.2f}"
    reasons = chromium.find_element(By.ID, "reasons").text
    for reason in item.reasons:
        assert f"{reason}: " in reasons
    image = chromium.find_element(By.CSS_SELECTOR, "img.overlay")
    wait.until(lambda driver: driver.execute_script("return arguments[0].complete", image))
    assert chromium.execute_script("return arguments[0].naturalWidth", image) > 0  # the PNG loaded
    assert chromium.find_element(By.ID, "viewer").get_attribute("href") == \
        f"https://viewer.example.org/view?study={study_uid}"

    # Resolve it.
    chromium.find_element(By.ID, "reviewer").send_keys("dr-browser")
    chromium.find_element(By.ID, "decision-ai-rejected").click()
    chromium.find_element(By.ID, "comments").send_keys("metal streaks over the liver")
    chromium.find_element(By.ID, "resolve").click()

    # Back on the open list, which no longer has it.
    wait.until(ec.url_to_be(base + "/"))
    wait.until(ec.presence_of_element_located((By.ID, "empty")))
    assert chromium.find_elements(By.ID, "empty") and not chromium.find_elements(By.CSS_SELECTOR, "#worklist")
    chromium.get(base + "/?status=resolved")  # get() returns once the page has loaded
    resolved_rows = chromium.find_elements(By.CSS_SELECTOR, "#worklist tbody tr")
    assert len(resolved_rows) == 1 and "ai-rejected" in resolved_rows[0].text and "dr-browser" in resolved_rows[0].text
    stored = sentinel.review.get(item.id)
    assert (stored.status, stored.decision.value, stored.reviewer, stored.comments) == \
        (ReviewStatus.RESOLVED, "ai-rejected", "dr-browser", "metal streaks over the liver")
