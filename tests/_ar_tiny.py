"""Tiny random AR-image pipelines and runs shared by ``test_ar_image.py`` and
``test_ar_speculative.py`` (no assets needed)."""

from __future__ import annotations

import numpy as np
import torch

from backends.tiny.ar_image import ARImagePipeline, ShapesVQ, TokenLayout, VQConfig, llama_config, prompt_words
from backends.types import MethodChoice, Request

PROMPT = "a red circle at top left on white"


def small_pipeline(seed: int = 0, codebook: int = 8, image_size: int = 8, logit_scale: float = 0.3,
                   model_seed: int | None = None) -> ARImagePipeline:
    """A 2x2-token, 8-code model with sharpened random logits: its token distributions are
    far from uniform, so a sampling loop that bends them is caught by a few hundred to a
    thousand draws (checked: SJD accepting every draft gives p < 1e-4 at three of the five
    columns). ``seed`` draws the tokenizer and, unless ``model_seed`` is given, the
    transformer after it; with ``model_seed`` pipelines of the same ``seed`` share the
    tokenizer and only the transformer differs (a target and a draft)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    vq = ShapesVQ(VQConfig(image_size=image_size, width=16, codebook_size=codebook)).eval().requires_grad_(False)
    layout = TokenLayout(codebook, tuple(prompt_words()), vq.cfg.grid)
    if model_seed is not None:
        torch.manual_seed(model_seed)
    model = LlamaForCausalLM(llama_config(layout, hidden=32, layers=1, heads=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale / model.lm_head.weight.std())
    return ARImagePipeline(vq, model, layout)


def run(backend, methods=(), seed=3, **params):
    """A studio run of ``PROMPT`` at guidance 3, methods as ``(name, params)`` pairs."""
    request = Request("image", backend.model_id, PROMPT, seed=seed, params={"guidance": 3.0, **params},
                      methods=[MethodChoice(name, p) for name, p in methods])
    return backend.run(request)


def pixels(result) -> np.ndarray:
    return np.asarray(result.output)
