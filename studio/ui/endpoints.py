"""The named API endpoints ``/generate_image``, ``/generate_video``, ``/generate_audio`` and
``/generate_text``: named parameters with defaults, so a client sends only what it sets::

    client.predict(prompt="a red circle", api_name="/generate_image")
    client.predict(prompt="a red circle", steps=12, methods=[{"name": "deepcache", "params": {"interval": 3}}],
                   api_name="/generate_image")

The parameters are the modality's table (``backends.params``), with its defaults; ``model``
defaults to the tab's first model. Each endpoint runs like the tab's button: streamed from a
worker thread, stopped by ``job.cancel()``, a closed connection or the tab's ``/cancel_*``
endpoint (the same session's runs), and checked once, by the studio.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterator

import gradio as gr

from backends.params import ModalityParam, params_for, request_params
from backends.types import Request
from studio.ui.common import format_result, user_errors
from studio.ui.generate import GenerationTab, stream_generation
from studio.ui.runs import Progress
from studio.ui.text import stream_text
from studio.validation import parse_methods

KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD
NOUNS = {"image": "an image", "video": "a video clip", "audio": "a sound"}
MethodsArg = list[dict[str, Any] | str] | str


def _hint(spec: ModalityParam) -> Any:
    return spec.kind if spec.default is not None else spec.kind | None


def endpoint_parameters(modality: str, default_model: str) -> list[inspect.Parameter]:
    """The endpoint's named parameters, in order: prompt, model, [negative_prompt], seed, the
    modality's table, methods."""
    params = [inspect.Parameter("prompt", KEYWORD, annotation=str),
              inspect.Parameter("model", KEYWORD, default=default_model, annotation=str)]
    if modality != "text":
        params.append(inspect.Parameter("negative_prompt", KEYWORD, default="", annotation=str))
    params.append(inspect.Parameter("seed", KEYWORD, default=0, annotation=int))
    params += [inspect.Parameter(spec.name, KEYWORD, default=spec.default, annotation=_hint(spec))
               for spec in params_for(modality)]
    params.append(inspect.Parameter("methods", KEYWORD, default=[], annotation=MethodsArg))
    return params


def endpoint_doc(modality: str) -> str:
    """The endpoint's description, with one line per parameter (for the API page and MCP)."""
    what = "text (streamed as it is written)" if modality == "text" else NOUNS[modality]
    lines = [f"Generate {what}; the run is kept in History. Returns the output and a summary "
             "(timings, model evaluations, what each method did).", "", "Args:",
             "    prompt: what to generate", "    model: a bundled model, a hub id or a local folder"]
    if modality != "text":
        lines.append("    negative_prompt: what to steer away from")
    lines.append("    seed: the random seed (-1 = random)")
    for spec in params_for(modality):
        text = "; ".join(t for t in (spec.label, spec.help) if t)
        bounds = "" if spec.kind in (bool, str) else f" ({spec.low:g} to {spec.high:g})"
        lines.append(f"    {spec.name}: {text}{bounds}")
    lines.append('    methods: acceleration methods, e.g. [{"name": "deepcache", "params": {"interval": 3}}], '
                 "or that list as JSON text")
    return "\n".join(lines)


def build_request(modality: str, values: dict[str, Any]) -> Request:
    """Named values -> a Request (checked once, by the studio, like the tab's)."""
    seed = values["seed"]
    return Request(modality, values["model"] or "", values["prompt"] or "", values.get("negative_prompt") or "",
                   -1 if seed is None else seed, request_params(modality, values), parse_methods(values["methods"]))


def _with_signature(fn: Callable, modality: str, parameters: list[inspect.Parameter], returns: Any) -> Callable:
    """Give ``fn(request, *values)`` the named signature Gradio reads the API from."""
    full = [inspect.Parameter("request", KEYWORD, annotation=gr.Request), *parameters]
    fn.__signature__ = inspect.Signature(full, return_annotation=returns)
    fn.__annotations__ = {p.name: p.annotation for p in full} | {"return": returns}
    fn.__doc__ = endpoint_doc(modality)
    fn.__name__ = f"generate_{modality}"
    return fn


def media_endpoint(studio, tab: GenerationTab) -> Callable:
    """``/generate_image|video|audio``: yields (None, progress) while running, then the saved
    file and the run's summary."""
    modality = tab.modality
    parameters = endpoint_parameters(modality, tab.model.value or "")
    named = inspect.Signature(parameters)

    @user_errors
    def generate(request: gr.Request, *args, **kwargs) -> Iterator[tuple[Any, str]]:
        bound = named.bind(*args, **kwargs)
        bound.apply_defaults()
        run_request = build_request(modality, bound.arguments)
        outcome = None
        status = "queued"
        for item in stream_generation(studio, tab.extra["runs"], request, run_request):
            if isinstance(item, Progress):
                status = f"{item.stage} {item.done}/{item.total}" if isinstance(item.stage, str) else status
            elif item is not None:  # the outcome, last
                outcome = item
                continue
            yield None, status  # progress or heartbeat: where a close (cancel, disconnect) lands
        path = outcome.result.output_path
        yield gr.FileData(path=path, orig_name=path.rsplit("/", 1)[-1]), format_result(outcome.result, outcome.run_id)

    return _with_signature(generate, modality, parameters, tuple[gr.FileData | None, str])


def text_endpoint(studio, tab: GenerationTab) -> Callable:
    """``/generate_text``: yields (text so far, status) as tokens arrive, then the whole
    text and the run's summary."""
    parameters = endpoint_parameters("text", tab.model.value or "")
    named = inspect.Signature(parameters)

    @user_errors
    def generate(request: gr.Request, *args, **kwargs) -> Iterator[tuple[str, str]]:
        bound = named.bind(*args, **kwargs)
        bound.apply_defaults()
        yield from stream_text(studio, tab.extra["runs"], request, build_request("text", bound.arguments),
                               ("", "queued"))

    return _with_signature(generate, "text", parameters, tuple[str, str])


def register_generation_endpoints(studio, tabs: dict[str, GenerationTab]) -> None:
    """One named endpoint per generation tab, in the tab's concurrency group."""
    for modality, tab in tabs.items():
        fn = text_endpoint(studio, tab) if modality == "text" else media_endpoint(studio, tab)
        gr.api(fn, api_name=f"generate_{modality}", concurrency_id=f"generate_{modality}")
