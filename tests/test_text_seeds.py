"""Text seed methods on the bundled code model (issue 20): the prefix cache across runs,
Token Recycling and retrieval drafting from a datastore.

Each is lossless: its tokens must equal plain greedy decoding's on every prompt, including
prompts written for this test (never used to tune anything); each keeps its cross-run state
on the backend, per model, and a run without it is plain decoding again.
"""

from __future__ import annotations

import pytest
import torch

from backends.types import MethodChoice, Request, ValidationError
from tests.test_tiny_text import TARGET_DIR, DRAFT_DIR, _require_assets

NEW_TOKENS = 32
# never used to tune a default: a class with methods, a loop over a dict, a docstring-heavy function
PROMPTS = [
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "counts = {'a': 1, 'b': 2}\nfor key, value in counts.items():\n",
    'def area(width, height):\n    """Return the area of a rectangle.\n\n    width: the width.\n    height: the '
    'height.\n    """\n',
    "def fibonacci(n):\n",
]
SYSTEM = ("# Helpers for parsing configuration files.\nimport os\nimport re\n\n\n"
          "def read_config(path):\n    \"\"\"Read key = value lines from path.\"\"\"\n    result = {}\n"
          "    with open(path) as f:\n        for line in f:\n            key, _, value = line.partition('=')\n"
          "            result[key.strip()] = value.strip()\n    return result\n\n\n")
SMALL_STORE = {"corpus_tokens": 20_000}


def _backend(folder, model_id, with_draft=False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.text import TextBackend

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    drafts = {"tiny-code-draft": (AutoModelForCausalLM.from_pretrained(DRAFT_DIR).eval(), tok)} if with_draft else None
    return TextBackend.from_model(model, tok, model_id=model_id, drafts=drafts)


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    _require_assets()
    torch.set_num_threads(1)
    backend = _backend(TARGET_DIR, "tiny-code-llama", with_draft=True)
    backend.cache_dir = tmp_path_factory.mktemp("cache")
    return backend


def run(backend, prompt, methods=(), **params):
    params.setdefault("max_new_tokens", NEW_TOKENS)
    return backend.run(Request("text", backend.model_id, prompt, seed=0, params=params,
                               methods=[MethodChoice(n, p) for n, p in methods]))


@pytest.fixture(scope="module")
def baselines(backend):
    return {p: run(backend, p).extra["output_token_ids"] for p in PROMPTS}


LOSSLESS = [
    ("token_recycling", {}),
    ("token_recycling", {"k": 4, "tree_size": 6, "depth": 3, "persist": False}),
    ("retrieval_draft", SMALL_STORE),
    ("retrieval_draft", {**SMALL_STORE, "context": False, "tree_size": 20, "depth": 8}),
    ("prefix_cache", {}),
    ("dynamic_tree", {}),
    ("dynamic_tree", {"depth": 6, "width": 2, "branch": 2, "tree_size": 8}),
]


@pytest.mark.parametrize("name,params", LOSSLESS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOSSLESS)])
def test_lossless_equals_greedy_on_new_prompts(backend, baselines, name, params):
    stateful = name in ("token_recycling", "prefix_cache")  # a second round runs on the state the first left
    reused: list[int] = []
    for round_ in range(2 if stateful else 1):
        for prompt in PROMPTS:
            result = run(backend, prompt, [(name, params)])
            assert result.extra["output_token_ids"] == baselines[prompt], (name, params, prompt)
            if name == "prefix_cache" and round_ == 1:  # the second request reuses every whole block it can
                reusable = (result.extra["prompt_tokens"] - 1) // 16 * 16
                assert result.method_stats[name]["cached_tokens"] == reusable, prompt
                reused.append(reusable)
    assert name != "prefix_cache" or sum(reused) > 0
    assert run(backend, PROMPTS[0]).extra["output_token_ids"] == baselines[PROMPTS[0]]  # removed: plain again


def test_draft_trees_accept_several_tokens_per_forward(backend, baselines):
    for name, params in (("token_recycling", {}), ("retrieval_draft", SMALL_STORE), ("dynamic_tree", {})):
        results = [run(backend, p, [(name, params)]) for p in PROMPTS]
        per_forward = [r.extra["tokens_per_target_forward"] for r in results]
        assert max(per_forward) > 1.5, (name, per_forward)
        for r in results:  # each tree step gives one token of its own plus the drafted tokens it accepted
            stats = r.method_stats[name]
            assert stats["accepted_from_tree"] == r.extra["tokens_generated"] - 1 - stats["tree_steps"], name
        assert all(r.method_stats[name]["accepted_from_tree"] > 0 for r in results), name
    plain = run(backend, PROMPTS[1])
    assert plain.extra["target_forwards"] == plain.extra["tokens_generated"]  # no tree left behind


def test_dynamic_tree_drafts_one_forward_per_level_and_follows_the_draft(backend):
    result = run(backend, PROMPTS[0], [("dynamic_tree", {"depth": 3, "tree_size": 5})])
    stats = result.method_stats["dynamic_tree"]
    assert stats["draft_forwards"] == 3 * stats["tree_steps"] and stats["draft"] == "tiny-code-draft"
    assert stats["mean_forward_width"] <= 6  # the current token and at most tree_size drafted nodes
    deep = run(backend, PROMPTS[0], [("dynamic_tree", {"depth": 6, "width": 1, "branch": 1, "tree_size": 6})])
    assert deep.method_stats["dynamic_tree"]["mean_forward_width"] == 7  # one chain: the draft's greedy path


def test_token_recycling_matrix_is_updated_and_kept_on_the_backend(backend):
    from backends.accel.token_recycling import MEMORY_KEY

    backend.run_memory.pop(MEMORY_KEY, None)
    first = run(backend, PROMPTS[1], [("token_recycling", {})]).method_stats["token_recycling"]
    matrix = backend.run_memory[MEMORY_KEY]
    assert first["matrix_updates"] > NEW_TOKENS and first["matrix_rows_seen"] > 10
    assert matrix.nbytes < 2 * 1024 * 1024
    second = run(backend, PROMPTS[1], [("token_recycling", {})])
    assert backend.run_memory[MEMORY_KEY] is matrix and second.method_stats["token_recycling"]["matrix_updates"] > 0
    # the matrix that saw this output drafts it: more tokens per forward than the cold run
    cold = run(backend, PROMPTS[1], [("token_recycling", {"persist": False})])
    assert second.extra["tokens_per_target_forward"] > cold.extra["tokens_per_target_forward"]


def test_prefix_cache_reuses_the_shared_prefix_only_on_later_requests(backend):
    from backends.accel.prefix_cache import MEMORY_KEY

    backend.run_memory.pop(MEMORY_KEY, None)
    plain = [run(backend, p, system_prompt=SYSTEM) for p in PROMPTS[:2]]
    cached = [run(backend, p, [("prefix_cache", {})], system_prompt=SYSTEM) for p in PROMPTS[:2]]
    stats = [r.method_stats["prefix_cache"] for r in cached]
    assert stats[0]["cached_tokens"] == 0 and stats[0]["misses"] == 1
    shared = len(backend.tokenizer(SYSTEM).input_ids)
    assert shared - 16 < stats[1]["cached_tokens"] <= shared and stats[1]["cached_tokens"] % 16 == 0
    for p, c in zip(plain, cached):
        assert c.extra["output_token_ids"] == p.extra["output_token_ids"]
    again = run(backend, PROMPTS[0], [("prefix_cache", {"block_tokens": 16})], system_prompt=SYSTEM)
    assert again.method_stats["prefix_cache"]["cached_tokens"] == (again.extra["prompt_tokens"] - 1) // 16 * 16
    assert again.extra["output_token_ids"] == plain[0].extra["output_token_ids"]
    blocks = again.method_stats["prefix_cache"]["blocks"]
    run(backend, PROMPTS[3], [("prefix_cache", {})], system_prompt=SYSTEM)  # a new suffix adds only its own blocks
    suffix_blocks = len(backend.tokenizer(SYSTEM + PROMPTS[3]).input_ids) // 16 - shared // 16
    assert backend.run_memory[MEMORY_KEY].blocks and len(backend.run_memory[MEMORY_KEY].blocks) <= \
        blocks + suffix_blocks + 1


def test_prefix_cache_never_hands_quantized_k_v_to_a_plain_run(backend):
    """weight_quant stacks with the prefix cache: its blocks are keyed by the weights it runs."""
    from backends.accel.prefix_cache import MEMORY_KEY

    backend.run_memory.pop(MEMORY_KEY, None)
    plain = run(backend, PROMPTS[0], system_prompt=SYSTEM).extra["output_token_ids"]
    quantized = [("weight_quant", {"weights": "int4"}), ("prefix_cache", {})]
    run(backend, PROMPTS[1], quantized, system_prompt=SYSTEM)
    again = run(backend, PROMPTS[0], quantized, system_prompt=SYSTEM)
    assert again.method_stats["prefix_cache"]["cached_tokens"] > 0  # its own blocks are reused
    later = run(backend, PROMPTS[0], [("prefix_cache", {})], system_prompt=SYSTEM)
    assert later.method_stats["prefix_cache"]["cached_tokens"] == 0
    assert later.extra["output_token_ids"] == plain
    assert getattr(backend, "weights_tag", "") == ""  # removal restores the plain weights' tag


def test_prefix_cache_keeps_sampled_output_too(backend):
    """With sampling the same seed draws the same tokens: the reused K/V give the same logits."""
    sampled = dict(system_prompt=SYSTEM, temperature=0.8, top_k=50, max_new_tokens=16)
    plain = run(backend, PROMPTS[1], **sampled).extra["output_token_ids"]
    run(backend, PROMPTS[2], [("prefix_cache", {})], **sampled)  # stores the shared prefix
    cached = run(backend, PROMPTS[1], [("prefix_cache", {})], **sampled)
    assert cached.method_stats["prefix_cache"]["cached_tokens"] > 0
    assert cached.extra["output_token_ids"] == plain


def test_prefix_cache_evicts_least_recently_used_under_a_small_budget(backend):
    from backends.accel.prefix_cache import MEMORY_KEY, MB

    backend.run_memory.pop(MEMORY_KEY, None)
    prompts = [f"# file {i}\n" + SYSTEM for i in range(3)]  # their first blocks differ: three chains
    run(backend, prompts[0], [("prefix_cache", {})], max_new_tokens=2)
    store = backend.run_memory[MEMORY_KEY]
    budget = {"budget_mb": round(store.nbytes / MB * 2.5, 2)}  # room for two chains
    cached = lambda i: run(backend, prompts[i], [("prefix_cache", budget)],  # noqa: E731
                           max_new_tokens=2).method_stats["prefix_cache"]
    assert cached(1)["cached_tokens"] == 0
    assert cached(0)["cached_tokens"] > 0  # 0 is now the most recently used
    third = cached(2)
    assert third["cached_tokens"] == 0 and third["evictions"] > 0
    full = (len(backend.tokenizer(prompts[0]).input_ids) - 1) // 16 * 16
    assert cached(0)["cached_tokens"] == full and cached(2)["cached_tokens"] == full
    assert cached(1)["cached_tokens"] < full  # chain 1, least recently used, lost its last blocks


def test_prefix_cache_never_reuses_across_models_and_reloads_from_disk(backend, tmp_path, monkeypatch):
    from backends.accel.prefix_cache import MEMORY_KEY

    monkeypatch.setattr(backend, "cache_dir", tmp_path)
    backend.run_memory.pop(MEMORY_KEY, None)
    disk = [("prefix_cache", {"disk": True})]
    run(backend, PROMPTS[0], disk, system_prompt=SYSTEM, max_new_tokens=4)
    assert list(tmp_path.rglob("*.safetensors"))
    draft = _backend(DRAFT_DIR, "tiny-code-draft")  # same tokenizer, other weights
    draft.cache_dir = tmp_path
    other = run(draft, PROMPTS[1], disk, system_prompt=SYSTEM, max_new_tokens=4).method_stats["prefix_cache"]
    assert other["cached_tokens"] == 0 and other["blocks_from_disk"] == 0
    reloaded = _backend(TARGET_DIR, "tiny-code-llama")  # a restarted studio: empty memory, same model
    reloaded.cache_dir = tmp_path
    result = run(reloaded, PROMPTS[1], disk, system_prompt=SYSTEM, max_new_tokens=4)
    stats = result.method_stats["prefix_cache"]
    assert stats["blocks_from_disk"] > 0 and stats["cached_tokens"] == 16 * stats["blocks_from_disk"]
    assert result.extra["output_token_ids"] == run(backend, PROMPTS[1], system_prompt=SYSTEM,
                                                   max_new_tokens=4).extra["output_token_ids"]
    reloaded.unload()
    assert reloaded.run_memory == {}


def test_datastore_finds_what_followed_the_longest_suffix():
    import numpy as np

    from backends.accel.retrieval_draft import Datastore, select_tree

    corpus = np.array([5, 1, 2, 3, 9, 1, 2, 4, 8, 7, 1, 2, 3, 6, 0], dtype=np.int64)
    store = Datastore.build(corpus, range(2, 4))
    assert store.continuations([7, 1, 2], 3, 2, 100) == [(3, 6)]  # the 3-gram occurs: longest first
    assert sorted(store.continuations([8, 1, 2], 3, 2, 100)) == [(3, 6), (3, 9), (4, 8)]  # then the 2-gram (1, 2)
    assert store.continuations([0, 2, 3], 3, 2, 100) == [(9, 1), (6, 0)]  # only the 2-gram (2, 3) occurs
    assert store.continuations([4, 4], 3, 2, 100) == []
    nodes, children = select_tree([(3, 6), (3, 9), (4, 8)], 2)
    assert [t for t, _, _ in nodes] == [3, 4]  # the most frequent prefixes first


def test_retrieval_datastore_is_built_once_then_read_from_disk(tmp_path):
    _require_assets()
    first, second = _backend(TARGET_DIR, "tiny-code-llama"), _backend(TARGET_DIR, "tiny-code-llama")
    first.cache_dir = second.cache_dir = tmp_path
    built = run(first, PROMPTS[1], [("retrieval_draft", SMALL_STORE)], max_new_tokens=4)
    assert built.method_stats["retrieval_draft"]["datastore"] == "built" and "built in this run" in built.notes[0]
    assert len(list((tmp_path / "retrieval").glob("*.npz"))) == 1
    read = run(second, PROMPTS[1], [("retrieval_draft", SMALL_STORE)], max_new_tokens=4)
    assert read.method_stats["retrieval_draft"]["datastore"] == "disk" and not read.notes
    assert run(second, PROMPTS[1], [("retrieval_draft", SMALL_STORE)],
               max_new_tokens=4).method_stats["retrieval_draft"]["datastore"] == "memory"
    assert read.extra["output_token_ids"] == built.extra["output_token_ids"]


@pytest.mark.parametrize("name,params,words", [
    ("token_recycling", {"tree_size": 2, "depth": 5}, "at least depth"),
    ("token_recycling", {"k": 0}, "between"),
    ("retrieval_draft", {"corpus_tokens": 10}, "between"),
    ("prefix_cache", {"budget_mb": 0}, "between"),
    ("prefix_cache", {"size": 3}, "no parameter"),
    ("dynamic_tree", {"draft": "tiny-sd-shapes"}, "must be one of"),
])
def test_bad_params_are_refused_in_one_line(backend, name, params, words):
    with pytest.raises(ValidationError) as info:
        run(backend, PROMPTS[0], [(name, params)], max_new_tokens=2)
    message = str(info.value)
    assert words in message and "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize("name", ["token_recycling", "retrieval_draft", "dynamic_tree"])
def test_tree_methods_refuse_sampling(backend, name):
    with pytest.raises(ValidationError, match="greedy decoding only"):
        run(backend, PROMPTS[0], [(name, SMALL_STORE if name == "retrieval_draft" else {})], temperature=0.8,
            max_new_tokens=2)


def test_the_studio_data_dir_cache_folder_reaches_the_backends(studio_factory):
    _require_assets()
    studio = studio_factory()
    studio.manager.register_factory("text", "code-under-test", lambda device, dtype: _backend(TARGET_DIR, "x"))
    backend = studio.manager.get("text", "code-under-test")
    assert backend.cache_dir == studio.data_dir / "cache"
