"""The bundled code LMs: tokenizer round trip, loading, and lossless speculative decoding."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ASSETS = Path(os.environ.get("TINY_CODE_ASSETS", Path(__file__).resolve().parents[1] / "assets"))
TARGET_DIR, DRAFT_DIR = ASSETS / "tiny-code-llama", ASSETS / "tiny-code-draft"
PROMPTS = ["def fibonacci(n):\n", "import os\n\nclass Config:\n    def __init__(self"]
CODE = 'class A:\n    def f(self, x):\n\t\treturn x  # tab\n\n\n    s = "  é  \\n"\n'


def _require_assets():
    for folder in (TARGET_DIR, DRAFT_DIR):
        if not (folder / "model.safetensors").exists():
            pytest.skip(f"{folder} is absent (python -m backends.tiny.train code-lm)")


@pytest.fixture(scope="module")
def models():
    _require_assets()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(TARGET_DIR)
    target = AutoModelForCausalLM.from_pretrained(TARGET_DIR).eval()
    draft = AutoModelForCausalLM.from_pretrained(DRAFT_DIR).eval()
    return tok, target, draft


def test_tokenizer_round_trip_on_code(models):
    tok, _, _ = models
    for text in (CODE, "for i in range(10):\n    print(i)\n", "    \n\n  x=1"):
        assert tok.decode(tok(text).input_ids) == text


def test_assets_load_and_share_vocab(models):
    from transformers import AutoTokenizer

    tok, target, draft = models
    draft_tok = AutoTokenizer.from_pretrained(DRAFT_DIR)
    assert draft_tok.get_vocab() == tok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(tok)
    assert target.dtype == draft.dtype == torch.float32
    assert target.config.num_hidden_layers >= 12 and draft.config.num_hidden_layers == 1
    assert target.generation_config.eos_token_id == tok.eos_token_id


def test_speculative_generate_equals_greedy(models):
    tok, target, draft = models
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        kw = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False)
        with torch.no_grad():
            greedy = target.generate(ids, **kw)
            assisted = target.generate(ids, assistant_model=draft, num_assistant_tokens=5,
                                       num_assistant_tokens_schedule="constant", **kw)
        assert greedy.shape[1] == ids.shape[1] + 24
        assert torch.equal(greedy, assisted), (tok.decode(greedy[0]), tok.decode(assisted[0]))
