"""Text tab: generate with any causal LM, stream tokens, toggle decoding accelerations."""

from __future__ import annotations

import queue
import threading
import time

import gradio as gr

from backends.types import Request, StudioError
from studio.presets import Preset
from studio.ui.common import accel_panel, format_result, model_dropdown, user_errors
from studio.ui.generate import GenerationTab

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
            button = gr.Button("Generate", variant="primary", elem_id="text-generate")
        with gr.Column(scale=3):
            output = gr.Textbox(label="Output (streams)", lines=18, elem_id="text-output")
            info = gr.Markdown("", elem_id="text-info")
            with gr.Accordion("Save these settings as a preset", open=False):
                preset_name = gr.Textbox(label="Preset name")
                preset_description = gr.Textbox(label="Description")
                save = gr.Button("Save preset")
                saved = gr.Markdown("")
    tab = TextTab("text", model, prompt, None, seed, [max_new, temperature, chat], panel, output, info, preset_name)

    @user_errors
    def generate(*values):
        request = tab.build_request(values)
        updates: queue.Queue = queue.Queue()
        box: dict = {}
        started = time.perf_counter()

        def progress(n_tokens, total, text_so_far):
            if isinstance(text_so_far, str):
                updates.put((n_tokens, text_so_far))

        def work():
            try:
                box["outcome"] = studio.generate(request, progress=progress)
            except Exception as exc:  # re-raised in the handler thread
                box["error"] = exc
            finally:
                updates.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (item := updates.get()) is not None:
            n_tokens, text = item
            elapsed = time.perf_counter() - started
            yield text, f"{n_tokens} tokens · {n_tokens / max(elapsed, 1e-9):.1f} tokens/s (streaming)"
        if "error" in box:
            raise box["error"]
        outcome = box["outcome"]
        yield outcome.result.output, format_result(outcome.result, outcome.run_id)

    button.click(generate, inputs=tab.request_inputs, outputs=[output, info], api_name="generate_text",
                 concurrency_id="generate_text")

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
