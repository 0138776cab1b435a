"""The method framework: specs, Config fields, validation, slots, and exact reversibility."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from backends.accel import IMPORT_ERRORS
from backends.accel.base import (Method, MethodConfig, MethodSpec, Param, all_methods, check_combinable, instantiate,
                                 methods_for, param)
from backends.image import ImageBackend
from backends.tiny.dummy import dummy_sd_pipeline
from backends.types import MethodChoice, Request, ValidationError


@pytest.fixture(scope="module")
def sd():
    return ImageBackend("dummy-sd", dummy_sd_pipeline(), torch.device("cpu"), torch.float32)


def test_every_method_module_imports():
    assert IMPORT_ERRORS == {}


def test_every_spec_is_complete():
    for name, cls in all_methods().items():
        spec = cls.spec
        assert spec.name == name and spec.title and spec.summary and spec.modalities and spec.families
        for p in spec.params:
            assert p.coerce(p.default) == p.default, (name, p.name)
            assert p.help, f"{name}.{p.name} has no help text"


def test_param_coercion_and_ranges():
    p = Param("n", "int", 3, min=1, max=5)
    assert p.coerce("4") == 4
    for bad in (0, 6, 2.5, "x", True):
        with pytest.raises(ValidationError):
            p.coerce(bad)
    assert Param("f", "bool", False).coerce("true") is True
    with pytest.raises(ValidationError):
        Param("c", "choice", "a", choices=("a", "b")).coerce("z")


def test_methods_for_filters_by_family():
    unet = {c.spec.name for c in methods_for("image", "unet")}
    dit = {c.spec.name for c in methods_for("image", "dit")}
    assert "deepcache" in unet and "deepcache" not in dit
    assert "sampler" in unet and "sampler" in dit


def test_instantiate_rejects_bad_combinations():
    with pytest.raises(ValidationError, match="unknown"):
        instantiate([MethodChoice("warp-drive")], "image", "unet")
    with pytest.raises(ValidationError, match="does not apply to this model"):
        instantiate([MethodChoice("deepcache")], "image", "dit")
    with pytest.raises(ValidationError, match="twice"):
        instantiate([MethodChoice("sampler"), MethodChoice("sampler")], "image", "unet")


def test_methods_sharing_a_slot_are_refused(monkeypatch):
    from backends.accel import base

    class A(Method):
        spec = MethodSpec("slot_a", "A", ("image",), ("unet",), "a", slots=("guidance",))

    monkeypatch.setitem(base._REGISTRY, "slot_a", A)
    with pytest.raises(ValidationError, match="methods 'cfg_truncation' and 'slot_a' cannot be combined"):
        instantiate([MethodChoice("cfg_truncation"), MethodChoice("slot_a")], "image", "unet")
    assert [m.spec.name for m in instantiate([MethodChoice("sampler"), MethodChoice("slot_a")], "image", "unet")] \
        == ["sampler", "slot_a"]


# The pairs the hand-written conflict lists refused (DIT_CACHES in _diffusers_cache.py,
# DECODING_METHODS in _decoding.py, faster_cache + cfg_truncation, sta + attention_backend),
# computed once from those lists before slots replaced them.
OLD_CONFLICTS = {tuple(pair.split("+")) for pair in """
adacache+block_cache adacache+faster_cache adacache+first_block_cache adacache+mag_cache adacache+pab
adacache+taylorseer adacache+teacache attention_backend+sta block_cache+faster_cache block_cache+first_block_cache
block_cache+mag_cache block_cache+pab block_cache+taylorseer block_cache+teacache cfg_truncation+faster_cache
faster_cache+first_block_cache faster_cache+mag_cache faster_cache+pab faster_cache+taylorseer faster_cache+teacache
first_block_cache+mag_cache first_block_cache+pab first_block_cache+taylorseer first_block_cache+teacache
layer_skip+lookahead layer_skip+prompt_lookup layer_skip+sink_cache layer_skip+snapkv layer_skip+speculative
layer_skip+static_cache lookahead+prompt_lookup lookahead+sink_cache lookahead+snapkv lookahead+speculative
lookahead+static_cache mag_cache+pab mag_cache+taylorseer mag_cache+teacache pab+taylorseer pab+teacache
prompt_lookup+sink_cache prompt_lookup+snapkv prompt_lookup+speculative prompt_lookup+static_cache
sink_cache+snapkv sink_cache+speculative sink_cache+static_cache snapkv+speculative snapkv+static_cache
speculative+static_cache taylorseer+teacache
""".split()}
# Pairs added by methods that came after slots, by the slot they share.
NEW_CONFLICTS = {("attention_backend", "int8_attention"), ("int8_attention", "sta")} | {
    tuple(sorted(("kv_quant", other))) for other in
    "layer_skip lookahead prompt_lookup sink_cache snapkv speculative static_cache".split()}


# Methods added since, that take over the decoding loop too: refused with every decoding method.
NEW_DECODING = {"prefix_cache", "token_recycling", "retrieval_draft", "dynamic_tree", "ffn_skip", "minicache",
                "chunk_cache"}
# Methods that only rewrite the prompt (prompt compression): no slot, combinable with every decoder.
PROMPT_EDITS = {"prompt_compress"}
DECODING = NEW_DECODING | {"layer_skip", "lookahead", "prompt_lookup", "sink_cache", "snapkv", "speculative",
                           "static_cache"}


def refused(a: MethodSpec, b: MethodSpec) -> bool:
    try:
        check_combinable(b, [a])
    except ValidationError as exc:
        assert str(exc) == f"methods '{a.name}' and '{b.name}' cannot be combined"
        return True
    return False


# The methods that existed when slots replaced the lists; a method added since is checked
# by its slot below (it must conflict with every other method of its slot, and only those).
OLD_METHODS = set("""
adacache attention_backend block_cache cfg_truncation compile deepcache faster_cache first_block_cache layer_skip
lookahead mag_cache pab prompt_lookup sampler sink_cache snapkv speculative static_cache sta sway_sampling
taylorseer teacache tome
""".split())

# one weight format per run (issue 18): the quantization methods share the "weights" slot
WEIGHT_CONFLICTS = {("awq", "dynamic_quant"), ("awq", "weight_quant"), ("dynamic_quant", "weight_quant")}


def test_slots_refuse_exactly_the_pairs_the_old_conflict_lists_refused():
    specs = {name: cls.spec for name, cls in all_methods().items() if name in OLD_METHODS}
    assert len(OLD_CONFLICTS) == 51 and {n for pair in OLD_CONFLICTS for n in pair} <= set(specs)
    assert set(specs) == OLD_METHODS
    for a, b in itertools.combinations(sorted(specs), 2):
        expected = (a, b) in OLD_CONFLICTS | NEW_CONFLICTS | WEIGHT_CONFLICTS
        assert refused(specs[a], specs[b]) == expected, (a, b)
        assert refused(specs[b], specs[a]) == expected, (b, a)


def test_a_newer_method_conflicts_exactly_with_the_methods_of_its_slots():
    specs = {name: cls.spec for name, cls in all_methods().items()}
    for new in sorted(set(specs) - OLD_METHODS):
        for other in sorted(set(specs) - {new}):
            shares = bool(set(specs[new].slots) & set(specs[other].slots))
            assert refused(specs[new], specs[other]) == shares, (new, other)
    assert "cg_taylor" in specs and refused(specs["cg_taylor"], specs["teacache"])
    for a, b in NEW_CONFLICTS | WEIGHT_CONFLICTS:  # the pairs written down when those methods were added
        assert refused(specs[a], specs[b]) and refused(specs[b], specs[a]), (a, b)
    for a in NEW_DECODING:  # the text drafting / cache methods all take the decoder
        for b in (DECODING | {"kv_quant"}) - {a}:
            assert refused(specs[a], specs[b]), (a, b)
    for a in PROMPT_EDITS:
        assert specs[a].slots == ()
        for b in DECODING | {"kv_quant"}:
            assert not refused(specs[a], specs[b]) and not refused(specs[b], specs[a]), (a, b)


def test_request_validation_refuses_the_same_pairs_with_the_same_message():
    from studio.validation import validate_methods

    with pytest.raises(ValidationError, match="^methods 'snapkv' and 'lookahead' cannot be combined$"):
        validate_methods("text", ["snapkv", "lookahead"])
    with pytest.raises(ValidationError, match="^method 'tome' is listed twice$"):
        validate_methods("image", ["tome", "deepcache", "tome"])
    assert [m.name for m in validate_methods("image", ["deepcache", "tome", "cfg_truncation"])] == \
        ["deepcache", "tome", "cfg_truncation"]


def test_every_method_reads_its_parameters_from_one_frozen_config():
    for name, cls in all_methods().items():
        config = cls.spec.config
        assert dataclasses.is_dataclass(config) and config.__dataclass_params__.frozen, name
        method = cls()
        assert isinstance(method.config, config), name
        assert {p.name: getattr(method.config, p.name) for p in cls.spec.params} == cls.spec.defaults(), name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(method.config, cls.spec.params[0].name, None)


def test_config_fields_are_validated_and_typed():
    from backends.accel.deepcache import DeepCacheConfig, DeepCacheMethod

    spec = DeepCacheMethod.spec
    assert [(p.name, p.kind, p.default, p.min, p.max) for p in spec.params] == \
        [("interval", "int", 3, 1, 10), ("branch", "int", 0, 0, 3)]
    (method,) = instantiate([MethodChoice("deepcache", {"interval": "4"})], "image", "unet")
    assert method.config == DeepCacheConfig(interval=4, branch=0)
    with pytest.raises(ValidationError, match=r"^parameter 'interval' must be between 1 and 10, got 11$"):
        spec.validate({"interval": 11})


def test_run_time_fields_of_a_config_are_not_parameters():
    from backends.accel.teacache import TeaCacheConfig, TeaCacheMethod

    assert [p.name for p in TeaCacheMethod.spec.params] == ["threshold", "rescale"]
    assert {f.name for f in dataclasses.fields(TeaCacheConfig)} == {"threshold", "rescale", "coefficients", "num_steps"}
    with pytest.raises(ValidationError, match="has no parameter 'num_steps'; it takes"):
        TeaCacheMethod.spec.validate({"num_steps": 3})


def test_a_malformed_config_fails_when_the_spec_is_made():
    class NoChoices(MethodConfig):
        mode: str = param("a", help="a text field needs its choices")

    @dataclasses.dataclass
    class NotAConfig:
        n: int = param(1, help="n")

    with pytest.raises(TypeError, match="needs choices"):
        MethodSpec("bad", "Bad", ("image",), ("unet",), "bad", config=NoChoices)
    with pytest.raises(TypeError, match="MethodConfig subclass"):
        MethodSpec("bad", "Bad", ("image",), ("unet",), "bad", config=NotAConfig)


def test_paper_settings_are_shown_where_they_differ_from_the_defaults():
    from studio.presets import method_preset
    from studio.ui.common import _control

    window = all_methods()["lookahead"].spec.param("window")
    assert (window.default, window.paper) == (2, 15)
    assert "(paper: 15)" in _control(window).info
    assert "window 15, ngram 5, branches 15" in method_preset(all_methods()["lookahead"]).description


@pytest.mark.parametrize("methods", [
    [("deepcache", {"interval": 2})],
    [("cfg_truncation", {"fraction": 0.4})],
    [("sampler", {"scheduler": "dpmpp_2m", "steps": 3})],
    [("deepcache", {"interval": 2}), ("cfg_truncation", {"fraction": 0.5}), ("sampler", {"scheduler": "unipc", "steps": 4})],
])
def test_apply_then_remove_restores_bit_identical_baseline(sd, methods):
    request = Request("image", "dummy-sd", "a red circle", seed=3, params={"steps": 5, "guidance": 4.0})
    before = np.asarray(sd.run(request).output)
    changed = np.asarray(sd.run(request.replace(methods=[MethodChoice(*m) for m in methods])).output)
    after = np.asarray(sd.run(request).output)
    assert np.array_equal(before, after)
    assert not np.array_equal(before, changed)
    assert "forward" not in vars(sd.pipe.unet)
    assert sd.pipe.scheduler is sd.base_scheduler


def test_a_method_failing_mid_apply_still_unwinds(sd):
    request = Request("image", "dummy-sd", "x", seed=1, params={"steps": 3})
    before = np.asarray(sd.run(request).output)
    with pytest.raises(ValidationError):
        sd.run(request.replace(methods=[MethodChoice("cfg_truncation"), MethodChoice("deepcache", {"branch": 3})]))
    assert np.array_equal(before, np.asarray(sd.run(request).output))


def test_method_parameters_are_validated_once_per_request(sd, monkeypatch):
    """validate_request checks a method's parameters and builds its Config; the run uses
    that Config instead of validating the same parameters again (main validated them twice)."""
    from studio.validation import validate_request

    calls = []
    original = MethodSpec.validate

    def counting(spec, params):
        calls.append(spec.name)
        return original(spec, params)

    monkeypatch.setattr(MethodSpec, "validate", counting)
    request = validate_request(Request("image", sd.model_id, "a red circle", seed=0, params={"steps": 3},
                                       methods=[MethodChoice("deepcache", {"interval": 2})]))
    result = sd.run(request)
    assert calls == ["deepcache"]
    assert result.method_stats["deepcache"]["shallow_steps"] == 1


def test_the_runner_removes_attached_methods_when_a_later_attach_fails(sd):
    """A method whose attach fails leaves the model as it was: the ones attached before it
    are removed, and the next run is the bit-identical baseline."""
    request = Request("image", sd.model_id, "a red circle", seed=0, params={"steps": 3})
    base = sd.run(request)
    with pytest.raises(ValidationError):
        sd.run(request.replace(methods=[MethodChoice("tome"), MethodChoice("deepcache", {"branch": 3})]))
    assert "forward" not in vars(sd.denoiser)
    assert np.array_equal(np.asarray(sd.run(request).output), np.asarray(base.output))


def test_backend_base_imports_no_method_module():
    """backends/base.py depends on the plan and runner only; the registry (which imports
    every method module) is looked up when a run needs it."""
    import ast
    import inspect

    import backends.base

    tree = ast.parse(inspect.getsource(backends.base))
    top_level = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    modules = [node.module if isinstance(node, ast.ImportFrom) else node.names[0].name for node in top_level]
    assert not any(m and m.startswith("backends.accel") for m in modules), modules
