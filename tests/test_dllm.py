"""The masked-diffusion LM kind (LLaDA-style decoding) and its methods, Fast-dLLM and
dKV-Cache, on a tiny random bidirectional Llama built from a config.

What is checked: decoding is seeded and deterministic and streams its decided prefix;
every method is removed bit-identically; each changes the work done (denoising forwards
or positions recomputed); the settings that should be exact are (threshold 1.0 parallel
decoding, dKV-Cache refreshed every step); the K/V cache plumbing itself reproduces a
full forward; the training objective weights masked tokens only.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)

from backends.accel._dllm_decoding import (  # noqa: E402
    commit_count, factor_count, steps_per_block, transfer_schedule,
)
from backends.diffusion_lm import DiffusionLMBackend, is_diffusion_lm  # noqa: E402
from backends.types import MethodChoice, Request, ValidationError  # noqa: E402

PROMPTS = ["def draw(shape, colour):\n", "a red circle"]
GEN = 24


@pytest.fixture(scope="module")
def backend():
    from backends.tiny.dummy import dummy_dllm

    model, tok = dummy_dllm(layers=2, seed=0)
    return DiffusionLMBackend.from_model(model, tok, model_id="dummy-dllm",
                                         mask_id=tok.convert_tokens_to_ids("<|mask|>"))


def run(backend, prompt, methods=(), progress=None, **params):
    params.setdefault("max_new_tokens", GEN)
    params.setdefault("block_length", 8)
    request = Request("text", backend.model_id, prompt, seed=params.pop("seed", 0), params=params,
                      methods=[MethodChoice(n, p) for n, p in methods])
    return backend.run(request, progress=progress)


def ids(result):
    return result.extra["output_token_ids"]


def test_schedules_follow_llada():
    assert transfer_schedule(8, 3) == [3, 3, 2] and transfer_schedule(4, 9) == [1, 1, 1, 1]
    assert steps_per_block(10, 3) == [4, 3, 3] and steps_per_block(2, 4) == [1, 1, 1, 1]
    conf = torch.tensor([0.95, 0.5, 0.99, 0.2])
    assert commit_count(1, conf, None) == 1 and commit_count(1, conf, 0.9) == 2
    assert commit_count(3, conf, 1.0) == 3 and commit_count(1, conf, 0.0) == 4


def test_factor_rule_follows_the_paper():
    """Fast-dLLM's factor rule: the largest n with (n + 1)(1 - c_n) < f, at least one;
    it admits tokens the 0.9 threshold does not, and replaces the threshold when set."""
    conf = torch.tensor([0.1, 0.8, 0.75])  # sorted 0.8, 0.75, 0.1: 2*0.2, 3*0.25 < 1; 4*0.9 >= 1
    assert factor_count(conf, 1.0) == 2 and commit_count(1, conf, 0.9) == 1
    assert commit_count(1, conf, 0.9, 1.0) == 2 and commit_count(1, conf, 0.0, 1.0) == 2
    assert factor_count(conf, 0.3) == 1  # 2*0.2 = 0.4 >= 0.3: only the forced first token
    assert factor_count(conf, 4.0) == 3 and commit_count(3, conf, None, 0.3) == 3
    assert factor_count(torch.tensor([0.2, 0.3]), 1e-9) == 1
    assert factor_count(torch.tensor([0.5, 0.5]), 1.5) == 1  # strict: 3 * 0.5 = 1.5 is not < 1.5


def test_baseline_is_deterministic_streams_and_counts(backend):
    seen = []
    first = run(backend, PROMPTS[0], progress=lambda n, total, text: seen.append((n, total, text)))
    again = run(backend, PROMPTS[0])
    assert ids(first) == ids(again) and first.output == again.output
    assert backend.family == "diffusion-lm"
    extra = first.extra
    assert extra["denoising_forwards"] == extra["target_forwards"] == first.model_evals
    assert extra["denoising_forwards"] <= GEN and extra["tokens_per_denoising_step"] == 1.0
    assert extra["positions_recomputed_share"] == 1.0
    assert seen and seen[-1][2] == first.output and [n for n, _, _ in seen] == sorted(n for n, _, _ in seen)
    assert backend.runner.mask_id not in ids(first)


def test_sampling_is_seeded(backend):
    a = run(backend, PROMPTS[1], temperature=1.5, seed=3)
    b = run(backend, PROMPTS[1], temperature=1.5, seed=3)
    c = run(backend, PROMPTS[1], temperature=1.5, seed=4)
    assert ids(a) == ids(b) and ids(a) != ids(c)


def test_fewer_steps_commit_more_tokens_per_forward(backend):
    result = run(backend, PROMPTS[0], steps=GEN // 4)
    assert result.extra["denoising_forwards"] == GEN // 4 and result.extra["tokens_per_denoising_step"] == 4.0


@pytest.mark.parametrize("method", [("fast_dllm", {}), ("fast_dllm", {"cache": "prefix", "threshold": 0.5}),
                                    ("fast_dllm", {"factor": 1.0}), ("fast_dllm", {"factor": 32.0, "cache": "none"}),
                                    ("dkv_cache", {}), ("dkv_cache", {"refresh_interval": 4})])
def test_removal_restores_the_baseline_bit_identically(backend, method):
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    base = [ids(run(backend, p)) for p in PROMPTS]
    for p in PROMPTS:
        run(backend, p, [method])
    assert [ids(run(backend, p)) for p in PROMPTS] == base
    assert all(torch.equal(v, backend.model.state_dict()[k]) for k, v in before.items())


def test_threshold_one_without_cache_is_exact(backend):
    for p in PROMPTS:
        assert ids(run(backend, p, [("fast_dllm", {"threshold": 1.0, "cache": "none"})])) == ids(run(backend, p))


def test_dkv_cache_refreshed_every_step_is_exact(backend):
    for p in PROMPTS:
        result = run(backend, p, [("dkv_cache", {"refresh_interval": 1})])
        assert ids(result) == ids(run(backend, p)) and result.extra["positions_recomputed_share"] == 1.0


def test_parallel_decoding_takes_fewer_forwards(backend):
    base = run(backend, PROMPTS[0])
    fast = run(backend, PROMPTS[0], [("fast_dllm", {"threshold": 0.0, "cache": "none"})])
    # threshold 0: every masked token of a block in one step -> one forward per block
    assert fast.extra["denoising_forwards"] == GEN // 8 < base.extra["denoising_forwards"]
    assert len(ids(fast)) == len(ids(base))
    # per forward, the tokens it committed (Compare's plot), not the streamed prefix's jumps
    assert fast.extra["tokens_per_step"] == [8] * (GEN // 8)
    assert base.extra["tokens_per_step"] == [1] * base.extra["denoising_forwards"]


def test_run_info_shows_no_threshold_once_a_factor_replaces_it(backend):
    ruled = run(backend, PROMPTS[0], [("fast_dllm", {"factor": 1.5, "threshold": 0.5})])
    assert ruled.extra["factor"] == 1.5 and ruled.extra["threshold"] is None
    assert run(backend, PROMPTS[0], [("fast_dllm", {"threshold": 0.5})]).extra["threshold"] == 0.5


def test_factor_rule_takes_fewer_forwards_and_replaces_the_threshold(backend):
    base = run(backend, PROMPTS[0])
    # factor 32 > (n + 1) for every n of a block of 8: the whole block in one step, even
    # with a threshold of 1.0 (which alone would decode exactly as the baseline)
    fast = run(backend, PROMPTS[0], [("fast_dllm", {"factor": 32.0, "threshold": 1.0, "cache": "none"})])
    assert fast.extra["denoising_forwards"] == GEN // 8 < base.extra["denoising_forwards"]
    assert fast.extra["factor"] == 32.0 and len(ids(fast)) == len(ids(base))
    off = run(backend, PROMPTS[0], [("fast_dllm", {"factor": 0.0, "threshold": 1.0, "cache": "none"})])
    assert ids(off) == ids(base) and off.extra["factor"] is None


@pytest.mark.parametrize("method,share_below", [(("fast_dllm", {"threshold": 1.0, "cache": "dual"}), 0.6),
                                                (("fast_dllm", {"threshold": 1.0, "cache": "prefix"}), 0.9),
                                                (("dkv_cache", {}), 0.8)])
def test_caches_recompute_fewer_positions(backend, method, share_below):
    base = run(backend, PROMPTS[0])
    cached = run(backend, PROMPTS[0], [method])
    assert cached.extra["denoising_forwards"] == base.extra["denoising_forwards"]  # same steps
    assert cached.extra["positions_computed"] < base.extra["positions_computed"]
    assert cached.extra["positions_recomputed_share"] < share_below
    assert cached.method_stats[method[0]]["positions_computed"] == cached.extra["positions_computed"]


def test_partial_forward_over_cached_kv_reproduces_the_full_forward(backend):
    """The plumbing the caches rest on: K/V kept from a full forward, then a forward over
    a subset of positions against the others' K/V gives the full forward's logits."""
    runner = backend.runner
    x = torch.tensor([5, 9, 14, 3, runner.mask_id, runner.mask_id, 22, runner.mask_id, 7])
    pos = torch.arange(len(x))
    with torch.inference_mode():
        full, kv = runner.forward(x[None], pos, None, True)
        query = torch.tensor([2, 4, 5, 7])
        others = torch.tensor([0, 1, 3, 6, 8])
        past = [(k.index_select(-2, others), v.index_select(-2, others)) for k, v in kv]
        part, _ = runner.forward(x[query][None], query, past, False)
    torch.testing.assert_close(part, full[query], rtol=1e-4, atol=1e-4)


def test_methods_are_refused_where_they_do_not_apply(backend):
    from studio.validation import validate_request

    with pytest.raises(ValidationError, match="cannot be combined"):
        run(backend, PROMPTS[0], [("fast_dllm", {}), ("dkv_cache", {})])
    with pytest.raises(ValidationError, match="does not apply to this model"):
        run(backend, PROMPTS[0], [("prompt_lookup", {})])
    with pytest.raises(ValidationError, match="at most 24 steps"):
        run(backend, PROMPTS[0], steps=30)
    validate_request(Request("text", "dummy-dllm", "x", params={"steps": 8, "block_length": 4}))


def test_cached_modes_refuse_a_model_without_a_cache_interface(backend):
    from backends.diffusion_lm import RemoteRunner

    remote = DiffusionLMBackend("remote", backend.model, backend.tokenizer,
                                RemoteRunner(backend.model, backend.runner.mask_id, shift=0))
    assert len(ids(run(remote, PROMPTS[0], [("fast_dllm", {"cache": "none"})]))) == GEN
    with pytest.raises(ValidationError, match="no key/value cache"):
        run(remote, PROMPTS[0], [("dkv_cache", {})])


def test_hub_diffusion_lms_are_recognised_and_fail_offline_in_one_line(tmp_path):
    from backends.manager import BackendManager
    from backends.types import ModelLoadError

    assert is_diffusion_lm("GSAI-ML/LLaDA-8B-Instruct") and is_diffusion_lm("Dream-org/Dream-v0-Instruct-7B")
    assert not is_diffusion_lm("HuggingFaceTB/SmolLM2-135M") and not is_diffusion_lm("dreamlike-art/dreamlike-diffusion-1.0")
    (tmp_path / "config.json").write_text('{"model_type": "llama", "diffusion_lm": {"mask_token_id": 3}}')
    assert is_diffusion_lm(str(tmp_path))
    with pytest.raises(ModelLoadError) as err:
        BackendManager(device="cpu").get("text", "GSAI-ML/LLaDA-8B-Instruct")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_training_objective_scores_masked_tokens_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    from backends.tiny.dllm_models import DLLMConfig, corrupt, masked_diffusion_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 49, (4, 16), generator=gen)
    xt, hidden, t = corrupt(x0, 49, DLLMConfig(prefix_prob=1.0), gen)
    assert not hidden[:, 0].any() and torch.equal(xt[~hidden], x0[~hidden]) and (xt[hidden] == 49).all()
    loss = masked_diffusion_loss(model, x0, xt, hidden, t)
    changed = x0.clone()
    keep = ~hidden
    keep[:, 0] = False  # position 0 is never a target
    changed[keep] = (changed[keep] + 1) % 49  # other targets at unmasked positions: loss unchanged
    xt2 = torch.where(hidden, xt, changed)
    assert torch.allclose(loss, masked_diffusion_loss(model, changed, xt, hidden, t))
    assert not torch.allclose(loss, masked_diffusion_loss(model, changed, xt2, hidden, t))


def test_compare_history_and_presets_take_a_diffusion_lm(studio_factory):
    from studio.compare import parse_configs, run_compare
    from studio.presets import parse_preset

    studio = studio_factory()
    assert studio.describe_model("text", "dummy-dllm")["family"] == "diffusion-lm"  # the Text tab shows its methods
    request = Request("text", "dummy-dllm", PROMPTS[0], seed=0,
                      params={"max_new_tokens": 16, "steps": 16, "block_length": 8})
    report = run_compare(studio, request, parse_configs("fast_dllm(threshold=0.0)\ndkv_cache"), repeats=1,
                         warmup=False, perplexity=True)
    base, fast, dkv = report.rows
    assert not (base.error or fast.error or dkv.error)
    assert base.quality["token_agreement"] == 1.0 and base.quality["perplexity_delta_pct"] == 0
    assert fast.quality["perplexity"] > 1 and fast.model_evals < base.model_evals  # generated-code perplexity
    from studio import evidence

    compact = evidence.compact_table(report)  # the figure a diffusion LM's methods are judged by, on screen
    assert list(compact.columns)[:4] == ["config", "speedup", "agree", "ppl Δ%"]
    assert list(compact["ppl Δ%"]) == [0.0, round(fast.quality["perplexity_delta_pct"], 1),
                                       round(dkv.quality["perplexity_delta_pct"], 1)]
    assert studio.history.count(compare_group=report.group, status="ok") == 3
    preset = parse_preset({"name": "dllm fast", "modality": "text", "model": "dummy-dllm",
                           "params": {"max_new_tokens": 16, "steps": 16},
                           "methods": [{"name": "fast_dllm", "params": {"threshold": 0.8}}]})
    studio.presets.save(preset)
    assert studio.presets.get("dllm fast").methods[0].params["threshold"] == 0.8


def test_benchmark_cli_reports_generated_code_perplexity(tmp_path):
    import json

    from benchmarks.cli import main

    out = tmp_path / "d.json"
    assert main(["--modality", "text", "--model", "dummy-dllm", "--methods", "fast_dllm(threshold=1.0, cache=none),"
                 "dkv_cache", "--repeats", "1", "--prompts", "1", "--prompt-kind", "code", "--max-new-tokens", "16",
                 "--params", '{"max_new_tokens": 16, "block_length": 8}', "--json", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    exact = rows["fast_dllm(threshold=1.0, cache=none)"]
    assert exact["all_exact"] is True and exact["quality"]["perplexity_delta_pct"] == 0
    assert rows["baseline"]["quality"]["perplexity"] > 1
    assert rows["dkv_cache"]["method_stats"]["dkv_cache"]["positions_recomputed_share"] < 1


def test_auto_tune_searches_the_diffusion_lm_methods():
    from studio.tune_spec import build_space

    space = build_space("text", "diffusion-lm", None, {"max_new_tokens": 16}, exact=False)
    assert set(space.methods) == {"fast_dllm", "dkv_cache"}
    assert {s.name for s in dict(space.groups)["dllm-decoding"]} == {"fast_dllm", "dkv_cache"}
    assert build_space("text", "diffusion-lm", None, {}, exact=True).methods == []  # none is lossless


def test_limits_leave_the_cache_out_for_a_model_without_a_cache_interface():
    """The tuner's space and the up-front refusal read these: only cache=none for Fast-dLLM,
    dKV-Cache not at all, on a runner without a K/V cache (hub LLaDA; Dream has one)."""
    from types import SimpleNamespace

    from backends.accel.dkv_cache import DKVCacheMethod
    from backends.accel.fast_dllm import FastDLLMMethod

    remote = SimpleNamespace(runner=SimpleNamespace(supports_cache=False))
    local = SimpleNamespace(runner=SimpleNamespace(supports_cache=True))
    assert FastDLLMMethod.limits(remote).choices == {"cache": ("none",)}
    assert FastDLLMMethod.limits(remote).refusal("fast_dllm", {"cache": "dual"})
    assert FastDLLMMethod.limits(remote).refusal("fast_dllm", {"cache": "none"}) is None
    unfit = DKVCacheMethod.limits(remote).unfit
    assert "no key/value cache" in unfit and "\n" not in unfit
    assert FastDLLMMethod.limits(local).choices == {} and not DKVCacheMethod.limits(local).unfit


class FakeDLLMRunner:
    """A diffusion LM for the tuner: fast_dllm 2.5x at +30% generated-code perplexity,
    dkv_cache 1.8x at +2%, both together 3x at +40% (every setting of each the same)."""

    device, parallel = "fake-device", 1
    speed = {frozenset(): 1.0, frozenset({"fast_dllm"}): 2.5, frozenset({"dkv_cache"}): 1.8}
    ppl = {(): 10.0, ("fast_dllm",): 13.0, ("dkv_cache",): 10.2}

    def __init__(self, url, family="diffusion-lm"):
        self.storage_url, self.saved, self._family = url, [], family

    def family(self, modality, model):
        return self._family

    def run(self, request, cancel):
        from studio.measure import Timed

        names = tuple(sorted(m.name for m in request.methods))
        return Timed(1.0 / self.speed[frozenset(names)], f"{'+'.join(names)}:{request.prompt}", None, self.device)

    def warm(self, request, cancel):
        pass

    def quality(self, modality, reference, output):
        same = float(reference == output)
        return {"exact_match": same, "token_agreement": same, "exact": same}

    def task(self, modality, model, outputs, prompts):
        return None

    def output_perplexity(self, prompts, outputs):
        names = tuple(n for n in outputs[0].split(":")[0].split("+") if n)
        return self.ppl[names]

    def shipped_presets(self, modality, model):
        return []

    def save_preset(self, preset):
        self.saved.append(preset)


def test_auto_tune_floors_a_diffusion_lm_on_its_generated_code_perplexity(tmp_path):
    """The diffusion LM's quality figure is a floor the tuner checks: fast_dllm is faster
    but fails perplexity_delta_pct<=5, so dkv_cache wins; the floor is refused in one line
    for a model of another family."""
    from studio.tune import run_tune
    from studio.tune_spec import TuneSpec, parse_floor

    assert parse_floor("perplexity_delta_pct<=5", "text").met({"perplexity_delta_pct": 2.0})
    spec = TuneSpec("text", "fake-dllm", "perplexity_delta_pct<=5", prompts=("a", "b", "c", "d"), trials=4,
                    repeats=1, methods=("fast_dllm", "dkv_cache"), confirm_top=4, compare_singles=True)
    runner = FakeDLLMRunner(f"sqlite:///{tmp_path / 'opt.db'}")
    result = run_tune(runner, spec)
    assert result.winner is not None and [m.name for m in result.winner.heldout.methods] == ["dkv_cache"]
    assert result.winner.heldout.figures["perplexity_delta_pct"] == pytest.approx(2.0)
    single = [c for c in result.confirmed if c.kind == "single" and c.heldout.methods[0].name == "fast_dllm"]
    assert single and not single[0].feasible and single[0].heldout.figures["perplexity_delta_pct"] == pytest.approx(30.0)
    assert "perplexity" in runner.saved[0].description
    other = FakeDLLMRunner(f"sqlite:///{tmp_path / 'other.db'}", family="causal-lm")
    with pytest.raises(ValidationError) as info:
        run_tune(other, spec)
    assert "diffusion LM's quality figure" in str(info.value) and "\n" not in str(info.value)
