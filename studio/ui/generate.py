"""The generation tabs for diffusion modalities (Image, Video, Audio): one builder, three
configurations, so every tab behaves the same way: model, prompt, seed, modality knobs,
the Acceleration panel, a progress bar, per-stage timings, method statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import gradio as gr

from backends.catalog import recommended_params
from backends.params import ModalityParam, controls_for, request_params
from backends.types import Request
from studio.plots import audio_figure, frame_strip
from studio.presets import Preset
from studio.ui.common import AccelPanel, accel_panel, format_result, model_dropdown, progress_adapter, user_errors, wire_model_change
from studio.ui.runs import Progress, SessionRuns, run_with_token


def param_control(spec: ModalityParam, modality: str, value: Any) -> gr.components.Component:
    """The tab's control for one modality parameter, from its one declaration."""
    elem_id = f"{modality}-{spec.name.replace('_', '-')}"
    if spec.kind is bool:
        return gr.Checkbox(value=value, label=spec.label, info=spec.help or None, elem_id=elem_id)
    if spec.kind is str:
        return gr.Textbox(value=value, label=spec.label, info=spec.help or None, lines=3, elem_id=elem_id)
    return gr.Slider(spec.control_low, spec.high, value=value, step=spec.step, label=spec.label,
                     info=spec.help or None, elem_id=elem_id)


@dataclass
class GenerationTab:
    """One generation tab's components. ``negative`` is None where the modality has no
    negative prompt (Text); ``controls`` follow ``controls_for(modality)``."""

    modality: str
    model: gr.Dropdown
    prompt: gr.Textbox
    negative: gr.Textbox | None
    seed: gr.Number
    controls: list[gr.components.Component]
    panel: AccelPanel
    output: gr.components.Component
    info: gr.Markdown
    preset_name: gr.Textbox = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def specs(self) -> tuple[ModalityParam, ...]:
        return controls_for(self.modality)

    @property
    def request_inputs(self) -> list[gr.components.Component]:
        negative = [self.negative] if self.negative is not None else []
        return [self.model, self.prompt, *negative, self.seed, *self.controls, *self.panel.inputs]

    def build_request(self, values: list[Any]) -> Request:
        """The values of ``request_inputs`` -> a Request; checked once, by the studio."""
        values = list(values)
        model, prompt = values.pop(0), values.pop(0)
        negative = values.pop(0) if self.negative is not None else ""
        seed = values.pop(0)
        controls = {spec.name: values.pop(0) for spec in self.specs}
        methods = self.panel.collect(values)
        return Request(self.modality, model or "", prompt or "", negative or "", -1 if seed is None else seed,
                       request_params(self.modality, controls), methods)

    def preset_updates(self, preset: Preset) -> list[Any]:
        """Values for [model, *controls, *panel.inputs] showing a preset."""
        out: list[Any] = [gr.update(value=preset.model) if preset.model else gr.update()]
        out.extend(preset.params.get(spec.name, spec.default) for spec in self.specs)
        out.extend(self.panel.values_for(preset.methods))
        return out

    @property
    def preset_outputs(self) -> list[gr.components.Component]:
        return [self.model, *self.controls, *self.panel.inputs]


def stream_generation(studio, runs: SessionRuns, request: gr.Request, run_request: Request) -> Iterator[Any]:
    """``Progress`` reports and heartbeats (None) while the run goes on in a worker thread,
    then the ``RunOutcome``; closing it (Cancel, a cancelled API job, a closed connection)
    stops the run (``studio.ui.runs``). Shared by the tabs' buttons and the named endpoints."""

    def work(token, on_progress):
        return studio.generate(run_request, progress=on_progress, cancel=token)

    return run_with_token(runs, request, work)


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
            for spec in controls_for(modality):
                controls.append(param_control(spec, modality, recommended.get(spec.name, spec.default)))
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
    runs = SessionRuns()  # this tab's runs in flight (its named endpoint's too), per session, for its Cancel button
    tab.extra["runs"] = runs

    @user_errors
    def generate(request: gr.Request, progress=gr.Progress(), *values):
        """A generator: the run goes on in a worker thread while this yields, so a Cancel,
        a cancelled API job or a closed connection stops the run itself (``studio.ui.runs``)."""
        run_request = tab.build_request(values)
        report = progress_adapter(progress)
        unchanged = [gr.update() for _ in outputs]

        outcome = None
        for item in stream_generation(studio, runs, request, run_request):
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

    events = [
        # the named endpoint /generate_{modality} (studio.ui.endpoints) takes named parameters;
        # the button's own event, positional over every control, is not part of the API
        button.click(generate, inputs=tab.request_inputs, outputs=outputs, api_name=False,
                     concurrency_id=f"generate_{modality}"),
        prompt.submit(generate, inputs=tab.request_inputs, outputs=outputs, api_name=False,
                      concurrency_id=f"generate_{modality}"),
    ]
    cancel.click(runs.cancel_session, inputs=None, outputs=None, cancels=events, queue=False,
                 api_name=f"cancel_{modality}")

    tab.extra["model_change"] = wire_model_change(studio, modality, model, family, panel,
                                                  dict(zip((spec.name for spec in controls_for(modality)), controls)))

    @user_errors
    def on_model_input(model_id):
        """A model the user picked: set the controls to its recommended settings, where the
        catalog has them. Only on user input, so loading a preset keeps the preset's values."""
        recommended = recommended_params(model_id)
        return [gr.update(value=recommended[spec.name]) if spec.name in recommended else gr.update()
                for spec in controls_for(modality)]

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
    return tab
