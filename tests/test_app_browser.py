"""End to end: `qilin-med-vl app` in a real browser (headless Debian Chromium, driven by Playwright's Python API).

The app serves a tiny Qilin-Med-VL with a HiA adapter on 127.0.0.1. The test uploads the shipped before/after pair,
picks the comparison preset, sends it, and waits until the page shows the answer the same model gives when called
directly in this test, and two heatmaps; then it checks bad input, that the page asked for nothing beyond
127.0.0.1, and that the upload folder is gone when the server stops. A screenshot is written to the test's output
folder (and also to $QILIN_APP_SCREENSHOT when set).

QILIN_APP_E2E_MODEL=demo runs the same test on the embedded demo model instead (it must be installed; its answer
must then also contain Chinese characters), e.g. to refresh the README's screenshot:
    QILIN_APP_E2E_MODEL=demo QILIN_APP_SCREENSHOT=docs/app-screenshot.png python -m pytest tests/test_app_browser.py

Chromium must be at /usr/bin/chromium (Debian's `chromium` package; `.ci/run` installs it) or $QILIN_CHROMIUM.
Playwright's own browser download is not used. A missing browser fails the test, it does not skip it.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

from qilin_med_vl.app.prompts import preset_prompt
from qilin_med_vl.demo import DEMO_EXAMPLES_DIR, DEMO_MODEL_DIR, demo_model_available, generate_report
from qilin_med_vl.loading import load_model_and_processor
from qilin_med_vl.modeling.configuration_hia import HiAConfig
from qilin_med_vl.processing.image_loading_qilin import load_image
from qilin_med_vl.testing import random_image, tiny_model, tiny_processor

CHROMIUM = os.environ.get("QILIN_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MAX_NEW_TOKENS = 24
TIMEOUT_MS = 30_000


def _require_browser():
    if not os.path.isfile(CHROMIUM) or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium), as "
                    ".ci/run does, or point QILIN_CHROMIUM at a Chromium binary", pytrace=False)
    try:
        import gradio  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as error:
        pytest.fail(f"{error.name} is missing: pip install 'qilin-med-vl[app,dev]' (playwright, gradio)",
                    pytrace=False)


USE_DEMO_MODEL = os.environ.get("QILIN_APP_E2E_MODEL") == "demo"


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    if USE_DEMO_MODEL:
        if not demo_model_available():
            pytest.fail("QILIN_APP_E2E_MODEL=demo but the embedded demo model is not installed", pytrace=False)
        return DEMO_MODEL_DIR
    folder = tmp_path_factory.mktemp("app-browser-model")
    tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    get_peft_model(tiny_model(), HiAConfig(num_queries=8, num_heads=4, encoder_depths=[1, 1], encoder_width=8,
                                           high_res_size=56)).save_pretrained(folder / "hia")
    return folder


@pytest.fixture(scope="module")
def example_pair(tmp_path_factory):
    """The shipped before/after pair (`qilin_med_vl/demo_model/examples/`)."""
    pair = [DEMO_EXAMPLES_DIR / "before.png", DEMO_EXAMPLES_DIR / "after.png"]
    if not all(path.is_file() for path in pair):  # an installation without the demo examples
        folder = tmp_path_factory.mktemp("pair")
        pair = [folder / "before.png", folder / "after.png"]
        random_image(0, size=(96, 128)).save(pair[0])
        random_image(1, size=(96, 128)).save(pair[1])
    return pair


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, model_folder, log_path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        env.pop("GRADIO_TEMP_DIR", None)
        self.log = open(log_path, "w", encoding="utf-8")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qilin_med_vl.cli", "app", "--model", str(model_folder), "--host", "127.0.0.1",
             "--port", str(self.port), "--max-new-tokens", str(MAX_NEW_TOKENS)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return Path(self.log_path).read_text(encoding="utf-8", errors="replace")

    def wait_until_up(self, timeout=300):  # generous: a busy CI machine can take minutes to import gradio
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the app exited with {self.process.returncode}:\n{self.output()[-3000:]}", pytrace=False)
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        pytest.fail(f"the app did not answer on {self.url} within {timeout} s:\n{self.output()[-3000:]}",
                    pytrace=False)

    @property
    def upload_dir(self) -> Path:
        found = re.search(r"^uploads: (\S+)", self.output(), re.MULTILINE)
        assert found, self.output()
        return Path(found.group(1))

    def stop(self, sig=signal.SIGTERM, timeout=20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(model_folder, tmp_path_factory):
    _require_browser()
    server = Server(model_folder, tmp_path_factory.mktemp("app-server") / "server.log")
    try:
        yield server  # still starting: the browser starts meanwhile
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser_page(server):
    from playwright.sync_api import sync_playwright

    outside = []
    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        context.set_default_timeout(TIMEOUT_MS)
        page = context.new_page()
        server.wait_until_up()
        page.on("request", lambda request: outside.append(request.url)
                if not request.url.startswith((server.url, "data:", "blob:")) else None)
        page.goto(server.url)
        page.wait_for_selector("#send")
        page.outside_requests = outside
        yield page
        context.close()


def fresh(page):
    """A new visit: an empty page and a new session."""
    page.goto(page.url)
    page.wait_for_selector("#send")
    return page


def _compact(text: str) -> str:
    return re.sub(r"\s+", "", text)


def test_comparison_of_the_example_pair_streams_the_answer_and_two_heatmaps(
        server, browser_page, model_folder, example_pair, tmp_path):
    page = browser_page
    question = preset_prompt("comparison", 2, "zh")
    model, processor = load_model_and_processor(str(model_folder), "hia")
    torch.manual_seed(0)
    expected = generate_report(model, processor, [load_image(path) for path in example_pair], question,
                               MAX_NEW_TOKENS)
    assert expected.strip()
    if USE_DEMO_MODEL:
        assert re.search(r"[\u4e00-\u9fff]", expected), expected

    assert "不可用于临床" in page.locator("#notice").inner_text()
    page.locator("#upload input[type=file]").set_input_files([str(path) for path in example_pair])
    page.wait_for_function("document.querySelectorAll('#thumbnails img').length === 2")
    thumbnails = page.locator("#thumbnails").inner_text()
    assert "第一张" in thumbnails and "第二张" in thumbnails and "before.png" in thumbnails
    page.locator("#preset").get_by_text("前后对比").click()
    page.wait_for_function("q => document.querySelector('#prompt textarea').value === q", arg=question)
    page.locator("#send").click()
    page.wait_for_function(
        "expected => (document.querySelector('#chat')?.innerText || '').replace(/\\s+/g, '').includes(expected)",
        arg=_compact(expected))
    page.wait_for_function("document.querySelectorAll('#heatmaps img').length === 2")
    page.wait_for_function("document.querySelector('#status').innerText.includes('done')")
    heatmap_captions = page.locator("#heatmaps").inner_text()
    assert "第一张 · Image 1 · HiA" in heatmap_captions and "第二张 · Image 2 · HiA" in heatmap_captions
    # Uploads land in the app's own temporary folder.
    assert {"before.png", "after.png"} <= {path.name for path in server.upload_dir.rglob("*.png")}

    page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'app.png'}")
    if os.environ.get("QILIN_APP_SCREENSHOT"):
        shutil.copyfile(tmp_path / "app.png", os.environ["QILIN_APP_SCREENSHOT"])


def test_follow_up_question_and_hia_off(browser_page):
    page = browser_page
    page.locator("#hia-switch input").uncheck()
    page.locator("#prompt textarea").fill("第二张呢？")
    page.locator("#send").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('HiA off')")
    assert page.locator("#chat").inner_text().count("第二张呢？") == 1
    assert page.locator("#heatmaps img").count() == 0
    page.locator("#hia-switch input").check()


def test_two_visitors_at_once_both_get_answers(browser_page, example_pair):
    """The shared model serves one request at a time; the second visitor's request waits in the queue."""
    pages = [fresh(browser_page), browser_page.context.new_page()]
    pages[1].goto(browser_page.url)
    for page in pages:
        page.locator("#upload input[type=file]").set_input_files([str(path) for path in example_pair])
        page.wait_for_function("document.querySelectorAll('#thumbnails img').length === 2")
        page.locator("#prompt textarea").fill("请描述第一张图片的影像表现。")
    for page in pages:
        page.locator("#send").click()
    for page in pages:
        page.wait_for_function("document.querySelector('#status').innerText.includes('done')")
        assert page.locator("#heatmaps img").count() == 2
    pages[1].close()


def test_bad_input_is_a_message_in_the_page(browser_page, example_pair, tmp_path):
    page = fresh(browser_page)
    broken = tmp_path / "scan.dcm"
    broken.write_bytes(b"\x00" * 400)
    page.locator("#upload input[type=file]").set_input_files([str(broken)])
    page.wait_for_function("document.querySelector('#status').innerText.includes('Cannot read scan.dcm')")
    fresh(page).locator("#upload input[type=file]").set_input_files([str(example_pair[0])] * 5)
    page.wait_for_function("document.querySelector('#status').innerText.includes('At most 4 images')")
    page.locator("#send").click()
    page.wait_for_function("document.querySelector('#status').innerText.includes('At most 4 images')")
    assert "Traceback" not in page.content()


def test_the_page_reached_only_the_app(browser_page):
    assert browser_page.outside_requests == []


def test_stopping_the_server_removes_the_uploads(server, browser_page):
    browser_page.close()
    upload_dir = server.upload_dir
    assert upload_dir.is_dir()
    server.stop(signal.SIGTERM)
    output = server.output()
    assert not upload_dir.exists(), output[-2000:]
    assert "server stopped; uploads removed" in output and "Traceback" not in output, output[-3000:]
