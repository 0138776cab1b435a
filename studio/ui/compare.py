"""Compare tab: baseline vs any number of method configurations, and parameter sweeps."""

from __future__ import annotations

import base64
import html
import io
import json

import gradio as gr
import pandas as pd

from backends.accel.base import all_methods
from backends.catalog import recommended_params
from backends.params import controls_for
from backends.types import MODALITIES, Request, ValidationError
from studio import evidence
from studio.compare import parse_config, parse_configs, parse_values, run_compare, sweep_configs
from studio.plots import (block_timeline_figure, difference_figure, draft_length_figure, figure_image, grid_figure,
                          seed_drift_figure, speed_quality_figure, stages_figure, timeline_figure)
from studio.ui.common import model_choices, progress_adapter, user_errors
from studio.ui.runs import Progress, SessionRuns, run_with_token


def default_params(modality: str, model: str | None = None) -> dict:
    """The Parameters box's starting JSON: the modality's defaults from its one table
    (``backends.params``), sizes left to the model, and ``model``'s recommended settings
    over them (tiny-ar-shapes runs at guidance 1.5, not the image default 5)."""
    defaults = {spec.name: spec.default for spec in controls_for(modality)
                if spec.default is not None and not spec.zero_means_default}
    return {**defaults, **recommended_params(model or "")}


def params_after_model_pick(params_text: str, modality: str, model: str) -> str:
    """The Parameters box after the user picks ``model``: its recommended settings over
    what the box holds (the user's other values kept, as the Image tab's sliders keep
    theirs). Left exactly as typed when the model recommends nothing or the text is not
    a JSON object (half-edited text is the user's; the run says what is wrong with it)."""
    recommended = recommended_params(model or "")
    try:
        current = json.loads(params_text or "{}")
    except ValueError:
        current = None
    if not recommended or not isinstance(current, dict):
        return params_text
    return json.dumps({**current, **recommended})


EXAMPLE_CONFIGS = "deepcache(interval=3)\nsampler(scheduler=dpmpp_2m, steps=12)\ndeepcache(interval=3) + cfg_truncation(fraction=0.5)"

def build_compare_tab(studio) -> dict:
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                modality = gr.Dropdown(list(MODALITIES), value="image", label="Modality")
                model = gr.Dropdown(model_choices(studio, "image"), value=(model_choices(studio, "image") or [None])[0],
                                    allow_custom_value=True, label="Model", elem_id="compare-model")
            prompt = gr.Textbox(label="Prompt", lines=2, elem_id="compare-prompt")
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                seeds = gr.Textbox(value="0", label="Seeds (comma separated)")
                params = gr.Code(value=json.dumps(default_params("image", model.value)), language="json",
                                 label="Parameters")
            configs = gr.Textbox(value=EXAMPLE_CONFIGS, lines=5, elem_id="compare-configs",
                                 label="Configurations, one per line (baseline runs first automatically)",
                                 info="e.g. deepcache(interval=3) + sampler(scheduler=dpmpp_2m, steps=20)")
            with gr.Row():
                warmup = gr.Checkbox(value=True, label="Warm-up run per configuration (not timed)")
                repeats = gr.Slider(1, 10, value=3, step=1, label="Repeats (runs interleaved per seed)",
                                    info="speedup = median of paired ratios (each run vs the baseline run "
                                         "just before it), range min-max; 3 or more for numbers to trust")
            with gr.Row():
                run = gr.Button("Run comparison", variant="primary", elem_id="compare-run")
                cancel = gr.Button("Cancel", variant="stop")
            with gr.Accordion("Parameter sweep", open=False):
                with gr.Row():
                    sweep_method = gr.Dropdown(sorted(all_methods()), label="Method")
                    sweep_param = gr.Textbox(label="Parameter", placeholder="interval")
                    sweep_values = gr.Textbox(label="Values", placeholder="2, 3, 4, 5  or  4..50:6")
                sweep = gr.Button("Run sweep")
            with gr.Accordion("XYZ grid: two parameters, every combination", open=False):
                with gr.Row():
                    grid_x = gr.Textbox(label="X: method.parameter", placeholder="deepcache.interval",
                                        elem_id="compare-grid-x")
                    grid_x_values = gr.Textbox(label="X values", placeholder="2, 3, 4", elem_id="compare-grid-xv")
                with gr.Row():
                    grid_y = gr.Textbox(label="Y: method.parameter", placeholder="sampler.steps",
                                        elem_id="compare-grid-y")
                    grid_y_values = gr.Textbox(label="Y values", placeholder="6, 8", elem_id="compare-grid-yv")
                grid_run = gr.Button("Run grid", elem_id="compare-grid-run")
            with gr.Accordion("Seed drift: one configuration over several seeds", open=False):
                drift_config = gr.Textbox(label="Configuration", placeholder="deepcache(interval=3)",
                                          elem_id="compare-drift-config")
                drift_seeds = gr.Textbox(value="0, 1, 2, 3", label="Seeds", elem_id="compare-drift-seeds")
                drift_run = gr.Button("Run over seeds", elem_id="compare-drift-run")
        with gr.Column(scale=4):
            summary = gr.Markdown("")
            gallery = gr.Gallery(label="Outputs", columns=4, height=320, elem_id="compare-gallery")
            texts = gr.HTML("", elem_id="compare-texts")
    table = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-table", label="Comparison")
    with gr.Accordion("Full table (every figure)", open=False):
        table_full = gr.Dataframe(interactive=False, wrap=False, elem_id="compare-table-full")
    timeline = gr.Image(label="Timeline: computed / partial / reused per step", type="pil", format="png",
                        interactive=False, elem_id="compare-timeline", visible=False)
    with gr.Row():
        row_pick = gr.Dropdown([], label="Row to inspect against the baseline", elem_id="compare-row")
        frame_pick = gr.Number(0, precision=0, minimum=0, label="Frame (video)", elem_id="compare-frame")
    with gr.Row():
        slider = gr.ImageSlider(label="A/B: baseline | row", type="pil", format="png", interactive=False,
                                elem_id="compare-slider", visible=False)
        diff_image = gr.Image(label="|difference| vs baseline", type="pil", format="png", interactive=False,
                              elem_id="compare-diff", visible=False)
    blocks_image = gr.Image(label="Per block", type="pil", format="png", interactive=False, elem_id="compare-blocks",
                            visible=False)
    grid_image = gr.Image(label="XYZ grid", type="pil", format="png", interactive=False, elem_id="compare-grid",
                          visible=False)
    with gr.Row():
        drift_image = gr.Image(label="Seed drift", type="pil", format="png", interactive=False, elem_id="compare-drift",
                               visible=False)
        drift_table = gr.Dataframe(interactive=False, elem_id="compare-drift-table", visible=False)
    with gr.Row():
        scatter = gr.Plot(label="Speed vs quality")
        stages = gr.Plot(label="Time per stage")
    with gr.Row():
        csv_file = gr.File(label="CSV")
        html_file = gr.File(label="HTML report")
    report_state = gr.State(None)

    @user_errors
    def on_modality(m):
        choices = model_choices(studio, m)
        first = choices[0] if choices else None
        return gr.update(choices=choices, value=first), json.dumps(default_params(m, first))

    modality.change(on_modality, inputs=[modality], outputs=[model, params], api_name=False)
    # only on user input: a comparison's own settings are not overwritten by a programmatic change
    model.input(params_after_model_pick, inputs=[params, modality, model], outputs=[params], api_name=False)

    def make_request(modality, model, prompt, negative, seeds, params):
        try:
            seed_list = [int(s) for s in str(seeds).replace(" ", "").split(",") if s != ""] or [0]
        except ValueError:
            raise ValidationError("seeds must be whole numbers separated by commas") from None
        if len(seed_list) > 8:
            raise ValidationError("at most 8 seeds per comparison")
        try:
            param_values = json.loads(params or "{}")
        except ValueError as exc:
            raise ValidationError(f"parameters are not valid JSON: {exc}") from None
        return Request(modality, model or "", prompt or "", negative or "", seed_list[0], param_values), seed_list

    def row_views(report, label, frame):
        """The A/B slider, the |difference| heatmap and the per-block timeline of one row."""
        hidden = gr.update(visible=False, value=None)
        row = next((r for r in report.rows if r.label == label), None) if report else None
        if row is None or not row.outputs:
            return hidden, hidden, hidden
        blocks = evidence.block_timeline(row.timeline)
        blocks_view = (gr.update(visible=True, value=figure_image(block_timeline_figure(blocks, row.label)))
                       if blocks else hidden)
        base = report.rows[0]
        if report.modality not in ("image", "video") or not base.outputs:
            return hidden, hidden, blocks_view
        a = evidence.first_frame(base.outputs[0], int(frame or 0))
        b = evidence.first_frame(row.outputs[0], int(frame or 0))
        diff = figure_image(difference_figure(evidence.abs_difference(a, b), row.label))
        return (gr.update(visible=True, value=(a.convert("RGB"), b.convert("RGB"))),
                gr.update(visible=True, value=diff), blocks_view)

    def timeline_view(report):
        fig = (draft_length_figure(report.rows) if report.modality == "text"
               else timeline_figure(report.rows))
        return gr.update(visible=True, value=figure_image(fig)) if fig is not None else gr.update(visible=False)

    def present(report):
        images, gallery, html_parts = [], [], []
        tokenizer = evidence.loaded_tokenizer(studio.manager, report.model) if report.modality == "text" else None
        for row in report.rows:
            for out, path in zip(row.outputs[:1], row.output_paths[:1] or [None]):
                if report.modality == "image":
                    images.append((out, row.label))
                    gallery.append((path or out, row.label))  # the kept file, served in place
                elif report.modality == "video":
                    images.append((out[0], row.label))
                    gallery.append((out[0], row.label))
                elif report.modality == "text" and row is not report.rows[0] and report.rows[0].outputs:
                    html_parts.append(f"<h4>{html.escape(row.label)}</h4>"
                                      + evidence.text_difference_html(report.rows[0], row, tokenizer))
        csv_path = studio.exports.new_file(f"compare-{report.group}.csv")  # one pruned folder, no temp dirs
        csv_path.write_text(report.to_csv(), encoding="utf-8")
        embedded = {}
        for out, label in images:
            buffer = io.BytesIO()
            out.save(buffer, format="PNG")
            embedded[label] = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        html_path = studio.exports.new_file(f"compare-{report.group}.html")
        html_path.write_text(report.to_html(embedded), encoding="utf-8")
        failed = [r for r in report.rows if r.error]
        text = (f"Compare group `{report.group}` · Pareto front: **{', '.join(report.pareto()) or '-'}** · "
                "speedup: median of paired ratios (min-max); ideal: what the caching methods skipped, at the "
                "measured cost of a full vs a partial evaluation; efficiency = speedup / ideal")
        if failed:
            text += "\n\n" + "\n".join(f"- ❌ `{r.label}`: {r.error}" for r in failed)
        flagged = [(r.label, f["message"]) for r in report.rows for f in r.findings]  # studio.detectors
        if flagged:
            text += "\n\n" + "\n".join(f"- ⚠️ `{label}`: {message}" for label, message in flagged)
        others = [r.label for r in report.rows[1:] if r.outputs]
        picked = others[0] if others else None
        return (text, gallery, "".join(html_parts), evidence.compact_table(report), speed_quality_figure(report),
                stages_figure(report), str(csv_path), str(html_path), report.frame(),
                timeline_view(report), report, gr.update(choices=others, value=picked),
                *row_views(report, picked, 0))

    outputs = [summary, gallery, texts, table, scatter, stages, csv_file, html_file,  # the first, as before
               table_full, timeline, report_state, row_pick, slider, diff_image, blocks_image]
    grid_outputs = [*outputs, grid_image]
    drift_outputs = [*outputs, drift_image, drift_table]

    def workers() -> int:  # fan out over Ray workers when there are several
        return len(getattr(studio.executor, "workers", ())) or 1

    runs = SessionRuns()  # this tab's comparisons in flight, per session, for its Cancel button

    def stream_compare(request, progress, base, configs, seed_list, repeats, warmup, shown=None, finish=present):
        """Run the comparison in a worker thread, yielding while it goes (``studio.ui.runs``):
        Cancel stops the run in progress and the ones after it; the runs already made stay in
        History under the compare group. ``finish`` turns the report into ``shown``'s values."""
        report_progress = progress_adapter(progress)

        def work(token, on_progress):
            return run_compare(studio, base, configs, repeats=int(repeats), warmup=bool(warmup), seeds=seed_list,
                               progress=on_progress, cancel=token, parallel=workers(),
                               perplexity=base.modality == "text")  # held-out perplexity column for text

        unchanged = [gr.update() for _ in (shown or outputs)]
        for item in run_with_token(runs, request, work):
            if isinstance(item, Progress):
                report_progress(item.done, item.total, item.stage)
            elif item is not None:  # the report, last
                yield finish(item)
                return
            yield unchanged

    @user_errors
    def do_compare(request: gr.Request, progress=gr.Progress(), *values):
        modality, model, prompt, negative, seeds, params, configs, warmup, repeats = values
        base, seed_list = make_request(modality, model, prompt, negative, seeds, params)
        yield from stream_compare(request, progress, base, parse_configs(configs or ""), seed_list, repeats, warmup)

    inputs = [modality, model, prompt, negative, seeds, params]
    compare_event = run.click(do_compare, inputs=[*inputs, configs, warmup, repeats], outputs=outputs,
                              api_name="compare", concurrency_id="compare")

    @user_errors
    def do_sweep(request: gr.Request, progress=gr.Progress(), *values):
        modality, model, prompt, negative, seeds, params, configs, method, param, values_text, warmup, repeats = values
        base, seed_list = make_request(modality, model, prompt, negative, seeds, params)
        if not method or not param:
            raise ValidationError("pick a method and one of its parameters to sweep")
        first = parse_configs(configs or "")
        base_methods = first[0].methods if first else []
        try:
            sweep_list = sweep_configs(base_methods, method, param.strip(), parse_values(values_text or ""))
        except KeyError:
            raise ValidationError(f"method '{method}' has no parameter '{param}'") from None
        yield from stream_compare(request, progress, base, sweep_list, seed_list, repeats, warmup)

    sweep_event = sweep.click(do_sweep, inputs=[*inputs, configs, sweep_method, sweep_param, sweep_values, warmup,
                                                repeats], outputs=outputs, api_name="sweep", concurrency_id="compare")

    @user_errors
    def do_grid(request: gr.Request, progress=gr.Progress(), *values):
        (modality, model, prompt, negative, seeds, params, configs, x_name, x_values, y_name, y_values, warmup,
         repeats) = values
        base, seed_list = make_request(modality, model, prompt, negative, seeds, params)
        x_axis, y_axis = evidence.parse_axis(x_name, x_values), evidence.parse_axis(y_name, y_values)
        first = parse_configs(configs or "")
        grid = evidence.grid_configs(first[0].methods if first else [], x_axis, y_axis)

        def finish(report):
            cells = evidence.grid_rows(report, grid)
            pictures = [[evidence.first_frame(c.outputs[0]) if c and c.outputs and report.modality in ("image", "video")
                         else None for c in line] for line in cells]
            captions = [[evidence.cell_caption(c, report.modality) for c in line] for line in cells]
            figure = grid_figure(pictures, captions, x_axis.name, x_axis.values, y_axis.name, y_axis.values)
            return (*present(report), gr.update(visible=True, value=figure_image(figure)))

        cells = [cell for line in grid for cell in line]
        yield from stream_compare(request, progress, base, cells, seed_list, repeats, warmup, grid_outputs, finish)

    grid_event = grid_run.click(do_grid, inputs=[*inputs, configs, grid_x, grid_x_values, grid_y, grid_y_values,
                                                 warmup, repeats], outputs=grid_outputs, api_name="compare_grid",
                                concurrency_id="compare")

    @user_errors
    def do_drift(request: gr.Request, progress=gr.Progress(), *values):
        modality, model, prompt, negative, params, config_text, seeds_text, warmup, repeats = values
        base, seed_list = make_request(modality, model, prompt, negative, seeds_text, params)
        config = parse_config(config_text or "")
        if config.is_baseline:
            raise ValidationError("name one configuration to run over the seeds (the baseline runs anyway)")

        def finish(report):
            row = next((r for r in report.rows[1:] if r.outputs), None)
            if row is None:
                return (*present(report), gr.update(visible=False), gr.update(visible=False))
            metric = evidence.primary_metric(report.modality)
            entries = evidence.seed_drift(row, seed_list, metric)
            figure = figure_image(seed_drift_figure(entries, metric, row.label))
            table_rows = pd.DataFrame(evidence.drift_table(entries, metric))
            return (*present(report), gr.update(visible=True, value=figure),
                    gr.update(visible=True, value=table_rows))

        yield from stream_compare(request, progress, base, [config], seed_list, repeats, warmup, drift_outputs,
                                  finish)

    drift_event = drift_run.click(do_drift, inputs=[modality, model, prompt, negative, params, drift_config,
                                                    drift_seeds, warmup, repeats], outputs=drift_outputs,
                                  api_name="compare_seeds", concurrency_id="compare")

    @user_errors
    def on_row(report, label, frame):
        return row_views(report, label, frame)

    for trigger in (row_pick.change, frame_pick.change):
        trigger(on_row, inputs=[report_state, row_pick, frame_pick], outputs=[slider, diff_image, blocks_image],
                api_name=False)

    def do_cancel(request: gr.Request):
        runs.cancel_session(request)
        return "Cancelled. The runs already made are in History under their compare group."

    cancel.click(do_cancel, outputs=[summary], cancels=[compare_event, sweep_event, grid_event, drift_event],
                 api_name="compare_cancel",
                 queue=False)
    return {"model": model}
