"""Text backend and its decoding methods, on tiny random Llamas built from configs.

Lossless methods must give token-for-token the output of plain greedy decoding; the
speculative-sampling test checks the first token's distribution over many seeds.
"""

from __future__ import annotations

import copy

import pytest
import torch

torch.set_num_threads(1)

from backends.accel.base import get_method  # noqa: E402
from backends.text import TextBackend  # noqa: E402
from backends.types import MethodChoice, Request, ValidationError  # noqa: E402
from studio.validation import validate_request  # noqa: E402

CORPUS = [
    "def add(x, y):\n    return x + y\n\n",
    "for i in range(10):\n    print(i)\n",
    "class A:\n    def __init__(self):\n        self.x = 1\n",
]
PROMPTS = [
    "def add(x, y):",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\nfor i in",
    "x",
    "return x + 1\nreturn x + 1\nreturn x + 1\nreturn",
]
REPETITIVE = PROMPTS[1]  # the random model copies this one: 4.4 (lookup) and 2.7 (lookahead) tokens/forward
LOSSLESS = [
    ("speculative", {}),
    ("speculative", {"num_assistant_tokens": 3, "schedule": "heuristic"}),
    ("speculative", {"num_assistant_tokens": 6, "confidence_threshold": 0.3}),
    ("prompt_lookup", {}),
    ("prompt_lookup", {"num_tokens": 4, "max_matching_ngram_size": 3}),
    ("lookahead", {}),
    ("lookahead", {"window": 2, "ngram": 3, "branches": 2, "prompt_ngrams": False}),
    ("lookahead", {"window": 1, "ngram": 4, "branches": 3, "output_ngrams": False}),
    ("lookahead", {"window": 5, "ngram": 5, "branches": 6}),
    ("layer_skip", {}),
    ("layer_skip", {"skip_from": 1, "skip_to": 1, "draft_tokens": 6, "draft_confidence": 0.05}),
    ("static_cache", {}),
]
NEW_TOKENS = 40


def make_tokenizer(corpus: list[str], vocab_size: int):
    from backends.tiny.dummy import byte_level_tokenizer

    return byte_level_tokenizer(corpus, vocab_size)


def make_model(tok, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.1,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(CORPUS, 300)


@pytest.fixture(scope="module")
def target(tok):
    return make_model(tok, 4, 0)


@pytest.fixture(scope="module")
def backend(tok, target):
    draft = make_model(tok, 1, 1)
    return TextBackend.from_model(target, tok, model_id="tiny-test", drafts={"tiny-draft": (draft, tok)})


def run(backend, prompt, methods=(), **params):
    params.setdefault("max_new_tokens", NEW_TOKENS)
    request = Request("text", backend.model_id, prompt, seed=params.pop("seed", 0), params=params,
                      methods=[MethodChoice(n, p) for n, p in methods])
    return backend.run(request)


@pytest.fixture(scope="module")
def baselines(backend):
    return {p: run(backend, p).extra["output_token_ids"] for p in PROMPTS}


def test_baseline_streams_times_and_counts(backend):
    seen = []
    result = run(backend, PROMPTS[0], max_new_tokens=12)
    streamed = backend.run(Request("text", "tiny-test", PROMPTS[0], params={"max_new_tokens": 12}),
                           progress=lambda n, total, text: seen.append((n, total, text)))
    assert streamed.output == result.output and isinstance(result.output, str)
    assert [n for n, _, _ in seen] == list(range(1, 13)) and seen[-1][1] == 12
    assert seen[-1][2] == result.output
    extra = result.extra
    assert extra["tokens_generated"] == 12 and len(extra["output_token_ids"]) == 12
    assert extra["target_forwards"] == 12 and extra["tokens_per_target_forward"] == 1.0
    assert result.model_evals == 12
    assert {"prefill", "decode", "total"} <= set(result.timings)
    assert extra["time_to_first_token_s"] == pytest.approx(result.timings["prefill"], abs=1e-5)
    assert extra["tokens_per_s"] > 0


@pytest.mark.parametrize("name,params", LOSSLESS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOSSLESS)])
def test_lossless_methods_equal_greedy(backend, baselines, name, params):
    assert get_method(name).spec.lossless is True
    for prompt in PROMPTS:
        result = run(backend, prompt, [(name, params)])
        assert result.extra["output_token_ids"] == baselines[prompt], (name, params, prompt)
        stats = result.method_stats[name]
        assert stats["tokens"] == NEW_TOKENS


@pytest.mark.parametrize("name", ["prompt_lookup", "lookahead"])
def test_copying_methods_accept_tokens_on_repetitive_prompt(backend, name):
    stats = run(backend, REPETITIVE, [(name, {})]).method_stats[name]
    assert stats["tokens_per_target_forward"] > 1.5, stats
    assert stats["accepted_draft_tokens"] > 0


def test_lookahead_candidate_tree_shares_prefixes_and_masks_ancestors_only():
    from backends.accel.lookahead import candidate_tree, lookahead_mask

    nodes, children = candidate_tree([(5, 6, 7), (5, 6, 8), (9, 6, 7)])
    assert [t for t, _, _ in nodes] == [5, 6, 7, 8, 9, 6, 7]  # "5 6" verified once: 7 nodes, not 9
    assert children[(-1, 5)] == 0 and children[(1, 8)] == 3 and children[(4, 6)] == 5
    mask, offsets = lookahead_mask(past=3, W=2, N=4, nodes=nodes, dtype=torch.float32, device="cpu")
    seen = mask[0, 0] == 0
    base = 1 + 3 * 2
    assert mask.shape == (1, 1, base + 7, 3 + base + 7) and seen[:, :3].all()  # the cache: seen by all
    assert offsets[base:] == [1, 2, 3, 3, 1, 2, 3]
    new = seen[:, 3:]
    # node 3 ("8" after "5 6"): c, its ancestors 0 and 1, itself; not its sibling 2 nor the window
    assert new[base + 3].nonzero().flatten().tolist() == [0, base, base + 1, base + 3]
    assert new[base + 6].nonzero().flatten().tolist() == [0, base + 4, base + 5, base + 6]


def test_speculative_with_agreeing_draft_accepts_most_tokens(tok, target):
    backend = TextBackend.from_model(target, tok, drafts={"twin": (copy.deepcopy(target), tok)})
    greedy = run(backend, PROMPTS[0]).extra["output_token_ids"]
    result = run(backend, PROMPTS[0], [("speculative", {"num_assistant_tokens": 4})])
    assert result.extra["output_token_ids"] == greedy
    stats = result.method_stats["speculative"]
    assert stats["tokens_per_target_forward"] > 3 and stats["acceptance_rate"] > 0.9, stats


def test_layer_skip_reports_draft_rounds(backend):
    stats = run(backend, PROMPTS[1], [("layer_skip", {"skip_ratio": 0.5})]).method_stats["layer_skip"]
    assert stats["skipped_layers"] == [1, 2] and stats["draft_rounds"] > 0 and stats["drafted"] > 0


def test_apply_and_remove_leave_baseline_identical(backend, baselines):
    layers = backend.model.model.layers
    draft_config = backend.drafts["tiny-draft"][0].generation_config.to_dict()
    for name, params in LOSSLESS + [("sink_cache", {"window_length": 8}), ("snapkv", {"budget": 4, "window": 4})]:
        run(backend, PROMPTS[1], [(name, params)], max_new_tokens=12)
        assert all("forward" not in vars(layer) for layer in layers), name
        assert not backend.model._forward_pre_hooks and not backend.model._forward_hooks, name
    assert backend.drafts["tiny-draft"][0].generation_config.to_dict() == draft_config
    for prompt in PROMPTS:
        assert run(backend, prompt).extra["output_token_ids"] == baselines[prompt]


def test_mismatched_draft_tokenizer_is_refused(tok, target):
    other_tok = make_tokenizer(["completely different text, other merges " * 3, "zzz yyy"], 280)
    draft = make_model(other_tok, 1, 2)
    backend = TextBackend.from_model(target, tok, drafts={"alien": (draft, other_tok)})
    with pytest.raises(ValidationError, match="different tokenizer"):
        run(backend, PROMPTS[0], [("speculative", {})])
    assert not backend.model._forward_pre_hooks


def test_speculative_without_a_paired_draft_says_so(tok, target):
    backend = TextBackend.from_model(target, tok)
    with pytest.raises(ValidationError, match="no paired draft"):
        run(backend, PROMPTS[0], [("speculative", {})])


def test_the_tuner_never_tries_a_model_as_its_own_draft(tok, target):
    from backends.accel.base import get_method

    for paired in (None, "tiny-code-draft"):
        backend = TextBackend.from_model(target, tok, model_id="tiny-code-llama")
        backend.draft_id = paired
        limits = get_method("speculative").limits(backend)
        assert "tiny-code-llama" in limits.choices["draft"]  # allowed when asked for by name
        searched = limits.search_choices["draft"]
        assert "tiny-code-llama" not in searched
        # with a paired draft it is tried once, as 'auto'; without, by its name
        assert ("auto" in searched, "tiny-code-draft" in searched) == ((True, False) if paired else (False, True))


def test_greedy_only_methods_refuse_sampling(backend):
    for name in ("lookahead", "layer_skip"):
        with pytest.raises(ValidationError, match="greedy"):
            run(backend, PROMPTS[0], [(name, {})], temperature=0.7)


def test_decoding_methods_do_not_combine(backend):
    with pytest.raises(ValidationError, match="cannot be combined"):
        run(backend, PROMPTS[0], [("lookahead", {}), ("prompt_lookup", {})])


def test_request_validation():
    ok = {"modality": "text", "model": "tiny-code-llama", "prompt": "def f():", "params": {"max_new_tokens": 8}}
    assert validate_request(ok).params["max_new_tokens"] == 8
    for bad in ({"prompt": ""}, {"prompt": "   "}, {"params": {"max_new_tokens": 0}},
                {"params": {"max_new_tokens": 100000}}, {"params": {"temperature": -1}},
                {"methods": [{"name": "lookahead", "params": {"window": 0}}]},
                {"methods": [{"name": "speculative", "params": {"draft": "no-such-draft"}}]}):
        with pytest.raises(ValidationError):
            validate_request({**ok, **bad})


def test_system_prompt_is_limited_with_the_prompt(backend):
    from backends.params import MAX_TEXT_INPUT_CHARS

    ok = {"modality": "text", "model": "tiny-code-llama", "prompt": "x" * 3000, "params": {"max_new_tokens": 8}}
    with pytest.raises(ValidationError, match="together; the limit is") as info:
        validate_request({**ok, "params": {"system_prompt": "y" * (MAX_TEXT_INPUT_CHARS - 2999)}})
    assert "\n" not in str(info.value)
    assert validate_request({**ok, "params": {"system_prompt": "y" * (MAX_TEXT_INPUT_CHARS - 3000)}})


def test_input_past_the_model_context_is_refused_in_one_line(backend):
    long_system = "def f(x):\n    return x\n" * 400  # far more tokens than the model's 1,024 positions
    with pytest.raises(ValidationError, match="context of 1024 positions") as info:
        run(backend, PROMPTS[0], system_prompt=long_system)
    assert "\n" not in str(info.value)
    prompt_tokens = run(backend, PROMPTS[0], max_new_tokens=1).extra["prompt_tokens"]
    with pytest.raises(ValidationError, match="1024 positions"):
        run(backend, PROMPTS[0], max_new_tokens=1025 - prompt_tokens)
    backend.check_context(prompt_tokens, 1024 - prompt_tokens)  # exactly the context: allowed


def test_lossy_methods_are_exact_until_they_drop_something(backend, baselines):
    prompt = PROMPTS[1]
    sink = run(backend, prompt, [("sink_cache", {"num_sink_tokens": 4, "window_length": 256})])
    snap = run(backend, prompt, [("snapkv", {"budget": 64, "window": 8})])
    assert sink.extra["output_token_ids"] == baselines[prompt] and sink.method_stats["sink_cache"]["evicted_tokens"] == 0
    assert snap.extra["output_token_ids"] == baselines[prompt] and not snap.method_stats["snapkv"]["compressed"]
    sink = run(backend, prompt, [("sink_cache", {"num_sink_tokens": 2, "window_length": 8})])
    snap = run(backend, prompt, [("snapkv", {"budget": 4, "window": 4, "kernel": 3})])
    assert sink.method_stats["sink_cache"]["max_cache_len"] <= 2 + 8 + len(backend.tokenizer(prompt).input_ids)
    assert sink.method_stats["sink_cache"]["evicted_tokens"] > 0 and len(sink.extra["output_token_ids"]) == NEW_TOKENS
    stats = snap.method_stats["snapkv"]
    assert stats["compressed"] and stats["kept_prompt_tokens"] == 8 and len(snap.extra["output_token_ids"]) == NEW_TOKENS
    assert any("differ" in note for note in sink.notes + snap.notes)
    assert not get_method("sink_cache").spec.lossless and not get_method("snapkv").spec.lossless


def test_sink_cache_rerotation_is_a_position_shift(target):
    from backends.accel.sink_cache import shift_positions
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    keys = torch.randn(1, 2, 5, 16)
    rotary = target.model.rotary_emb

    def at(position):
        cos, sin = rotary(keys, position_ids=torch.full((1, 5), position))
        return apply_rotary_pos_emb(keys, keys, cos, sin)[1]

    torch.testing.assert_close(shift_positions(target, at(40), -13), at(27), atol=1e-5, rtol=1e-5)


def test_speculative_sampling_keeps_the_target_distribution(tok, target):
    """First sampled token over many seeds vs the target's exact softmax (chi-square)."""
    from scipy.stats import chisquare

    draft = copy.deepcopy(target)
    with torch.no_grad():  # a draft that agrees only partly (TV ~0.6): both accept and resample paths run
        torch.manual_seed(5)
        draft.lm_head.weight.add_(torch.randn_like(draft.lm_head.weight) * 0.1)
    backend = TextBackend.from_model(target, tok, drafts={"noisy": (draft, tok)})
    prompt, temperature, draws = "x", 0.3, 200
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        p = (target(ids).logits[0, -1] / temperature).softmax(-1)
        q = (draft(ids).logits[0, -1] / temperature).softmax(-1)
    top = p.topk(3).indices.tolist()

    def binned(dist):
        probs = [float(dist[t]) for t in top]
        return probs + [1 - sum(probs)]

    counts = [0] * (len(top) + 1)
    accepted = 0
    for seed in range(draws):
        result = run(backend, prompt, [("speculative", {"num_assistant_tokens": 2})], seed=seed,
                     temperature=temperature, max_new_tokens=2)
        first = result.extra["output_token_ids"][0]
        counts[top.index(first) if first in top else len(top)] += 1
        accepted += result.method_stats["speculative"]["accepted_draft_tokens"]
    assert chisquare(counts, [draws * x for x in binned(p)]).pvalue > 1e-3, (counts, binned(p))
    # power: the draft's own distribution is far from what was observed
    tv_to_draft = 0.5 * sum(abs(c / draws - x) for c, x in zip(counts, binned(q)))
    assert tv_to_draft > 0.12, (counts, binned(q))
    assert accepted > draws // 10  # a good share of first tokens came from accepted drafts


def test_chat_template_is_applied_when_present(tok, target):
    chat_tok = copy.deepcopy(tok)
    chat_tok.chat_template = "{% for m in messages %}USER: {{ m['content'] }}\n{% endfor %}ASSISTANT:"
    backend = TextBackend.from_model(target, chat_tok)
    with_template = backend.encode_prompt("hi", chat_template=True)[0].tolist()
    plain = backend.encode_prompt("hi", chat_template=False)[0].tolist()
    assert chat_tok.decode(with_template) == "USER: hi\nASSISTANT:" and chat_tok.decode(plain) == "hi"
    result = run(backend, "hi", chat_template=False, max_new_tokens=4)
    assert result.extra["prompt_tokens"] == len(plain)


def test_manager_loads_a_saved_model_and_its_draft(tmp_path, tok, target):
    from backends.manager import BackendManager

    folder, draft_folder = tmp_path / "lm", tmp_path / "draft"
    target.save_pretrained(folder)
    tok.save_pretrained(folder)
    make_model(tok, 1, 1).save_pretrained(draft_folder)
    tok.save_pretrained(draft_folder)
    manager = BackendManager(device="cpu", dtype=torch.float32)
    backend = manager.get("text", str(folder))
    assert isinstance(backend, TextBackend) and backend.family == "causal-lm"
    greedy = run(backend, PROMPTS[0], max_new_tokens=8).extra["output_token_ids"]
    backend.draft_id = str(draft_folder)
    result = run(backend, PROMPTS[0], [("speculative", {})], max_new_tokens=8)
    assert result.extra["output_token_ids"] == greedy and str(draft_folder) in backend.drafts
    assert backend.memory_bytes() > sum(p.numel() * 4 for p in target.parameters())


def test_universal_assisted_decoding_is_opt_in_and_exact(tok, target):
    other_tok = make_tokenizer(["completely different text, other merges " * 3, "zzz yyy"], 280)
    backend = TextBackend.from_model(target, tok, drafts={"alien": (make_model(other_tok, 1, 2), other_tok)})
    greedy = run(backend, PROMPTS[0], max_new_tokens=10).extra["output_token_ids"]
    result = run(backend, PROMPTS[0], [("speculative", {"universal": True})], max_new_tokens=10)
    assert result.extra["output_token_ids"] == greedy
    assert result.method_stats["speculative"]["universal"] and any("different tokenizer" in n for n in result.notes)


def test_custom_loops_stream_and_sample_with_the_seed(backend):
    seen = []
    request = Request("text", "tiny-test", PROMPTS[1], params={"max_new_tokens": 20},
                      methods=[MethodChoice("lookahead", {})])
    result = backend.run(request, progress=lambda n, total, text: seen.append((n, text)))
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and counts[-1] == 20 and len(seen) < 20  # several tokens per step
    assert seen[-1][1] == result.output
    sampled = [run(backend, PROMPTS[0], [("sink_cache", {"window_length": 8})], temperature=1.0, seed=s,
                   max_new_tokens=8).extra["output_token_ids"] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
