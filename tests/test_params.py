"""Issue 16: modality parameters declared once (UI, validator, API), named endpoints with
named parameters, and declared properties instead of special cases keyed on strings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# -- declared, not grepped: how a pipeline runs guidance ----------------------------------
def test_guidance_batching_is_declared_per_pipeline_class_not_read_from_its_source():
    """A subclass that wraps ``__call__`` (as the dummy Wan does) has none of its parent's
    source text: reading the source for "[latents] * 2" called such an SD pipeline
    unbatched. The declaration follows the class's bases instead."""
    import diffusers

    from backends.image import batches_cfg

    class WrappedSD(diffusers.StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    class WrappedWan(diffusers.WanPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    def of(cls) -> bool:
        return batches_cfg(object.__new__(cls))

    assert of(WrappedSD) is True and of(WrappedWan) is False
    for name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "PixArtSigmaPipeline",
                 "CogVideoXPipeline", "AudioLDM2Pipeline"):
        assert of(getattr(diffusers, name)) is True, name
    for name in ("FluxPipeline", "QwenImagePipeline", "WanPipeline", "CogView4Pipeline"):
        assert of(getattr(diffusers, name)) is False, name


# -- the task grader is a catalog field -----------------------------------------------------
def test_task_score_follows_the_catalogs_grader_not_the_models_name(monkeypatch):
    import backends.catalog as catalog
    from studio import metrics

    shipped = catalog.BUNDLED
    graded = []
    monkeypatch.setitem(metrics.TASK_GRADERS, "shapes", lambda outputs, prompts: graded.append(prompts) or {"all": 1.0})
    renamed = catalog.BundledModel("my-shape-painter", "image", "t", "d", grader="shapes")
    monkeypatch.setattr(catalog, "BUNDLED", (*catalog.BUNDLED, renamed))
    assert metrics.task_score("image", "my-shape-painter", [None], ["a red circle"]) == {"all": 1.0}
    # a name that looks bundled is not a grader: only the catalog entry says so
    assert metrics.task_score("image", "tiny-random-shapes", [None], ["a red circle"]) is None
    assert metrics.task_score("image", "dummy-sd", [None], ["a red circle"]) is None
    assert graded == [["a red circle"]]
    for model in shipped:
        assert model.grader is None or model.grader in metrics.TASK_GRADERS, model.name
    assert {m.name for m in shipped if m.grader} == {"tiny-sd-shapes", "tiny-flux-shapes",
                                                             "tiny-video-shapes", "tiny-audio-synth",
                                                             "tiny-sd-shapes-small", "tiny-ar-shapes"}


# -- the method registry is complete however the framework is first imported ------------------
def test_importing_the_method_framework_alone_registers_every_method():
    code = ("from backends.accel.base import all_methods; import backends.accel as a; "
            "import pkgutil; files = [m.name for m in pkgutil.iter_modules(a.__path__) "
            "if m.name != 'base' and not m.name.startswith('_')]; "
            "print(len(all_methods()), len(files) - len(a.IMPORT_ERRORS))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    registered, modules = map(int, out.stdout.split())
    assert registered >= modules > 10


# -- modality parameters declared once -------------------------------------------------------
def build_tabs(studio) -> dict:
    import gradio as gr

    from studio.ui.generate import build_generation_tab
    from studio.ui.text import build_text_tab

    with gr.Blocks():
        tabs = {m: build_generation_tab(studio, m) for m in ("image", "video", "audio")}
        tabs["text"] = build_text_tab(studio)
    return tabs


def test_each_tabs_controls_span_exactly_what_the_validator_accepts(studio_factory):
    """The Image tab's sliders stopped at width 1024 and 100 steps while the validator (and
    so the API, presets and history reruns) allowed 2048 and 150: a value the API accepted
    could not be shown in the tab."""
    from backends.params import controls_for
    from backends.types import Request, ValidationError
    from studio.validation import validate_request

    tabs = build_tabs(studio_factory())
    for modality, tab in tabs.items():
        specs = controls_for(modality)
        assert [c.elem_id for c in tab.controls] == [f"{modality}-{s.name.replace('_', '-')}" for s in specs]
        for spec, control in zip(specs, tab.controls):
            def request(value):
                return Request(modality, "m", "p", params={spec.name: value})

            if spec.kind is bool:
                assert validate_request(request(not spec.default)).params[spec.name] is (not spec.default)
                continue
            if spec.kind is str:  # a text box: any text up to ``high`` characters (with the 1-char prompt)
                fits = int(spec.high) - 1  # the system prompt shares one limit with the prompt
                assert validate_request(request("x" * fits)).params[spec.name] == "x" * fits
                with pytest.raises(ValidationError, match="too long|the limit is"):
                    validate_request(request("x" * (int(spec.high) + 1)))
                continue
            assert (control.minimum, control.maximum, control.step) == (spec.control_low, spec.high, spec.step)
            assert validate_request(request(control.maximum)).params[spec.name] == control.maximum
            lowest = control.minimum or spec.low  # 0 on a slider means the model's default
            assert validate_request(request(lowest)).params[spec.name] == lowest
            with pytest.raises(ValidationError, match="between"):
                validate_request(request(control.maximum + spec.step))


def test_zero_means_the_models_default_for_the_ui_the_api_and_run_alike(studio_factory):
    from backends.types import Request
    from studio.validation import validate_request

    assert validate_request({"modality": "image", "model": "m", "prompt": "p",
                             "params": {"width": 0, "height": 0, "steps": 3}}).params == {"steps": 3}
    tab = build_tabs(studio_factory())["image"]
    values = ["dummy-sd", "a red circle", "", 1, 0, 32, 3, 4.0] + tab.panel.values_for([])
    built = tab.build_request(values)
    assert isinstance(built, Request) and built.params == {"height": 32, "steps": 3, "guidance": 4.0}


def test_compare_tab_starts_from_the_tables_defaults():
    from studio.ui.compare import default_params

    assert default_params("image") == {"steps": 25, "guidance": 5.0}
    assert default_params("audio") == {"steps": 25, "guidance": 3.5}
    assert default_params("text") == {"max_new_tokens": 128, "temperature": 0.0, "chat_template": True}


def test_compare_tab_takes_a_picked_models_recommended_settings():
    """tiny-ar-shapes is meant for guidance 1.5: at the image default 5 its images fall apart,
    so Compare's Parameters box follows the model the user picks, keeping their other values."""
    from studio.ui.compare import default_params, params_after_model_pick

    assert default_params("image", "tiny-ar-shapes") == {"steps": 25, "guidance": 1.5}
    assert default_params("image", "some/hub-model") == default_params("image")
    picked = json.loads(params_after_model_pick('{"steps": 25, "guidance": 5.0, "width": 48}', "image", "tiny-ar-shapes"))
    assert picked == {"steps": 25, "guidance": 1.5, "width": 48}
    dllm = json.loads(params_after_model_pick(json.dumps(default_params("text")), "text", "tiny-code-dllm"))
    assert (dllm["max_new_tokens"], dllm["steps"], dllm["block_length"]) == (64, 64, 32)
    # left exactly as typed: half-edited text, or a model that recommends nothing
    assert params_after_model_pick('{"steps": 2', "image", "tiny-ar-shapes") == '{"steps": 2'
    assert params_after_model_pick('{"steps":   7}', "image", "dummy-sd") == '{"steps":   7}'


def test_a_tab_request_is_checked_no_more_often_than_a_run_request(studio_factory, monkeypatch):
    """Method parameters were validated three times per request from a tab (the panel, the
    studio, the backend building the method) against twice from /run: the panel's own
    check is gone, the studio's is the one a user sees, before any model is loaded."""
    from backends.accel.base import MethodSpec

    studio = studio_factory()
    tab = build_tabs(studio)["image"]
    calls = []
    original = MethodSpec.validate
    monkeypatch.setattr(MethodSpec, "validate", lambda self, params: calls.append(self.name) or original(self, params))
    values = ["dummy-sd", "a red circle", "", 1, 0, 0, 2, 4.0] + tab.panel.values_for([])
    on = [m.spec.name for m in tab.panel.methods].index("deepcache")
    position = sum(1 + len(m.spec.params) for m in tab.panel.methods[:on])
    values[8 + position] = True  # the DeepCache checkbox
    studio.generate(tab.build_request(values))
    from_tab = len(calls)
    calls.clear()
    studio.generate({"modality": "image", "model": "dummy-sd", "prompt": "a red circle", "seed": 1,
                     "params": {"steps": 2, "guidance": 4.0}, "methods": [{"name": "deepcache"}]})
    assert calls and from_tab == len(calls)
