"""The Gradio app: one module per tab; this file only assembles them."""

from __future__ import annotations

import json
import logging

import gradio as gr

from backends.types import StudioError
from studio.validation import parse_request_json
from studio.ui.calibration import build_calibration_panel
from studio.ui.compare import build_compare_tab
from studio.ui.endpoints import register_generation_endpoints
from studio.ui.generate import build_generation_tab
from studio.ui.history import build_history_tab
from studio.ui.presets import build_presets_tab
from studio.ui.story import build_story_tab
from studio.ui.stream import build_stream_section
from studio.ui.text import build_text_tab
from studio.ui.tune import build_tune_tab

log = logging.getLogger(__name__)
INTERNAL_ERROR = "internal error: the request could not be run; the server log has the details"
MAX_ERROR_CHARS = 300


def api_run(studio, request_json) -> dict:
    """``/run``'s work: strict JSON in, a result dict out, or a gr.Error of one line.

    Nothing else escapes: a StudioError's own message is meant for users; any other
    exception may carry SQL, paths or a host name, so the client gets a fixed line and the
    details go to the server log."""
    try:
        outcome = studio.generate(parse_request_json(request_json))
        result = outcome.result
        # the path as History stores it (``outputs/...``, relative to the data dir), and
        # where to download the file: Gradio's file route, as for any file a UI output shows
        stored = studio.outputs.relative(result.output_path) if result.output_path else None
        url = f"gradio_api/file={result.output_path}" if result.output_path else None
        return {"run_id": outcome.run_id, "output_path": stored, "output_url": url,
                "output": result.output if isinstance(result.output, str) else None, **result.summary()}
    except StudioError as exc:
        raise gr.Error(one_line(str(exc)), print_exception=False) from None
    except Exception:
        log.exception("/run failed")
        raise gr.Error(INTERNAL_ERROR, print_exception=False) from None


def one_line(message: str) -> str:
    """An error as the client sees it: a single line of bounded length."""
    text = " ".join(message.split()) or "the request was refused"
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."


# Example prompts in each bundled model's closed vocabulary (backends/tiny/*_data.py and
# *_models.py): a first click gives a result that matches its prompt.
EXAMPLES: dict[str, list[str]] = {
    "image": ["a red circle at top left on white", "a blue square at bottom right on black",
              "a yellow triangle at top right on white"],
    "video": ["a red circle moving right on white", "a blue square growing on black",
              "a green triangle turning yellow on white"],
    "audio": ["a high sine tone", "a low minor chord on a saw wave",
              "a mid major arpeggio going up on a square wave", "a fast drum pattern", "a pink noise texture"],
}
# Page CSS (given to ``launch``): tiny bundled images are shown large with crisp pixels.
STUDIO_CSS = """
#image-output img, #history-image img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#compare-gallery img { image-rendering: pixelated; }
#compare-slider img, #compare-diff img { image-rendering: pixelated; }
/* Compare tables: one line per header and cell (no letter-by-letter wrapping); the full
   table scrolls sideways instead of squeezing its columns. */
#compare-table th, #compare-table td, #compare-table-full th, #compare-table-full td { white-space: nowrap; }
#compare-table th *, #compare-table-full th * { white-space: nowrap; word-break: keep-all; }
#compare-table-full .table-wrap { overflow-x: auto; }
#compare-table td:last-child { white-space: normal; min-width: 18em; }  /* notes: the one column that wraps */
/* Tune tables: headers on one line; the configuration column wraps, the figures do not;
   a table wider than the page scrolls sideways. */
.tune-table th, .tune-table th * { white-space: nowrap; word-break: keep-all; }
.tune-table td { white-space: nowrap; }
.tune-table td:nth-child(2) { white-space: normal; min-width: 16em; }
.tune-table .table-wrap { overflow-x: auto; }
"""
HEADER = """# ⚡ FastGen Studio
Generate images, video, audio and text, switch acceleration methods on and off, and see what each one buys
(speed) and costs (quality against the baseline with the same seed). Every run is kept in **History**."""


def build_app(studio) -> gr.Blocks:
    # Gradio's cache keeps copies of files a handler returned from outside the served
    # folders (a compare's video frames): remove those after a day.
    with gr.Blocks(title="FastGen Studio", analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        gr.Markdown(HEADER)
        tabs: dict = {}
        with gr.Tabs() as tabs_component:
            with gr.Tab("Image", id="image"):
                gr.Markdown("Any diffusers text-to-image pipeline by hub id or local folder (SD, FLUX...), or an "
                            "autoregressive Janus-Pro (`deepseek-community/Janus-Pro-1B`, `-7B`) or Emu3-Gen "
                            "(`BAAI/Emu3-Gen-hf`).")
                tabs["image"] = build_generation_tab(studio, "image", EXAMPLES["image"])
                build_stream_section(studio)  # img2img over frames (StreamDiffusion)
            with gr.Tab("Video", id="video"):
                gr.Markdown("Any diffusers text-to-video pipeline by hub id or local folder (Wan, CogVideoX, LTX...).")
                tabs["video"] = build_generation_tab(studio, "video", EXAMPLES["video"])
            with gr.Tab("Audio", id="audio"):
                gr.Markdown("Diffusers audio pipelines by hub id or local folder (AudioLDM 2, Stable Audio Open...).")
                tabs["audio"] = build_generation_tab(studio, "audio", EXAMPLES["audio"])
            with gr.Tab("Text", id="text"):
                tabs["text"] = build_text_tab(studio)
            with gr.Tab("Story", id="story"):
                build_story_tab(studio)
            with gr.Tab("Compare", id="compare"):
                build_compare_tab(studio)
            with gr.Tab("Tune", id="tune"):
                tune = build_tune_tab(studio)
            with gr.Tab("Calibrate", id="calibrate"):
                build_calibration_panel(studio)
            with gr.Tab("History", id="history") as history_tab:
                history = build_history_tab(studio)
            with gr.Tab("Presets", id="presets"):
                presets = build_presets_tab(studio, tabs, tabs_component)

        def run_request(request_json: str) -> str:
            """Run one request given as JSON ({modality, model, prompt, negative_prompt, seed, params,
            methods, compare_group}) and return the run id, output path, timings and method statistics
            as JSON."""
            return json.dumps(api_run(studio, request_json))

        gr.api(run_request, api_name="run")
        register_generation_endpoints(studio, tabs)  # /generate_image ... with named parameters
        app.load(history["load"], inputs=history["inputs"], outputs=[history["table"], history["summary"]],
                 api_name=False)
        # runs made in the other tabs since the page loaded: show them when History is opened
        history_tab.select(history["load"], inputs=history["inputs"], outputs=[history["table"], history["summary"]],
                           api_name=False)
        app.load(tune["load_studies"], outputs=[tune["studies"]], api_name=False)
        app.load(presets["listing"], outputs=[presets["table"], presets["errors"]], api_name=False)
        for tab in tabs.values():  # show only the methods that fit the default model; hints after
            change = tab.extra["model_change"]
            app.load(change["describe"], inputs=[tab.model], outputs=change["describe_outputs"], api_name=False).then(
                change["hints"], inputs=[tab.model], outputs=change["hint_outputs"], api_name=False)
    return app
