"""Image acceleration methods on tiny dummy pipelines (SD UNet and FLUX DiT).

For every method: (a) it changes the work done (fewer model evaluations, skipped
steps/blocks/attention layers, fewer attention tokens) and, if lossy, the output;
(b) apply + remove leaves the baseline bit-identical; (c) family and conflict checks
refuse bad requests with a ValidationError.
"""

from __future__ import annotations

import itertools
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

torch.set_num_threads(1)

from backends.accel import all_methods  # noqa: E402
from backends.image import ImageBackend  # noqa: E402
from backends.tiny.dummy import dummy_flux_pipeline, dummy_sd_pipeline  # noqa: E402
from backends.types import MethodChoice, Request, ValidationError  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def sd():
    return ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def flux():
    return ImageBackend("dummy-flux", dummy_flux_pipeline(), torch.device("cpu"), torch.float32)


def make_request(backend, methods=(), steps=STEPS, guidance=4.0):
    return Request("image", backend.model_id, "a red circle", seed=3, params={"steps": steps, "guidance": guidance},
                   methods=[MethodChoice(name, dict(params)) for name, params in methods])


def pixels(result) -> np.ndarray:
    return np.asarray(result.output)


_BASELINES: dict[tuple, object] = {}


def baseline(backend, **kwargs):
    """The untouched run, computed once per pipeline and settings (before any method ran)."""
    key = (backend.model_id, tuple(sorted(kwargs.items())))
    if key not in _BASELINES:
        _BASELINES[key] = backend.run(make_request(backend, **kwargs))
    return _BASELINES[key]


def run_with(backend, methods, **kwargs):
    """Baseline, with the methods, baseline again: the two baselines must be bit-identical."""
    base = baseline(backend, **kwargs)
    result = backend.run(make_request(backend, methods, **kwargs))
    again = backend.run(make_request(backend, **kwargs))
    assert np.array_equal(pixels(base), pixels(again)), f"{methods}: baseline changed after apply + remove"
    return base, result


# name, params, (stats key that must be > 0 | "evals"), lossy
UNET_CASES = [
    ("sampler", {"scheduler": "dpmpp_2m", "steps": 4}, "evals", True),
    ("cfg_truncation", {"fraction": 0.5}, "unguided_steps", True),
    ("deepcache", {"interval": 3}, "shallow_steps", True),
    ("tome", {"ratio": 0.5}, "tokens", True),
    ("int8_attention", {"kernel": "torch"}, "int8_calls", True),
    ("weight_quant", {"skip_blocks": 0}, "layers_quantized", True),
    ("dynamic_quant", {"skip_blocks": 0}, "layers_quantized", True),
]
DIT_CASES = [
    ("sampler", {"steps": 4}, "evals", True),
    ("cfg_truncation", {"fraction": 0.5}, "evals", True),
    ("block_cache", {"interval": 2}, "blocks_skipped", True),
    ("teacache", {"threshold": 0.4}, "skipped_steps", True),
    ("adacache", {"scale": 3.0}, "skipped_steps", True),
    ("first_block_cache", {"threshold": 0.3}, "attention_skipped", True),
    ("taylorseer", {"interval": 2, "warmup_steps": 2}, "skipped_calls", True),
    ("cg_taylor", {"threshold": 0.3}, "skipped_calls", True),
    ("ras", {"warmup_steps": 2, "reset_every": 4}, "ras_calls", True),
    ("bac", {}, "unit_reused", True),
    ("mag_cache", {"threshold": 0.06}, "skipped_calls", True),
    ("pab", {}, "attention_skipped", True),
    ("faster_cache", {}, "attention_skipped", True),
    ("attention_backend", {"backend": "_native_math"}, "processors", False),
    ("compile", {"compiler": "eager"}, "compiled_modules", False),  # inductor: see the slow test below
    ("int8_attention", {"kernel": "torch"}, "int8_calls", True),
    ("weight_quant", {"weights": "int4", "group_size": 32, "skip_blocks": 0, "skip_io": False}, "layers_quantized",
     True),
    ("dynamic_quant", {}, "layers_quantized", True),
    ("bottleneck_sampling", {}, "low_res_calls", True),
    ("ralu", {}, "mixed_res_calls", True),
]


def check_case(backend, name, params, evidence, lossy):
    # dynamo tracing is the slow part of compile: trace a short, guidance-free run
    kwargs = {"steps": 2, "guidance": 1.0} if name == "compile" else {}
    base, result = run_with(backend, [(name, params)], **kwargs)
    stats = result.method_stats[name]
    if evidence == "evals":
        assert result.model_evals < base.model_evals, (name, result.model_evals, base.model_evals)
    elif evidence == "tokens":
        assert 0 < stats["tokens_after"] < stats["tokens_before"], stats
    else:
        assert stats[evidence] > 0, (name, stats)
    if "evals_partial" in stats:  # a caching method: its timed calls show the skipped work
        assert stats["evals_partial"] > 0 and stats["ideal_speedup"] is not None, (name, stats)
    if lossy:
        assert not np.array_equal(pixels(base), pixels(result)), f"{name} did not change the output"
    else:
        diff = np.abs(pixels(base).astype(int) - pixels(result).astype(int))
        assert diff.max() <= 1, f"{name} is meant to be lossless, max pixel diff {diff.max()}"
    return base, result


@pytest.mark.parametrize("name,params,evidence,lossy", UNET_CASES, ids=[c[0] for c in UNET_CASES])
def test_unet_method_changes_work_and_restores_baseline(sd, name, params, evidence, lossy):
    check_case(sd, name, params, evidence, lossy)


@pytest.mark.parametrize("name,params,evidence,lossy", DIT_CASES, ids=[c[0] for c in DIT_CASES])
def test_dit_method_changes_work_and_restores_baseline(flux, name, params, evidence, lossy):
    check_case(flux, name, params, evidence, lossy)


def test_a_teacache_that_never_skips_fails_its_method_test(flux, monkeypatch):
    """The method test above can fail: with a policy forced never to skip (every change
    rescaled past any threshold), TeaCache skips nothing, its ideal speedup is 1.0 and
    ``check_case`` raises."""
    import backends.accel.teacache as teacache

    monkeypatch.setattr(teacache, "rescale", lambda value, coefficients: 1e9)
    result = flux.run(make_request(flux, [("teacache", {"threshold": 0.4})]))
    stats = result.method_stats["teacache"]
    assert stats["skipped_steps"] == 0 and stats["evals_partial"] == 0 and stats["ideal_speedup"] == 1.0
    with pytest.raises(AssertionError):
        check_case(flux, "teacache", {"threshold": 0.4}, "skipped_steps", True)


def test_a_deepcache_that_never_skips_fails_its_method_test(sd, monkeypatch):
    """DeepCache's policy reads the step counter; one stuck at step 0 makes every step a
    full one: nothing is skipped, the ideal is 1.0 and the method's own test fails."""
    import backends.accel.deepcache as deepcache

    class StuckAtZero(deepcache.StepCallback):
        def __call__(self, pipe, step, timestep, kwargs):
            return {}

    monkeypatch.setattr(deepcache, "StepCallback", StuckAtZero)
    result = sd.run(make_request(sd, [("deepcache", {"interval": 3})]))
    stats = result.method_stats["deepcache"]
    assert stats["shallow_steps"] == 0 and stats["evals_partial"] == 0 and stats["ideal_speedup"] == 1.0
    with pytest.raises(AssertionError):
        check_case(sd, "deepcache", {"interval": 3}, "shallow_steps", True)


# image methods whose test needs more than a backend: their own test file covers the same
# ground (work changed, removal bit-identical) through the studio
COVERED_ELSEWHERE = {"approx_cache",  # tests/test_approx_cache.py: reuse needs the history of earlier runs
                     "t_stitch",  # tests/test_t_stitch.py: needs a smaller sibling model beside the full one
                     # tests/test_ar_speculative.py: the text methods on the AR-image token loop
                     "speculative", "static_cache"}


def test_every_image_method_is_covered():
    covered = {c[0] for c in UNET_CASES + DIT_CASES} | COVERED_ELSEWHERE
    # the AR-image token loops (sjd, zipar, lantern) are covered in tests/test_ar_image.py
    image_methods = {n for n, cls in all_methods().items()
                     if "image" in cls.spec.modalities and set(cls.spec.families) - {"ar-image"}}
    assert image_methods <= covered, f"untested image methods: {image_methods - covered}"


def test_tome_is_deterministic_and_merges_only_high_resolution(sd):
    first = sd.run(make_request(sd, [("tome", {})]))
    second = sd.run(make_request(sd, [("tome", {})]))
    assert np.array_equal(pixels(first), pixels(second))
    stats = first.method_stats["tome"]
    assert stats["token_ratio"] == 0.5
    wider = sd.run(make_request(sd, [("tome", {"max_downsample": 2})])).method_stats["tome"]
    assert wider["merged_blocks"] > stats["merged_blocks"]


def test_cfg_branches_are_cached_separately(flux):
    """True CFG runs the transformer once for cond and once for uncond per step: the
    step-level caches must keep one state per branch and decide per step."""
    for name in ("teacache", "block_cache"):
        stats = flux.run(make_request(flux, [(name, {})])).method_stats[name]
        assert stats["branches"] == 2, (name, stats)
        single = flux.run(make_request(flux, [(name, {})], guidance=1.0)).method_stats[name]
        assert single["branches"] == 1


def test_block_cache_front_and_rear_spans(flux):
    rear = flux.run(make_request(flux, [("block_cache", {"num_blocks": 2, "position": "rear"})]))
    front = flux.run(make_request(flux, [("block_cache", {"num_blocks": 2, "position": "front"})]))
    assert rear.method_stats["block_cache"]["span_blocks"] == 2
    assert not np.array_equal(pixels(rear), pixels(front))


def test_mag_cache_calibrates_once(flux):
    params = {"threshold": 0.1}
    first = flux.run(make_request(flux, [("mag_cache", params)], steps=6)).method_stats["mag_cache"]
    second = flux.run(make_request(flux, [("mag_cache", params)], steps=6)).method_stats["mag_cache"]
    assert second["calibrated_this_run"] is False
    assert second["denoiser_calls"] == 12  # the calibration pass is not counted as this run's work
    assert first["denoiser_calls"] == 12


@pytest.mark.parametrize("name", ["deepcache", "tome"])
def test_unet_methods_refuse_a_dit(flux, name):
    with pytest.raises(ValidationError, match="does not apply"):
        flux.run(make_request(flux, [(name, {})]))


@pytest.mark.parametrize("name", ["block_cache", "teacache", "adacache", "first_block_cache", "taylorseer", "mag_cache",
                                  "pab", "faster_cache", "attention_backend"])
def test_dit_methods_refuse_a_unet(sd, name):
    with pytest.raises(ValidationError, match="does not apply"):
        sd.run(make_request(sd, [(name, {})]))


def test_diffusers_cache_needs_enable_cache():
    from backends.accel._diffusers_cache import require_cache_support

    with pytest.raises(ValidationError, match="enable_cache"):
        require_cache_support(SimpleNamespace(denoiser=torch.nn.Linear(2, 2)), "pab")


def test_gpu_attention_backend_refused_on_cpu(flux):
    with pytest.raises(ValidationError, match="CUDA"):
        flux.run(make_request(flux, [("attention_backend", {"backend": "flash"})]))
    baseline = flux.run(make_request(flux))
    assert baseline.method_stats == {}


DIT_CACHES = sorted(name for name, cls in all_methods().items() if "dit-cache" in cls.spec.slots)
assert len(DIT_CACHES) == 13  # with bottleneck_sampling, ralu, ras and bac; the exact pairs are checked in test_framework.py


@pytest.mark.parametrize("a,b", list(itertools.combinations(DIT_CACHES, 2)))
def test_dit_caches_conflict(flux, a, b):
    """All of them decide, per step, what the block stack recomputes: two at once would
    fight over the same blocks (and diffusers allows one enable_cache at a time)."""
    with pytest.raises(ValidationError, match="cannot be combined"):
        flux.run(make_request(flux, [(a, {}), (b, {})]))


def test_faster_cache_conflicts_with_cfg_truncation(flux):
    with pytest.raises(ValidationError, match="cannot be combined"):
        flux.run(make_request(flux, [("cfg_truncation", {}), ("faster_cache", {})]))


@pytest.mark.parametrize("methods,backend_name", [
    ([("deepcache", {"interval": 2}), ("tome", {})], "sd"),
    ([("tome", {}), ("cfg_truncation", {"fraction": 0.5})], "sd"),
    ([("cfg_truncation", {"fraction": 0.5}), ("teacache", {})], "flux"),
    ([("teacache", {}), ("cfg_truncation", {"fraction": 0.5})], "flux"),
    ([("pab", {}), ("cfg_truncation", {"fraction": 0.5})], "flux"),
    ([("block_cache", {}), ("attention_backend", {"backend": "_native_math"})], "flux"),
    ([("tome", {}), ("int8_attention", {})], "sd"),
    ([("block_cache", {}), ("int8_attention", {})], "flux"),
], ids=["deepcache+tome", "tome+cfg_truncation", "cfg_truncation+teacache", "teacache+cfg_truncation",
        "pab+cfg_truncation", "block_cache+attention_backend", "tome+int8_attention", "block_cache+int8_attention"])
def test_methods_that_patch_the_same_model_combine(request, methods, backend_name):
    """Methods that are allowed together stack their patches and unwind them exactly, in
    either order, and each still does its work."""
    check_combination(request.getfixturevalue(backend_name), methods)


# the statistic that shows a method did its work, from the single-method cases above
WORK_EVIDENCE = {name: key for name, _, key, _ in UNET_CASES + DIT_CASES if key not in ("evals", "tokens")}
WORK_EVIDENCE["cfg_truncation"] = "unguided_steps"


def check_combination(backend, methods):
    _, result = run_with(backend, methods)
    for name, _ in methods:
        stats = result.method_stats[name]
        if name == "tome":
            assert 0 < stats["tokens_after"] < stats["tokens_before"], (name, stats)
        else:
            assert stats[WORK_EVIDENCE[name]] > 0, (name, stats)


def test_a_teacache_that_never_skips_fails_the_combined_test(flux, monkeypatch):
    """The combined test looks at each method's own work, not at any counter above zero."""
    import backends.accel.teacache as teacache

    monkeypatch.setattr(teacache, "rescale", lambda value, coefficients: 1e9)
    with pytest.raises(AssertionError, match="teacache"):
        check_combination(flux, [("cfg_truncation", {"fraction": 0.5}), ("teacache", {})])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTGEN_RUN_COMPILE") != "1",
                    reason="inductor compiles C++ kernels: over a minute even for the tiniest DiT on a shared "
                           "2-core CPU; set FASTGEN_RUN_COMPILE=1 to run it")
def test_compile_inductor_is_lossless_and_reversible():
    backend = ImageBackend("dummy-flux-tiny", dummy_flux_pipeline(layers=1, single_layers=1), torch.device("cpu"),
                           torch.float32)
    try:
        base, result = run_with(backend, [("compile", {"mode": "default"})], steps=2, guidance=1.0)
    except Exception as exc:  # no working C++ toolchain for inductor
        if "compil" in str(exc).lower() or "cpp" in str(exc).lower():
            pytest.skip(f"inductor cannot compile here: {exc}")
        raise
    assert result.method_stats["compile"]["compiled_modules"] == 2
    diff = np.abs(pixels(base).astype(int) - pixels(result).astype(int))
    assert diff.max() <= 1


def test_the_sampler_sets_the_step_count_before_other_methods_read_it(flux):
    """The sampler attaches first whatever the listed order (main configured mag_cache for
    the request's steps and warned "list the sampler before mag_cache")."""
    result = flux.run(make_request(flux, [("mag_cache", {}), ("sampler", {"steps": 4})]))
    assert not any("configured for" in note for note in result.notes), result.notes
    other_order = flux.run(make_request(flux, [("sampler", {"steps": 4}), ("mag_cache", {})]))
    assert np.array_equal(pixels(result), pixels(other_order))
    teacache_last = flux.run(make_request(flux, [("teacache", {"threshold": 2.0}), ("sampler", {"steps": 4})]))
    stats = teacache_last.method_stats["teacache"]
    assert stats["computed_steps"] == 2 and stats["skipped_steps"] == 2  # first and (real) last step computed


@pytest.mark.parametrize("backend_name", ["sd", "flux"])
def test_remove_leaves_no_patch_behind(request, backend_name):
    """After runs with methods, no module keeps an instance ``forward``, a torch hook, a
    compiled call or a hook registry that the baseline did not have."""
    backend = request.getfixturevalue(backend_name)
    names = [c[0] for c in (UNET_CASES if backend_name == "sd" else DIT_CASES) if c[0] != "compile"]
    for name in names:
        backend.run(make_request(backend, [(name, {})], steps=3))
    for module_name, module in backend.denoiser.named_modules():
        assert "forward" not in vars(module), module_name
        assert not module._forward_hooks and not module._forward_pre_hooks, module_name
        assert module._compiled_call_impl is None, module_name
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or (module_name == "" and not registry.hooks), module_name


def test_guidance_methods_on_a_pipeline_with_separate_cfg_passes():
    """Wan runs cond and uncond as separate passes: CFG truncation must drop the uncond
    pass without halving the batch, and FasterCache must keep its CFG-Cache off."""
    from backends.tiny.dummy_video import dummy_wan_pipeline
    from backends.video import VideoBackend

    backend = VideoBackend("dummy-wan", dummy_wan_pipeline(), torch.device("cpu"), torch.float32)
    assert backend.cfg_batched is False
    request = Request("video", "dummy-wan", "a red ball", seed=0, params={"steps": 4, "guidance": 5.0})
    base = backend.run(request)
    truncated = backend.run(request.replace(methods=[MethodChoice("cfg_truncation", {"fraction": 0.5})]))
    assert truncated.model_evals == base.model_evals - 2
    cached = backend.run(request.replace(methods=[MethodChoice("faster_cache")]))
    assert any("separate passes" in n for n in cached.notes)
    again = backend.run(request)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(base.output, again.output))


@pytest.mark.parametrize("order", [("cond", "uncond"), ("uncond", "cond"), ("cond", "uncond", "cond")],
                         ids=["cond-first", "uncond-first", "extra-cond-call"])
def test_cfg_truncation_follows_the_branch_the_plan_names(order):
    """Separate CFG passes in any order: after the cut, an unconditional pass is answered with
    the same step's conditional output, never another step's or another branch's (main
    counted calls and assumed cond, uncond alternate)."""
    from backends.accel.cfg_truncation import CFGTruncationHandle
    from backends.plan import DiffusionPlan, Guidance

    plan = DiffusionPlan(steps=4, guidance=Guidance(scale=4.0, passes=2, batched=False))
    handle = CFGTruncationHandle(plan, cut=2, fraction=0.5)
    ran = []
    forward = handle.reuse_cond(lambda x: ran.append(x) or x)
    answers = {}
    for step in range(4):
        handle.on_step(step)
        for i, branch in enumerate(order):
            plan.guidance.branch = branch
            answers[step, branch, i] = forward(f"{branch}{step}.{i}")
    for (step, branch, i), answer in answers.items():
        if branch == "cond" or step < 2 or order[0] == "uncond":
            assert answer == f"{branch}{step}.{i}"  # computed
        else:
            last_cond = max(j for j, b in enumerate(order[:i]) if b == "cond")
            assert answer == f"cond{step}.{last_cond}"  # this step's conditional output
    expected_skips = 0 if order[0] == "uncond" else 2
    assert handle.skipped_evals() == expected_skips == 8 + 4 * (len(order) - 2) - len(ran)


def _solvers_for(backend) -> list[str]:
    from backends.accel.sampler import FLOW_SCHEDULERS, SCHEDULERS, is_flow_matching

    table = FLOW_SCHEDULERS if is_flow_matching(backend.base_scheduler) else SCHEDULERS
    return [name for name in table if name != "lcm"]


@pytest.mark.parametrize("backend_name", ["sd", "flux"])
def test_every_offered_solver_runs_reproducibly_and_restores_the_baseline(request, backend_name):
    """Each solver the sampler offers for this model family (diffusers' own schedulers,
    SDE ones included) makes a finite image that differs from the baseline's, the same
    image again from the same seed (SDE noise comes from the run's generator), and leaves
    the baseline bit-identical after removal."""
    backend = request.getfixturevalue(backend_name)
    solvers = _solvers_for(backend)
    assert {"deis", "dpmpp_3m", "dpmpp_2m_sde"} <= set(solvers)
    for name in solvers:
        methods = [("sampler", {"scheduler": name, "steps": 5})]
        base, result = run_with(backend, methods)
        again = backend.run(make_request(backend, methods))
        assert np.isfinite(pixels(result)).all() and pixels(result).std() > 0, name
        assert np.array_equal(pixels(result), pixels(again)), f"{name} is not reproducible from its seed"
        assert not np.array_equal(pixels(base), pixels(result)), name


def test_a_solver_without_a_flow_form_is_refused_on_a_flow_model(flux):
    with pytest.raises(ValidationError, match="does not fit"):
        flux.run(make_request(flux, [("sampler", {"scheduler": "pndm", "steps": 4})]))


@pytest.mark.parametrize("solver", ["unipc", "dpmpp_2m", "deis"])
def test_a_flow_solver_keeps_the_models_sigma_shift(solver):
    """A Wan-style model trains with a static shift (3 here, as tiny-video-shapes): a
    swapped solver must walk the same noise levels, not the unshifted ones (which spend
    the steps at the wrong noise levels: the early sigmas drop ~2.5x faster)."""
    import diffusers

    from backends.accel.sampler import FLOW_SCHEDULERS, flow_shift_of

    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    base.set_timesteps(10)
    cls_name, overrides = FLOW_SCHEDULERS[solver]
    swapped = getattr(diffusers, cls_name).from_config(base.config, **overrides, **flow_shift_of(base))
    swapped.set_timesteps(10)
    assert np.allclose(swapped.sigmas[:4].numpy(), base.sigmas[:4].numpy(), atol=0.04), (swapped.sigmas, base.sigmas)


def test_taylor_series_forecasts_a_polynomial_of_its_order_exactly():
    """CG-Taylor's forecasts: divided differences over the computed steps extrapolate a
    polynomial of the configured order exactly (steps need not be evenly spaced), also on a
    (hidden, encoder) pair with an absent encoder part."""
    from backends.accel.cg_taylor import TaylorSeries

    def value(step):
        return torch.full((2, 3), 1.0 + 2.0 * step), None

    series = TaylorSeries(order=1)
    assert not series.ready
    for step in (0, 1, 4):
        series.update(step, value(step))
    hidden, encoder = series.forecast(7)
    assert series.ready and encoder is None and torch.allclose(hidden, value(7)[0])
    constant = TaylorSeries(order=0)
    constant.update(2, torch.ones(3))
    assert torch.equal(constant.forecast(9), torch.ones(3))  # order 0: plain reuse


def test_cg_taylor_forecasts_only_when_the_first_block_forecast_is_accurate(flux):
    """Threshold 0 never forecasts (bit-identical to the baseline); a loose threshold
    forecasts, at most ``max_skips`` steps in a row, never the warm-up or the last step."""
    base = baseline(flux)
    strict = flux.run(make_request(flux, [("cg_taylor", {"threshold": 0.0})]))
    assert strict.method_stats["cg_taylor"]["skipped_calls"] == 0
    assert np.array_equal(pixels(base), pixels(strict))
    loose = flux.run(make_request(flux, [("cg_taylor", {"threshold": 1.0, "max_skips": 1, "warmup_steps": 2})]))
    stats = loose.method_stats["cg_taylor"]
    assert 0 < stats["skipped_steps"] <= (STEPS - 2 - 1 + 1) // 2, stats
