"""The Gradio demo, launched as `adaptkit demo` in its own process: through gradio_client and in a real
headless Chromium (Debian's package, driven by Playwright; no browser download).

ADAPTKIT_DEMO_DIR=RUN_OR_EXPORT points the tests at a real model instead of the tiny run, and
ADAPTKIT_SCREENSHOT=PATH keeps the browser test's screenshot. The README's docs/demo.png comes from
ADAPTKIT_DEMO_DIR=exports/default-fp32 ADAPTKIT_SCREENSHOT=docs/demo.png pytest tests/test_demo.py -k browser
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import bomb_png, free_port

CHROMIUM = "/usr/bin/chromium"
EMPTY_ANSWER = "(no answer: the model ended its reply at once)"  # what app/demo.py shows for an empty reply
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def demo(tiny_run, tmp_path_factory):
    """``(url, model_dir, log_path)`` of a demo served by ``adaptkit demo`` in a subprocess."""
    model_dir = Path(os.environ.get("ADAPTKIT_DEMO_DIR", tiny_run))
    port = free_port()
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "adaptkit", "demo", str(model_dir), "--port", str(port), "--device", "cpu"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"adaptkit demo exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail(f"the demo did not answer on {url} within 240 s:\n{log_path.read_text()[-3000:]}")
    yield url, model_dir, log_path
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"the demo did not exit on SIGTERM within 20 s:\n{log_path.read_text()[-3000:]}")
    # Its example images were copied to a temp folder; a terminated demo removes it.
    logged = [line for line in log_path.read_text().splitlines() if "example images copied to" in line]
    assert logged, log_path.read_text()[-3000:]
    folder = Path(logged[-1].split("copied to ")[1].split(" (removed")[0])
    assert folder.name.startswith("adaptkit-demo-") and not folder.exists()
    # ... and so does the folder of its uploads (every image a client sent, the decompression bomb included).
    logged = [line for line in log_path.read_text().splitlines() if "uploads kept in" in line]
    assert logged, log_path.read_text()[-3000:]
    uploads = Path(logged[-1].split("kept in ")[1].split(" (removed")[0])
    assert uploads.name.startswith("adaptkit-demo-uploads-") and not uploads.exists()


def _sample(tiny_vqa):
    import json

    row = json.loads(tiny_vqa.read_text().splitlines()[1])
    return str(tiny_vqa.parent / row["image"]), row["question"]


def test_gradio_client_answers_and_rejects_non_images(demo, tiny_vqa, tmp_path):
    from gradio_client import Client, handle_file

    from adaptkit.inference import load_for_inference

    url, model_dir, log_path = demo
    image, question = _sample(tiny_vqa)
    client = Client(url, verbose=False, download_files=str(tmp_path))
    text, top = client.predict(handle_file(image), question, api_name="/answer")
    expected = load_for_inference(model_dir, "cpu").answer(image, question)
    assert text == (expected.text or EMPTY_ANSWER)
    assert top["label"] == expected.top[0][0]
    assert [c["label"] for c in top["confidences"]] == [a for a, _ in expected.top]

    fake = tmp_path / "holiday.png"  # an image name, not an image
    fake.write_text("this is a text file")
    text, top = client.predict(handle_file(str(fake)), question, api_name="/answer")
    assert text.startswith("This file is not an image I can read") and "holiday.png" in text
    assert not top  # the top-answers panel is cleared
    assert "Traceback" not in log_path.read_text()

    text, _ = client.predict(handle_file(image), "   ", api_name="/answer")
    assert text == "Type a question about the image."

    bomb = tmp_path / "bomb.png"  # 300 bytes that declare 12,000 x 12,000 pixels
    bomb_png(bomb)
    text, top = client.predict(handle_file(str(bomb)), question, api_name="/answer")
    assert text.startswith("This file is not an image I can read") and "decompression bomb" in text
    assert not top and "Traceback" not in log_path.read_text()


def test_demo_is_local_only_and_caps_uploads(demo, tmp_path):
    import httpx

    url, _, _ = demo
    assert url.startswith("http://127.0.0.1:")
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (11 * 1024 * 1024))  # over the 10 MB cap
    with big.open("rb") as handle:
        response = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", handle)}, timeout=60)
    assert response.status_code == 413
    config = httpx.get(f"{url}/config", timeout=30).json()
    assert config.get("share_url") in (None, "")


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no /usr/bin/chromium (.ci/run installs it)")
def test_browser_upload_ask_and_read_answer(demo, tiny_vqa, tmp_path):
    from playwright.sync_api import sync_playwright

    from adaptkit.inference import load_for_inference

    url, model_dir, _ = demo
    image, question = _sample(tiny_vqa)
    if os.environ.get("ADAPTKIT_DEMO_DIR"):
        image, question = _easyvqa_example()
    expected = load_for_inference(model_dir, "cpu").answer(image, question)
    shot = tmp_path / "demo.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url, wait_until="networkidle")
        page.locator("input[type=file]").first.set_input_files(image)
        page.get_by_label("Question").fill(question)
        page.get_by_role("button", name="Ask").click()
        answer_box = page.locator("#answer textarea")
        page.wait_for_function("el => el.value.length > 0", arg=answer_box.element_handle(), timeout=120_000)
        shown = answer_box.input_value()
        page.wait_for_timeout(500)  # let the confidence bars finish rendering
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shown == (expected.text or EMPTY_ANSWER)
    assert shot.stat().st_size > 10_000
    keep = os.environ.get("ADAPTKIT_SCREENSHOT")
    if keep:
        shutil.copy2(shot, keep)


def _easyvqa_example() -> tuple[str, str]:
    from adaptkit.data.formats import load_vqa

    sample = load_vqa("easyvqa:test").samples[3]
    return sample.image, sample.question
