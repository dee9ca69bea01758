"""Screenshots of the demo's two tabs for the README, taken as a person would see them (`make screenshots`).

    python scripts/demo_screenshots.py --adapter results/model_checkpoints/final --output_dir results/plots

Starts `loraqa demo` on a free port, opens it in headless Chromium (Debian's chromium + chromium-driver, as
the browser test), answers the first prefilled dev question on the Ask tab, opens the first question that
the adapter answers right and the untuned model wrong on the Errors tab (its default evaluation files), and
saves `demo_ask.png` and `demo_errors.png`.
"""
import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from loraqa.data.assets import squad_file
from loraqa.config import default_cache_dir
from loraqa.app.demo import dev_examples
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def start_demo(model: str, adapter: str, log) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "loraqa.cli", "demo", "--model", model, "--adapter", adapter,
                                "--port", str(port), "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 300
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"`loraqa demo` did not start; its log: {log.name}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except OSError:
            time.sleep(0.5)


def chromium(width: int) -> webdriver.Chrome:
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if not binary or not driver_path:
        raise SystemExit("needs chromium and chromedriver (Debian: apt-get install chromium chromium-driver)")
    options = Options()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                 "--disable-background-networking", f"--user-data-dir={tempfile.mkdtemp(prefix='loraqa-shots-')}",
                 f"--window-size={width},1200"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(driver_path))


def full_page(driver, width: int, path: Path) -> None:
    """Grow the window to the page's height, so that one screenshot holds the whole tab."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, height + 40)
    time.sleep(1)
    driver.save_screenshot(str(path))
    driver.set_window_size(width, 1200)
    print(f"written: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--output_dir", default="results/plots")
    parser.add_argument("--width", type=int, default=1400)
    args = parser.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = tempfile.NamedTemporaryFile("w+", prefix="loraqa-demo-", suffix=".log", delete=False)
    process, url = start_demo(args.model, args.adapter, log)
    driver = chromium(args.width)
    wait = WebDriverWait(driver, 300, poll_frequency=0.5)
    try:
        driver.get(url)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ask-context textarea").is_displayed())
        # the first prefilled dev example (the demo's own list), answered with the default (greedy) settings
        question = dev_examples(squad_file("squad", "validation", default_cache_dir()))[0][1]
        start = question[:40]  # the examples table cuts long cells with "..."
        example = f"//button[contains(., {start!r})] | //td[contains(., {start!r})]"
        wait.until(lambda d: d.find_elements(By.XPATH, example))
        driver.find_element(By.XPATH, example).click()
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ask-question textarea").get_property("value") == question)
        driver.find_element(By.CSS_SELECTOR, "#ask-button").click()
        wait.until(lambda d: "Answered (" in d.find_element(By.CSS_SELECTOR, "#ask-status").text)
        full_page(driver, args.width, out / "demo_ask.png")

        driver.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Errors')]").click()
        wait.until(lambda d: "questions." in d.find_element(By.CSS_SELECTOR, "#errors-status").text)
        driver.find_element(By.XPATH, "//*[@id='errors-comparison']//label[contains(., 'A right, B wrong')]").click()
        time.sleep(2)
        cell = "#errors-table [role=row] [role=gridcell][data-col='1']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, cell))
        driver.find_elements(By.CSS_SELECTOR, cell)[0].click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#errors-detail mark"))
        full_page(driver, args.width, out / "demo_errors.png")
    finally:
        driver.quit()
        process.terminate()
        process.wait(timeout=30)


if __name__ == "__main__":
    main()
