"""The method framework: specs, validation, conflicts, and exact reversibility."""

import numpy as np
import pytest
import torch

from backends.accel import IMPORT_ERRORS
from backends.accel.base import Method, MethodSpec, Param, all_methods, instantiate, methods_for
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


def test_declared_conflicts_are_refused(monkeypatch):
    from backends.accel import base

    class A(Method):
        spec = MethodSpec("conflict_a", "A", ("image",), ("unet",), "a", conflicts=("sampler",))

    monkeypatch.setitem(base._REGISTRY, "conflict_a", A)
    with pytest.raises(ValidationError, match="cannot be combined"):
        instantiate([MethodChoice("sampler"), MethodChoice("conflict_a")], "image", "unet")


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
