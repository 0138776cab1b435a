"""The Image tab's Stream section: frames in (a video, an animated GIF or images; or the
bundled moving-shapes clip), img2img'd frames out with StreamDiffusion's options, the
output clip, a frame strip and the frames per second. Everything it runs is
``studio.streaming``; this module only lays out and wires controls."""

from __future__ import annotations

from typing import Any

import gradio as gr

from backends.catalog import recommended_params
from backends.stream import STREAM_SPEC
from backends.types import Request
from studio.plots import frame_strip
from studio.streaming import LiveStream, demo_clip, read_frames, run_stream
from studio.ui.common import _control, model_dropdown, progress_adapter, user_errors
from studio.ui.runs import Progress, SessionRuns, run_with_token

INTRO = ("img2img over a frame sequence ([StreamDiffusion](https://arxiv.org/abs/2312.12491)): every frame is "
         "denoised from `strength` of the way with one prompt and one fixed noise. **Stream batch** puts the "
         "steps of successive frames in one model call, **RCFG** replaces the negative pass by a residual from "
         "the input, the **similarity filter** skips near-identical frames. Frames are resized to the model's size.")


def stream_summary(outcome) -> str:
    """The run's figures as Markdown: frames per second first."""
    stats = outcome.stats
    return (f"**{stats.fps:.2f} frames/s** · run #{outcome.run_id} · {stats.frames_in} frames in "
            f"({stats.frames_processed} processed, {stats.frames_skipped} skipped by the similarity filter) · "
            f"{stats.denoising_steps} denoising steps per frame · {stats.model_calls} model calls, "
            f"{stats.model_evals} evaluations · {stats.seconds:.2f} s")


def build_stream_section(studio) -> dict[str, Any]:
    recommended = recommended_params("tiny-sd-shapes")
    with gr.Accordion("Stream: img2img over frames (StreamDiffusion)", open=False, elem_id="stream-section"):
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                model = model_dropdown(studio, "image", elem_prefix="stream-")
                prompt = gr.Textbox(label="Prompt", lines=1, value="a blue square at bottom right on black",
                                    elem_id="stream-prompt")
                negative = gr.Textbox(label="Negative prompt", lines=1)
                files = gr.File(label="Frames: a video, an animated GIF or images", file_count="multiple",
                                file_types=["image", "video", ".gif"], elem_id="stream-frames")
                demo = gr.Button("Use the bundled moving-shapes clip", elem_id="stream-demo")
                with gr.Row():
                    seed = gr.Number(value=0, label="Seed", precision=0)
                    steps = gr.Slider(1, 150, value=int(recommended.get("steps", 25)), step=1, label="Steps",
                                      info="of the schedule; a frame runs strength x steps of them",
                                      elem_id="stream-steps")
                    strength = gr.Slider(0.05, 1, value=0.5, step=0.05, label="Strength", elem_id="stream-strength")
                    guidance = gr.Slider(0, 30, value=float(recommended.get("guidance", 4.0)), step=0.5,
                                         label="Guidance scale", elem_id="stream-guidance")
                    fps = gr.Slider(1, 60, value=8, step=1, label="Clip fps", info="of the saved clip")
                with gr.Group():
                    options = [_control(p) for p in STREAM_SPEC.params]
                with gr.Row():
                    button = gr.Button("Run stream", variant="primary", elem_id="stream-run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="stream-cancel")
            with gr.Column(scale=2):
                video = gr.Video(label="Output clip", height=256, elem_id="stream-output")
                strip = gr.Image(label="Output frames", type="pil", elem_id="stream-strip")
                info = gr.Markdown("", elem_id="stream-info")
                with gr.Accordion("Live from a webcam", open=False):
                    gr.Markdown("The same settings, one webcam frame at a time (the browser captures it; nothing "
                                "leaves this server). Live frames are not kept in history.")
                    webcam = gr.Image(sources=["webcam"], streaming=True, type="pil", label="Webcam",
                                      elem_id="stream-webcam")
                    live = gr.Image(label="Live output", type="pil", elem_id="stream-live")
                    live_info = gr.Markdown("", elem_id="stream-live-info")
    live_state = gr.State(None)

    runs = SessionRuns()

    @user_errors
    def use_demo():
        return [str(demo_clip(studio))]

    demo.click(use_demo, outputs=[files], api_name=False)

    @user_errors
    def run(request: gr.Request, model_id, prompt_text, negative_text, seed_value, steps_value, strength_value,
            guidance_value, fps_value, paths, *option_values, progress=gr.Progress()):
        frames = read_frames([getattr(p, "name", p) for p in (paths or [])])
        run_request = Request("image", model_id or "", prompt_text or "", negative_text or "",
                              -1 if seed_value is None else seed_value,
                              {"steps": steps_value, "strength": strength_value, "guidance": guidance_value})
        chosen = {p.name: value for p, value in zip(STREAM_SPEC.params, option_values)}
        report = progress_adapter(progress)

        def work(token, on_progress):
            return run_stream(studio, run_request, frames, chosen, progress=on_progress, cancel=token,
                              fps=int(fps_value or 8))

        outcome = None
        for item in run_with_token(runs, request, work):
            if isinstance(item, Progress):
                report(item.done, item.total, item.stage)
            elif item is not None:
                outcome = item
                continue
            yield gr.update(), gr.update(), gr.update()
        yield outcome.output_path, frame_strip(outcome.frames), stream_summary(outcome)

    @user_errors
    def live_frame(state, frame, model_id, prompt_text, negative_text, seed_value, steps_value, strength_value,
                   guidance_value, *option_values):
        if frame is None:
            return gr.update(), gr.update(), state
        run_request = Request("image", model_id or "", prompt_text or "", negative_text or "",
                              0 if seed_value is None or seed_value < 0 else seed_value,
                              {"steps": steps_value, "strength": strength_value, "guidance": guidance_value})
        chosen = {p.name: value for p, value in zip(STREAM_SPEC.params, option_values)}
        if state is None or not state.matches(run_request, chosen):
            state = LiveStream(studio, run_request, chosen)  # settings changed: a new stream
        out = state.push(frame)
        stats = state.session.stats
        return out, (f"**{stats.fps:.2f} frames/s** · {stats.frames_in} frames in, {stats.frames_skipped} skipped"), state

    live_inputs = [live_state, webcam, model, prompt, negative, seed, steps, strength, guidance, *options]
    webcam.stream(live_frame, inputs=live_inputs, outputs=[live, live_info, live_state], stream_every=0.2,
                  time_limit=600, api_name=False, concurrency_id="generate_image")

    inputs = [model, prompt, negative, seed, steps, strength, guidance, fps, files, *options]
    event = button.click(run, inputs=inputs, outputs=[video, strip, info], api_name="stream_image",
                         concurrency_id="generate_image")
    cancel.click(runs.cancel_session, inputs=None, outputs=None, cancels=[event], queue=False, api_name=False)
    return {"model": model, "button": button, "info": info}
