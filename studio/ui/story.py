"""Story tab: a request -> planned steps -> text and an image per step, interleaved."""

from __future__ import annotations

import gradio as gr

from studio.story import StoryRequest, run_story, story_fragment
from studio.ui.common import accel_panel, model_dropdown, user_errors
from studio.ui.runs import Progress, SessionRuns, run_with_token


def build_story_tab(studio) -> None:
    gr.Markdown("A language model plans the steps and writes each one; the image model draws each step. "
                "Text and image accelerations are chosen independently; the whole story is one history run "
                "with its stages as child runs.")
    with gr.Row():
        with gr.Column(scale=2):
            request = gr.Textbox(label="Request", value="a 4-step how-to: drawing red and blue shapes",
                                 elem_id="story-request")
            steps = gr.Slider(1, 8, value=4, step=1, label="Steps", elem_id="story-steps")
            seed = gr.Number(value=0, precision=0, label="Seed (shared by every image: consistent style)")
            text_model = model_dropdown(studio, "text", label="Text model (planner and writer)", elem_prefix="story-")
            image_model = model_dropdown(studio, "image", label="Image model", elem_prefix="story-")
            with gr.Tab("Text acceleration"):
                text_panel = accel_panel("text", elem_prefix="story-")
            with gr.Tab("Image acceleration"):
                image_panel = accel_panel("image", elem_prefix="story-")
            with gr.Row():
                button = gr.Button("Write and draw", variant="primary", elem_id="story-run")
                cancel = gr.Button("Cancel", variant="stop", elem_id="story-cancel")
        with gr.Column(scale=3):
            info = gr.Markdown("", elem_id="story-info")
            page = gr.HTML("", elem_id="story-page")
            with gr.Row():
                html_file = gr.File(label="HTML")
                md_file = gr.File(label="Markdown")

    n_text = len(text_panel.inputs)

    runs = SessionRuns()  # this tab's stories in flight, per session, for its Cancel button

    @user_errors
    def run(gr_request: gr.Request, progress=gr.Progress(), *values):
        """Runs the story in a worker thread and yields while it waits: a Cancel, a cancelled
        API job or a closed connection stops the stage in progress (``studio.ui.runs``)."""
        request, steps, seed, text_model, image_model = values[:5]
        values = values[5:]
        story = StoryRequest(request or "", text_model or "", image_model or "", int(steps), int(seed or 0),
                             text_panel.collect(values[:n_text]), image_panel.collect(values[n_text:]))
        unchanged = (gr.update(), gr.update(), gr.update(), gr.update())
        result = None
        work = lambda token, on_progress: run_story(studio, story, progress=on_progress, cancel=token)  # noqa: E731
        for item in run_with_token(runs, gr_request, work):
            if isinstance(item, Progress):
                progress((item.done, max(item.total, 1)), desc=str(item.stage)[:40])
            elif item is not None:  # the StoryResult, last
                result = item
                continue
            yield unchanged  # progress or heartbeat: where a close (cancel, disconnect) lands
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.timings.items())
        lines = [f"**Story run #{result.story_id}** — {stages}"]
        lines += [f"- step {s.index}: text {s.text_seconds:.2f}s (run #{s.text_run_id}), "
                  f"image {s.image_seconds:.2f}s (run #{s.image_run_id})" for s in result.steps]
        # the fragment, not the downloadable document: its CSS is scoped to the story's own
        # container, so showing it here leaves the other tabs' layout alone
        yield ("\n".join(lines), story_fragment(result.title, result.steps, studio.outputs), result.html_path,
               result.markdown_path)

    events = [button.click(run, inputs=[request, steps, seed, text_model, image_model, *text_panel.inputs,
                                        *image_panel.inputs],
                           outputs=[info, page, html_file, md_file], api_name="story")]

    cancel.click(runs.cancel_session, inputs=None, outputs=None, cancels=events, queue=False, api_name="story_cancel")
