"""Compare tab: baseline vs any number of method configurations, and parameter sweeps."""

from __future__ import annotations

import base64
import io
import json

import gradio as gr
import pandas as pd

from backends.accel.base import all_methods
from backends.params import controls_for
from backends.types import MODALITIES, Request, ValidationError
from studio.compare import parse_configs, parse_values, run_compare, sweep_configs
from studio.plots import speed_quality_figure, stages_figure, text_diff_html
from studio.ui.common import model_choices, progress_adapter, user_errors
from studio.ui.runs import Progress, SessionRuns, run_with_token


def default_params(modality: str) -> dict:
    """The Parameters box's starting JSON: the modality's defaults from its one table
    (``backends.params``), sizes left to the model."""
    return {spec.name: spec.default for spec in controls_for(modality)
            if spec.default is not None and not spec.zero_means_default}


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
                params = gr.Code(value=json.dumps(default_params("image")), language="json", label="Parameters")
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
        with gr.Column(scale=4):
            summary = gr.Markdown("")
            gallery = gr.Gallery(label="Outputs", columns=4, height=320, elem_id="compare-gallery")
            texts = gr.HTML("")
            table = gr.Dataframe(interactive=False, wrap=True, elem_id="compare-table")
            with gr.Row():
                scatter = gr.Plot(label="Speed vs quality")
                stages = gr.Plot(label="Time per stage")
            with gr.Row():
                csv_file = gr.File(label="CSV")
                html_file = gr.File(label="HTML report")

    @user_errors
    def on_modality(m):
        choices = model_choices(studio, m)
        return gr.update(choices=choices, value=choices[0] if choices else None), json.dumps(default_params(m))

    modality.change(on_modality, inputs=[modality], outputs=[model, params], api_name=False)

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

    def present(report):
        table_rows = report.table()
        images, gallery, html_parts = [], [], []
        baseline_text = report.rows[0].outputs[0] if report.rows[0].outputs else ""
        for row in report.rows:
            for out, path in zip(row.outputs[:1], row.output_paths[:1] or [None]):
                if report.modality == "image":
                    images.append((out, row.label))
                    gallery.append((path or out, row.label))  # the kept file, served in place
                elif report.modality == "video":
                    images.append((out[0], row.label))
                    gallery.append((out[0], row.label))
                elif report.modality == "text":
                    html_parts.append(f"<h4>{row.label}</h4>" + text_diff_html(baseline_text, out))
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
        return (text, gallery, "".join(html_parts), pd.DataFrame(table_rows),
                speed_quality_figure(report), stages_figure(report), str(csv_path), str(html_path))

    outputs = [summary, gallery, texts, table, scatter, stages, csv_file, html_file]

    def workers() -> int:  # fan out over Ray workers when there are several
        return len(getattr(studio.executor, "workers", ())) or 1

    runs = SessionRuns()  # this tab's comparisons in flight, per session, for its Cancel button

    def stream_compare(request, progress, base, configs, seed_list, repeats, warmup):
        """Run the comparison in a worker thread, yielding while it goes (``studio.ui.runs``):
        Cancel stops the run in progress and the ones after it; the runs already made stay in
        History under the compare group."""
        report_progress = progress_adapter(progress)

        def work(token, on_progress):
            return run_compare(studio, base, configs, repeats=int(repeats), warmup=bool(warmup), seeds=seed_list,
                               progress=on_progress, cancel=token, parallel=workers(),
                               perplexity=base.modality == "text")  # held-out perplexity column for text

        unchanged = [gr.update() for _ in outputs]
        for item in run_with_token(runs, request, work):
            if isinstance(item, Progress):
                report_progress(item.done, item.total, item.stage)
            elif item is not None:  # the report, last
                yield present(item)
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

    def do_cancel(request: gr.Request):
        runs.cancel_session(request)
        return "Cancelled. The runs already made are in History under their compare group."

    cancel.click(do_cancel, outputs=[summary], cancels=[compare_event, sweep_event], api_name="compare_cancel",
                 queue=False)
    return {"model": model}
