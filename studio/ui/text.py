"""Text tab: generate with any causal LM, stream tokens, toggle decoding accelerations."""

from __future__ import annotations

import time

import gradio as gr

from backends.types import Request, StudioError
from studio.presets import Preset
from studio.ui.common import accel_panel, format_result, model_dropdown, user_errors
from studio.ui.generate import GenerationTab
from studio.ui.runs import Progress, SessionRuns, run_with_token, session_key

TEXT_PARAMS = ("max_new_tokens", "temperature")
# Ends inside the function body, not after a newline: after "def f(n):\n" the bundled code
# model reads a finished signature and starts a new ``def``; here it goes on with the body.
DEFAULT_PROMPT = "def fibonacci(n):\n    if n < 2:"


class TextTab(GenerationTab):
    def build_request(self, values) -> Request:
        values = list(values)
        model, prompt, seed, max_new_tokens, temperature, chat = values[:6]
        methods = self.panel.collect(values[6:])
        params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "chat_template": bool(chat)}
        return Request("text", model or "", prompt or "", "", int(seed if seed is not None else 0), params, methods)

    @property
    def request_inputs(self):
        return [self.model, self.prompt, self.seed, *self.controls, *self.panel.inputs]

    def preset_updates(self, preset: Preset):
        out = [gr.update(value=preset.model) if preset.model else gr.update()]
        out.append(preset.params.get("max_new_tokens", 128))
        out.append(preset.params.get("temperature", 0.0))
        out.append(preset.params.get("chat_template", True))
        out.extend(self.panel.values_for(preset.methods))
        return out


def build_text_tab(studio) -> TextTab:
    with gr.Row():
        with gr.Column(scale=3):
            model = model_dropdown(studio, "text")
            family = gr.Markdown("", elem_id="text-family")
            prompt = gr.Textbox(label="Prompt", lines=8, elem_id="text-prompt",
                                value=DEFAULT_PROMPT)
            seed = gr.Number(value=0, label="Seed (used when sampling)", precision=0)
            max_new = gr.Slider(1, 1024, value=128, step=1, label="Max new tokens", elem_id="text-max-new-tokens")
            temperature = gr.Slider(0, 2, value=0.0, step=0.05, label="Temperature (0 = greedy)")
            chat = gr.Checkbox(value=True, label="Apply the chat template when the tokenizer has one")
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
    tab = TextTab("text", model, prompt, None, seed, [max_new, temperature, chat], panel, output, info, preset_name)

    runs = SessionRuns()  # this tab's runs in flight, per session, for its Cancel button

    @user_errors
    def generate(request: gr.Request, *values):
        """Streams tokens while the run goes on in a worker thread; a Cancel, a cancelled API
        job or a closed connection stops the run itself (``studio.ui.runs``)."""
        run_request = tab.build_request(values)
        started = time.perf_counter()
        shown = (gr.update(), gr.update())  # nothing to show until the first token

        def work(token, on_progress):
            return studio.generate(run_request, progress=on_progress, cancel=token)

        outcome = None
        for item in run_with_token(runs, request, work):
            if isinstance(item, Progress):
                if isinstance(item.stage, str):
                    elapsed = time.perf_counter() - started
                    shown = (item.stage, f"{item.done} tokens · {item.done / max(elapsed, 1e-9):.1f} tokens/s (streaming)")
            elif item is not None:  # the outcome, last
                outcome = item
                continue
            yield shown  # a token or a heartbeat: where a close (cancel, disconnect) lands
        yield outcome.result.output, format_result(outcome.result, outcome.run_id)

    events = [button.click(generate, inputs=tab.request_inputs, outputs=[output, info], api_name="generate_text",
                           concurrency_id="generate_text")]

    def cancel_runs(request: gr.Request):
        runs.cancel(session_key(request))

    cancel.click(cancel_runs, inputs=None, outputs=None, cancels=events, queue=False, api_name="cancel_text")

    def on_model_change(model_id):
        if not model_id:
            return ["", *panel.visibility_for(None), *[gr.update(value="") for _ in panel.hints]]
        try:
            described = studio.describe_model("text", model_id)
        except StudioError as exc:
            return [f"⚠️ {exc}", *panel.visibility_for(None), *[gr.update(value="") for _ in panel.hints]]
        hints = studio.method_hints("text", model_id)
        return [f"Family: **{described.get('family')}** · device `{described.get('device')}`",
                *panel.visibility_for(described.get("family")),
                *[gr.update(value=hints.get(cls.spec.name, "")) for cls in panel.methods]]

    model.change(on_model_change, inputs=[model], outputs=[family, *panel.groups, *panel.hints], api_name=False)
    tab.extra["on_model_change"] = on_model_change
    tab.extra["model_change_outputs"] = [family, *panel.groups, *panel.hints]

    @user_errors
    def save_preset(name, description, *values):
        request = tab.build_request(values)
        preset = studio.presets.save(Preset(name or "", "text", request.model, request.params, request.methods,
                                            description or ""))
        return f"Saved preset **{preset.name}**."

    save.click(save_preset, inputs=[preset_name, preset_description, *tab.request_inputs], outputs=[saved],
               api_name="save_preset_text")
    return tab
