"""The chat page in a real headless browser (Debian's chromium driven by playwright): pick an image, ask, watch the
answer stream in; the page shows the model's layers, tokens/s and cache in use."""

import os
import shutil
from pathlib import Path

import pytest

from .conftest import image_message, scene_png

CHROMIUM = os.environ.get("MATVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "serve_page.png"

sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no chromium at {CHROMIUM}: apt-get install chromium (CI does), or set MATVLM_CHROMIUM")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def test_page_asks_about_an_image_and_streams_the_answer(hybrid_server, client, browser, tmp_path):
    image = tmp_path / "shapes.png"
    image.write_bytes(scene_png(2))
    expected = client.post(f"{hybrid_server.url}/v1/chat/completions", json={
        "messages": [image_message("Describe the image.", scene_png(2))], "temperature": 0, "max_tokens": 128,
    }).json()["choices"][0]["message"]["content"]

    page = browser.new_page(viewport={"width": 820, "height": 560})
    page.set_default_timeout(60_000)
    page.goto(hybrid_server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("mixer layers 0, 2, 4, 6")
    sync_api.expect(page.locator("#stats")).to_contain_text("cache in use")
    page.set_input_files("#image", str(image))
    page.wait_for_function("document.getElementById('preview').src.startsWith('data:image/png')")
    page.fill("#question", "Describe the image.")
    page.click("#ask")
    sync_api.expect(page.locator("#speed")).to_contain_text("tokens/s")
    assert page.locator("#answer").inner_text().strip() == expected.strip()
    assert "error" not in (page.locator("#answer").get_attribute("class") or "")
    if os.environ.get("MATVLM_WRITE_SCREENSHOT"):
        page.screenshot(path=str(SCREENSHOT))
    page.close()


def test_page_shows_a_refusal(teacher_server, browser):
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(teacher_server.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("teacher: 8 attention layers")
    page.fill("#question", "hi " * 400)  # longer than the 256-token cache
    page.click("#ask")
    sync_api.expect(page.locator("#answer")).to_contain_text("cache holds 256")
    page.close()
