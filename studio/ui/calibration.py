"""Calibrate tab: fit a method to a model (TeaCache's rescale curve, MagCache's ratios, a
threshold for a target skip rate), see the fit, keep or delete stored calibrations.

The work is ``studio.calibration.run_calibration``; this module only lays out controls."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from studio import calibration
from studio.plots import calibration_curve_figure
from studio.ui.common import model_choices, user_errors
from studio.ui.runs import SessionRuns, session_key

TABLE_COLUMNS = ["id", "method", "calibration", "settings", "device", "date"]
SKIP_RATE = "target skip rate"
MODALITIES = ("image", "video")  # the DiT caches that calibrate


def goal_choices(method: str) -> list[str]:
    return {"teacache": [calibration.CURVE, SKIP_RATE], "mag_cache": [calibration.RATIOS]}.get(method, [SKIP_RATE])


def build_calibration_panel(studio) -> dict:
    gr.Markdown("Fit a caching method to **this** model: TeaCache's rescale curve from the model's own "
                "input-change vs output-change statistics, MagCache's magnitude ratios, or the threshold that "
                "skips a target share of steps. Stored per model and settings; TeaCache (rescale auto or "
                "calibrated) and MagCache (ratios calibrate) use them automatically afterwards.")
    first = (model_choices(studio, "image") or [None])[0]
    with gr.Row():
        with gr.Column(scale=2):
            with gr.Row():
                modality = gr.Dropdown(list(MODALITIES), value="image", label="Modality")
                model = gr.Dropdown(model_choices(studio, "image"), value=first, allow_custom_value=True,
                                    label="Model", elem_id="calibrate-model")
            method = gr.Dropdown(list(calibration.CALIBRATABLE), value="teacache", label="Method",
                                 elem_id="calibrate-method")
            goal = gr.Radio(goal_choices("teacache"), value=calibration.CURVE, label="Goal")
            target = gr.Slider(0.05, 0.95, value=0.5, step=0.05, label="Target skip rate",
                               info="share of denoiser calls answered from the cache (for a target skip rate)")
            with gr.Row():
                prompts = gr.Slider(1, calibration.MAX_PROMPTS, value=3, step=1, label="Calibration prompts")
                steps = gr.Number(value=25, precision=0, label="Steps")
            prompt_texts = gr.Textbox(lines=3, label="Prompts (optional, one per line)",
                                      info="empty: the bundled models' own vocabulary")
            with gr.Row():
                start = gr.Button("Start", variant="primary", elem_id="calibrate-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="calibrate-cancel")
        with gr.Column(scale=3):
            result = gr.Markdown("", elem_id="calibrate-result")
            curve = gr.Plot(label="Input change vs output change")
            table = gr.Dataframe(pd.DataFrame(columns=TABLE_COLUMNS), interactive=False, label="Stored calibrations",
                                 elem_id="calibrate-table")
            with gr.Row():
                delete_id = gr.Number(value=None, precision=0, label="Calibration id")
                delete = gr.Button("Delete", variant="stop")

    runs = SessionRuns()

    def listing(model_id):
        rows = calibration.calibration_table(studio.history, model_id) if model_id else []
        return pd.DataFrame(rows, columns=TABLE_COLUMNS)

    @user_errors
    def on_modality(m):
        choices = model_choices(studio, m)
        value = choices[0] if choices else None
        return gr.update(choices=choices, value=value), listing(value)

    def on_method(name):
        choices = goal_choices(name)
        return gr.update(choices=choices, value=choices[0])

    @user_errors
    def on_start(m, model_id, name, goal_name, rate, count, step_count, texts, request: gr.Request = None,
                 progress=gr.Progress()):
        aim = rate if goal_name == SKIP_RATE else goal_name
        params = {"steps": int(step_count)} if step_count else {}
        key = session_key(request)
        token = runs.start(key)  # the Cancel button sets it: the passes stop at their next denoiser call
        try:
            record = calibration.run_calibration(studio, m, model_id, name, aim, prompts=int(count),
                                                 prompt_texts=(texts or "").splitlines(), params=params,
                                                 progress=lambda message: progress(0, desc=message), cancel=token)
        finally:
            runs.finish(key, token)
        return summary(name, record), figure(record), listing(model_id)

    @user_errors
    def on_delete(model_id, calibration_id):
        if calibration_id is None or not studio.history.delete_calibration(int(calibration_id)):
            raise gr.Error(f"no stored calibration #{calibration_id}", print_exception=False)
        return f"Deleted calibration #{int(calibration_id)}.", listing(model_id)

    modality.change(on_modality, inputs=[modality], outputs=[model, table], api_name=False)
    model.change(listing, inputs=[model], outputs=[table], api_name=False)
    method.change(on_method, inputs=[method], outputs=[goal], api_name=False)
    event = start.click(on_start, inputs=[modality, model, method, goal, target, prompts, steps, prompt_texts],
                        outputs=[result, curve, table], api_name=False, concurrency_limit=1)

    def on_cancel(request: gr.Request):
        runs.cancel_session(request)
        return "Cancelled: nothing was stored."

    cancel.click(on_cancel, outputs=[result], cancels=[event], api_name=False, queue=False)
    delete.click(on_delete, inputs=[model, delete_id], outputs=[result, table], api_name=False)
    return {"start": on_start, "cancel": runs, "delete": on_delete, "listing": listing, "on_method": on_method, "table": table,
            "model": model}


def summary(method: str, record: dict) -> str:
    lines = [f"**Stored calibration #{record['id']}** for `{method}`: {calibration.describe(record)}",
             f"Settings: {calibration.settings_text(record.get('settings') or {})} · "
             f"{record.get('prompts')} prompt(s)"]
    if record.get("kind") == "rescale":
        terms = ", ".join(f"{c:.4g}" for c in record["coefficients"])
        lines.append(f"Polynomial (highest power first): [{terms}]; TeaCache uses it with rescale=auto or calibrated.")
    if record.get("kind") == "threshold":
        probes = ", ".join(f"{t:g} → {100 * r:.0f}%" for t, r in record.get("probes", []))
        lines.append(f"Chosen threshold **{record['threshold']:g}**; probes (threshold → skip rate): {probes}")
    return "\n\n".join(lines)


def figure(record: dict):
    if record.get("kind") != "rescale":
        return None
    return calibration_curve_figure(*calibration.curve_points(record))
