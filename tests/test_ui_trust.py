"""What a new user meets first (issue 15, items 3, 12 and 13): the Text tab streams, the
Story result keeps its CSS to itself, History shows runs made in other tabs, a model of
the wrong modality is named as such, each tab starts from its model's settings and has
examples it understands, the Text tab's default prompt continues a body, --threads."""

from __future__ import annotations

import json
import re

import gradio as gr
import httpx
import pytest
import torch
from gradio_client import Client

import app as app_module
from backends.catalog import ASSETS_DIR, bundled
from backends.types import ModelLoadError
from conftest import ServedApp


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path_factory.mktemp("trust-ui")), "--device", "cpu"])
    yield served
    served.close()


def call_args(client: Client, api_name: str, by_label: dict) -> list:
    """Arguments for a named endpoint: ``by_label`` values, every other parameter its default."""
    params = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]["parameters"]
    args = []
    for p in params:
        if p["label"] in by_label:
            args.append(by_label[p["label"]])
        else:
            args.append(p.get("parameter_default") if p.get("parameter_has_default") else None)
    return args


# -- item 3: /generate_text streams -----------------------------------------------------


def test_generate_text_streams_partial_updates_then_the_final_text(served):
    client = Client(served.url, verbose=False)
    # the bundled code model writes real text (a random model's partial bytes do not decode stably)
    args = call_args(client, "/generate_text", {"Model": "tiny-code-llama", "Prompt": "def read_lines(path):",
                                                 "Max new tokens": 12})
    job = client.submit(*args, api_name="/generate_text")
    final_text, final_info = job.result(timeout=120)
    updates = job.outputs()
    # partial texts while generating (after a first update that only says the run started),
    # then the final one
    partial = [(text, info) for text, info in updates[:-1] if isinstance(text, str)]
    assert len(partial) >= 2
    assert all(final_text.startswith(text) for text, _info in partial)
    assert any("(streaming)" in info for _text, info in partial)
    assert "Run #" in final_info and "Model evaluations" in final_info
    row = served.studio.history.query(limit=1)[0]
    assert row.modality == "text" and row.status == "ok" and row.model == "tiny-code-llama"


# -- 12(a): the story's CSS stays inside the story ------------------------------------------


def css_selectors(html: str) -> list[str]:
    selectors = []
    for css in re.findall(r"<style[^>]*>(.*?)</style>", html, flags=re.S | re.I):
        css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
        for block in re.findall(r"([^{}]+)\{[^{}]*\}", css):
            selectors += [s.strip() for s in block.split(",") if s.strip()]
    return selectors


def test_story_shown_in_the_page_scopes_its_css_to_its_own_container(served):
    client = Client(served.url, verbose=False)
    args = call_args(client, "/story", {"Request": "a 1-step how-to: a red circle", "Steps": 1,
                                        "Text model (planner and writer)": "dummy-llama", "Image model": "dummy-sd"})
    info, page, html_file, _md_file = client.predict(*args, api_name="/story")
    assert "Story run #" in info and "<img" in page
    container = re.match(r"\s*<div[^>]*class=['\"]([\w-]+)['\"]", page)
    assert container, "the story is one container element"
    selectors = css_selectors(page)
    assert selectors, "the story keeps its styling"
    assert not [s for s in selectors if re.match(r"(body|html|\*)\b", s)], "no page-wide rule"
    assert all(s.startswith(f".{container.group(1)}") for s in selectors), selectors
    with open(html_file, encoding="utf-8") as f:  # the download is a page of its own
        assert page in f.read()


# -- 12(b): History refreshes when it is opened ----------------------------------------------


def test_history_table_reloads_when_the_history_tab_is_selected(served):
    config = httpx.get(served.url + "config", timeout=30).json()
    components = {c["id"]: c for c in config["components"]}
    history_tab = next(i for i, c in components.items()
                       if c.get("type") == "tabitem" and c.get("props", {}).get("label") == "History")
    table = next(i for i, c in components.items() if c.get("props", {}).get("elem_id") == "history-table")
    on_select = [d for d in config["dependencies"] if [history_tab, "select"] in [list(t) for t in d["targets"]]]
    assert any(table in d["outputs"] for d in on_select)


# -- 12(c): a text model chosen in the Image tab ----------------------------------------------


def test_known_model_of_another_modality_is_named_without_server_paths(studio_factory):
    studio = studio_factory()
    for modality, model, kind, tab in (("image", "tiny-code-llama", "a text model", "Text tab"),
                                       ("image", "dummy-llama", "a text model", "Text tab"),
                                       ("text", "tiny-sd-shapes", "an image model", "Image tab"),
                                       ("video", "tiny-audio-synth", "an audio model", "Audio tab")):
        with pytest.raises(ModelLoadError) as caught:
            studio.describe_model(modality, model)
        message = str(caught.value)
        assert f"'{model}' is {kind}: choose it in the {tab}" == message
    # the tab shows that sentence next to the model, not a loader error
    from studio.ui.generate import build_generation_tab

    with gr.Blocks():
        tab = build_generation_tab(studio, "image")
    shown = tab.extra["on_model_change"]("tiny-code-llama")[0]
    assert "is a text model" in shown and "/" not in shown and "model_index" not in shown


# -- 12(d): each tab starts from its model's recommended settings -------------------------------


def test_bundled_recommended_settings_match_their_training_reports():
    from backends.catalog import recommended_params

    checked = 0
    for model in bundled():
        report = ASSETS_DIR / model.name / "training_report.json"
        call = json.loads(report.read_text()).get("eval_call") if report.is_file() else None
        if not call:
            continue
        recommended = recommended_params(model.name)
        assert recommended["steps"] == call["num_inference_steps"]
        assert recommended["guidance"] == call.get("guidance_scale", call.get("true_cfg_scale"))
        checked += 1
    assert checked >= 3


def test_video_tab_defaults_to_the_bundled_video_models_guidance(studio_factory):
    from studio.ui.generate import PARAMS, build_generation_tab

    studio = studio_factory()
    with gr.Blocks():
        tab = build_generation_tab(studio, "video")
    names = [spec.name for spec in PARAMS["video"]]
    guidance = tab.controls[names.index("guidance")]
    assert tab.model.value == "tiny-video-shapes" and guidance.value == 3.0
    chosen = tab.extra["on_model_input"]("tiny-video-shapes")
    assert chosen[names.index("guidance")]["value"] == 3.0 and chosen[names.index("steps")]["value"] == 25
    unknown = tab.extra["on_model_input"]("dummy-wan")  # no recommendation: leave the user's values
    assert all("value" not in update for update in unknown)


# -- 12(e): example prompts the bundled models understand --------------------------------------


def test_audio_and_video_tabs_offer_examples_in_their_models_vocabulary(served):
    from backends.tiny.audio_data import parse_prompt as parse_sound
    from backends.tiny.video_models import parse_clip_prompt
    from studio.ui import EXAMPLES

    assert len(EXAMPLES["audio"]) >= 3 and all(parse_sound(p) for p in EXAMPLES["audio"])
    assert len(EXAMPLES["video"]) >= 3 and all(parse_clip_prompt(p) for p in EXAMPLES["video"])
    config = httpx.get(served.url + "config", timeout=30).json()
    samples = [c["props"].get("samples") for c in config["components"] if c.get("type") == "dataset"]
    shown = {row[0] for rows in samples if rows for row in rows}
    assert set(EXAMPLES["audio"]) <= shown and set(EXAMPLES["video"]) <= shown


# -- 12(f): the Text tab's default prompt ---------------------------------------------------


def test_text_tab_default_prompt_makes_the_bundled_model_continue_the_body(studio_factory):
    from backends.types import Request
    from studio.ui.text import build_text_tab

    studio = studio_factory()
    with gr.Blocks():
        tab = build_text_tab(studio)
    prompt = tab.prompt.value
    assert tab.model.value == "tiny-code-llama"
    outcome = studio.generate(Request("text", "tiny-code-llama", prompt, params={"max_new_tokens": 16}))
    last = prompt.split("\n")[-1]
    lines = (last + outcome.result.output).split("\n")  # the prompt's last line, then what was generated
    first = lines[0] if lines[0] != last and lines[0].strip() else next(line for line in lines[1:] if line.strip())
    assert re.match(r"( {4})+\S", first), f"the continuation is not the function body: {first!r}"


# -- 13: --threads -------------------------------------------------------------------------


def test_threads_flag_parses_with_a_small_machine_default():
    assert app_module.parse_args([]).threads == max(1, (__import__("os").cpu_count() or 1) - 1)
    assert app_module.parse_args(["--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        app_module.parse_args(["--threads", "0"])


def test_threads_flag_is_applied_at_startup(monkeypatch, tmp_path):
    seen = {}

    def stop(args):
        seen["threads"] = torch.get_num_threads()
        raise SystemExit(0)

    before = torch.get_num_threads()
    monkeypatch.setattr(app_module, "create_app", stop)
    try:
        target = 3 if before != 3 else 2
        with pytest.raises(SystemExit):
            app_module.main(["--threads", str(target), "--data-dir", str(tmp_path)])
        assert seen["threads"] == target
    finally:
        torch.set_num_threads(before)
