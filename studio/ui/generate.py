"""The generation tabs for diffusion modalities (Image, Video, Audio): one builder, three
configurations, so every tab behaves the same way: model, prompt, seed, modality knobs,
the Acceleration panel, a progress bar, per-stage timings, method statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from backends.catalog import recommended_params
from backends.types import Request, StudioError
from studio.plots import audio_figure, frame_strip
from studio.presets import Preset
from studio.ui.common import AccelPanel, accel_panel, format_result, model_dropdown, progress_adapter, user_errors
from studio.ui.runs import Progress, SessionRuns, run_with_token, session_key


@dataclass
class ParamControl:
    name: str
    label: str
    kind: str  # "slider" | "number"
    default: float | None
    low: float = 0
    high: float = 100
    step: float = 1
    info: str = ""


PARAMS: dict[str, list[ParamControl]] = {
    "image": [
        ParamControl("width", "Width (0 = model default)", "slider", 0, 0, 1024, 8),
        ParamControl("height", "Height (0 = model default)", "slider", 0, 0, 1024, 8),
        ParamControl("steps", "Steps", "slider", 25, 1, 100, 1),
        ParamControl("guidance", "Guidance scale", "slider", 5.0, 0, 20, 0.5),
    ],
    "video": [
        ParamControl("width", "Width (0 = model default)", "slider", 0, 0, 1024, 8),
        ParamControl("height", "Height (0 = model default)", "slider", 0, 0, 1024, 8),
        ParamControl("frames", "Frames (0 = model default)", "slider", 0, 0, 129, 1),
        ParamControl("fps", "Frames per second", "slider", 8, 1, 30, 1),
        ParamControl("steps", "Steps", "slider", 25, 1, 100, 1),
        ParamControl("guidance", "Guidance scale", "slider", 5.0, 0, 20, 0.5),
    ],
    "audio": [
        ParamControl("seconds", "Duration (s, 0 = model default)", "slider", 0, 0, 30, 0.5),
        ParamControl("steps", "Steps", "slider", 25, 1, 200, 1),
        ParamControl("guidance", "Guidance scale", "slider", 3.5, 0, 20, 0.5),
    ],
}
ZERO_MEANS_DEFAULT = {"width", "height", "frames", "seconds"}


@dataclass
class GenerationTab:
    modality: str
    model: gr.Dropdown
    prompt: gr.Textbox
    negative: gr.Textbox
    seed: gr.Number
    controls: list[gr.components.Component]
    panel: AccelPanel
    output: gr.components.Component
    info: gr.Markdown
    preset_name: gr.Textbox = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def request_inputs(self) -> list[gr.components.Component]:
        return [self.model, self.prompt, self.negative, self.seed, *self.controls, *self.panel.inputs]

    def build_request(self, values: list[Any]) -> Request:
        values = list(values)
        model, prompt, negative, seed = values[:4]
        values = values[4:]
        params = {}
        for spec in PARAMS[self.modality]:
            value = values.pop(0)
            if spec.name in ZERO_MEANS_DEFAULT and (value is None or value == 0):
                continue
            params[spec.name] = value
        methods = self.panel.collect(values)
        return Request(self.modality, model or "", prompt or "", negative or "", int(seed if seed is not None else -1),
                       params, methods)

    def preset_updates(self, preset: Preset) -> list[Any]:
        """Values for [model, *controls, *panel.inputs] showing a preset."""
        out: list[Any] = [gr.update(value=preset.model) if preset.model else gr.update()]
        for spec in PARAMS[self.modality]:
            out.append(preset.params.get(spec.name, spec.default if spec.name not in ZERO_MEANS_DEFAULT else 0))
        out.extend(self.panel.values_for(preset.methods))
        return out

    @property
    def preset_outputs(self) -> list[gr.components.Component]:
        return [self.model, *self.controls, *self.panel.inputs]


def output_component(modality: str) -> gr.components.Component:
    elem_id = f"{modality}-output"
    if modality == "image":
        return gr.Image(label="Output", type="pil", height=384, format="png", elem_id=elem_id)
    if modality == "video":
        return gr.Video(label="Output", height=384, elem_id=elem_id)
    return gr.Audio(label="Output", type="filepath", elem_id=elem_id)


def display_output(modality: str, outcome) -> Any:
    """The saved output file, shown in place: the outputs folder is served as a static path,
    so nothing is copied into Gradio's cache and a deleted run stops being downloadable
    (tiny images are enlarged by the page's CSS, ``image-rendering: pixelated``)."""
    return outcome.result.output_path


def build_generation_tab(studio, modality: str, examples: list[str] | None = None) -> GenerationTab:
    with gr.Row():
        with gr.Column(scale=3):
            model = model_dropdown(studio, modality)
            family = gr.Markdown("", elem_id=f"{modality}-family")
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="describe what to generate",
                                elem_id=f"{modality}-prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seed = gr.Number(value=0, label="Seed (-1 = random)", precision=0)
            controls = []
            recommended = recommended_params(model.value)  # the default model's own settings
            for spec in PARAMS[modality]:
                controls.append(gr.Slider(spec.low, spec.high, value=recommended.get(spec.name, spec.default),
                                          step=spec.step, label=spec.label, elem_id=f"{modality}-{spec.name}"))
            panel = accel_panel(modality)
            with gr.Row():
                button = gr.Button("Generate", variant="primary", elem_id=f"{modality}-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id=f"{modality}-cancel")
            if examples:
                gr.Examples(examples=[[e] for e in examples], inputs=[prompt])
        with gr.Column(scale=2):
            output = output_component(modality)
            picture = gr.Plot(label="Waveform and spectrogram") if modality == "audio" else (
                gr.Image(label="Frame strip", type="pil") if modality == "video" else None)
            info = gr.Markdown("", elem_id=f"{modality}-info")
            with gr.Accordion("Save these settings as a preset", open=False):
                preset_name = gr.Textbox(label="Preset name", elem_id=f"{modality}-preset-name")
                preset_description = gr.Textbox(label="Description")
                save = gr.Button("Save preset", elem_id=f"{modality}-preset-save")
                saved = gr.Markdown("", elem_id=f"{modality}-preset-saved")
    tab = GenerationTab(modality, model, prompt, negative, seed, controls, panel, output, info, preset_name)

    outputs = [output, info] + ([picture] if picture is not None else [])
    runs = SessionRuns()  # this tab's runs in flight, per session, for its Cancel button

    @user_errors
    def generate(request: gr.Request, progress=gr.Progress(), *values):
        """A generator: the run goes on in a worker thread while this yields, so a Cancel,
        a cancelled API job or a closed connection stops the run itself (``studio.ui.runs``)."""
        run_request = tab.build_request(values)
        report = progress_adapter(progress)
        unchanged = [gr.update() for _ in outputs]

        def work(token, on_progress):
            return studio.generate(run_request, progress=on_progress, cancel=token)

        outcome = None
        for item in run_with_token(runs, request, work):
            if isinstance(item, Progress):
                report(item.done, item.total, item.stage)
            elif item is not None:  # the outcome, last
                outcome = item
                continue
            yield unchanged  # progress or heartbeat: where a close (cancel, disconnect) lands
        shown = [display_output(modality, outcome), format_result(outcome.result, outcome.run_id)]
        if modality == "audio":
            shown.append(audio_figure(*outcome.result.output))
        elif modality == "video":
            shown.append(frame_strip(outcome.result.output))
        yield shown

    def cancel_runs(request: gr.Request):
        runs.cancel(session_key(request))

    events = [
        button.click(generate, inputs=tab.request_inputs, outputs=outputs, api_name=f"generate_{modality}",
                     concurrency_id=f"generate_{modality}"),
        prompt.submit(generate, inputs=tab.request_inputs, outputs=outputs, api_name=False,
                      concurrency_id=f"generate_{modality}"),
    ]
    cancel.click(cancel_runs, inputs=None, outputs=None, cancels=events, queue=False,
                 api_name=f"cancel_{modality}")

    def on_model_change(model_id):
        if not model_id:
            return ["", *panel.visibility_for(None), *[gr.update(value="") for _ in panel.hints]]
        try:
            described = studio.describe_model(modality, model_id)
        except StudioError as exc:
            return [f"⚠️ {exc}", *panel.visibility_for(None), *[gr.update(value="") for _ in panel.hints]]
        hints = studio.method_hints(modality, model_id)
        return [
            f"Family: **{described.get('family')}** · device `{described.get('device')}`",
            *panel.visibility_for(described.get("family")),
            *[gr.update(value=hints.get(cls.spec.name, "")) for cls in panel.methods],
        ]

    model.change(on_model_change, inputs=[model], outputs=[family, *panel.groups, *panel.hints], api_name=False)
    tab.extra["model_change_outputs"] = [family, *panel.groups, *panel.hints]

    def on_model_input(model_id):
        """A model the user picked: set the controls to its recommended settings, where the
        catalog has them. Only on user input, so loading a preset keeps the preset's values."""
        recommended = recommended_params(model_id)
        return [gr.update(value=recommended[spec.name]) if spec.name in recommended else gr.update()
                for spec in PARAMS[modality]]

    model.input(on_model_input, inputs=[model], outputs=controls, api_name=False)
    tab.extra["on_model_input"] = on_model_input

    @user_errors
    def save_preset(name, description, *values):
        request = tab.build_request(values)
        preset = studio.presets.save(Preset(name or "", modality, request.model, request.params,
                                            request.methods, description or ""))
        return f"Saved preset **{preset.name}**."

    save.click(save_preset, inputs=[preset_name, preset_description, *tab.request_inputs], outputs=[saved],
               api_name=f"save_preset_{modality}")
    tab.extra["family"] = family
    tab.extra["on_model_change"] = on_model_change
    return tab
