"""Tune tab: the fastest method configuration that keeps a quality floor, confirmed on
held-out prompts (``studio.tune``), and the ``/tune`` API endpoint."""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import gradio as gr
import pandas as pd

from backends.accel.base import methods_for
from backends.control import CancelToken, cancel_after
from backends.types import MODALITIES, StudioError, ValidationError
from benchmarks.prompts import default_prompts
from studio.plots import tune_pareto_figure
from studio.tune import list_studies, run_tune
from studio.tune_spec import TuneSpec, default_methods, parse_tune_json, spec_from_dict
from studio.ui.common import model_choices, user_errors
from studio.ui.runs import Progress, SessionRuns, run_with_token

log = logging.getLogger(__name__)

FLOOR_EXAMPLES = {"image": "adherence>=-5, psnr>=28", "video": "adherence>=-5, psnr>=28",
                  "audio": "adherence>=-5, lsd<=6", "text": "exact"}
FLOOR_HELP = ("conditions joined by ',' or 'and': psnr>=28, ssim>=0.95, adherence>=-5 (points of the bundled "
              "classifier vs the baseline), lsd<=6, token_agreement>=0.9, exact (bit-identical)")


def prompts_text(modality: str) -> str:
    return "\n".join(p.replace("\n", " ") for p in default_prompts(modality, 8)) if modality != "text" else ""


def result_markdown(result) -> str:
    """The winner with its tune and held-out figures, the preset it saved, the notes."""
    lines = [f"Study **{result.study}**: {len(result.trials)} trials measured, {result.failed} failed "
             f"({result.new_trials} new) on "
             f"{len(result.tune_prompts)} tune prompt(s), confirmed on {len(result.heldout_prompts)} held-out "
             f"prompt(s), floor `{result.floor}`, device `{result.device}`."]
    w = result.winner
    if w is not None:
        s, q = w.heldout.speedup, w.heldout.figures
        quality = ", ".join(f"{k} {q[k]:.3f}" for k in result.quality_keys() if k in q)
        tune = f"{w.tune.speedup:.2f}x" if w.tune and w.tune.speedup else "-"
        lines.append(f"**Winner**: `{w.heldout.label}`: held-out **{s.median:.2f}x** (min {s.low:.2f} – max "
                     f"{s.high:.2f}), tune prompts {tune}; held-out {quality}.")
        if result.best_shipped is not None:
            b = result.best_shipped
            lines.append(f"Best shipped preset at this floor, same run: {b.label} {b.heldout.speedup.median:.2f}x.")
        else:
            lines.append("No shipped preset of this model meets this floor on the held-out prompts.")
    elif not result.cancelled and any(c.kind == "tuned" and c.feasible for c in result.confirmed):
        lines.append("A configuration met the floor on the held-out prompts, but none was faster than the "
                     "baseline there: nothing saved.")
    elif not result.cancelled:
        lines.append("No configuration met the floor on the held-out prompts: nothing saved.")
    if result.preset:
        lines.append(f"Saved as the preset **{result.preset}** (Presets tab).")
    lines += [f"- {note}" for note in result.notes]
    return "\n\n".join(lines)


def studies_frame(studio) -> pd.DataFrame:
    try:
        studies = list_studies(studio.history.engine.url.render_as_string(hide_password=False))
    except StudioError:
        studies = []
    columns = ["study", "model", "floor", "trials", "best_heldout_speedup", "winner", "preset", "device", "started"]
    return pd.DataFrame([{k: s.get(k) for k in columns} for s in studies], columns=columns)


def api_tune(studio, body: str, cancel: Any = None) -> str:
    """``/tune``'s work: the same inputs as the tab as one JSON object, the result as JSON.
    The tune stops (its trials kept in the study) at the studio's ``--time-limit`` or when
    ``cancel`` is set (the client disconnected or cancelled)."""
    spec = parse_tune_json(body)
    token = CancelToken(studio.time_limit_s, parent=cancel)
    timer = cancel_after(token)
    try:
        return json.dumps(run_tune(studio, spec, cancel=token).to_dict(), default=str)
    finally:
        if timer is not None:
            timer.cancel()


def build_tune_tab(studio) -> dict:
    first_models = model_choices(studio, "image")
    with gr.Row():
        with gr.Column(scale=3):
            with gr.Row():
                modality = gr.Dropdown(list(MODALITIES), value="image", label="Modality")
                model = gr.Dropdown(first_models, value=(first_models or [None])[0], allow_custom_value=True,
                                    label="Model", elem_id="tune-model")
            prompts = gr.Textbox(value=prompts_text("image"), lines=5, label="Prompts, one per line",
                                 info="split into tune and held-out halves; empty: the bundled benchmark prompts",
                                 elem_id="tune-prompts")
            floor = gr.Textbox(value=FLOOR_EXAMPLES["image"], label="Quality floor", info=FLOOR_HELP,
                               elem_id="tune-floor")
            params = gr.Textbox(value="{}", label="Parameters (JSON, over the model's recommended settings)",
                                elem_id="tune-params")
            with gr.Row():
                trials = gr.Number(value=20, precision=0, minimum=1, maximum=500, label="Trials", elem_id="tune-trials")
                minutes = gr.Number(value=None, minimum=0, label="Minutes (0 = no time limit)")
                repeats = gr.Slider(1, 5, value=2, step=1, label="Repeats per prompt", elem_id="tune-repeats")
            methods = gr.CheckboxGroup(default_methods("image", None), value=default_methods("image", None),
                                       label="Allowed methods (the ones that apply to the model)",
                                       elem_id="tune-methods")
            with gr.Row():
                start = gr.Button("Start tune", variant="primary", elem_id="tune-run")
                cancel = gr.Button("Cancel", variant="stop")
        with gr.Column(scale=4):
            summary = gr.Markdown("", elem_id="tune-summary")
            plot = gr.Plot(label="Speed vs quality (tune prompts)", elem_id="tune-plot")
    # the tables take the page's full width (a dozen columns do not fit beside the inputs);
    # their headers stay on one line and a table wider than the page scrolls (STUDIO_CSS)
    with gr.Row():
        pareto = gr.Dataframe(interactive=False, wrap=True, label="Pareto front (tune prompts)",
                              elem_id="tune-pareto", elem_classes=["tune-table"])
    with gr.Row():
        confirmed = gr.Dataframe(interactive=False, wrap=True, label="Held-out confirmation (one interleaved run)",
                                 elem_id="tune-confirmed", elem_classes=["tune-table"])
    with gr.Row():
        studies = gr.Dataframe(interactive=False, wrap=True, label="Past studies", elem_id="tune-studies",
                               elem_classes=["tune-table"])
    refresh = gr.Button("Refresh studies", size="sm")

    @user_errors
    def on_modality(m):
        choices = model_choices(studio, m)
        names = default_methods(m, None)
        return (gr.update(choices=choices, value=choices[0] if choices else None), prompts_text(m),
                FLOOR_EXAMPLES[m], gr.update(choices=names, value=names))

    modality.change(on_modality, inputs=[modality], outputs=[model, prompts, floor, methods], api_name=False)

    @user_errors
    def on_model(m, name):
        """The methods that apply to this model's family (all of the modality's when the
        model cannot be described)."""
        try:
            family = studio.describe_model(m, name).get("family") if name else None
        except StudioError:
            family = None
        names = default_methods(m, family) or [c.spec.name for c in methods_for(m)]
        return gr.update(choices=names, value=names)

    model.change(on_model, inputs=[modality, model], outputs=[methods], api_name=False)

    def make_spec(modality, model, prompts, floor, params, trials, minutes, repeats, methods) -> TuneSpec:
        try:
            param_values = json.loads(params or "{}")
        except ValueError:
            raise ValidationError("parameters are not valid JSON") from None
        lines = [line.strip() for line in str(prompts or "").splitlines() if line.strip()]
        if not methods:
            raise ValidationError("allow at least one method")
        return spec_from_dict({
            "modality": modality, "model": model or "", "floor": floor or "", "prompts": lines or None,
            "params": param_values, "trials": int(trials) if trials else None,
            "minutes": float(minutes) if minutes else None, "repeats": int(repeats), "methods": list(methods)})

    runs = SessionRuns()
    outputs = [summary, plot, pareto, confirmed, studies]

    @user_errors
    def do_tune(request: gr.Request, progress=gr.Progress(), *values):
        spec = make_spec(*values)
        def report(done: int, total: int, stage: str) -> None:
            progress((done, max(total, 1)), desc=str(stage)[:90])

        def work(token, on_progress):
            return run_tune(studio, spec, progress=on_progress, cancel=token)

        unchanged = [gr.update() for _ in outputs]
        for item in run_with_token(runs, request, work):
            if isinstance(item, Progress):
                report(item.done, item.total, item.stage)
            elif item is not None:
                yield (result_markdown(item), tune_pareto_figure(item), pd.DataFrame(item.pareto_rows()),
                       pd.DataFrame(item.confirmed_rows()), studies_frame(studio))
                return
            yield unchanged

    inputs = [modality, model, prompts, floor, params, trials, minutes, repeats, methods]
    event = start.click(do_tune, inputs=inputs, outputs=outputs, api_name=False, concurrency_id="compare")

    def do_cancel(request: gr.Request):
        runs.cancel_session(request)
        return "Cancelled. The trials made so far are kept in the study: start the same tune again to resume."

    cancel.click(do_cancel, outputs=[summary], cancels=[event], api_name="tune_cancel", queue=False)
    refresh.click(lambda: studies_frame(studio), outputs=[studies], api_name=False)

    @user_errors
    def tune(request: gr.Request, body: str) -> Iterator[str]:
        """Auto-tune as JSON in, JSON out: {modality, model, floor, prompts?, params?, trials?, minutes?,
        methods?, repeats?, split?, seed?, study?}; returns the Pareto front, the held-out confirmation and
        the winner (saved as a preset). Streams "" while it runs; a client that disconnects stops it."""
        parse_tune_json(body)  # a bad body is refused before anything starts
        for item in run_with_token(runs, request, lambda token, _progress: api_tune(studio, body, token)):
            if isinstance(item, str):
                yield item
                return
            yield ""

    gr.api(tune, api_name="tune", concurrency_id="compare")
    return {"studies": studies, "load_studies": lambda: studies_frame(studio), "pareto": pareto,
            "confirmed": confirmed}
