"""Driving the attribution page in the operating system's headless Chromium with Selenium (for the browser test
and for benchmarks/app_page.py). Needs `chromium` and `chromium-driver` (Debian) on the PATH."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import time

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def browser_missing() -> str | None:
    """Why no browser test can run here, or ``None`` when Chromium, its driver and Selenium are all available."""
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed"
    if not any(shutil.which(name) for name in CHROMIUM_NAMES):
        return "no Chromium on the PATH (apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver on the PATH (apt-get install chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chromium(width: int = 1400, height: int = 1600):
    """A headless Chromium driven through the system's chromedriver (Selenium Manager is never asked to download
    anything)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = next(shutil.which(name) for name in CHROMIUM_NAMES if shutil.which(name))
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def attribute_on_page(driver, url: str, prompt: str | None, top_k: int, exact: bool = False,
                      timeout: float = 120.0) -> float:
    """Opens the page, types ``prompt`` (when the page takes one), sets top-k and the exact toggle, clicks
    "Generate and attribute" and waits until the gallery shows ``top_k`` images and the table ``top_k`` rows.
    Returns the seconds from the click to then."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as conditions
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    button = wait.until(conditions.element_to_be_clickable((By.ID, "dmin-generate")))
    if prompt is not None:
        box = driver.find_element(By.CSS_SELECTOR, "#dmin-prompt textarea")
        box.clear()
        box.send_keys(prompt)
    number = driver.find_element(By.CSS_SELECTOR, "#dmin-top-k input[type=number]")
    number.send_keys(Keys.CONTROL, "a")
    number.send_keys(str(top_k), Keys.TAB)
    toggle = driver.find_element(By.CSS_SELECTOR, "#dmin-exact input[type=checkbox]")
    if toggle.is_selected() != exact:
        toggle.click()
    start = time.perf_counter()
    button.click()

    def shown(driver) -> bool:
        images = driver.find_elements(By.CSS_SELECTOR, "#dmin-gallery .thumbnail-item img")
        rows = driver.find_elements(By.CSS_SELECTOR, "#dmin-rows table tbody tr")
        return len(images) == top_k and len(rows) == top_k

    wait.until(shown)
    return time.perf_counter() - start
