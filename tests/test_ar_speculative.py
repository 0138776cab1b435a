"""Speculative decoding with a draft model and the static cache on the autoregressive image
kind (issue 21): the text methods ``speculative`` and ``static_cache`` extended to the AR
token loop, on tiny random pipelines (no assets needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from backends.accel._ar_decoding import ARSampling, LoopStats, plain_loop, run_loop, static_cache_loop
from backends.accel.speculative import ar_speculative_loop
from backends.ar_image import ARImageBackend
from backends.tiny.ar_image import ARImagePipeline, llama_config
from backends.types import Request, ValidationError
from _ar_tiny import PROMPT, pixels, run, small_pipeline

DRAFT = "tiny-ar-random-draft"


def _truncated_draft(pipe: ARImagePipeline, layers: int = 1) -> ARImagePipeline:
    """The target's own weights with its last layers dropped: a draft of the same layout whose
    distributions are close to the target's (most drafts accepted), built in milliseconds."""
    from transformers import LlamaForCausalLM

    cfg = pipe.transformer.config
    draft = LlamaForCausalLM(llama_config(pipe.layout, cfg.hidden_size, layers, cfg.num_attention_heads)).eval()
    draft.load_state_dict(pipe.transformer.state_dict(), strict=False)
    return ARImagePipeline(pipe.vq, draft, pipe.layout)


@pytest.fixture(scope="module")
def pair():
    from backends.tiny.ar_image import tiny_random_pipeline

    torch.set_num_threads(1)
    pipe = tiny_random_pipeline(seed=0)
    return pipe, _truncated_draft(pipe)


# -- speculative decoding with a draft --------------------------------------------------------------
def test_draft_speculation_is_exact_under_greedy_and_needs_fewer_target_forwards(pair):
    pipe, draft = pair
    greedy = ARSampling(guidance=3.0, temperature=0.0)
    for seed in (0, 1):
        plain, f_plain = run_loop(plain_loop, pipe, PROMPT, greedy, seed)
        stats = LoopStats()
        spec, f_spec = run_loop(lambda s, p: ar_speculative_loop(s, p, draft, 4, stats=stats), pipe, PROMPT, greedy,
                                seed)
        assert torch.equal(plain, spec)
        assert f_spec < f_plain == 64 and stats.accepted > 0


def test_draft_speculation_keeps_the_sampling_distribution_and_a_broken_rule_fails_the_test():
    """Chi-square, speculative sampling against plain sampling, 500 seeds each, on a 2x2-token
    model with a draft of other weights (acceptance well below 1, so rejections and residual
    draws are exercised): every position's marginal and the joint of the last two. The same
    test on a loop that keeps every draft (so its tokens follow the draft) must fail."""
    from scipy.stats import chi2_contingency

    target, draft = small_pipeline(model_seed=0), small_pipeline(model_seed=1)
    sampling = ARSampling(guidance=2.0, temperature=1.0)
    n, k = 500, target.layout.codebook_size

    def tokens(loop, offset):
        return torch.cat([run_loop(loop, target, PROMPT, sampling, seed + offset)[0] for seed in range(n)])

    def columns(t):
        return [c for c in t.T] + [t[:, 2] * k + t[:, 3]]

    def pvalues(a, b):
        out = []
        for x, y in zip(columns(a), columns(b)):
            cells = max(int(x.max()), int(y.max())) + 1
            table = np.stack([np.bincount(x.numpy(), minlength=cells), np.bincount(y.numpy(), minlength=cells)])
            out.append(chi2_contingency(table[:, table.sum(0) > 0]).pvalue)
        return out

    plain = tokens(plain_loop, 0)
    stats = LoopStats()
    spec = tokens(lambda s, p: ar_speculative_loop(s, p, draft, 3, stats=stats), 10**6)
    assert 0.2 * stats.drafted < stats.accepted < 0.9 * stats.drafted  # drafts both kept and replaced
    assert min(pvalues(plain, spec)) > 0.001  # 5 tests: a false alarm about once in 200 runs
    broken = tokens(lambda s, p: ar_speculative_loop(s, p, draft, 3, accept=lambda *_: True), 2 * 10**6)
    assert min(pvalues(plain, broken)) < 0.001


def test_speculative_method_on_the_ar_model_removes_bit_identically_and_reports_its_work(pair):
    pipe, draft = pair
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random", drafts={DRAFT: draft})
    before = run(backend, temperature=0.0)
    spec = run(backend, [("speculative", {"num_assistant_tokens": 4})], temperature=0.0)
    after = run(backend, temperature=0.0)
    assert np.array_equal(pixels(before), pixels(after)) and np.array_equal(pixels(before), pixels(spec))
    stats = spec.method_stats["speculative"]
    assert stats["draft"] == DRAFT and stats["tokens"] == 64 and stats["draft_forwards"] > 0
    assert stats["transformer_forwards"] < 64 and spec.model_evals < before.model_evals == 64
    assert_evals_are_the_targets_with_the_drafts_shown_beside(spec)
    sampled = run(backend, [("speculative", {"schedule": "heuristic", "confidence_threshold": 0.2})])
    assert sampled.method_stats["speculative"]["tokens"] == 64
    assert backend.build_plan(Request("image", "x", PROMPT)).decoder is plain_loop


def assert_evals_are_the_targets_with_the_drafts_shown_beside(result):
    """Model evaluations count the target's forwards only (as for a text model's draft: the
    eval counter hooks the model itself); the draft's are shown beside them, not hidden."""
    from studio.compare import CompareReport, CompareRow
    from studio.evidence import compact_table
    from studio.ui.common import format_result

    stats = result.method_stats["speculative"]
    assert result.model_evals == stats["transformer_forwards"] and stats["draft_forwards"] > 0
    drafted = f"{stats['draft_forwards']} draft forwards"
    assert drafted in format_result(result, None)
    row = CompareRow("speculative", [], model_evals=result.model_evals, stats=result.method_stats)
    assert drafted in compact_table(CompareReport("g", "image", "m", [row]))["notes"][0]


def test_speculative_on_the_ar_model_needs_a_draft_of_its_layout(pair):
    pipe, _ = pair
    alone = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    with pytest.raises(ValidationError, match="no paired draft") as err:
        run(alone, [("speculative", {})])
    assert "\n" not in str(err.value)
    other = small_pipeline(model_seed=0)
    mismatched = ARImageBackend.from_pipeline(pipe, "tiny-ar-random", drafts={DRAFT: other})
    with pytest.raises(ValidationError, match="another token layout"):
        run(mismatched, [("speculative", {})])
    with pytest.raises(ValidationError, match="universal"):  # a text-only setting is refused, not ignored
        run(ARImageBackend.from_pipeline(pipe, "tiny-ar-random", drafts={DRAFT: pair[1]}),
             [("speculative", {"universal": True})])
    assert run(alone).extra["transformer_forwards"] == 64  # a refused method leaves nothing behind


def test_the_bundled_ar_model_names_its_draft_and_drafts_stay_in_their_kind(pair):
    from backends.accel.speculative import SpeculativeMethod
    from backends.catalog import find_bundled

    assert find_bundled("tiny-ar-shapes").draft == "tiny-ar-shapes-draft"
    assert find_bundled("tiny-ar-shapes-draft").family == "ar-image"
    backend = ARImageBackend.from_pipeline(pair[0], "tiny-ar-shapes")
    assert backend.draft_id == "tiny-ar-shapes-draft"
    limits = SpeculativeMethod.limits(backend)
    # only the drafts a catalog entry names, never the model itself nor a text draft
    assert limits.choices["draft"] == ("auto", "tiny-ar-shapes-draft") and not limits.unfit
    assert limits.searched_choices("draft") == ("auto",)  # 'auto' is that draft: searched once
    assert "tiny-ar-shapes" not in SpeculativeMethod.spec.param("draft").choices
    # a draft has no draft of its own: nothing to offer
    draft_as_target = ARImageBackend.from_pipeline(pair[0], "tiny-ar-shapes-draft")
    assert "token layout" in SpeculativeMethod.limits(draft_as_target).unfit


def test_a_draft_no_smaller_than_the_model_is_not_offered(pair):
    """A folder copy of the 1-layer bundled draft loaded as the model: the bundled draft has
    its layout but not fewer layers, so it is not offered (it would only add forwards); a
    deeper model of the same layout is offered it."""
    from backends.accel.speculative import SpeculativeMethod, bundled_draft_layers
    from backends.catalog import find_bundled

    if not find_bundled("tiny-ar-shapes-draft").available:
        pytest.skip("the bundled draft's assets are not checked out")
    assert bundled_draft_layers("tiny-ar-shapes-draft") == 1
    copy = ARImageBackend.from_pipeline(pair[1], "/home/user/models/my-ar-draft-copy")
    assert pair[1].transformer.config.num_hidden_layers == 1
    assert "fewer layers" in SpeculativeMethod.limits(copy).unfit
    with pytest.raises(ValidationError) as err:
        run(copy, [("speculative", {"draft": "tiny-ar-shapes-draft"})])
    assert "\n" not in str(err.value) and not copy.drafts
    deeper = ARImageBackend.from_pipeline(pair[0], "/home/user/models/my-ar-model")
    assert SpeculativeMethod.limits(deeper).choices["draft"] == ("auto", "tiny-ar-shapes-draft")
    # past the limits (a paired 'auto' while another draft fits), loading the draft refuses it too
    with pytest.raises(ValidationError, match="only add work") as err:
        copy.get_draft("tiny-ar-shapes-draft")
    assert "\n" not in str(err.value) and not copy.drafts


def test_a_missing_paired_draft_is_named_as_missing_not_as_another_layout(pair, monkeypatch):
    import backends.accel.speculative as speculative

    backend = ARImageBackend.from_pipeline(pair[0], "tiny-ar-shapes")
    real = speculative.find_bundled
    monkeypatch.setattr(speculative, "find_bundled", lambda name: None if name == "tiny-ar-shapes-draft" else real(name))
    assert "'tiny-ar-shapes-draft' is not available" in speculative.SpeculativeMethod.limits(backend).unfit
    monkeypatch.setattr(speculative, "find_bundled", real)  # its files are back (trained meanwhile): no restart
    assert not speculative.SpeculativeMethod.limits(backend).unfit


def test_a_draft_of_another_layout_is_refused_before_it_is_loaded_or_kept(monkeypatch):
    """A model whose layout no bundled draft shares: speculative is unfit, an explicit draft
    is refused by the limits before loading, and a draft loaded directly is checked before it
    is cached (a refusal leaves no draft in memory)."""
    from backends.accel.speculative import SpeculativeMethod
    from backends.catalog import find_bundled

    backend = ARImageBackend.from_pipeline(small_pipeline(model_seed=0), "tiny-ar-small")
    assert "token layout" in SpeculativeMethod.limits(backend).unfit
    memory = backend.memory_bytes()
    with pytest.raises(ValidationError, match="token layout") as err:
        run(backend, [("speculative", {"draft": "tiny-ar-shapes-draft"})])
    assert "\n" not in str(err.value) and not backend.drafts and backend.memory_bytes() == memory
    if not find_bundled("tiny-ar-shapes-draft").available:
        pytest.skip("the bundled draft's assets are not checked out")
    loads = []
    monkeypatch.setattr(ARImagePipeline, "from_pretrained", lambda *args, **kwargs: loads.append(args))
    with pytest.raises(ValidationError, match="another token layout"):
        backend.get_draft("tiny-ar-shapes-draft")
    assert not backend.drafts and backend.memory_bytes() == memory
    assert loads == []  # refused from its layout.json: no weights were read


# -- static cache -------------------------------------------------------------------------------------
def test_static_cache_paints_the_same_image_and_removes_bit_identically(pair):
    pipe, _ = pair
    sampling = ARSampling(guidance=3.0, temperature=1.0)
    plain, _ = run_loop(plain_loop, pipe, PROMPT, sampling, 5)
    static, forwards = run_loop(static_cache_loop, pipe, PROMPT, sampling, 5)
    assert torch.equal(plain, static) and forwards == 64
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    before = run(backend)
    cached = run(backend, [("static_cache", {})])
    after = run(backend)
    assert np.array_equal(pixels(before), pixels(cached)) and np.array_equal(pixels(before), pixels(after))
    assert cached.method_stats["static_cache"]["static_cache"] is True
    with pytest.raises(ValidationError, match="compile"):
        run(backend, [("static_cache", {"compile": True})])


def test_memory_counts_each_loaded_draft_and_a_tokenizer_copy_is_shared(pair, tmp_path):
    """A draft loaded from a folder: with its target's VQ tokenizer (byte-identical, as the
    bundled draft ships it) it shares the target's, so one copy is held and counted; with a
    tokenizer of its own, that one is counted too: memory_bytes is what is loaded."""
    from backends.base import module_bytes
    from backends.tiny.ar_image import tiny_random_pipeline

    pipe, draft = pair
    draft.save_pretrained(tmp_path / "same-vq")
    other = tiny_random_pipeline(seed=1, layers=1)  # same layout, another random tokenizer
    other.save_pretrained(tmp_path / "own-vq")
    backend = ARImageBackend.from_pipeline(pipe, "tiny-ar-random")
    target_bytes = module_bytes(pipe.transformer, pipe.vq)
    assert backend.memory_bytes() == target_bytes

    shared, _ = backend.get_draft(str(tmp_path / "same-vq"))
    assert shared.vq is pipe.vq
    assert backend.memory_bytes() == target_bytes + module_bytes(shared.transformer)

    own, _ = backend.get_draft(str(tmp_path / "own-vq"))
    assert own.vq is not pipe.vq
    assert backend.memory_bytes() == target_bytes + module_bytes(shared.transformer, own.transformer, own.vq)
    assert backend.weight_bytes() == target_bytes  # the drafts are not the model's weights
