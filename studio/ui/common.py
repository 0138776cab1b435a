"""UI helpers shared by the tabs: the Acceleration panel, error handling, formatting.

No model logic here: everything is a call into ``studio.*`` or ``backends.*`` APIs.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from backends.accel.base import Method, methods_for
from backends.catalog import bundled
from backends.types import MethodChoice, StudioError

log = logging.getLogger(__name__)


def _as_user_error(fn: Callable, exc: Exception) -> gr.Error:
    """The one-line toast for an exception raised by a handler."""
    if isinstance(exc, StudioError):
        return gr.Error(str(exc), print_exception=False)
    log.error("handler %s failed", fn.__name__, exc_info=exc)  # a bug: log it whole, show one line
    return gr.Error("internal error: the server log has the details", print_exception=False)


def user_errors(fn: Callable) -> Callable:
    """Turn StudioError into a UI toast with its message; never show a stack trace.

    Generator handlers (streaming) stay generators: Gradio decides how to drive a handler
    by inspecting it, so a plain wrapper around a generator would make every streaming
    endpoint fail with "didn't return enough output values"."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def stream(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except Exception as exc:
                raise _as_user_error(fn, exc) from None

        return stream

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except Exception as exc:
            raise _as_user_error(fn, exc) from None

    return wrapper


def model_choices(studio, modality: str) -> list[str]:
    names = [m.name for m in bundled(modality)]
    names += [m for m in studio.manager.known_factories(modality) if m not in names]
    return names


def model_dropdown(studio, modality: str, label: str = "Model", elem_prefix: str = "") -> gr.Dropdown:
    choices = model_choices(studio, modality)
    return gr.Dropdown(
        choices=choices, value=choices[0] if choices else None, allow_custom_value=True, label=label,
        info="bundled models first; or type a hub id (owner/name) or a local folder", elem_id=f"{elem_prefix}{modality}-model",
    )


@dataclass
class AccelPanel:
    """Checkbox + parameter controls per method of a modality, built from the registry."""

    modality: str
    methods: list[type[Method]]
    enabled: list[gr.Checkbox] = field(default_factory=list)
    params: list[list[gr.components.Component]] = field(default_factory=list)
    groups: list[gr.Group] = field(default_factory=list)
    hints: list[gr.Markdown] = field(default_factory=list)

    @property
    def inputs(self) -> list[gr.components.Component]:
        flat: list[gr.components.Component] = []
        for box, controls in zip(self.enabled, self.params):
            flat.append(box)
            flat.extend(controls)
        return flat

    def collect(self, values: list[Any]) -> list[MethodChoice]:
        """Values of ``inputs`` (same order) -> the chosen methods, in panel order; checked
        once, with the rest of the request, by the studio (``studio.validation``)."""
        values = list(values)
        chosen = []
        for cls in self.methods:
            on = values.pop(0)
            params = {p.name: values.pop(0) for p in cls.spec.params}
            if on:
                chosen.append(MethodChoice(cls.spec.name, params))
        return chosen

    def values_for(self, choices: list[MethodChoice]) -> list[Any]:
        """The inverse of ``collect``: control values that show ``choices`` (for presets)."""
        by_name = {c.name: c for c in choices}
        values: list[Any] = []
        for cls in self.methods:
            choice = by_name.get(cls.spec.name)
            values.append(choice is not None)
            for p in cls.spec.params:
                values.append((choice.params if choice else {}).get(p.name, p.default))
        return values

    def visibility_for(self, family: str | None) -> list[Any]:
        return [gr.update(visible=family is None or family in cls.spec.families) for cls in self.methods]


def _control(param) -> gr.components.Component:
    """One control per parameter, all read off the method's Config field: kind, default,
    range, step, choices, help, and the paper's setting where the default differs from it."""
    label = param.name
    info = param.help if param.paper is None else f"{param.help} (paper: {param.paper})"
    if param.kind == "bool":
        return gr.Checkbox(value=param.default, label=label, info=info)
    if param.kind == "choice":
        return gr.Dropdown(choices=list(param.choices), value=param.default, label=label, info=info)
    if param.min is not None and param.max is not None and (param.max - param.min) <= 1000:
        step = param.step or (1 if param.kind == "int" else (param.max - param.min) / 100)
        return gr.Slider(param.min, param.max, value=param.default, step=step, label=label, info=info)
    return gr.Number(value=param.default, label=label, info=info, precision=0 if param.kind == "int" else None)


def _grey_out_unread(params, controls) -> None:
    """A parameter read only under another's value (``Param.only_if``: fast_dllm's threshold
    once a factor is set) is greyed out while the other has any other value."""
    index = {p.name: i for i, p in enumerate(params)}
    for p, control in zip(params, controls):
        if p.only_if is None:
            continue
        other, value = p.only_if
        controls[index[other]].change(lambda v, value=value: gr.update(interactive=v == value),
                                      controls[index[other]], control, show_progress="hidden",
                                      api_name=False, queue=False)


def accel_panel(modality: str, elem_prefix: str = "") -> AccelPanel:
    panel = AccelPanel(modality, methods_for(modality))
    with gr.Accordion("Acceleration", open=True):
        gr.Markdown("Tick methods to apply them to the next run; they are removed afterwards, so no reload is needed.")
        for cls in panel.methods:
            spec = cls.spec
            kind = {True: "lossless", False: "lossy", None: "lossless or lossy by setting"}[spec.lossless]
            with gr.Group(visible=True) as group:
                box = gr.Checkbox(value=False, label=f"{spec.title} ({kind})", info=spec.summary,
                                  elem_id=f"{elem_prefix}{modality}-method-{spec.name}")
                with gr.Accordion(f"{spec.title} settings", open=False):
                    if spec.paper:
                        gr.Markdown(f"*Paper:* {spec.paper}")
                    controls = [_control(p) for p in spec.params]
                    _grey_out_unread(spec.params, controls)
                hint = gr.Markdown("", visible=True)
            panel.enabled.append(box)
            panel.params.append(controls)
            panel.groups.append(group)
            panel.hints.append(hint)
    return panel


def format_result(result, run_id: int | None) -> str:
    """Markdown summary of a run: stages, evaluations, memory, what each method did."""
    from studio.evidence import draft_forwards

    lines = []
    if run_id is not None:
        lines.append(f"**Run #{run_id}** on `{result.device}` ({result.worker})")
    stages = ", ".join(f"{k} {v:.3f}s" for k, v in result.timings.items() if k != "total")
    lines.append(f"**Total {result.total_seconds:.3f}s** — {stages}")
    weights = f" · weights {result.weight_bytes / 2**20:.1f} MiB" if getattr(result, "weight_bytes", 0) else ""
    drafted = draft_forwards(result.method_stats)  # not in the evaluations, which count the model's own forwards
    evals = f"{result.model_evals}**" + (f" (the target's; + {drafted} draft forwards)" if drafted else "")
    lines.append(f"Model evaluations: **{evals} · peak memory {result.peak_memory_bytes / 2**20:.0f} MiB" + weights)
    for name, stats in result.method_stats.items():
        if stats:
            lines.append(f"- `{name}`: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
        else:
            lines.append(f"- `{name}` applied")
    for key, value in (result.extra or {}).items():
        if value is not None and not isinstance(value, (list, dict)):  # token id lists stay in history only
            lines.append(f"- {key.replace('_', ' ')}: {value}")
    for note in result.notes:
        lines.append(f"> ⚠️ {note}")
    for finding in result.findings:  # studio.detectors: skipped nothing, NaN/Inf, blank output
        lines.append(f"> ⚠️ {finding['message']}")
    return "\n\n".join(lines)


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def progress_adapter(progress: gr.Progress | None):
    if progress is None:
        return None

    def report(step: int, total: int, stage: str) -> None:
        progress((step, total), desc=stage if isinstance(stage, str) and len(stage) < 40 else "generating")

    return report


def wire_model_change(studio, modality: str, model: gr.Dropdown, family: gr.Markdown, panel: AccelPanel,
                      controls: dict[str, gr.components.Component] | None = None) -> dict:
    """When the model changes: first the model's family, the methods that fit it and the
    parameter ``controls`` (name -> component) it reads (a token model has no denoising
    steps: its Steps slider is hidden), then, as a separate step, what history says of each
    method (``Studio.method_hints``). The page and the dropdown answer before any history
    is read; the hints arrive after."""
    controls = controls or {}

    def shown_controls(unused) -> list[Any]:
        return [gr.update(visible=name not in unused) for name in controls]

    @user_errors
    def describe(model_id):
        if not model_id:
            return ["", *panel.visibility_for(None), *shown_controls(())]
        try:
            described = studio.describe_model(modality, model_id)
        except StudioError as exc:
            return [f"⚠️ {exc}", *panel.visibility_for(None), *shown_controls(())]
        return [f"Family: **{described.get('family')}** · device `{described.get('device')}`",
                *panel.visibility_for(described.get("family")),
                *shown_controls(set(described.get("unused_params") or ()))]

    def hints(model_id):
        found = {}
        if model_id:
            try:
                found = studio.method_hints(modality, model_id)
            except Exception:  # hints are a help, never an error toast (the database may be away)
                log.warning("method hints for %s unavailable", model_id, exc_info=True)
        return [gr.update(value=found.get(cls.spec.name, "")) for cls in panel.methods]

    describe_outputs, hint_outputs = [family, *panel.groups, *controls.values()], list(panel.hints)
    model.change(describe, inputs=[model], outputs=describe_outputs, api_name=False).then(
        hints, inputs=[model], outputs=hint_outputs, api_name=False)
    return {"describe": describe, "hints": hints, "describe_outputs": describe_outputs,
            "hint_outputs": hint_outputs}
