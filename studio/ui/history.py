"""History tab: browse, filter, inspect, re-run, delete, export; speedup trend."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from backends.accel.base import all_methods
from backends.types import MODALITIES
from studio.ui.common import format_result, to_json, user_errors

PAGE_SIZE = 20
SEARCH_COUNT_CAP = 1000
COLUMNS = ["id", "time", "modality", "model", "prompt", "methods", "status", "seconds", "evals", "group"]


def rows_frame(runs) -> pd.DataFrame:
    return pd.DataFrame(
        [
            [r.id, r.created_at.strftime("%Y-%m-%d %H:%M:%S") if r.created_at else "", r.modality, r.model,
             (r.prompt or "")[:60], r.method_names.strip(",").replace(",", " + ") or "baseline", r.status,
             round(r.total_seconds, 3) if r.total_seconds is not None else None, r.model_evals, r.compare_group or ""]
            for r in runs
        ],
        columns=COLUMNS,
    )


def build_history_tab(studio) -> dict:
    with gr.Row():
        modality = gr.Dropdown(["", *MODALITIES], value="", label="Modality")
        model = gr.Textbox(label="Model")
        method = gr.Dropdown(["", *sorted(all_methods())], value="", label="Method")
        status = gr.Dropdown(["", "ok", "failed", "cancelled", "timeout", "oom", "running", "interrupted"], value="",
                             label="Status")
        text = gr.Textbox(label="Search prompt / error")
    with gr.Row():
        page = gr.Number(value=1, label="Page", precision=0, minimum=1)
        refresh = gr.Button("Refresh", elem_id="history-refresh")
        export = gr.Button("Export CSV")
        csv_file = gr.File(label="CSV", visible=True)
    summary = gr.Markdown("")
    table = gr.Dataframe(value=pd.DataFrame(columns=COLUMNS), interactive=False, wrap=True, elem_id="history-table")
    with gr.Row():
        run_id = gr.Number(label="Run id (click a row)", precision=0, elem_id="history-run-id")
        rerun = gr.Button("Re-run exactly")
        delete = gr.Button("Delete run (its file; a story's stages too)", variant="stop")
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Output", type="filepath", visible=True, height=256, elem_id="history-image")
            media = gr.File(label="Output file")
            text_out = gr.Textbox(label="Text output", lines=6)
        with gr.Column():
            details = gr.Code(language="json", label="Config, timings, metrics")
    with gr.Accordion("Trend: speedup of a method over time", open=False):
        with gr.Row():
            trend_model = gr.Textbox(label="Model")
            trend_method = gr.Dropdown(sorted(all_methods()), label="Method")
            trend_button = gr.Button("Show trend")
        trend_plot = gr.LinePlot(x="run_id", y="speedup", title="speedup vs baseline (same model, device, params)")

    def filters(modality, model, method, status, text):
        return {"modality": modality or None, "model": (model or "").strip() or None, "method": method or None,
                "status": status or None, "text": (text or "").strip() or None}

    @user_errors
    def load(modality, model, method, status, text, page):
        f = filters(modality, model, method, status, text)
        page = max(1, int(page or 1))
        runs = studio.history.query(limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE, **f)
        # a text search counts its first SEARCH_COUNT_CAP matches only: fast on any history
        cap = SEARCH_COUNT_CAP if f["text"] else None
        total = studio.history.count(cap=cap, **f)
        shown = f"more than {cap:,}" if cap is not None and total > cap else f"{total:,}"
        pages = "many" if cap is not None and total > cap else str(max(1, -(-total // PAGE_SIZE)))
        return rows_frame(runs), f"{shown} run(s); page {page} of {pages}"

    filter_inputs = [modality, model, method, status, text, page]
    for trigger in (refresh.click, page.submit, text.submit):
        trigger(load, inputs=filter_inputs, outputs=[table, summary], api_name=False)

    @user_errors
    def pick(evt: gr.SelectData, frame):
        return int(frame.iloc[evt.index[0]]["id"])

    table.select(pick, inputs=[table], outputs=[run_id], api_name=False)

    @user_errors
    def show(run_id):
        if not run_id:
            return None, None, "", ""
        row = studio.history.get(int(run_id))
        if row is None:
            return None, None, "", f'"no run #{int(run_id)}"'
        details = row.to_dict()
        # only a file inside the outputs folder is ever read or served, whatever the row says
        resolved = studio.outputs.resolve(row.output_path)
        path = str(resolved) if resolved is not None and resolved.is_file() else None
        if row.output_path and path is None:
            details["file"] = "file missing" if resolved is not None else "file refused: not in the outputs folder"
        image_path = path if path and path.endswith(".png") else None
        text_value = resolved.read_text(encoding="utf-8") if path and path.endswith(".txt") else ""
        if row.output_path and path is None:
            text_value = f"⚠️ {details['file']}"
        return image_path, path, text_value, to_json(details)

    run_id.change(show, inputs=[run_id], outputs=[image, media, text_out, details], api_name="history_show")

    @user_errors
    def do_rerun(run_id):
        if not run_id:
            raise gr.Error("pick a run first")
        outcome = studio.rerun(int(run_id))
        return int(outcome.run_id), format_result(outcome.result, outcome.run_id)

    rerun.click(do_rerun, inputs=[run_id], outputs=[run_id, summary], api_name="history_rerun")

    @user_errors
    def do_delete(run_id, *filter_values):
        if not run_id:
            raise gr.Error("pick a run first")
        removed = studio.history.delete([int(run_id)])
        frame, text = load(*filter_values)
        return frame, f"deleted {removed} run(s). {text}", None

    delete.click(do_delete, inputs=[run_id, *filter_inputs], outputs=[table, summary, run_id], api_name="history_delete")

    @user_errors
    def do_export(modality, model, method, status, text, _page, progress=gr.Progress()):
        """Stream the filtered history into a file (flat memory, whatever its size), with
        a progress bar; the file lands in the one pruned exports folder."""
        path = studio.exports.new_file("fastgen-history.csv")

        def report(done, total):
            progress((done, max(total, 1)), desc=f"exported {done:,} of {total:,} runs")

        with open(path, "w", encoding="utf-8", newline="") as out:
            studio.history.write_csv(out, progress=report, **filters(modality, model, method, status, text))
        return str(path)

    export.click(do_export, inputs=filter_inputs, outputs=[csv_file], api_name="history_export")

    @user_errors
    def trend(model, method):
        points = studio.history.trend((model or "").strip(), method or "")
        return pd.DataFrame([{"run_id": p["run_id"], "speedup": p["speedup"]} for p in points],
                            columns=["run_id", "speedup"])

    trend_button.click(trend, inputs=[trend_model, trend_method], outputs=[trend_plot], api_name="history_trend")
    return {"load": load, "inputs": filter_inputs, "table": table, "summary": summary}
