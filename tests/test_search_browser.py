"""`mlx-aim search serve` in a real browser: headless Chromium driven by Selenium types a query, sees the grid of
thumbnails with their scores, and follows "more like this". Debian's `chromium` and `chromium-driver` (`.ci/run`
installs them on Linux); MLX_AIM_CHROMIUM and MLX_AIM_CHROMEDRIVER name other binaries. The test skips where they
are absent, and fails instead when MLX_AIM_REQUIRE_BROWSER=1 (CI). MLX_AIM_SCREENSHOT=PATH saves the page after the
text query (docs/search-serve.png)."""

import io
import os
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from mlx_aim.apps.search_server import SearchService, make_server
from mlx_aim.data import preprocessing_for
from mlx_aim.data.synthetic import SyntheticShapes
from mlx_aim.tasks.search import SearchIndex, build_index

NUM_PHOTOS = 24


def browser_binaries():
    """(chromium, chromedriver, selenium's webdriver module), or a pytest skip, or a failure under
    MLX_AIM_REQUIRE_BROWSER=1, naming what is missing."""
    chromium = os.environ.get("MLX_AIM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("MLX_AIM_CHROMEDRIVER") or shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver), ("selenium", webdriver))
               if not found]
    if missing:
        message = f"the browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver; pip " \
                  "install selenium)"
        if os.environ.get("MLX_AIM_REQUIRE_BROWSER") == "1":
            pytest.fail(message + ", and MLX_AIM_REQUIRE_BROWSER=1 requires it")
        pytest.skip(message)
    return chromium, driver, webdriver


def save_screenshot(png: bytes, path: Path) -> None:
    """The page as a 256-colour PNG (the generated photos' noise makes a full-colour one four times larger)."""
    with Image.open(io.BytesIO(png)) as shot:
        path.parent.mkdir(parents=True, exist_ok=True)
        shot.convert("RGB").quantize(256, dither=Image.Dither.NONE).save(path, optimize=True)


@pytest.fixture
def browser():
    chromium, driver_path, webdriver = browser_binaries()
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver's path too: Selenium Manager never looks anything up
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1180,860", "--hide-scrollbars", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    yield driver
    driver.quit()


def test_type_a_query_see_the_grid_and_follow_more_like_this(browser, lit, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    photos = tmp_path / "photos"
    photos.mkdir()
    shapes = SyntheticShapes(NUM_PHOTOS, image_size=160, seed=7)
    for i in range(NUM_PHOTOS):
        shapes[i][0].save(photos / f"IMG_{1000 + i}.png")
    model, tokenizer = lit
    build_index(model, [photos], tmp_path / "index", model_name="tiny-lit", progress=False)
    service = SearchService(tmp_path / "index", lambda _: (model, tokenizer, preprocessing_for(model.config.image)),
                            "tiny-lit")
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    wait = WebDriverWait(browser, 20)
    try:
        browser.get(server.url)
        box = browser.find_element(By.ID, "q")
        box.send_keys("a red disc + 0.5:stripes - a photo of text", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".hit")) == NUM_PHOTOS)
        wait.until(lambda d: all(d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img)
                                 for img in d.find_elements(By.CSS_SELECTOR, ".hit img")))
        scores = [float(e.text.split()[-1]) for e in browser.find_elements(By.CSS_SELECTOR, ".hit .score")]
        assert scores == sorted(scores, reverse=True) and len(set(scores)) > 1
        assert f"{NUM_PHOTOS} of {NUM_PHOTOS} photos" in browser.find_element(By.ID, "status").text
        index = SearchIndex.open(tmp_path / "index")
        links = [a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, ".hit a.photo")]
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".hit .name")]
        rows = [int(link.rsplit("/", 1)[1]) for link in links]
        assert [os.path.basename(index.row_path(r)) for r in rows] == names
        if os.environ.get("MLX_AIM_SCREENSHOT"):
            save_screenshot(browser.get_screenshot_as_png(), Path(os.environ["MLX_AIM_SCREENSHOT"]))

        third = browser.find_elements(By.CSS_SELECTOR, ".hit")[2]
        third.find_element(By.CSS_SELECTOR, "button.more").click()
        wait.until(lambda d: d.find_element(By.ID, "q").get_attribute("value") == f"#{rows[2]}")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".hit a.photo").get_attribute("href").endswith(
            f"/photo/{rows[2]}"))
        first = browser.find_element(By.CSS_SELECTOR, ".hit .score").text
        assert first.endswith("1.000"), first  # the photo itself comes first, with cosine 1
        # Its full photo opens from the grid: the indexed file's bytes.
        browser.get(browser.find_element(By.CSS_SELECTOR, ".hit a.photo").get_attribute("href"))
        assert browser.execute_script("return document.images[0].naturalWidth") == 160
        # The address keeps the query: back goes to the text query's grid.
        browser.back()
        browser.back()
        wait.until(lambda d: d.find_element(By.ID, "q").get_attribute("value").startswith("a red disc"))
    finally:
        server.shutdown()
        server.server_close()
