"""Text tab: generate with any causal LM, stream tokens, toggle decoding accelerations."""

from __future__ import annotations

import time

import gradio as gr

from backends.params import controls_for
from studio.presets import Preset
from studio.ui.common import accel_panel, format_result, model_dropdown, user_errors, wire_model_change
from studio.ui.generate import GenerationTab, param_control, stream_generation
from studio.ui.runs import Progress, SessionRuns

# Ends inside the function body, not after a newline: after "def f(n):\n" the bundled code
# model reads a finished signature and starts a new ``def``; here it goes on with the body.
DEFAULT_PROMPT = "def fibonacci(n):\n    if n < 2:"


def streaming_status(tokens: int, started: float) -> str:
    """The line shown under the text while it streams."""
    elapsed = time.perf_counter() - started
    return f"{tokens} tokens · {tokens / max(elapsed, 1e-9):.1f} tokens/s (streaming)"


def stream_text(studio, runs, request, run_request, shown):
    """(text so far, status) while the run goes on in a worker thread, then the final text and
    the run's summary: shared by the Text tab and the /generate_text endpoint. Every yield,
    a token or a heartbeat, is where a close (Cancel, a cancelled job, a disconnect) lands
    and stops the run itself (``studio.ui.runs``)."""
    started = time.perf_counter()
    outcome = None
    for item in stream_generation(studio, runs, request, run_request):
        if isinstance(item, Progress):
            if isinstance(item.stage, str):
                shown = (item.stage, streaming_status(item.done, started))
        elif item is not None:  # the outcome, last
            outcome = item
            continue
        yield shown
    yield outcome.result.output, format_result(outcome.result, outcome.run_id)


def build_text_tab(studio) -> GenerationTab:
    with gr.Row():
        with gr.Column(scale=3):
            model = model_dropdown(studio, "text")
            family = gr.Markdown("", elem_id="text-family")
            prompt = gr.Textbox(label="Prompt", lines=8, elem_id="text-prompt",
                                value=DEFAULT_PROMPT)
            seed = gr.Number(value=0, label="Seed (used when sampling)", precision=0)
            controls = [param_control(spec, "text", spec.default) for spec in controls_for("text")]
            panel = accel_panel("text")
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id="text-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="text-cancel")
        with gr.Column(scale=3):
            output = gr.Textbox(label="Output (streams)", lines=18, elem_id="text-output")
            info = gr.Markdown("", elem_id="text-info")
            with gr.Accordion("Save these settings as a preset", open=False):
                preset_name = gr.Textbox(label="Preset name")
                preset_description = gr.Textbox(label="Description")
                save = gr.Button("Save preset")
                saved = gr.Markdown("")
    tab = GenerationTab("text", model, prompt, None, seed, controls, panel, output, info, preset_name)

    runs = SessionRuns()  # this tab's runs in flight (its named endpoint's too), per session, for its Cancel button
    tab.extra["runs"] = runs

    @user_errors
    def generate(request: gr.Request, *values):
        """Streams tokens while the run goes on in a worker thread; a Cancel, a cancelled API
        job or a closed connection stops the run itself (``studio.ui.runs``)."""
        # nothing to show until the first token
        yield from stream_text(studio, runs, request, tab.build_request(values), (gr.update(), gr.update()))

    # the named endpoint /generate_text (studio.ui.endpoints) takes named parameters
    events = [button.click(generate, inputs=tab.request_inputs, outputs=[output, info], api_name=False,
                           concurrency_id="generate_text")]

    cancel.click(runs.cancel_session, inputs=None, outputs=None, cancels=events, queue=False, api_name="cancel_text")

    tab.extra["model_change"] = wire_model_change(studio, "text", model, family, panel,
                                                  dict(zip((spec.name for spec in controls_for("text")), controls)))

    @user_errors
    def save_preset(name, description, *values):
        request = tab.build_request(values)
        preset = studio.presets.save(Preset(name or "", "text", request.model, request.params, request.methods,
                                            description or ""))
        return f"Saved preset **{preset.name}**."

    save.click(save_preset, inputs=[preset_name, preset_description, *tab.request_inputs], outputs=[saved],
               api_name="save_preset_text")
    return tab
