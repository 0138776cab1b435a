"""Lossy text seed methods on the bundled code model (issue 20): FFN-SkipLLM ('ffn_skip') and
MiniCache ('minicache').

Each must change the work done (MLP calls skipped; KV bytes held smaller by the factor its
storage implies), leave the protected parts alone (the first and last layers' MLPs; the
retention tokens exact), sample reproducibly with a seed, refuse bad settings in one line,
and leave plain greedy decoding bit-identical once removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backends.accel.minicache import (MergedStates, angular_distance, held_bytes, make_minicache, merged_pairs,
                                      slerp_direction)
from backends.types import MethodChoice, Request, ValidationError

torch.set_num_threads(1)

MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny-code-llama"
PROMPT = "import os\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def llama():
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip("assets/tiny-code-llama not built")
    from backends.manager import BackendManager

    return BackendManager(device="cpu").get("text", "tiny-code-llama")


def _run(backend, methods=(), max_new_tokens=NEW_TOKENS, **params):
    request = Request("text", "tiny-code-llama", PROMPT, seed=0, params={"max_new_tokens": max_new_tokens, **params},
                      methods=[MethodChoice(name, dict(p)) for name, p in methods])
    return backend.run(request)


def _tokens(result) -> list[int]:
    return result.extra["output_token_ids"]


@pytest.fixture(scope="module")
def plain(llama):
    return _tokens(_run(llama))


# -- FFN-SkipLLM --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ffn", "attention"])
def test_ffn_skip_skips_mlps_only_in_unprotected_layers_and_removal_restores_plain(llama, plain, mode):
    result = _run(llama, [("ffn_skip", {"mode": mode, "protect_first": 3, "protect_last": 2, "warmup_tokens": 4})])
    stats = result.method_stats["ffn_skip"]
    layers = llama.model.config.num_hidden_layers
    # the prompt and 4 warm-up tokens run every MLP; then at most 3 (a quarter of 12) per token
    decoded_after_warmup = NEW_TOKENS - 1 - 4
    assert stats["mlp_calls"] == layers * NEW_TOKENS
    assert 0 < stats["mlp_skipped"] <= 3 * decoded_after_warmup
    skipped = {int(k) for k in stats["skipped_per_layer"]}
    assert skipped and skipped <= set(range(3, layers - 2))
    assert stats["protected_layers"] == [0, 1, 2, layers - 2, layers - 1]
    if mode == "ffn":  # the monotonic rule: one fixed set, skipped on every token after the warm-up
        assert len(stats["skipped_layers"]) == 3
        assert stats["mlp_skipped"] == 3 * decoded_after_warmup
    assert _tokens(_run(llama)) == plain


def test_ffn_skip_with_nothing_to_skip_equals_plain_decoding(llama, plain):
    result = _run(llama, [("ffn_skip", {"skip_fraction": 0.0})])
    assert result.method_stats["ffn_skip"]["mlp_skipped"] == 0
    assert _tokens(result) == plain


def test_ffn_skip_samples_reproducibly_with_a_seed(llama):
    methods = [("ffn_skip", {"warmup_tokens": 2})]
    first = _run(llama, methods, temperature=0.8, top_k=50)
    second = _run(llama, methods, temperature=0.8, top_k=50)
    assert _tokens(first) == _tokens(second)
    assert first.method_stats["ffn_skip"]["mlp_skipped"] > 0


def test_ffn_skip_refuses_settings_that_leave_nothing_to_skip(llama):
    with pytest.raises(ValidationError, match=r"^ffn_skip protects 6 first \+ 6 last layers, but the model has "
                                              r"only 12: nothing could be skipped$"):
        _run(llama, [("ffn_skip", {"protect_first": 6, "protect_last": 6})])
    with pytest.raises(ValidationError, match=r"^ffn_skip: a skip fraction of 0.01 skips no layer of 12$"):
        _run(llama, [("ffn_skip", {"skip_fraction": 0.01})])
    with pytest.raises(ValidationError, match=r"^parameter 'mode' must be one of \['ffn', 'attention'\], got 'x'$"):
        _run(llama, [("ffn_skip", {"mode": "x"})])


# -- MiniCache ----------------------------------------------------------------------------


def _prompt_kv(llama, cache):
    ids = llama.tokenizer(PROMPT * 3, return_tensors="pt").input_ids
    with torch.inference_mode():
        llama.model(input_ids=ids, cache=cache, use_cache=True)
    return ids.shape[-1]


def test_minicache_holds_fewer_bytes_by_the_factor_its_storage_implies(llama):
    """No retention: each merged pair holds per token one direction (head_dim floats) and two
    magnitudes per head instead of two vectors, plus one int64 position."""
    config = llama.model.config
    cache, stores, pairs = make_minicache(llama.model, start=0.5, t=0.6, retention=0.0)
    tokens = _prompt_kv(llama, cache)
    heads, dim, layers = config.num_key_value_heads, config.head_dim, config.num_hidden_layers
    assert pairs == [(6, 7), (8, 9), (10, 11)] and cache.get_seq_length() == tokens
    plain_layer = heads * tokens * dim * 4  # one layer's keys (or values), float32
    merged_pair = heads * tokens * (dim + 2) * 4 + tokens * 8
    expected = 2 * ((layers - 2 * len(pairs)) * plain_layer + len(pairs) * merged_pair)
    assert held_bytes(cache, stores) == expected
    assert 2 * plain_layer / merged_pair > 1.9  # 1.94x smaller over the merged layers


def test_minicache_retention_tokens_are_exact_and_merged_ones_follow_slerp(llama):
    """On the real model's KV: a retention token is rebuilt bit-exactly; a merged one keeps its
    magnitude exactly and its direction is SLERP's, (1 - t) of the angle from layer l's."""
    from transformers import DynamicCache

    reference = DynamicCache(config=llama.model.config)
    _prompt_kv(llama, reference)
    cache, stores, _ = make_minicache(llama.model, start=0.5, t=0.6, retention=0.25)
    _prompt_kv(llama, cache)
    states: MergedStates = stores[0].keys
    first, second = reference.layers[6].keys, reference.layers[7].keys
    rebuilt = [states.rebuild(0), states.rebuild(1)]
    kept, merged = states.retained_index, states.merged_index
    assert 0 < kept.numel() < states.tokens and kept.numel() + merged.numel() == states.tokens
    assert torch.equal(rebuilt[0][..., kept, :], first[..., kept, :])
    assert torch.equal(rebuilt[1][..., kept, :], second[..., kept, :])
    a, b, r = first[..., merged, :], second[..., merged, :], rebuilt[0][..., merged, :]
    torch.testing.assert_close(r.norm(dim=-1), a.norm(dim=-1))
    angle = angular_distance(a, b) * torch.pi
    cos = torch.nn.functional.cosine_similarity(r, a, dim=-1)
    torch.testing.assert_close(cos, torch.cos(0.6 * angle), atol=1e-4, rtol=0)
    # the retained tokens are those whose layers disagree most
    distance = angular_distance(first, second).mean(dim=(0, 1))
    assert distance[kept].min() > distance[merged].max()


def test_minicache_merges_close_vectors_to_within_cosine_0_9():
    """Where adjacent layers agree, as the paper observes in deep LLaMA layers, the merged
    vectors stay close to both originals (the bundled model's layers do not agree: see README)."""
    generator = torch.Generator().manual_seed(0)
    first = torch.randn(1, 4, 50, 64, generator=generator)
    second = first * 1.3 + 0.3 * torch.randn(1, 4, 50, 64, generator=generator)
    states = MergedStates()
    states.merge(first, second, t=0.6, retention=0.0)
    for which, original in enumerate((first, second)):
        cos = torch.nn.functional.cosine_similarity(states.rebuild(which), original, dim=-1)
        assert cos.min() > 0.9
    assert slerp_direction(first, first, 0.6).norm(dim=-1).sub(1).abs().max() < 1e-5


def test_minicache_changes_the_output_and_removal_restores_plain(llama, plain):
    result = _run(llama, [("minicache", {})])
    stats = result.method_stats["minicache"]
    assert stats["merged_layers"] == [[6, 7], [8, 9], [10, 11]]
    assert stats["cached_tokens"] == result.extra["prompt_tokens"] + NEW_TOKENS - 1
    assert stats["kv_cache_bytes"] < stats["plain_kv_cache_bytes"] / 1.2
    assert _tokens(result)[0] == plain[0]  # the prompt's forward attends over exact K/V
    assert _tokens(result) != plain
    assert _tokens(_run(llama)) == plain


def test_minicache_retaining_every_token_is_plain_decoding(llama, plain):
    result = _run(llama, [("minicache", {"retention": 1.0})])
    assert result.method_stats["minicache"]["retained_fraction"] == 1.0
    assert _tokens(result) == plain


def test_minicache_samples_reproducibly_with_a_seed(llama):
    first = _run(llama, [("minicache", {})], temperature=0.8, top_k=50)
    second = _run(llama, [("minicache", {})], temperature=0.8, top_k=50)
    assert _tokens(first) == _tokens(second)


def test_minicache_refuses_bad_settings_in_one_line(llama):
    assert merged_pairs(12, 0.5) == [(6, 7), (8, 9), (10, 11)] and merged_pairs(12, 0.05) [0] == (1, 2)
    with pytest.raises(ValidationError, match=r"^MiniCache: starting at 0.95 of 12 layers leaves no pair to merge$"):
        _run(llama, [("minicache", {"start": 0.95})])
    with pytest.raises(ValidationError, match=r"^parameter 't' must be between 0.0 and 1.0, got 1.5$"):
        _run(llama, [("minicache", {"t": 1.5})])
    with pytest.raises(ValidationError, match="^methods 'minicache' and 'ffn_skip' cannot be combined$"):
        _run(llama, [("minicache", {}), ("ffn_skip", {})])


# -- held-out perplexity as decoding sees it ----------------------------------------------


def test_perplexity_of_decode_time_methods_is_measured_by_teacher_forced_decoding(llama):
    """A parallel forward would never reach a decode-time skip or a merged past: those methods'
    perplexity comes from decoding the held-out text token by token, which without methods
    equals the parallel figure."""
    from backends.base import _instantiate
    from backends.text_eval import backend_perplexity, decoding_perplexity, heldout_ids

    tokens = 256
    plain = backend_perplexity(llama, [], max_tokens=tokens)
    request = Request("text", "tiny-code-llama", "x", params={"max_new_tokens": 1})
    decoded = decoding_perplexity(llama, request, _instantiate(request, llama),
                                  heldout_ids(llama.tokenizer, tokens), 256)
    assert decoded == pytest.approx(plain, rel=1e-4)
    skipped = backend_perplexity(llama, [MethodChoice("ffn_skip")], max_tokens=tokens)
    merged = backend_perplexity(llama, [MethodChoice("minicache")], max_tokens=tokens)
    assert skipped > plain * 1.001 and merged > plain * 1.001
    assert backend_perplexity(llama, [], max_tokens=tokens) == plain
