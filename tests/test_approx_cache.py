"""Approximate caching from history (approx_cache, Nirvana) through the studio, on SQLite
and PostgreSQL: reuse on a near-repeat shrinks the work by K steps, never across models,
sizes, schedulers, step counts or guidance settings, removal restores the baseline bit for
bit, a failed or cancelled run keeps nothing, a lost latent file means a full run with one
warning, and deleting a run deletes its kept latents."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from backends.accel.approx_cache import ApproxCacheConfig, kept_steps, similarity, skip_for
from backends.control import RunCancelled
from backends.types import StudioError
from tests.conftest import DB_KINDS

torch.set_num_threads(1)

PROMPT = "a red circle at top left on white"
NEAR = "a red circle at the top left on white"
STEPS = 6
# the dummy models' random text encoders score prompts differently from the bundled ones
LOOSE = {"min_similarity": 0.5}


@pytest.fixture(params=DB_KINDS)
def db_kind(request):
    return request.param


@pytest.fixture
def studio(studio_factory):
    return studio_factory()


def request(prompt=PROMPT, model="dummy-sd", methods=(("approx_cache", LOOSE),), seed=1, **params):
    return {"modality": "image", "model": model, "prompt": prompt, "seed": seed,
            "params": {"steps": STEPS, "guidance": 4.0, **params},
            "methods": [{"name": name, "params": dict(p)} for name, p in methods]}


def cache_stats(outcome) -> dict:
    return outcome.result.method_stats["approx_cache"]


def latent_files(studio) -> list[Path]:
    folder = studio.outputs.root / "latents"
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_a_near_repeat_starts_from_the_earlier_latent_and_runs_k_fewer_steps(studio):
    baseline = studio.generate(request(methods=()))
    first = studio.generate(request())
    assert cache_stats(first)["reused"] is False and first.result.model_evals == baseline.result.model_evals
    near = studio.generate(request(NEAR, seed=2))
    stats = cache_stats(near)
    skip = stats["skipped_steps"]
    assert stats["reused"] and stats["source_run"] == first.run_id and skip >= 1, stats
    # the cost meter saw K fewer denoiser calls (CFG is batched in SD: one call per step)
    assert stats["evals_full"] == baseline.result.model_evals - skip == near.result.model_evals
    assert stats["evals_partial"] == skip and stats["ideal_speedup"] > 1
    assert not np.array_equal(np.asarray(near.result.output), np.asarray(baseline.result.output))


@pytest.mark.parametrize("model", ["dummy-sd", "dummy-flux"])
def test_an_exact_repeat_with_its_seed_lands_on_the_same_image(studio, model, monkeypatch):
    """Starting from the run's own latent at step K must walk the rest of the same
    trajectory: the schedulers' timesteps and sigmas line up with the skipped steps (FLUX
    with a shifted, uneven sigma schedule, where a step taken at the wrong sigma shows)."""
    if model == "dummy-flux":
        from diffusers import FlowMatchEulerDiscreteScheduler

        monkeypatch.setattr(studio.manager.get("image", model).pipe, "scheduler",
                            FlowMatchEulerDiscreteScheduler(shift=3.0))
    baseline = studio.generate(request(model=model, methods=()))
    studio.generate(request(model=model))
    repeat = studio.generate(request(model=model))
    assert cache_stats(repeat)["skipped_steps"] >= 1
    assert np.array_equal(np.asarray(repeat.result.output), np.asarray(baseline.result.output))


def test_flux_reuse_skips_both_passes_of_each_skipped_step(studio):
    studio.generate(request(model="dummy-flux"))
    near = studio.generate(request(NEAR, model="dummy-flux"))
    stats = cache_stats(near)
    assert stats["reused"] and stats["evals_partial"] == 2 * stats["skipped_steps"] > 0, stats  # true CFG


MISMATCHES = {
    "model": ({"model": "dummy-flux"}, {}),
    "size": ({}, {"height": 24, "width": 24}),
    "steps": ({}, {"steps": 8}),
    "guidance": ({}, {"guidance": 6.0}),
    "no guidance": ({}, {"guidance": 1.0}),
}


@pytest.mark.parametrize("change", sorted(MISMATCHES))
def test_never_reuses_across_settings_that_change_the_trajectory(studio, change):
    studio.generate(request())
    overrides, params = MISMATCHES[change]
    outcome = studio.generate(request(**overrides, **params))  # the very same prompt
    assert cache_stats(outcome)["reused"] is False and cache_stats(outcome)["similarity"] is None


def test_never_reuses_across_schedulers_or_negative_prompts(studio):
    studio.generate(request())
    swapped = studio.generate(request(methods=(("sampler", {"scheduler": "dpmpp_2m", "steps": STEPS}),
                                               ("approx_cache", LOOSE))))
    assert cache_stats(swapped)["reused"] is False and cache_stats(swapped)["similarity"] is None
    negative = studio.generate({**request(), "negative_prompt": "blurry"})
    assert cache_stats(negative)["reused"] is False and cache_stats(negative)["similarity"] is None
    same = studio.generate(request())
    assert cache_stats(same)["reused"] is True  # the control: the same settings do reuse


def test_removal_restores_the_baseline_bit_for_bit(studio):
    before = studio.generate(request(methods=()))
    studio.generate(request())
    assert cache_stats(studio.generate(request(NEAR)))["reused"]
    after = studio.generate(request(methods=()))
    assert np.array_equal(np.asarray(before.result.output), np.asarray(after.result.output))


def test_a_failed_or_cancelled_run_keeps_no_latents(studio, monkeypatch):
    backend = studio.manager.get("image", "dummy-sd")
    calls = {"n": 0}
    original = backend.pipe.vae.decode

    def broken_decode(*args, **kwargs):  # fails after every denoising step ran
        calls["n"] += 1
        raise RuntimeError("decoder broke")

    monkeypatch.setattr(backend.pipe.vae, "decode", broken_decode)
    with pytest.raises(StudioError):
        studio.generate(request())
    assert calls["n"] == 1
    monkeypatch.setattr(backend.pipe.vae, "decode", original)

    cancel = threading.Event()

    def progress(step, total, stage):
        if step >= STEPS - 2:
            cancel.set()

    with pytest.raises(RunCancelled):
        studio.generate(request(), progress=progress, cancel=cancel)
    assert studio.history.latent_records("dummy-sd") == [] and latent_files(studio) == []
    statuses = [row.status for row in studio.history.query()]
    assert sorted(statuses) == ["cancelled", "failed"]


def test_a_lost_or_corrupt_latent_file_means_a_full_run_with_one_warning(studio):
    baseline = studio.generate(request(methods=()))
    studio.generate(request())
    (path,) = latent_files(studio)
    path.write_bytes(b"not a tensor file")
    corrupt = studio.generate(request(NEAR))
    assert cache_stats(corrupt)["reused"] is False
    assert corrupt.result.model_evals == baseline.result.model_evals
    (note,) = [n for n in corrupt.result.notes if "approx_cache" in n]
    assert "\n" not in note and str(path) not in note
    for file in latent_files(studio):
        file.unlink()
    missing = studio.generate(request(NEAR))
    assert cache_stats(missing)["reused"] is False and missing.result.notes


def test_deleting_a_run_deletes_its_latents_and_the_history_still_lists(studio, studio_factory, tmp_path):
    kept = studio.generate(request())
    other = studio.generate(request("a blue square at bottom right on black"))
    assert len(latent_files(studio)) == 2 and studio.history.latent_rows_of(kept.run_id) == 1
    # a restart's repair counts the latent files as referenced: nothing moves to the trash
    again = studio_factory(data_dir=tmp_path / "data", db_url=str(studio.history.engine.url.render_as_string(
        hide_password=False)))
    assert again.repaired["orphans_moved_to_trash"] == 0 and len(latent_files(again)) == 2
    assert studio.history.delete([kept.run_id]) == 1
    assert studio.history.latent_rows_of(kept.run_id) == 0 and len(latent_files(studio)) == 1
    assert [row.id for row in studio.history.query()] == [other.run_id]
    outcome = studio.generate(request(NEAR))
    assert cache_stats(outcome)["source_run"] in (None, other.run_id)


def test_store_off_keeps_nothing_and_warm_ups_keep_nothing(studio):
    studio.generate(request(methods=(("approx_cache", {**LOOSE, "store": False}),)))
    studio.warm_up(request())
    assert studio.history.latent_records("dummy-sd") == [] and latent_files(studio) == []


def test_a_comparison_measures_against_the_history_it_started_with(studio):
    """Compare's repetitions of one prompt must not reuse each other: every timed run retrieves
    only, so a comparison on an empty history is all misses and stores nothing."""
    from studio.compare import parse_configs, run_compare
    from studio.service import validate_request

    report = run_compare(studio, validate_request(request(methods=())), parse_configs("approx_cache(min_similarity=0.5)"),
                         repeats=2, warmup=False, seeds=[1, 2])
    row = report.rows[1]
    assert row.error is None and len(row.outputs) == 2
    assert studio.history.latent_records("dummy-sd") == [] and latent_files(studio) == []


def test_never_reuses_a_latent_stored_under_other_methods(studio):
    """Another method shapes the stored trajectory (here DeepCache's reused features): a run
    with a different set of methods must not start from it, the same set may."""
    studio.generate(request(methods=(("approx_cache", LOOSE), ("deepcache", {"interval": 2}))))
    plain = studio.generate(request(NEAR, seed=2))
    assert cache_stats(plain)["reused"] is False
    again = studio.generate(request(NEAR, seed=3, methods=(("approx_cache", LOOSE), ("deepcache", {"interval": 2}))))
    assert cache_stats(again)["reused"] is True


def test_k_grows_with_similarity_on_the_papers_levels():
    config = ApproxCacheConfig(min_similarity=0.9, max_skip=0.5)
    levels = kept_steps(50)
    assert levels == [5, 10, 15, 20, 25]  # the paper's K of 50 steps
    assert skip_for(1.0, config, 50, levels) == 25
    assert skip_for(0.9, config, 50, levels) == 5
    assert 5 < skip_for(0.95, config, 50, levels) < 25
    assert skip_for(1.0, config, 50, [5, 10]) == 10  # no more than a stored step allows
    a = np.eye(4, dtype=np.float16)
    assert similarity(a, a) == pytest.approx(1.0) and similarity(a[:2], a[2:]) == pytest.approx(0.0)
