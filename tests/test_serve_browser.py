"""The review page end to end in headless Chromium (Debian's chromium + chromium-driver):
load the page, upload a real image, see its overlay and score, mark the verdict "wrong", and
find that verdict in the CSV the page exports.

Skipped when Chromium or its driver is missing, unless PATCHCORE_REQUIRE_BROWSER=1 (set by CI,
which installs them), where that is a failure.
"""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from conftest import SHARED, TINY  # noqa: E402

from patchcore import PatchCore  # noqa: E402
from patchcore.data.images import IMAGE_SUFFIXES  # noqa: E402
from patchcore.data.synthetic import make_synthetic_dataset  # noqa: E402
from patchcore.serve import BackgroundServer, ServeOptions, Service, create_app  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
REQUIRED = os.environ.get("PATCHCORE_REQUIRE_BROWSER") == "1"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--window-size=1280,900")


def browser_or_skip() -> tuple[str, str]:
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not p]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    if missing:
        message = (f"{', '.join(missing)} not installed (apt-get install chromium "
                   "chromium-driver; pip install selenium)")
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM, DRIVER  # type: ignore[return-value]


def real_image(tmp_path: Path) -> Path:
    """An image from ../shared/data (magnetic_tile), or a generated one when it is absent."""
    folder = SHARED / "magnetic_tile" / "test"
    found = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES) \
        if folder.is_dir() else []
    if found:
        return found[0]
    make_synthetic_dataset(tmp_path / "img", categories=("tile",), n_train=1, n_test_good=0,
                           n_test_defect=1, size=96, seed=5)
    return sorted((tmp_path / "img").rglob("test/*/*.png"))[0]


@pytest.fixture
def driver(tmp_path):
    chromium, chromedriver = browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads), "download.prompt_for_download": False})
    browser = webdriver.Chrome(service=DriverService(executable_path=chromedriver),
                               options=options)
    browser.downloads = downloads
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


def wait_for(condition, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_review_page_upload_overlay_verdict_and_csv_export(driver, tmp_path):
    from selenium.webdriver.common.by import By

    make_synthetic_dataset(tmp_path / "data", categories=("carpet",), n_train=5, n_test_good=0,
                           n_test_defect=0, size=48, seed=2)
    PatchCore(**TINY).fit(tmp_path / "data" / "carpet").save(tmp_path / "results" / "models"
                                                              / "tile")
    image = real_image(tmp_path)
    service = Service(tmp_path / "results", ServeOptions(db=tmp_path / "reviews.sqlite"))
    with BackgroundServer(create_app(service)) as url:
        driver.get(url + "/")
        text = lambda i: driver.find_element(By.ID, i).text  # noqa: E731
        wait_for(lambda: text("status") == "ready", what="the page to load its models")
        assert driver.find_element(By.ID, "model").get_attribute("value") == "tile"

        driver.find_element(By.ID, "file-input").send_keys(str(image))
        overlay = driver.find_element(By.ID, "view-overlay")
        wait_for(lambda: overlay.get_attribute("data-loaded") == "yes"
                 and driver.execute_script("return arguments[0].naturalWidth", overlay) > 0,
                 what="the overlay to appear")
        assert driver.execute_script("return arguments[0].naturalWidth", overlay) == \
            Image.open(image).width
        score = float(text("view-score"))
        label = text("view-label")
        assert label in ("good", "anomalous")
        assert float(text("view-threshold")) > 0
        assert text("view-verdict") == "not reviewed"
        assert text("view-file") == image.stem

        slider = driver.find_element(By.ID, "opacity")
        driver.execute_script("arguments[0].value = 30; arguments[0].dispatchEvent("
                              "new Event('input'))", slider)
        assert float(overlay.value_of_css_property("opacity")) == pytest.approx(0.3)

        rows = driver.find_elements(By.CSS_SELECTOR, "#queue tbody tr")
        assert len(rows) == 1 and image.stem in rows[0].text

        driver.find_element(By.ID, "btn-wrong").click()
        wait_for(lambda: text("view-verdict").startswith("wrong"), what="the verdict")

        driver.find_element(By.ID, "export-csv").click()
        exported = driver.downloads / "reviews.csv"
        wait_for(exported.is_file, what="the CSV download")
        table = list(csv.DictReader(exported.open()))
    assert len(table) == 1
    row = table[0]
    flip = {"good": "anomalous", "anomalous": "good"}
    assert row["verdict"] == "wrong" and row["label"] == label
    assert row["true_label"] == flip[label] and row["filename"] == image.stem
    assert float(row["score"]) == pytest.approx(score, abs=1e-4)
