"""Quantized KV cache ('kv_quant', KIVI/GEAR via transformers' QuantizedCache + HQQ) on the
bundled tiny code model: the bytes it holds, greedy output at 8 bits, sampling, removal
and refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

pytest.importorskip("hqq", reason="kv_quant needs the hqq package (pip install hqq)")

from backends.accel.kv_quant import cache_bytes, make_quantized_cache, plain_bytes  # noqa: E402
from backends.types import MethodChoice, Request, ValidationError  # noqa: E402

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-code-llama"
PROMPT = "import os\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"


@pytest.fixture(scope="module")
def llama():
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip("assets/tiny-code-llama not built")
    from backends.manager import BackendManager

    return BackendManager(device="cpu").get("text", "tiny-code-llama")


def _run(backend, methods=(), max_new_tokens=40, **params):
    request = Request("text", "tiny-code-llama", PROMPT, seed=0,
                      params={"max_new_tokens": max_new_tokens, **params},
                      methods=[MethodChoice(name, dict(p)) for name, p in methods])
    return backend.run(request)


def _tokens(result) -> list[int]:
    return result.extra["output_token_ids"]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_cache_bytes_shrink_by_the_expected_factor(llama, bits):
    """A 512-token prefill is quantized at once (empty residual): the bytes held are the
    packed integers plus one float32 scale and zero per group, exactly."""
    model, group = llama.model, 64
    ids = torch.randint(3, model.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    cache = make_quantized_cache(model, bits, group, residual_length=64)
    with torch.inference_mode():
        model(input_ids=ids, cache=cache, use_cache=True)
    elements = 2 * 12 * 4 * 512 * 64  # (keys + values) x layers x heads x tokens x head dim
    expected = elements * bits // 8 + (elements // group) * 2 * 4
    assert cache.get_seq_length() == 512
    assert cache_bytes(cache) == expected
    plain = plain_bytes(model.config, 512, torch.float32)
    assert plain == elements * 4
    if bits == 4:
        assert plain / cache_bytes(cache) == pytest.approx(6.4) and plain / cache_bytes(cache) >= 3


def test_plain_cache_bytes_are_measured_the_same_way(llama):
    from transformers import DynamicCache

    cache = DynamicCache(config=llama.model.config)
    with torch.inference_mode():
        llama.model(input_ids=torch.arange(3, 103)[None], cache=cache, use_cache=True)
    assert cache_bytes(cache) == plain_bytes(llama.model.config, 100, torch.float32)


def test_eight_bits_keep_greedy_output_and_removal_restores_it(llama):
    plain = _tokens(_run(llama))
    # a residual of 8 tokens: the prompt and every 8 decoded tokens go through int8
    result = _run(llama, [("kv_quant", {"bits": 8, "residual_length": 8})])
    stats = result.method_stats["kv_quant"]
    assert stats["cached_tokens"] == result.extra["prompt_tokens"] + 39
    assert stats["kv_cache_bytes"] < stats["plain_kv_cache_bytes"] / 2
    assert _tokens(result)[:32] == plain[:32]
    assert _tokens(_run(llama)) == plain


def test_two_bits_change_the_output_and_removal_restores_it(llama):
    plain = _tokens(_run(llama))
    result = _run(llama, [("kv_quant", {"bits": 2, "residual_length": 8, "group_size": 128})])
    assert _tokens(result) != plain  # lossy: 2-bit keys move the greedy choice
    assert result.method_stats["kv_quant"]["kv_compression"] > 3
    assert _tokens(_run(llama)) == plain


def test_sampling_runs_through_the_quantized_cache(llama):
    sampled = _run(llama, [("kv_quant", {"residual_length": 8})], max_new_tokens=24, temperature=0.8, top_k=20)
    assert sampled.method_stats["kv_quant"]["cached_tokens"] > sampled.extra["prompt_tokens"]
    again = _run(llama, [("kv_quant", {"residual_length": 8})], max_new_tokens=24, temperature=0.8, top_k=20)
    assert _tokens(again) == _tokens(sampled)  # seeded


@pytest.mark.parametrize("params,words", [({"bits": 3}, "'bits' must be one of"),
                                          ({"residual_length": 0}, "'residual_length' must be between"),
                                          ({"group_size": 48}, "'group_size' must be one of"),
                                          ({"window": 4}, "has no parameter")])
def test_invalid_params_are_refused_in_one_line(llama, params, words):
    with pytest.raises(ValidationError, match=words) as info:
        _run(llama, [("kv_quant", params)])
    assert "\n" not in str(info.value)


def test_kv_quant_takes_the_decoder_slot(llama):
    with pytest.raises(ValidationError, match="cannot be combined"):
        _run(llama, [("kv_quant", {}), ("sink_cache", {})])
