"""The web UI in a real browser: Debian's chromium, headless, driven by playwright, against a real
`bagel serve` (UI mounted at /ui, API key on) with the tiny golden checkpoint."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from test_serve_support import INPUT_IMAGE, ServerProcess, png_bytes

pytest.importorskip("gradio", reason="the web UI needs the 'ui' extra (gradio)")
try:
    from playwright import sync_api
except ImportError:
    sync_api = None

CHROMIUM = os.environ.get("BAGEL_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
KEY = "ui-key"

needs_chromium = pytest.mark.skipif(
    sync_api is None or not os.path.exists(CHROMIUM),
    reason=(f"no chromium at {CHROMIUM}: install Debian's package (apt-get install chromium) to run the browser test"
            if sync_api is not None else "the playwright package is not installed (pip install playwright; no "
            "browser download needed, the test drives Debian's chromium)"),
)


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess("--api-key", KEY, "--log-level", "warning")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def page(server, browser):
    pg = browser.new_page(viewport={"width": 1400, "height": 1600})
    pg.set_default_timeout(30_000)
    pg.goto(server.base_url + "/ui/")
    # --api-key also guards the UI: any user name, the key as the password
    pg.fill("input[type=password]", KEY)
    pg.locator("input[type=text]").first.fill("tester")
    pg.click("button:has-text('Login')")
    pg.wait_for_selector("#t2i-run")
    yield pg
    pg.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _open_settings(page, tab: str) -> None:
    page.locator(f"#tab-{tab} button:has-text('Image generation settings')").click()


def _image_size(page, elem_id: str) -> list[int]:
    """The size of the picture shown in ``elem_id``, read in the same check that finds it loaded (gradio may
    swap the <img> element between two separate calls, and a fresh one reads 0 x 0)."""
    handle = page.wait_for_function(f"() => {{ const i = document.querySelector('#{elem_id} img');"
                                    " return i && i.complete && i.naturalWidth > 0"
                                    " ? [i.naturalWidth, i.naturalHeight] : null; }")
    return handle.json_value()


def test_ui_is_mounted_and_guarded(server):
    r = httpx.get(server.base_url + "/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"] == "/ui/"
    assert httpx.get(server.base_url + "/health").status_code == 200
    # the UI's own API is behind the login too
    assert httpx.get(server.base_url + "/ui/config").status_code in (401, 403)


def test_every_ui_route_needs_the_login_and_no_other_origin_is_served(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        assert c.get("/ui/gradio_api/startup-events").status_code == 401  # gradio itself leaves it open
        assert c.post("/ui/gradio_api/cancel", json={}).status_code == 401
        assert c.post("/ui/login", data={"username": "u", "password": "wrong"}).status_code >= 400
        assert c.post("/ui/login", data={"username": "u", "password": KEY}).status_code == 200
        assert c.get("/ui/gradio_api/startup-events").status_code == 200
        assert c.get("/ui/config").status_code == 200
        # a page of another origin (another local app) gets nothing, logged in or not, preflight included
        for origin in ("http://localhost:1", "http://127.0.0.1:9", "null"):
            r = c.get("/ui/config", headers={"Origin": origin})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
            r = c.options("/ui/gradio_api/queue/join", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
            assert r.status_code == 403 and "access-control-allow-credentials" not in r.headers
        own = server.base_url.rstrip("/")
        assert c.get("/ui/config", headers={"Origin": own}).status_code == 200
    assert httpx.get(server.base_url + "/health").status_code == 200


@needs_chromium
def test_text_to_image_in_the_browser(page):
    page.click("button[role=tab]:has-text('Text to image')")
    page.fill("#t2i-prompt textarea", "a red fox in the snow")
    _set_number(page, "t2i-width", 32)
    _set_number(page, "t2i-height", 48)
    page.locator("#t2i-seed input").fill("7")
    _open_settings(page, "t2i")
    assert page.locator("#t2i-cfg-text input[type=number]").input_value() == "4"  # official default
    _set_number(page, "t2i-steps", 3)
    page.click("#t2i-run")
    assert _image_size(page, "t2i-output") == [32, 48]
    page.wait_for_function("document.querySelector('#t2i-info textarea').value.startsWith('seed 7')")


@needs_chromium
def test_edit_with_two_images_in_the_browser(page, tmp_path):
    second = tmp_path / "b.png"
    second.write_bytes(png_bytes(40, 48))
    page.click("button[role=tab]:has-text('Edit')")
    page.locator("#edit-images input[type=file]").set_input_files([str(INPUT_IMAGE), str(second)])
    page.wait_for_function("document.querySelectorAll('#edit-images img').length >= 2")
    page.fill("#edit-prompt textarea", "make it blue")
    _open_settings(page, "edit")
    assert page.locator("#edit-cfg-img input[type=number]").input_value() == "2"  # the edit tab's default
    _set_number(page, "edit-steps", 3)
    page.click("#edit-run")
    assert _image_size(page, "edit-output") == [40, 48]  # the last input image's size


@needs_chromium
def test_understand_and_chat_in_the_browser(page):
    page.click("button[role=tab]:has-text('Understand')")
    page.locator("#und-images input[type=file]").set_input_files([str(INPUT_IMAGE)])
    page.fill("#und-question textarea", "What is in the picture?")
    page.locator("#tab-understand button:has-text('Text decoding settings')").click()
    _set_number(page, "und-tokens", 8)
    page.click("#und-run")
    page.wait_for_function("document.querySelector('#und-answer textarea').value.length > 0")

    page.click("button[role=tab]:has-text('Chat')")
    page.locator("#tab-chat button:has-text('Text decoding settings')").click()
    _set_number(page, "chat-tokens", 6)
    for turn, text in enumerate(("Hello", "And then?"), start=1):  # the second turn sees the first
        page.fill("#chat-input textarea", text)
        page.press("#chat-input textarea", "Enter")
        page.wait_for_function(f"document.querySelectorAll('#chat-log [data-testid=bot]').length >= {turn}")
    assert page.locator("#chat-log [data-testid=user]").count() == 2


def test_bagel_ui_runs_alone():
    srv = ServerProcess(command="ui")
    try:
        r = httpx.get(srv.base_url + "/", timeout=30)
        assert r.status_code == 200 and "<html" in r.text.lower()
        config = httpx.get(srv.base_url + "/config", timeout=30).text
        for tab in ("Text to image", "Edit", "Understand", "Chat"):
            assert tab in config
        assert httpx.get(srv.base_url + "/v1/models").status_code == 404  # the UI alone has no HTTP API
    finally:
        srv.stop()


def test_every_word_the_ui_shows_has_a_chinese_translation():
    """Every literal the app passes to its words table (labels, tabs, buttons, hints, progress, errors) is in
    the Chinese table, and every entry there is used."""
    import ast

    from bagel_engine.ui import app as ui_app
    from bagel_engine.ui.strings import ZH, Words

    tree = ast.parse(Path(ui_app.__file__).read_text())
    used = {node.args[0].value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "w"
            and node.args and isinstance(node.args[0], ast.Constant)}
    assert len(used) > 60
    assert used - ZH.keys() == set()
    assert ZH.keys() - used == set()
    words = Words("zh")
    assert words("seed {seed}", seed=7) == "种子 7" and words("not a word") == "not a word"
    assert words.missing == {"not a word"}
    with pytest.raises(ValueError, match="unknown UI language 'fr'"):
        Words("fr")


@needs_chromium
def test_the_ui_in_chinese_in_the_browser(browser):
    """``bagel ui --lang zh``: the tabs, buttons and messages in Chinese, and a picture drawn from it."""
    srv = ServerProcess("--lang", "zh", command="ui")
    try:
        pg = browser.new_page(viewport={"width": 1400, "height": 1600})
        pg.set_default_timeout(30_000)
        pg.goto(srv.base_url + "/")
        pg.wait_for_selector("#t2i-run")
        assert pg.locator("button[role=tab]:has-text('文字生成图片')").count() == 1
        assert pg.locator("button[role=tab]:has-text('Text to image')").count() == 0
        assert "生成" in pg.locator("#t2i-run").inner_text()
        pg.fill("#t2i-prompt textarea", "a red circle")
        _set_number(pg, "t2i-width", 32)
        _set_number(pg, "t2i-height", 32)
        pg.locator("#t2i-seed input").fill("7")
        pg.locator("#tab-t2i button:has-text('图片生成设置')").click()
        _set_number(pg, "t2i-steps", 3)
        pg.click("#t2i-run")
        assert _image_size(pg, "t2i-output") == [32, 32]
        pg.wait_for_function("document.querySelector('#t2i-info textarea').value.startsWith('种子 7')")
        pg.close()
    finally:
        srv.stop()
