"""What a model does not read is said, not silently dropped: the tabs hide the controls a
model kind ignores (a token image model has no denoising steps, a causal LM no diffusion
block length), and a tiny token model names the prompt words it could not read."""

import gradio as gr
import torch

from backends.ar_image import ARImageBackend
from backends.tiny.ar_image import tiny_random_pipeline
from backends.types import Request


def _ar_backend():
    torch.manual_seed(0)
    return ARImageBackend.from_pipeline(tiny_random_pipeline(seed=0), "tiny-ar-test")


def _visible(tab, shown) -> dict[str, bool]:
    """Control name -> visible, from a model-change answer ``shown`` of ``tab``."""
    n_fixed = 1 + len(tab.panel.groups)
    return {spec.name: update["visible"] for spec, update in zip(tab.specs, shown[n_fixed:])}


def test_token_image_model_names_the_words_it_ignored():
    backend = _ar_backend()
    plain = backend.run(Request("image", backend.model_id, "a red circle at top left on white", seed=1))
    assert plain.notes == []
    odd = backend.run(Request("image", backend.model_id, "a purple triangle at top left on gray", seed=1,
                              negative_prompt="blurry"))
    ignored, negative = odd.notes
    assert "purple, gray" in ignored and "red" in ignored  # what it skipped, and what it knows
    assert "negative prompt" in negative
    # a prompt with every attribute is read in canonical order: only what that form leaves out is lost
    assert backend.run(Request("image", backend.model_id, "white, circle, red, top left", seed=1)).notes == []
    assert "big, shiny" in backend.run(Request("image", backend.model_id,
                                               "a big shiny red circle at top left on white", seed=1)).notes[0]


def test_ignored_words_include_words_past_the_prefix():
    layout = _ar_backend().pipe.layout
    words = "a red a red a red a red circle".split()  # nine known words, no full spec
    assert layout.ignored_words(" ".join(words)) == ["circle"]
    # commas are not part of a word: "red, circle, blue" is read as three known words
    assert layout.ignored_words("red, circle, blue") == []
    assert layout.prompt_ids("red, circle, blue")[:3] == [layout.word_id(w) for w in ("red", "circle", "blue")]


def test_tabs_hide_the_controls_a_model_kind_does_not_read(studio_factory):
    from studio.ui.generate import build_generation_tab
    from studio.ui.text import build_text_tab

    studio = studio_factory()
    with gr.Blocks():
        image = build_generation_tab(studio, "image")
        text = build_text_tab(studio)
    describe_image = image.extra["model_change"]["describe"]
    assert _visible(image, describe_image("dummy-ar"))["steps"] is False
    assert _visible(image, describe_image("dummy-sd"))["steps"] is True
    describe_text = text.extra["model_change"]["describe"]
    causal, diffusion = _visible(text, describe_text("dummy-llama")), _visible(text, describe_text("dummy-dllm"))
    assert (causal["steps"], causal["block_length"]) == (False, False)
    assert (diffusion["steps"], diffusion["block_length"]) == (True, True)
    assert causal["max_new_tokens"] and diffusion["max_new_tokens"]
    # an unknown model shows everything again, with its one-line message
    shown = describe_image("no-such/model-anywhere")
    assert shown[0].startswith("⚠️") and all(_visible(image, shown).values())
