"""The page in headless Chromium (Debian's chromium and chromium-driver, driven by selenium; nothing is
downloaded: the driver's path is given, so Selenium Manager does not run). Load it, upload a demo clip, wait
for the label, check it against /v1/emotion, save a screenshot."""

import os
import shutil

import numpy as np
import pytest
from serve_helpers import API_KEY

CHROMEDRIVER, CHROMIUM = "/usr/bin/chromedriver", "/usr/bin/chromium"
# CI installs both (.ci/run): there a missing browser fails the test instead of skipping it.
pytestmark = pytest.mark.skipif(not os.environ.get("CI") and not (os.path.exists(CHROMEDRIVER)
                                                                  and os.path.exists(CHROMIUM)),
                                reason="needs Debian's chromium and chromium-driver")


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_page_labels_a_dropped_clip_like_the_api(running, client, media_root, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(running.url + "/")
    assert "emoqwen" in browser.title
    browser.find_element(By.ID, "apikey").send_keys(API_KEY)
    browser.find_element(By.ID, "file").send_keys(str(media_root / "clip.mp4"))
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "failed", "4", "5"))
               or d.find_element(By.ID, "status").get_attribute("class") == "error")
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("done"), status
    label = browser.find_element(By.ID, "label").text
    api = client.post("/v1/emotion", json={"video": f"file://{media_root}/clip.mp4"}).json()
    assert label == api["label"]
    bars = browser.find_elements(By.CSS_SELECTOR, "#scores .bar")
    shown = {b.get_attribute("data-label"): float(b.find_elements(By.TAG_NAME, "span")[-1].text) for b in bars}
    assert list(shown) == list(api["scores"])
    np.testing.assert_allclose(list(shown.values()), list(api["scores"].values()), atol=1e-3)  # shown as 0.xxx
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#frames canvas")) == len(api["frames"]))
    api_timeline = client.post("/v1/emotion", json={"video": f"file://{media_root}/clip.mp4",
                                                     "gate_timeline": True}).json()["gate_timeline"]
    moments = browser.find_elements(By.CSS_SELECTOR, "#gates .gate.moment")
    assert len(moments) == len(api_timeline["weights"]) == 2
    shown_at = [float(m.find_element(By.TAG_NAME, "span").text.removesuffix(" s")) for m in moments]
    np.testing.assert_allclose(shown_at, api_timeline["times"], atol=0.005 + 1e-9)  # shown with 2 decimals
    assert len(browser.find_elements(By.CSS_SELECTOR, "#gates .gate:not(.moment)")) == len(api["gate_weights"])
    assert browser.find_element(By.ID, "description").text.strip()
    shot = tmp_path / "page.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("EMOQWEN_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shot, os.environ["EMOQWEN_SCREENSHOT"])
