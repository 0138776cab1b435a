"""End to end in a real headless Chromium (Debian's package) driven by Playwright: every
tab's main button is clicked as a user would (Image, Video, Audio, Text, Story, Compare,
Tune, History, Presets), each must show a result and no error toast. The quick random models of
``--dummy-models`` keep the whole file short; the Text tab uses the bundled code model, whose
output is real text. One screenshot per tab lands in artifacts/browser/."""

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
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 # a synthetic webcam, allowed without a prompt (the Stream section's live input)
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
ERROR_TOAST = ".toast-body.error"  # Gradio's toast for gr.Error (statustracker's Toast)


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


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def set_slider(page, elem_id: str, value) -> None:
    """Type ``value`` into a slider's number box until the slider itself shows it: a box
    filled while a tab just opened is still being mounted can be reset to its old value,
    and a click then sends that one (the Story test once drew 4 steps instead of 2)."""
    box, track = page.locator(f"#{elem_id} input[type=number]"), page.locator(f"#{elem_id} input[type=range]")
    shown = f"{float(value):g}"  # how a range input writes a number (1.0 -> "1")
    for _ in range(5):
        box.fill(str(value))
        box.press("Enter")
        try:
            playwright_api.expect(track).to_have_value(shown, timeout=2_000)
            return
        except AssertionError:
            continue
    playwright_api.expect(track).to_have_value(shown)


def wait_for_text(page, elem_id: str, text: str, timeout_ms: float = 60_000) -> str:
    try:
        page.wait_for_function("([id, text]) => { const el = document.getElementById(id); "
                               "return el && el.innerText.includes(text); }", arg=[elem_id, text], timeout=timeout_ms)
    except playwright_api.TimeoutError:
        shot(page, f"failed-{elem_id}")  # what the page showed instead
        toasts = page.locator(ERROR_TOAST)
        shown = toasts.first.inner_text() if toasts.count() else "no error toast"
        raise AssertionError(f"#{elem_id} never showed {text!r} ({shown})") from None
    return page.locator(f"#{elem_id}").inner_text()


def no_error_toast(page) -> None:
    page.wait_for_timeout(200)  # a toast appears right after the event that raised it
    toasts = page.locator(ERROR_TOAST)
    assert toasts.count() == 0, toasts.first.inner_text()


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_error_toast_is_what_the_other_tests_look_for(page):
    """The "no error toast" checks below mean something: a refused request shows one."""
    page.locator("#image-prompt textarea").fill("")
    page.locator("#image-generate").click()
    page.wait_for_selector(ERROR_TOAST)
    assert "prompt is empty" in page.locator(ERROR_TOAST).first.inner_text()
    page.locator("[data-testid='toast-close']").first.click()
    page.wait_for_selector(ERROR_TOAST, state="detached")


def test_image_tab_generates_with_a_method(page, served):
    _, studio = served
    choose_model(page, "image-model", "tiny-code-llama")  # a text model: named as one, no server path
    family = wait_for_text(page, "image-family", "is a text model")
    assert "Text tab" in family and "/" not in family
    choose_model(page, "image-model", "dummy-sd")
    page.locator("#image-prompt textarea").fill("a red circle at top left on white")
    page.locator("#image-method-deepcache input").check()
    set_slider(page, "image-steps", 6)
    page.locator("#image-generate").click()
    info = wait_for_text(page, "image-info", "Model evaluations")
    assert "deepcache" in info and "shallow_steps" in info
    page.wait_for_selector("#image-output img", state="visible")
    no_error_toast(page)
    shot(page, "1-image")
    row = studio.history.query(limit=1)[0]
    assert row.model == "dummy-sd" and row.methods[0]["name"] == "deepcache"
    page.locator("#image-method-deepcache input").uncheck()


def test_image_tab_streams_the_bundled_clip(page, served):
    """The Stream section: the bundled moving-shapes clip in, frames out, fps shown, a history row."""
    _, studio = served
    page.locator("#stream-section").get_by_text("Stream: img2img over frames").first.click()
    choose_model(page, "stream-image-model", "dummy-sd")
    set_slider(page, "stream-steps", 4)
    page.locator("#stream-demo").click()
    page.wait_for_selector("#stream-frames a, #stream-frames .file-preview", state="visible")
    page.locator("#stream-run").click()
    info = wait_for_text(page, "stream-info", "frames/s")
    assert "16 frames in" in info and "skipped by the similarity filter" in info
    page.wait_for_selector("#stream-strip img", state="visible")
    no_error_toast(page)
    shot(page, "1b-stream")
    row = studio.history.query(limit=1)[0]
    assert row.model == "dummy-sd" and row.methods[0]["name"] == "streamdiffusion" and row.metrics["fps"] > 0


def test_image_tab_streams_live_from_a_webcam(page):
    """Gradio 6's streaming webcam input works offline: the browser captures (here Chromium's
    fake camera) and each frame goes through the stream; fps is shown."""
    page.get_by_text("Live from a webcam").first.click()
    page.locator("#stream-webcam").get_by_text("Click to Access Webcam").click()
    page.locator("#stream-webcam button[aria-label='capture photo']").click()  # "Record": start streaming
    info = wait_for_text(page, "stream-live-info", "frames/s")
    assert "frames in" in info
    page.wait_for_selector("#stream-live img", state="visible")
    no_error_toast(page)
    shot(page, "1c-stream-webcam")
    page.locator("#stream-webcam").get_by_text("Stop").click()


def test_image_tab_runs_an_autoregressive_model_with_sjd(page, served):
    """Issue 21: a token (LlamaGen-style) model in the image tab, its own methods offered."""
    _, studio = served
    open_tab(page, "Image")
    choose_model(page, "image-model", "dummy-ar")
    wait_for_text(page, "image-family", "ar-image")
    page.wait_for_selector("#image-steps", state="hidden")  # a token model has no denoising steps
    page.locator("#image-prompt textarea").fill("a blue square at bottom right on black")
    page.locator("#image-method-sjd input").check()
    page.locator("#image-generate").click()
    # the info box still shows the earlier image test's run: wait for this run's own method
    info = wait_for_text(page, "image-info", "sjd")
    assert "Model evaluations" in info
    page.wait_for_selector("#image-output img", state="visible")
    no_error_toast(page)
    row = studio.history.query(limit=1)[0]
    assert row.model == "dummy-ar" and row.methods[0]["name"] == "sjd"
    page.locator("#image-method-sjd input").uncheck()
    choose_model(page, "image-model", "dummy-sd")  # the later image tests use the diffusion model's methods
    wait_for_text(page, "image-family", "unet")
    page.wait_for_selector("#image-steps", state="visible")


def test_video_tab_generates(page, served):
    _, studio = served
    open_tab(page, "Video")
    # the bundled video model is sampled at guidance 3: the tab starts there
    assert float(page.locator("#video-guidance input[type=number]").input_value()) == 3.0
    choose_model(page, "video-model", "dummy-wan")
    page.get_by_text("a red circle moving right on white", exact=True).first.click()  # an example
    set_slider(page, "video-steps", 4)
    page.locator("#video-generate").click()
    wait_for_text(page, "video-info", "Model evaluations")
    page.wait_for_selector("#video-output video", state="visible")
    no_error_toast(page)
    shot(page, "2-video")
    row = studio.history.query(limit=1)[0]
    assert (row.modality, row.model, row.status, row.prompt) == ("video", "dummy-wan", "ok",
                                                                 "a red circle moving right on white")


def test_audio_tab_generates_from_an_example(page, served):
    _, studio = served
    open_tab(page, "Audio")
    page.get_by_text("a high sine tone", exact=True).first.click()  # the tab has examples
    assert page.locator("#audio-prompt textarea").input_value() == "a high sine tone"
    choose_model(page, "audio-model", "dummy-vits")  # loads at once (dummy-musicgen takes seconds)
    page.locator("#audio-generate").click()
    wait_for_text(page, "audio-info", "Model evaluations")
    page.wait_for_selector("#audio-output audio, #audio-output canvas, #audio-output [data-testid='waveform-Output']",
                           state="attached")
    no_error_toast(page)
    shot(page, "3-audio")
    row = studio.history.query(limit=1)[0]
    assert (row.modality, row.model, row.status, row.prompt) == ("audio", "dummy-vits", "ok", "a high sine tone")


def test_text_tab_streams_generated_text(page, served):
    _, studio = served
    open_tab(page, "Text")
    prompt = page.locator("#text-prompt textarea").input_value()
    assert prompt.startswith("def fibonacci(n):") and not prompt.endswith("\n")
    set_slider(page, "text-max-new-tokens", 24)
    page.locator("#text-generate").click()
    wait_for_text(page, "text-info", "Run #")
    output = page.locator("#text-output textarea").input_value()
    assert output.strip(), "the Text tab shows generated text"
    no_error_toast(page)
    shot(page, "4-text")
    row = studio.history.query(limit=1)[0]
    assert (row.modality, row.model, row.status) == ("text", "tiny-code-llama", "ok")


def test_text_tab_runs_the_diffusion_lm(page, served):
    from backends.catalog import find_bundled

    if not find_bundled("tiny-code-dllm").available:
        pytest.skip("assets/tiny-code-dllm is not built")
    _, studio = served
    open_tab(page, "Text")
    choose_model(page, "text-model", "tiny-code-dllm")
    wait_for_text(page, "text-family", "diffusion-lm")  # its methods (Fast-dLLM, dKV-Cache) are the ones shown
    set_slider(page, "text-max-new-tokens", 16)
    set_slider(page, "text-steps", 8)
    page.locator("#text-generate").click()
    wait_for_text(page, "text-info", "Run #")
    assert page.locator("#text-output textarea").input_value().strip(), "the diffusion LM wrote something"
    no_error_toast(page)
    shot(page, "4b-text-dllm")
    row = studio.history.query(limit=1)[0]
    assert (row.modality, row.model, row.status) == ("text", "tiny-code-dllm", "ok")


def test_fast_dllm_factor_greys_out_its_threshold_and_runs(page, served):
    """fast_dllm's threshold is read only while factor is 0 (``Param.only_if``): the page
    greys it out once a factor is set, and the run records the factor."""
    from backends.catalog import find_bundled

    if not find_bundled("tiny-code-dllm").available:
        pytest.skip("assets/tiny-code-dllm is not built")
    _, studio = served
    open_tab(page, "Text")
    choose_model(page, "text-model", "tiny-code-dllm")
    wait_for_text(page, "text-family", "diffusion-lm")
    page.locator("#text-method-fast_dllm input").check()
    page.get_by_text("Fast-dLLM (block KV cache + parallel decoding) settings").click()
    group = page.locator("#text-method-fast_dllm").locator("xpath=ancestor::div[contains(@class,'group')][1]")
    threshold = group.get_by_label("number input for threshold")
    factor = group.get_by_label("number input for factor")
    assert threshold.is_enabled()
    factor.fill("1.5")
    factor.press("Enter")
    playwright_api.expect(threshold).to_be_disabled()
    set_slider(page, "text-max-new-tokens", 16)
    set_slider(page, "text-steps", 8)
    page.locator("#text-generate").click()
    wait_for_text(page, "text-info", "factor: 1.5")
    no_error_toast(page)
    row = studio.history.query(limit=1)[0]
    assert (row.model, row.status) == ("tiny-code-dllm", "ok") and row.methods[0]["name"] == "fast_dllm"
    assert row.methods[0]["params"]["factor"] == 1.5
    factor.fill("0")
    factor.press("Enter")
    playwright_api.expect(threshold).to_be_enabled()
    page.locator("#text-method-fast_dllm input").uncheck()


def test_story_tab_writes_and_draws_without_restyling_the_page(page, served):
    open_tab(page, "Story")
    set_slider(page, "story-steps", 2)
    choose_model(page, "story-text-model", "dummy-llama")
    choose_model(page, "story-image-model", "dummy-sd")
    page.locator("#story-run").click()
    wait_for_text(page, "story-info", "Story run #")
    assert page.locator("#story-page img").count() == 2
    no_error_toast(page)
    # the story's CSS stays in the story: the page (every tab) keeps its own width
    assert page.evaluate("getComputedStyle(document.body).maxWidth") == "none"
    shot(page, "5-story")


def test_three_way_comparison(page, served):
    _, studio = served
    open_tab(page, "Compare")
    choose_model(page, "compare-model", "dummy-sd")
    page.locator("#compare-prompt textarea").fill("a blue square at bottom right on black")
    page.locator("#compare-configs textarea").fill("deepcache(interval=2)\nsampler(steps=5)")
    page.locator("#compare-run").click()
    table = wait_for_text(page, "compare-table", "speedup")
    assert "baseline" in table and "deepcache" in table
    page.wait_for_selector("#compare-timeline img", state="visible")  # what each row computed, per step
    page.wait_for_selector("#compare-slider img", state="visible")  # A/B: the baseline vs the first row
    page.wait_for_selector("#compare-diff img", state="visible")
    no_error_toast(page)
    shot(page, "6-compare")
    groups = {r.compare_group for r in studio.history.query(limit=10) if r.compare_group}
    assert len(groups) == 1


def test_history_shows_runs_from_every_tab_when_opened(page, served):
    _, studio = served
    group = next(r.compare_group for r in studio.history.query(limit=10) if r.compare_group)
    open_tab(page, "History")  # no Refresh click: opening the tab reloads it
    table = wait_for_text(page, "history-table", group)
    # every timed run of the comparison (3 configurations x Compare's default repeats)
    assert table.count(group) == studio.history.count(compare_group=group) >= 3
    for modality in ("image", "video", "audio", "text", "story"):
        assert modality in table
    page.locator("#history-refresh").click()  # the tab's own button
    wait_for_text(page, "history-table", "dummy-vits")
    no_error_toast(page)
    shot(page, "7-history")


def test_tune_tab_runs_a_small_tune(page, served):
    _, studio = served
    open_tab(page, "Tune")
    choose_model(page, "tune-model", "dummy-sd")
    page.locator("#tune-prompts textarea").fill("a red circle\na blue square\na green triangle\na red square")
    page.locator("#tune-floor textarea, #tune-floor input").first.fill("ssim>=0.5")
    # 8 steps: the methods skip ~half the work, so the held-out winner (and its preset) does
    # not hinge on timing noise
    page.locator("#tune-params textarea, #tune-params input").first.fill('{"steps": 8}')
    page.locator("#tune-trials input").fill("2")
    set_slider(page, "tune-repeats", 1)
    page.locator("#tune-run").click()
    summary = wait_for_text(page, "tune-summary", "Saved as the preset", timeout_ms=180_000)
    assert "held-out" in summary
    page.wait_for_selector("#tune-plot img, #tune-plot canvas, #tune-plot svg", state="attached")
    assert "dummy-sd" in wait_for_text(page, "tune-studies", "dummy-sd")
    no_error_toast(page)
    shot(page, "7b-tune")
    name = summary.split("Saved as the preset", 1)[1].split("(Presets tab)")[0].strip()
    assert studio.presets.get(name).model == "dummy-sd"


def test_presets_save_and_load_into_the_image_tab(page, served):
    _, studio = served
    open_tab(page, "Image")
    page.locator("#image-method-deepcache input").check()
    page.get_by_text("Save these settings as a preset").first.click()
    page.locator("#image-preset-name textarea, #image-preset-name input").first.fill("my fast preset")
    page.locator("#image-preset-save").click()
    wait_for_text(page, "image-preset-saved", "Saved")
    page.locator("#image-method-deepcache input").uncheck()

    open_tab(page, "Presets")
    page.locator("#presets-refresh").click()
    wait_for_text(page, "presets-table", "my fast preset")
    page.locator("#presets-name textarea, #presets-name input").first.fill("my fast preset")
    page.locator("#presets-load").click()
    page.wait_for_selector("#image-generate", state="visible")
    page.wait_for_function("document.querySelector('#image-method-deepcache input').checked")
    no_error_toast(page)
    shot(page, "8-presets")
    assert studio.presets.get("my fast preset").methods[0].name == "deepcache"
