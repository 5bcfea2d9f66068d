"""The attribution page end to end in a real browser: the operating system's headless Chromium, driven by Selenium,
loads the page, submits a prompt, and k training images and their captions appear; a screenshot is written.

CI installs Chromium and its driver (`.ci/run`) and sets DMIN_REQUIRE_BROWSER=1, so there the test fails rather
than skips when the browser is missing."""

import os
import time

import pytest

import dmin_diffusers as dm
from browser import attribute_on_page, browser_missing, chromium, free_port
from dmin_diffusers.app import build_app
from tiny_models import make_caption_dataset, tiny_pipeline

TOP_K = 4


@pytest.fixture
def page_url(tmp_path):
    missing = browser_missing()
    if missing:
        if os.environ.get("DMIN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"the browser test must run here: {missing}")
        pytest.skip(missing)
    pipe = tiny_pipeline("stable-diffusion", pipeline_class=dm.DMinStableDiffusionPipeline, lora_rank=4)
    data = make_caption_dataset(8)
    pipe.build_attribution_index(data, tmp_path / "index", config=dm.DMinConfig(num_timesteps=3, projection_dim=256),
                                 progress=False)
    demo = build_app(pipe, num_inference_steps=2)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", data
    finally:
        demo.close()


def test_the_page_in_headless_chromium(page_url, tmp_path):
    from selenium.webdriver.common.by import By

    url, data = page_url
    start = time.perf_counter()
    driver = chromium()
    try:
        seconds = attribute_on_page(driver, url, "a red circle on the left", TOP_K)
        rows = driver.find_element(By.ID, "dmin-rows").text
        captions = [line for line in data["text"] if line in rows]
        assert len(captions) == TOP_K, rows  # each shown row with its own caption
        labels = driver.find_element(By.ID, "dmin-gallery").text
        assert labels.count("#") >= TOP_K and "row" in labels
        assert f"top-{TOP_K} of 8 rows" in driver.find_element(By.ID, "dmin-status").text
        assert driver.find_element(By.CSS_SELECTOR, "#dmin-chart img").get_attribute("src")
        screenshot = tmp_path / "page.png"
        assert driver.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    finally:
        driver.quit()
    print(f"browser test: submit to gallery {seconds:.2f} s, whole test {time.perf_counter() - start:.1f} s")
