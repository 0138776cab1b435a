"""Presets tab: shipped and user presets; load into a tab, rename, delete, import, export."""

from __future__ import annotations


import gradio as gr
import pandas as pd

from backends.types import ValidationError
from studio.compare import format_config
from studio.ui.common import to_json, user_errors

COLUMNS = ["name", "modality", "model", "source", "methods", "description"]


def build_presets_tab(studio, tabs: dict, tabs_component: gr.Tabs) -> dict:
    errors = gr.Markdown("")
    table = gr.Dataframe(value=pd.DataFrame(columns=COLUMNS), interactive=False, wrap=True, elem_id="presets-table")
    with gr.Row():
        name = gr.Textbox(label="Preset name (click a row)", elem_id="presets-name")
        refresh = gr.Button("Refresh", elem_id="presets-refresh")
        load = gr.Button("Load into its tab", variant="primary", elem_id="presets-load")
    details = gr.Code(language="json", label="Preset")
    with gr.Row():
        new_name = gr.Textbox(label="Rename to")
        rename = gr.Button("Rename")
        delete = gr.Button("Delete", variant="stop")
    with gr.Row():
        upload = gr.File(label="Import presets (JSON file)", file_types=[".json"], type="filepath")
        export = gr.Button("Export all presets")
        exported = gr.File(label="Exported JSON")
    status = gr.Markdown("")

    @user_errors
    def listing():
        presets, problems = studio.presets.all()
        presets.sort(key=lambda p: p.source != "user")  # yours first, then the shipped ones
        frame = pd.DataFrame(
            [[p.name, p.modality, p.model or "", p.source, format_config(p.methods), p.description] for p in presets],
            columns=COLUMNS,
        )
        message = "" if not problems else "**Presets that could not be read (skipped):**\n\n" + "\n".join(
            f"- {p}" for p in problems)
        return frame, message

    refresh.click(listing, outputs=[table, errors], api_name="presets_list")
    @user_errors
    def pick(evt: gr.SelectData, frame):
        return str(frame.iloc[evt.index[0]]["name"])

    table.select(pick, inputs=[table], outputs=[name], api_name=False)

    @user_errors
    def show(preset_name):
        if not preset_name:
            return ""
        try:
            return to_json(studio.presets.get(preset_name).to_dict())
        except ValidationError as exc:
            return to_json({"error": str(exc)})

    name.change(show, inputs=[name], outputs=[details], api_name=False)

    ordered = list(tabs.values())
    load_outputs = [tabs_component] + [c for tab in ordered for c in tab.preset_outputs]

    @user_errors
    def do_load(preset_name):
        preset = studio.presets.get(preset_name or "")
        if preset.modality not in tabs:
            raise ValidationError(f"no {preset.modality} tab to load this preset into")
        updates: list = [gr.Tabs(selected=preset.modality)]
        for tab in ordered:
            if tab.modality == preset.modality:
                updates.extend(tab.preset_updates(preset))
            else:
                updates.extend(gr.update() for _ in tab.preset_outputs)
        return updates

    load.click(do_load, inputs=[name], outputs=load_outputs, api_name=False)

    @user_errors
    def do_rename(old, new):
        studio.presets.rename(old or "", new or "")
        return (*listing(), f"Renamed **{old}** to **{new}**.")

    rename.click(do_rename, inputs=[name, new_name], outputs=[table, errors, status], api_name="presets_rename")

    @user_errors
    def do_delete(preset_name):
        studio.presets.delete(preset_name or "")
        return (*listing(), f"Deleted **{preset_name}**.")

    delete.click(do_delete, inputs=[name], outputs=[table, errors, status], api_name="presets_delete")

    @user_errors
    def do_import(path):
        if not path:
            return gr.update(), gr.update(), ""
        imported = studio.presets.import_file(path)
        return (*listing(), f"Imported {', '.join(p.name for p in imported)}.")

    upload.upload(do_import, inputs=[upload], outputs=[table, errors, status], api_name="presets_import")

    @user_errors
    def do_export():
        path = studio.exports.new_file("fastgen-presets.json")  # one pruned folder, no temp dir per export
        path.write_text(studio.presets.export_json(), encoding="utf-8")
        return str(path)

    export.click(do_export, outputs=[exported], api_name="presets_export")
    return {"listing": listing, "table": table, "errors": errors}
