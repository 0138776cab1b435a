"""Context methods on the bundled code model (issue 20, items 7 and 8): context-chunk reuse
(CacheBlend) and prompt compression (LLMLingua).

Both are lossy. Chunk reuse: a later request with the same chunks in another order reuses
their K/V, its output stays close to full prefill (first divergence after token 0 on these
prompts), and with every token recomputed it is full prefill's; kept K/V are never reused
for other weights. Compression: the kept count follows the ratio, the instruction is always
kept, keep 1 is plain decoding. For both, a run without them is plain decoding again.
"""

from __future__ import annotations

import inspect
import posixpath
import re

import pytest
import torch

from backends.types import MethodChoice, Request, ValidationError
from tests.test_text_seeds import _backend
from tests.test_tiny_text import DRAFT_DIR, TARGET_DIR, _require_assets

NEW_TOKENS = 16


def _functions(count: int = 4) -> list[str]:
    """Top-level functions of a stdlib module (~60-130 tokens each): the documents."""
    source = inspect.getsource(posixpath)
    parts = [p.split("\n\n\n")[0].strip("\n") for p in re.split(r"\n(?=def )", source) if p.startswith("def ")]
    return [p for p in parts if 240 < len(p) < 420][:count]


DOCS = _functions()
QUESTION = "# usage:\nprint("


def prompt(order) -> str:
    return "\n\n\n".join(DOCS[i] for i in order) + "\n\n\n" + QUESTION


@pytest.fixture(scope="module")
def backend():
    _require_assets()
    torch.set_num_threads(1)
    return _backend(TARGET_DIR, "tiny-code-llama", with_draft=True)


def run(backend, text, methods=(), **params):
    params.setdefault("max_new_tokens", NEW_TOKENS)
    return backend.run(Request("text", backend.model_id, text, seed=0, params=params,
                               methods=[MethodChoice(n, p) for n, p in methods]))


def agreement(a: list[int], b: list[int]) -> int:
    """Tokens before the first divergence."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def plain(backend):
    return {order: run(backend, prompt(order)).extra["output_token_ids"] for order in ((0, 1, 2, 3), (2, 0, 3, 1))}


# -- context-chunk reuse ------------------------------------------------------------------

def test_chunks_keep_their_tokens_wherever_they_stand(backend):
    from backends.accel.chunk_cache import split_chunks

    def chunks(order):
        ids = backend.tokenizer(prompt(order)).input_ids
        cuts = split_chunks(backend.tokenizer.batch_decode([[t] for t in ids]), "\n\n", 16)
        return [tuple(ids[a:b]) for a, b in zip([0, *cuts[:-1]], cuts)]

    first, second = chunks((0, 1, 2, 3)), chunks((2, 0, 3, 1))
    assert len(first) >= 4 and sorted(first) == sorted(second) and first != second


def test_moved_keys_equal_keys_computed_in_place(backend):
    """Layer 0's K depend only on the token and its position: a chunk prefilled alone and
    re-rotated to offset d must equal the same tokens computed at positions d.. Deeper
    layers, blended, keep the first chunk's K/V as they are and differ after it (the
    second chunk's tokens never saw the first: what the selective recompute restores)."""
    from backends.accel.chunk_cache import moved_keys, prefill_alone, reused_kv, rotation
    from backends.accel.prefix_cache import Block

    lead, chunk = (tuple(backend.tokenizer(d).input_ids) for d in DOCS[:2])
    alone = [Block(str(i), "", t, prefill_alone(backend.model, t, backend.device)) for i, t in enumerate((lead, chunk))]
    together = prefill_alone(backend.model, lead + chunk, backend.device)
    keys = alone[1].layers[0][0]
    cos, sin = rotation(backend.model, torch.full((len(chunk),), len(lead)), keys.dtype)
    torch.testing.assert_close(moved_keys(keys, cos, sin), together[0][0][..., len(lead):, :], atol=1e-4, rtol=1e-4)
    blended, values = reused_kv(backend.model, alone, [0, len(lead)], len(lead) + len(chunk) + 3)
    assert blended[5].shape[-2] == values[5].shape[-2] == len(lead) + len(chunk) + 3  # room for the suffix
    torch.testing.assert_close(blended[5][..., :len(lead), :], together[5][0][..., :len(lead), :])
    torch.testing.assert_close(values[5][..., :len(lead), :], together[5][1][..., :len(lead), :])
    assert (blended[5][..., len(lead):-3, :] - together[5][0][..., len(lead):, :]).abs().max() > 1e-2


def test_reordered_chunks_are_reused_from_the_store(backend, plain):
    from backends.accel.chunk_cache import MEMORY_KEY

    backend.run_memory.pop(MEMORY_KEY, None)
    first = run(backend, prompt((0, 1, 2, 3)), [("chunk_cache", {})])
    stats = first.method_stats["chunk_cache"]
    assert stats["chunks"] >= 4 and stats["chunks_computed"] == stats["chunks"] and stats["chunks_reused"] == 0
    second = run(backend, prompt((2, 0, 3, 1)), [("chunk_cache", {})])
    stats = second.method_stats["chunk_cache"]
    assert stats["chunks_computed"] == 0 and stats["chunks_reused"] == stats["chunks"]
    assert stats["reused_tokens"] == second.extra["prompt_tokens"] - stats["suffix_tokens"]
    assert stats["recomputed_tokens"] == round(0.15 * stats["reused_tokens"])  # the selective recompute
    assert stats["store_chunks"] == stats["chunks"]  # kept once, not once per order
    # a run without it is plain decoding again, bit for bit
    assert run(backend, prompt((2, 0, 3, 1))).extra["output_token_ids"] == plain[2, 0, 3, 1]


ROTATIONS = [(0, 1, 2, 3), (1, 2, 3, 0), (2, 3, 0, 1), (3, 0, 1, 2)]


def _first_logits(backend, text, recompute=None):
    """The first output token's logits: full prefill (``recompute`` None), else the
    chunks' kept K/V blended with ``recompute`` of their tokens recomputed."""
    from backends.accel.chunk_cache import ChunkCacheMethod, blended_prefill, chunk_store

    ids = backend.encode_prompt(text, False)
    with torch.inference_mode():
        if recompute is None:
            return backend.model(input_ids=ids).logits[0, -1]
        chunks = ChunkCacheMethod().chunks_of(backend, chunk_store(backend), ids[0].tolist(), {})
        cache, _ = blended_prefill(backend.model, ids[:, :-1], chunks, recompute)
        return backend.model(input_ids=ids[:, -1:], past_key_values=cache).logits[0, -1]


def test_selective_recompute_restores_cross_chunk_attention(backend):
    """Lossy, with a documented tolerance: the more tokens recomputed, the closer the first
    logits come to full prefill's (all: equal up to rounding); at the default 15% the first
    token is full prefill's on at least 3 of the 4 orders."""
    right = 0
    for order in ROTATIONS:
        full = _first_logits(backend, prompt(order))
        gaps = [(_first_logits(backend, prompt(order), r) - full).norm().item() for r in (0.0, 0.5, 1.0)]
        assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-3 * full.norm().item(), (order, gaps)
        right += int(_first_logits(backend, prompt(order), 0.15).argmax() == full.argmax())
    assert right >= 3


def test_recomputing_every_token_is_full_prefill(backend, plain):
    for order in plain:
        result = run(backend, prompt(order), [("chunk_cache", {"recompute": 1.0})])
        assert result.extra["output_token_ids"] == plain[order]
        assert result.method_stats["chunk_cache"]["chunks_reused"] > 0 and "full prefill" in result.notes[0]


def test_chunk_kv_is_never_reused_for_other_weights(backend):
    from backends.accel.chunk_cache import MEMORY_KEY

    run(backend, prompt((0, 1, 2, 3)), [("chunk_cache", {})], max_new_tokens=2)
    draft = _backend(DRAFT_DIR, "tiny-code-draft")  # same tokenizer, other weights
    draft.run_memory = backend.run_memory  # even sharing one store, nothing matches
    other = run(draft, prompt((0, 1, 2, 3)), [("chunk_cache", {})], max_new_tokens=2).method_stats["chunk_cache"]
    assert other["chunks_reused"] == 0 and other["chunks_computed"] == other["chunks"]
    layer = backend.model.model.layers[3].mlp.up_proj
    original = layer.weight
    layer.weight = torch.nn.Parameter(original.detach().clone(), requires_grad=False)  # weights swapped in
    try:
        swapped = run(backend, prompt((0, 1, 2, 3)), [("chunk_cache", {})], max_new_tokens=2)
    finally:
        layer.weight = original
    assert swapped.method_stats["chunk_cache"]["chunks_reused"] == 0
    assert backend.run_memory[MEMORY_KEY].blocks


def test_a_prompt_without_chunks_is_plain_prefill(backend):
    text = "def add(a, b):\n    return a + b\n"
    result = run(backend, text, [("chunk_cache", {})])
    assert result.method_stats["chunk_cache"]["chunks"] == 0
    assert result.extra["output_token_ids"] == run(backend, text).extra["output_token_ids"]


# -- prompt compression -------------------------------------------------------------------

def test_compression_keeps_the_ratio_and_the_instruction(backend, plain):
    text = prompt((0, 1, 2, 3))
    ids = backend.tokenizer(text).input_ids
    result = run(backend, text, [("prompt_compress", {"keep": 0.5, "keep_last": 12, "keep_lines": False})])
    stats = result.method_stats["prompt_compress"]
    assert stats["prompt_tokens"] == len(ids) and stats["kept_tokens"] == round(0.5 * len(ids))
    assert result.extra["prompt_tokens"] == stats["kept_tokens"]  # the model read the shorter prompt
    assert stats["compressed_prompt"].endswith(backend.tokenizer.decode(ids[-12:]))
    lines = run(backend, text, [("prompt_compress", {"keep": 0.5})]).method_stats["prompt_compress"]
    assert lines["compressed_prompt"].count("\n") == text.count("\n")  # line structure kept
    assert lines["kept_tokens"] == max(round(0.5 * len(ids)), lines["forced_tokens"])


def test_compression_keeps_the_most_surprising_tokens():
    from backends.accel.prompt_compress import kept_positions

    scores = torch.tensor([float("inf"), 0.1, 5.0, 0.2, 3.0, 0.3, 0.05, 1.0])
    assert kept_positions(scores, {0, 7}, 0.5) == [0, 2, 4, 7]
    assert kept_positions(scores, {0, 1, 3, 5, 6}, 0.25) == [0, 1, 3, 5, 6]  # forced beyond the budget


def test_keeping_everything_is_plain_decoding_and_removal_restores_it(backend, plain):
    text = prompt((0, 1, 2, 3))
    whole = run(backend, text, [("prompt_compress", {"keep": 1.0})])
    assert whole.extra["output_token_ids"] == plain[0, 1, 2, 3]
    assert whole.method_stats["prompt_compress"]["dropped_tokens"] == 0
    compressed = run(backend, text, [("prompt_compress", {})])
    assert compressed.method_stats["prompt_compress"]["dropped_tokens"] > 0
    assert run(backend, text).extra["output_token_ids"] == plain[0, 1, 2, 3]


def test_compression_combines_with_a_decoding_method(backend):
    """It only rewrites the prompt: a lossless decoder on the compressed prompt gives the
    compressed prompt's plain output; the scorer can be the model itself."""
    text = prompt((1, 3))
    alone = run(backend, text, [("prompt_compress", {"scorer": "self"})])
    both = run(backend, text, [("prompt_compress", {"scorer": "self"}), ("prompt_lookup", {})])
    assert both.extra["output_token_ids"] == alone.extra["output_token_ids"]
    assert both.method_stats["prompt_compress"]["kept_tokens"] == alone.extra["prompt_tokens"]


@pytest.mark.parametrize("name,params,words", [
    ("chunk_cache", {"recompute": 1.5}, "between"),
    ("chunk_cache", {"separator": "tab"}, "must be one of"),
    ("chunk_cache", {"window": 3}, "no parameter"),
    ("prompt_compress", {"keep": 0}, "between"),
    ("prompt_compress", {"scorer": "gpt2"}, "must be one of"),
])
def test_bad_params_are_refused_in_one_line(backend, name, params, words):
    with pytest.raises(ValidationError) as info:
        run(backend, QUESTION, [(name, params)], max_new_tokens=2)
    message = str(info.value)
    assert words in message and "\n" not in message and "Traceback" not in message


def test_compression_without_a_draft_says_so_in_one_line():
    _require_assets()
    alone = _backend(TARGET_DIR, "tiny-code-llama")  # no paired draft
    with pytest.raises(ValidationError, match="^prompt compression: this model has no paired draft model; use "
                                              "scorer=self$"):
        run(alone, QUESTION, [("prompt_compress", {})], max_new_tokens=2)
