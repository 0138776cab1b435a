"""Quantization methods: weight_quant (int8/int4), dynamic_quant, awq.

Each is lossy, so the tests check that it changes the work done (logits, weight bytes),
that the skip list keeps its layers in full precision, that a toggle reuses the cached
quantized weights, and that removal gives back the baseline bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from backends.accel import _quant
from backends.accel.awq import search_scale
from backends.accel.base import all_methods
from backends.plan import attached
from backends.text import TextBackend
from backends.tiny.dummy import dummy_llama
from backends.types import MethodChoice, Request, ValidationError

CONFIGS = [
    ("weight_quant", {"weights": "int8"}, (0.24, 0.30)),
    ("weight_quant", {"weights": "int4", "group_size": 32}, (0.12, 0.20)),
    ("dynamic_quant", {}, (0.24, 0.32)),  # per-row float64 scale + int64 zero: 16 bytes a row
    ("awq", {"group_size": 32, "calib_tokens": 256, "grid": 4}, (0.12, 0.22)),  # + its input scales
]
IDS = torch.tensor([[5, 17, 40, 99, 3, 250, 7, 12, 60, 61, 62, 63]])


@pytest.fixture(scope="module")
def backend():
    model, tok = dummy_llama(layers=4, seed=3)
    return TextBackend.from_model(model, tok, model_id="quant-test")


def request(backend, methods=()):
    return Request("text", backend.model_id, "def f(x):", params={"max_new_tokens": 4},
                   methods=[MethodChoice(n, p) for n, p in methods])


def build(backend, methods):
    from backends.base import _instantiate

    req = request(backend, methods)
    return backend.build_plan(req), _instantiate(req, backend)


@torch.no_grad()
def logits(backend) -> torch.Tensor:
    return backend.model(input_ids=IDS).logits


def snapshot(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (p, p.detach().clone()) for name, p in model.named_parameters()}


@pytest.mark.parametrize("name,params,factor", CONFIGS, ids=[f"{n}-{p.get('weights', '')}" for n, p, _ in CONFIGS])
def test_quantization_is_lossy_shrinks_and_restores_exactly(backend, name, params, factor):
    base_logits, before = logits(backend), snapshot(backend.model)
    base_bytes = backend.run(request(backend)).weight_bytes
    plan, methods = build(backend, [(name, params)])
    with attached(backend, plan, methods) as handles:
        quant_logits = logits(backend)
        stats = handles[0].stats()
        swapped = {n: m for n, m in backend.model.named_modules()
                   if isinstance(m, torch.nn.Linear) and type(m.weight) is not torch.nn.Parameter}
    assert not torch.equal(quant_logits, base_logits)  # lossy: the forward really changed
    assert (quant_logits - base_logits).abs().max() < 0.5 * base_logits.abs().max()  # but still the model
    assert stats["layers_quantized"] == len(swapped) > 0
    # the quantized weights take the expected fraction of their float32 bytes
    float_bytes = sum(_quant.tensor_bytes(before[n + ".weight"][1]) for n in swapped)
    quantized_bytes = float_bytes - (base_bytes - stats["weight_bytes_after"])
    low, high = factor
    assert low * float_bytes <= quantized_bytes <= high * float_bytes
    # removal: the same Parameter objects, the same values, bit-identical logits
    after = dict(backend.model.named_parameters())
    assert all(after[n] is p and torch.equal(p, copy) for n, (p, copy) in before.items())
    assert torch.equal(logits(backend), base_logits)


@pytest.mark.parametrize("name,params", [(n, p) for n, p, _ in CONFIGS if n != "awq"])
def test_result_reports_the_weight_bytes_as_run(backend, name, params):
    base = backend.run(request(backend))
    quant = backend.run(request(backend, [(name, params)]))
    assert base.weight_bytes == _quant.module_weight_bytes(backend.model)
    assert 0 < quant.weight_bytes < base.weight_bytes
    assert quant.method_stats[name]["weight_bytes_after"] == quant.weight_bytes
    assert quant.summary()["weight_bytes"] == quant.weight_bytes


def test_skip_list_keeps_io_and_edge_blocks_in_full_precision(backend):
    layers = backend.model.model.layers
    plan, methods = build(backend, [("weight_quant", {"weights": "int8", "skip_blocks": 1})])
    with attached(backend, plan, methods):
        kinds = {n: type(m.weight) for n, m in backend.model.named_modules() if isinstance(m, torch.nn.Linear)}
    full = torch.nn.Parameter
    assert kinds["lm_head"] is full
    assert all(kind is full for n, kind in kinds.items() if n.startswith(("model.layers.0.", "model.layers.3.")))
    middle = [kind for n, kind in kinds.items() if n.startswith(("model.layers.1.", "model.layers.2."))]
    assert middle and all(kind is not full for kind in middle)
    # and a wider setting quantizes them
    plan, methods = build(backend, [("weight_quant", {"weights": "int8", "skip_blocks": 0, "skip_io": False})])
    with attached(backend, plan, methods):
        assert type(backend.model.lm_head.weight) is not full
        assert type(layers[0].self_attn.q_proj.weight) is not full


@pytest.mark.parametrize("name,params", [(n, p) for n, p, _ in CONFIGS])
def test_toggling_again_reuses_the_cached_weights(backend, name, params):
    _quant.CACHE.clear(backend.model)
    builds = _quant.CACHE.builds
    first = backend.run(request(backend, [(name, params)]))
    backend.run(request(backend))  # off
    second = backend.run(request(backend, [(name, params)]))
    assert _quant.CACHE.builds == builds + 1  # quantized once
    assert first.method_stats[name]["cache_hit"] is False and second.method_stats[name]["cache_hit"] is True
    assert first.extra["output_token_ids"] == second.extra["output_token_ids"]


@pytest.mark.parametrize("name,params,change", [
    ("awq", {"group_size": 32, "calib_tokens": 256, "grid": 4}, {"clip": False}),
    ("weight_quant", {"weights": "int4", "group_size": 32}, {"group_size": 64}),
    ("weight_quant", {"weights": "int8"}, {"skip_io": False}),
    ("dynamic_quant", {}, {"skip_blocks": 0}),
])
def test_every_field_that_changes_the_weights_is_in_the_cache_key(backend, name, params, change):
    _quant.CACHE.clear(backend.model)
    backend.run(request(backend, [(name, params)]))
    other = backend.run(request(backend, [(name, {**params, **change})]))
    assert other.method_stats[name]["cache_hit"] is False  # built anew, not the other config's weights


def test_cache_is_bounded_and_keyed_by_model():
    cache, model = _quant.QuantCache(per_model=2), torch.nn.Linear(2, 2)
    for key in "abc":
        cache.get(model, key, dict)
    assert list(cache.store[model]) == ["b", "c"] and cache.builds == 3
    del model
    import gc

    gc.collect()
    assert len(cache.store) == 0  # the model gone, its quantized weights go with it


def test_awq_scales_reduce_calibration_error_against_plain_int4():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=gen)
    x = torch.randn(512, 128, generator=gen)
    x[:, :4] *= 30  # a few salient input channels, as in LLM activations
    s, alpha, gain = search_scale(weight, x, group_size=32, grid=10)
    reference = x @ weight.t()
    plain = (x @ _quant.fake_int4(weight, 32).t() - reference).pow(2).mean()
    scaled = ((x / s) @ _quant.fake_int4(weight * s, 32).t() - reference).pow(2).mean()
    assert alpha > 0 and scaled < 0.9 * plain
    assert gain == pytest.approx((plain / scaled).item(), rel=1e-4)
    # and the int4 kernel computes exactly what the search scored
    w4 = _quant.int4_weight(weight * s, 32, 1 / s)
    assert torch.allclose(torch.nn.functional.linear(x, w4), (x / s) @ _quant.fake_int4(weight * s, 32).t(),
                          rtol=1e-4, atol=1e-3)


def test_perplexity_is_exp_of_the_mean_next_token_loss(backend):
    from backends.text_eval import backend_perplexity, heldout_ids, perplexity

    ids = heldout_ids(backend.tokenizer, 300)
    context = 100
    value = perplexity(backend.model, ids, context=context)
    with torch.no_grad():
        windows = [ids[i * context: (i + 1) * context + 1] for i in range((len(ids) - 1) // context)]
        losses = [backend.model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert math.isfinite(value) and value == pytest.approx(math.exp(torch.stack(losses).mean().item()), rel=1e-5)
    # with a method attached the model as run is scored: int8 moves it, and removal restores it
    plain = backend_perplexity(backend, [], max_tokens=300)
    quant = backend_perplexity(backend, [MethodChoice("weight_quant", {"skip_blocks": 0, "skip_io": False})],
                               max_tokens=300)
    assert quant != plain and backend_perplexity(backend, [], max_tokens=300) == plain


def test_heldout_text_is_not_the_calibration_text(backend):
    from backends.text_eval import calibration_ids, heldout_ids

    held, calib = heldout_ids(backend.tokenizer, 500), calibration_ids(backend.tokenizer, 500)
    assert len(held) == len(calib) == 501 and not torch.equal(held, calib)


def test_int8_on_a_unet_stacks_with_deepcache_and_restores():
    from backends.manager import BackendManager
    from backends.tiny.dummy import register_dummy_models

    manager = BackendManager(device="cpu")
    register_dummy_models(manager)
    image = manager.get("image", "dummy-sd")
    req = Request("image", "dummy-sd", "a red circle", params={"steps": 4, "width": 64, "height": 64})
    base = image.run(req)
    stacked = image.run(req.replace(methods=[MethodChoice("weight_quant"), MethodChoice("deepcache", {"interval": 2})]))
    assert stacked.method_stats["deepcache"]["shallow_steps"] > 0
    assert stacked.method_stats["weight_quant"]["layers_quantized"] > 0
    assert stacked.weight_bytes < base.weight_bytes
    again = image.run(req)
    assert list(again.output.getdata()) == list(base.output.getdata())


def test_fp8_on_cpu_is_refused_in_one_line(backend):
    with pytest.raises(ValidationError, match="fp8 weights need a CUDA GPU"):
        backend.run(request(backend, [("weight_quant", {"weights": "fp8"})]))


def test_weight_methods_share_one_slot_and_cite_papers():
    from backends.accel.base import check_combinable

    methods = all_methods()
    for name in ("weight_quant", "dynamic_quant", "awq"):
        assert methods[name].spec.paper and methods[name].spec.lossless is False
    with pytest.raises(ValidationError, match="cannot be combined"):
        check_combinable(methods["awq"].spec, [methods["weight_quant"].spec])


def test_compare_shows_weight_size_and_perplexity_for_text(studio_factory):
    from studio.compare import parse_configs, run_compare

    studio = studio_factory()
    request = Request("text", "dummy-llama", "def f(x):", params={"max_new_tokens": 4})
    report = run_compare(studio, request, parse_configs("weight_quant(skip_blocks=0, skip_io=false)"), repeats=1,
                         warmup=False, perplexity=True)
    base, quant = report.table()
    assert 0 < quant["weight_mb"] < base["weight_mb"]
    assert base["perplexity_delta_pct"] == 0 and quant["perplexity"] != base["perplexity"]
    assert "weight_mb" in report.to_csv().splitlines()[0]


def test_perplexity_delta_is_against_the_baseline_row_only(monkeypatch):
    """A failed baseline leaves the change empty (no other row becomes the reference); a row
    whose perplexity fails keeps the others' figures and says so."""
    from backends import text_eval
    from studio.compare import CompareRow, add_perplexity

    values = iter([2.0, RuntimeError("evaluation failed"), 3.0])

    def fake_perplexity(_backend, _methods):
        value = next(values)
        if isinstance(value, Exception):
            raise value
        return value

    monkeypatch.setattr(text_eval, "backend_perplexity", fake_perplexity)
    rows = [CompareRow("baseline", [], error="out of memory"), CompareRow("a", [MethodChoice("awq", {})]),
            CompareRow("b", [MethodChoice("awq", {})]), CompareRow("c", [MethodChoice("awq", {})])]
    add_perplexity(None, rows)
    assert rows[1].quality == {"perplexity": 2.0} and rows[3].quality == {"perplexity": 3.0}
    assert "perplexity" not in rows[2].quality and "perplexity could not be computed" in rows[2].notes[0]
    values = iter([4.0, 5.0])
    rows = [CompareRow("baseline", []), CompareRow("a", [MethodChoice("awq", {})])]
    add_perplexity(None, rows)
    assert rows[0].quality["perplexity_delta_pct"] == 0 and rows[1].quality["perplexity_delta_pct"] == 25.0


def test_encoded_text_does_not_keep_an_unloaded_tokenizer_alive():
    import gc
    import weakref

    from backends import text_eval

    _model, tok = dummy_llama(layers=1, seed=0)
    first = text_eval.heldout_ids(tok, 256)
    assert text_eval.heldout_ids(tok, 256) is first  # encoded once per tokenizer
    gone = weakref.ref(tok)
    del tok, _model
    gc.collect()
    assert gone() is None
