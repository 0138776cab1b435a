"""End to end in a real headless Chromium (Debian's package) driven by Playwright:
generate with a method on, run a 3-way comparison, find it in history, save and
reload a preset. Screenshots land in artifacts/browser/."""

import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no system Chromium (install Debian's 'chromium' package)", allow_module_level=True)

from conftest import ServedApp  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "browser"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path_factory.mktemp("browser")), "--device", "cpu"])
    yield served.url, served.studio
    served.close()


@pytest.fixture(scope="module")
def page(served):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(90_000)
        page.goto(served[0])
        page.wait_for_selector("#image-generate")
        yield page
        browser.close()


def choose_model(page, elem_id: str, model: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.click()
    box.fill(model)
    box.press("Enter")
    page.wait_for_timeout(300)


def test_generate_image_with_a_method(page, served):
    _, studio = served
    choose_model(page, "image-model", "dummy-sd")
    page.locator("#image-prompt textarea").fill("a red circle at top left on white")
    page.locator("#image-method-deepcache input").check()
    page.locator("#image-generate").click()
    page.wait_for_function("document.querySelector('#image-info') && "
                           "document.querySelector('#image-info').innerText.includes('Model evaluations')")
    info = page.locator("#image-info").inner_text()
    assert "deepcache" in info and "shallow_steps" in info
    page.screenshot(path=str(ARTIFACTS / "1-image.png"), full_page=True)
    row = studio.history.query(limit=1)[0]
    assert row.model == "dummy-sd" and row.methods[0]["name"] == "deepcache"


def test_three_way_comparison_then_history(page, served):
    _, studio = served
    page.get_by_role("tab", name="Compare").click()
    choose_model(page, "compare-model", "dummy-sd")
    page.locator("#compare-prompt textarea").fill("a blue square at bottom right on black")
    page.locator("#compare-configs textarea").fill("deepcache(interval=2)\nsampler(steps=5)")
    page.locator("#compare-run").click()
    page.wait_for_function("document.querySelector('#compare-table') && "
                           "document.querySelector('#compare-table').innerText.includes('speedup')")
    table = page.locator("#compare-table").inner_text()
    assert "baseline" in table and "deepcache" in table and "speedup" in table
    page.screenshot(path=str(ARTIFACTS / "2-compare.png"), full_page=True)
    groups = {r.compare_group for r in studio.history.query(limit=10) if r.compare_group}
    assert len(groups) == 1
    group = groups.pop()

    page.get_by_role("tab", name="History").click()
    page.locator("#history-refresh").click()
    page.wait_for_function(f"document.querySelector('#history-table').innerText.includes('{group}')")
    assert page.locator("#history-table").inner_text().count(group) == 3
    page.screenshot(path=str(ARTIFACTS / "3-history.png"), full_page=True)


def test_save_and_reload_a_preset(page, served):
    _, studio = served
    page.get_by_role("tab", name="Image").click()
    page.locator("#image-method-deepcache input").check()
    page.get_by_text("Save these settings as a preset").first.click()
    page.locator("#image-preset-name textarea, #image-preset-name input").first.fill("my fast preset")
    page.locator("#image-preset-save").click()
    page.wait_for_function("document.querySelector('#image-preset-saved').innerText.includes('Saved')")
    page.locator("#image-method-deepcache input").uncheck()

    page.get_by_role("tab", name="Presets").click()
    page.locator("#presets-refresh").click()
    page.wait_for_function("document.querySelector('#presets-table').innerText.includes('my fast preset')")
    page.locator("#presets-name textarea, #presets-name input").first.fill("my fast preset")
    page.locator("#presets-load").click()
    page.wait_for_selector("#image-generate", state="visible")
    page.wait_for_function("document.querySelector('#image-method-deepcache input').checked")
    page.screenshot(path=str(ARTIFACTS / "4-preset-loaded.png"), full_page=True)
    assert studio.presets.get("my fast preset").methods[0].name == "deepcache"
