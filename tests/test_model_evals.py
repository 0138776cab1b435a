"""``Result.model_evals`` counts the denoiser evaluations actually run: calls a cache
answered without running the network are not evaluations (issue 15, item 15)."""

from __future__ import annotations

import pytest
import torch

from backends.image import ImageBackend
from backends.tiny.dummy import dummy_flux_pipeline
from backends.types import MethodChoice, Request

STEPS = 6


@pytest.fixture(scope="module")
def flux():
    return ImageBackend("dummy-flux", dummy_flux_pipeline(), torch.device("cpu"), torch.float32)


def run(backend, methods=()):
    return backend.run(Request("image", backend.model_id, "a red circle", seed=3,
                               params={"steps": STEPS, "guidance": 4.0},
                               methods=[MethodChoice(name, dict(params)) for name, params in methods]))


def test_teacache_evaluations_exclude_the_skipped_calls(flux):
    base = run(flux)
    passes = base.model_evals // STEPS
    assert passes == 2 and base.model_evals == STEPS * passes  # true CFG: cond + uncond per step
    cached = run(flux, [("teacache", {"threshold": 2.0, "rescale": "none"})])
    skipped = cached.method_stats["teacache"]["skipped_calls"]
    assert skipped > 0
    assert cached.model_evals == STEPS * passes - skipped
    never = run(flux, [("teacache", {"threshold": 0.0})])  # a policy that never skips
    assert never.method_stats["teacache"]["skipped_calls"] == 0
    assert never.model_evals == base.model_evals


@pytest.mark.parametrize("name,params", [
    ("adacache", {"scale": 3.0}),
    ("block_cache", {"interval": 2, "num_blocks": 64}),  # a span of every block: whole calls reused
    ("mag_cache", {"threshold": 0.06}),
])
def test_whole_call_caches_report_their_skipped_evaluations(flux, name, params):
    base = run(flux)
    result = run(flux, [(name, params)])
    stats = result.method_stats[name]
    assert stats["skipped_evals"] > 0, stats
    assert result.model_evals == base.model_evals - stats["skipped_evals"]


def test_partial_caches_still_count_every_call(flux):
    """A block span smaller than the model still runs the other blocks: every call counts."""
    base = run(flux)
    result = run(flux, [("block_cache", {"interval": 2, "num_blocks": 1})])
    assert result.method_stats["block_cache"]["blocks_skipped"] > 0
    assert result.model_evals == base.model_evals
