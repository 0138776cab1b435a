"""Calibration for models a method has no coefficients for: TeaCache's rescale curve,
MagCache's ratios and thresholds for a target skip rate, fitted on the model, kept in the
history database (SQLite and PostgreSQL) and used automatically afterwards."""

from __future__ import annotations

import numpy as np
import pytest

from backends.accel import _calibration as fits
from backends.types import MethodChoice, Request, ValidationError
from conftest import DB_KINDS
from studio import calibration

MODEL = "dummy-flux"
PARAMS = {"steps": 6, "guidance": 4.0}


def flux_request(prompt="a red circle", seed=3, methods=()):
    return Request("image", MODEL, prompt, seed=seed, params=dict(PARAMS), methods=list(methods))


def curve(coefficients, settings=None):
    return {"kind": fits.RESCALE, "coefficients": list(coefficients), "points": [[0.1, 0.2], [0.1, 0.2]],
            "settings": settings or {"steps": 6}}


# -- storage ---------------------------------------------------------------------------

@pytest.mark.parametrize("db_kind", DB_KINDS)
def test_calibrations_are_stored_per_model_and_settings(studio_factory, db_kind):
    history = studio_factory().history
    first = history.save_calibration(MODEL, "teacache", curve([1, 2, 3, 4, 5], {"steps": 6}), "cpu")
    other = history.save_calibration(MODEL, "teacache", curve([0, 0, 0, 0, 1], {"steps": 12}), "cuda:0")
    history.save_calibration("another-model", "teacache", curve([9, 9, 9, 9, 9]), "cpu")
    records = history.calibrations(MODEL)
    assert [r["id"] for r in records] == [other, first]  # newest first, this model only
    newest = records[0]
    assert newest["coefficients"] == [0, 0, 0, 0, 1] and newest["settings"] == {"steps": 12}
    assert newest["device"] == "cuda:0" and newest["kind"] == "rescale" and newest["created_at"]
    # the same model, method, kind and settings: the new one replaces the old one
    again = history.save_calibration(MODEL, "teacache", curve([5, 4, 3, 2, 1], {"steps": 6}), "cpu")
    assert [r["id"] for r in history.calibrations(MODEL)] == [again, other]
    assert history.calibrations(MODEL, "mag_cache") == []
    assert history.delete_calibration(other) and not history.delete_calibration(other)
    assert [r["coefficients"] for r in history.calibrations(MODEL)] == [[5, 4, 3, 2, 1]]


@pytest.mark.parametrize("db_kind", DB_KINDS)
def test_stored_calibrations_survive_a_restart(studio_factory, db_kind, tmp_path):
    studio = studio_factory(data_dir=tmp_path / "d")
    saved = studio.history.save_calibration(MODEL, "teacache", curve([1, 2, 3, 4, 5]), "cpu")
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d")
    assert [r["id"] for r in again.history.calibrations(MODEL)] == [saved]


@pytest.mark.parametrize("db_kind", DB_KINDS)
def test_an_older_database_gets_the_calibrations_table(studio_factory, db_kind, tmp_path):
    from sqlalchemy import inspect

    from studio.history import CalibrationRow

    studio = studio_factory(data_dir=tmp_path / "d")
    CalibrationRow.__table__.drop(studio.history.engine)  # a database from before calibrations
    assert "calibrations" not in inspect(studio.history.engine).get_table_names()
    studio.close()
    again = studio_factory(data_dir=tmp_path / "d").history
    assert "calibrations" in inspect(again.engine).get_table_names()
    assert again.calibrations(MODEL) == []
    again.save_calibration(MODEL, "teacache", curve([1, 2, 3, 4, 5]), "cpu")
    assert len(again.calibrations(MODEL)) == 1


# -- the TeaCache fit --------------------------------------------------------------------

def test_rescale_curve_is_fitted_from_the_models_own_changes(studio_factory):
    studio = studio_factory()
    backend = studio.manager.get("image", MODEL)
    requests = [flux_request("a red circle", 0), flux_request("a blue square", 1)]
    record = fits.fit_rescale_curve(backend, requests)
    xs, ys = record["points"]
    # every step after the first, for each of the two CFG branches (true CFG: separate calls)
    assert len(xs) == len(ys) == 2 * (PARAMS["steps"] - 1) * 2
    assert all(x > 0 for x in xs) and all(y > 0 for y in ys)
    assert len(record["coefficients"]) == fits.CURVE_DEGREE + 1
    assert np.allclose(record["coefficients"], np.polyfit(xs, ys, 4))
    assert record["r2"] == fits.fit_r2(xs, ys, record["coefficients"]) and record["r2"] <= 1.0
    assert fits.fit_r2([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], [10.0, 0.0]) == 1.0
    assert record["settings"]["steps"] == PARAMS["steps"] and record["settings"]["passes"] == 2
    # the x values are what TeaCache itself accumulates: a raw (rescale=none) run skips
    # exactly while their sum stays under the threshold
    x_first_branch = xs[: PARAMS["steps"] - 1]
    threshold = sum(x_first_branch[:2]) + 1e-6
    result = backend.run(flux_request("a red circle", 0, [MethodChoice("teacache", {"threshold": threshold,
                                                                                      "rescale": "none"})]))
    assert result.method_stats["teacache"]["skipped_steps"] >= 1


class WatchedLock:
    """The backend's lock, counting how deep it is held (to see what runs under it)."""

    def __init__(self, inner):
        self.inner, self.depth = inner, 0

    def acquire(self, *args, **kwargs):
        got = self.inner.acquire(*args, **kwargs)
        self.depth += bool(got)
        return got

    def release(self):
        self.depth -= 1
        self.inner.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *_exc):
        self.release()


def test_calibration_hooks_the_shared_model_only_under_its_lock(studio_factory, monkeypatch):
    """A generation running meanwhile on the same model must not feed the curve."""
    import torch

    backend = studio_factory().manager.get("image", MODEL)
    watched = WatchedLock(backend.lock)
    monkeypatch.setattr(backend, "lock", watched)
    held = []
    for name in ("register_forward_pre_hook", "register_forward_hook"):
        original = getattr(torch.nn.Module, name)

        def record(module, *args, _original=original, **kwargs):
            held.append(watched.depth > 0)
            return _original(module, *args, **kwargs)

        monkeypatch.setattr(torch.nn.Module, name, record)
    fits.record_changes(backend, flux_request())
    assert held and all(held)


def test_calibrated_curve_is_used_and_forced_choices_still_win(studio_factory):
    """The stored curve decides what TeaCache skips: one that predicts huge changes never
    skips, one that predicts none skips every step but the first and last."""
    studio = studio_factory()
    never = studio.history.save_calibration(MODEL, "teacache", curve([0, 0, 0, 0, 100.0]), "cpu")

    def run(rescale):
        outcome = studio.generate(flux_request(methods=[{"name": "teacache", "params": {"threshold": 0.5,
                                                                                         "rescale": rescale}}]))
        return outcome.result.method_stats["teacache"]

    stats = run("auto")
    assert stats["rescale"] == "calibrated" and stats["calibration_id"] == never
    assert stats["skipped_steps"] == 0
    assert run("calibrated")["skipped_steps"] == 0
    assert run("flux")["rescale"] == "flux" and run("none")["rescale"] == "none"
    always = studio.history.save_calibration(MODEL, "teacache", curve([0, 0, 0, 0, 0.0], {"steps": 99}), "cpu")
    studio.history.delete_calibration(never)
    stats = run("auto")  # the newest curve, even at other settings
    assert stats["calibration_id"] == always and stats["calibration_settings"] == "other"
    assert stats["skipped_steps"] == PARAMS["steps"] - 2


def test_calibrated_without_a_stored_curve_is_a_clear_error(studio_factory):
    studio = studio_factory()
    with pytest.raises(ValidationError, match="no stored calibration"):
        studio.generate(flux_request(methods=[{"name": "teacache", "params": {"rescale": "calibrated"}}]))
    auto = studio.generate(flux_request(methods=[{"name": "teacache"}]))
    assert auto.result.method_stats["teacache"]["rescale"] == "flux"  # FLUX transformer, nothing stored


def test_calibrated_teacache_removal_restores_the_baseline(studio_factory):
    studio = studio_factory()
    backend = studio.manager.get("image", MODEL)
    record = {**curve([0, 0, 0, 0, 0.01]), "id": 1}
    before = backend.run(flux_request()).output
    cached = backend.run(flux_request(methods=[MethodChoice("teacache", {"threshold": 0.5, "rescale": "calibrated"},
                                                            calibrations=[record])]))
    assert cached.method_stats["teacache"]["skipped_steps"] > 0
    after = backend.run(flux_request()).output
    assert np.array_equal(np.asarray(before), np.asarray(after))


def test_request_json_cannot_smuggle_calibrations(studio_factory):
    from studio.validation import validate_request

    request = flux_request(methods=[MethodChoice("teacache", {}, calibrations=[curve([0, 0, 0, 0, 0])])])
    assert validate_request(request).methods[0].calibrations == []  # only the studio's store hands them over


# -- MagCache: the ratios measured by the first run are kept --------------------------------

@pytest.mark.parametrize("db_kind", DB_KINDS)
def test_mag_cache_ratios_are_stored_and_reused_after_a_restart(studio_factory, db_kind, tmp_path, monkeypatch):
    from backends.accel.mag_cache import MagCacheMethod

    monkeypatch.setattr(MagCacheMethod, "calibrated", {})
    request = flux_request(methods=[{"name": "mag_cache", "params": {"threshold": 0.5}}])
    studio = studio_factory(data_dir=tmp_path / "d")
    first = studio.generate(request).result
    assert first.method_stats["mag_cache"]["calibrated_this_run"]
    saved = first.method_stats["mag_cache"]["calibration_saved"]
    assert "calibration" not in first.method_stats["mag_cache"]  # the curve went to the store
    [record] = studio.history.calibrations(MODEL, "mag_cache")
    assert record["id"] == saved and len(record["ratios"]) == PARAMS["steps"]
    studio.close()
    monkeypatch.setattr(MagCacheMethod, "calibrated", {})  # a new process: nothing in memory
    again = studio_factory(data_dir=tmp_path / "d").generate(request).result
    stats = again.method_stats["mag_cache"]
    assert not stats["calibrated_this_run"] and stats["calibration_id"] == saved
    assert np.array_equal(np.asarray(first.output), np.asarray(again.output))


# -- thresholds for a target skip rate --------------------------------------------------

def test_threshold_for_a_target_skip_rate(studio_factory):
    studio = studio_factory()
    backend = studio.manager.get("image", MODEL)
    requests = [flux_request("a red circle", 0)]
    record = fits.choose_threshold(backend, requests, "first_block_cache", 0.5, iterations=5)
    rates = dict(record["probes"])
    assert len(rates) == 5 and record["threshold"] in rates
    # the probes bracket the target: bisection moved towards it from both sides
    assert min(rates.values()) <= 0.5 <= max(rates.values())
    assert abs(record["skip_rate"] - 0.5) == min(abs(r - 0.5) for r in rates.values())
    measured = fits.measured_skip_rate(backend, requests, "first_block_cache", {"threshold": record["threshold"]})
    assert measured == record["skip_rate"]  # deterministic: the same runs again
    with pytest.raises(ValidationError):
        fits.choose_threshold(backend, requests, "mag_cache", 0.5)


def test_run_calibration_stores_it_and_the_hints_say_so(studio_factory):
    studio = studio_factory()
    record = calibration.run_calibration(studio, "image", MODEL, "teacache", calibration.CURVE, prompts=2,
                                         prompt_texts=["a red circle", "a green triangle"], params=PARAMS)
    [row] = calibration.calibration_table(studio.history, MODEL)
    assert row[0] == record["id"] and row[1] == "teacache" and "rescale curve" in row[2]
    hints = studio.method_hints("image", MODEL)
    assert "Calibrated for this model" in hints["teacache"] and "in use" in hints["teacache"]
    assert "first_block_cache" not in hints
    xs, ys, grid, fitted = calibration.curve_points(record)
    assert len(xs) == len(ys) == 20 and len(grid) == len(fitted) == 50
    with pytest.raises(ValidationError):
        calibration.run_calibration(studio, "image", MODEL, "mag_cache", calibration.CURVE)
    ratios = calibration.run_calibration(studio, "image", MODEL, "mag_cache", calibration.RATIOS, prompts=1,
                                         prompt_texts=["a red circle"], params=PARAMS)
    assert len(ratios["ratios"]) == PARAMS["steps"]
    used = studio.generate(flux_request(methods=[{"name": "mag_cache"}])).result.method_stats["mag_cache"]
    assert used["calibration_id"] == ratios["id"] and not used["calibrated_this_run"]
    with pytest.raises(ValidationError):
        calibration.parse_goal("teacache", "fast")
    assert calibration.parse_goal("first_block_cache", "40%") == 0.4


@pytest.mark.parametrize("model", ["dummy-ar", "dummy-sd"])
def test_calibration_refuses_a_model_the_method_does_not_run_on(studio_factory, model):
    """An AR image model (LlamaForCausalLM) or a UNet: one line naming the model kind, not
    the fitting code's complaint about a class it cannot read; nothing is stored."""
    studio = studio_factory()
    with pytest.raises(ValidationError) as err:
        calibration.run_calibration(studio, "image", model, "teacache", calibration.CURVE, prompts=1,
                                    prompt_texts=["a red circle"], params={"steps": 4})
    message = str(err.value)
    assert f"teacache does not apply to {model}" in message and "\n" not in message
    assert "LlamaForCausalLM" not in message and "UNet2DConditionModel" not in message
    assert calibration.calibration_table(studio.history, model) == []


def test_calibration_panel_builds_and_lists(studio_factory):
    import gradio as gr

    from studio.ui.calibration import build_calibration_panel

    studio = studio_factory()
    studio.history.save_calibration(MODEL, "teacache", curve([1, 2, 3, 4, 5]), "cpu")
    with gr.Blocks():
        panel = build_calibration_panel(studio)
    listing = panel["listing"](MODEL)
    assert list(listing["method"]) == ["teacache"]
    text, figure, table = panel["start"]("image", MODEL, "teacache", calibration.CURVE, 0.5, 1, PARAMS["steps"],
                                         "a red circle")
    assert "Stored calibration" in text and "Polynomial" in text and figure is not None
    assert len(table) == 2 and "R²" in table["calibration"][0]  # the new fit first
    with pytest.raises(gr.Error, match="no stored calibration #99"):
        panel["delete"](MODEL, 99)
    assert panel["on_method"]("first_block_cache")["value"] == "target skip rate"
    assert panel["on_method"]("teacache")["value"] == calibration.CURVE


def test_report_pairs_uncalibrated_and_calibrated_rows():
    from benchmarks.report import calibration_table

    def row(method, psnr, speedup, evals):
        return {"method": method, "params": [{"name": "teacache"}] if method != "baseline" else [],
                "quality": {"psnr": psnr, "ssim": 0.9}, "speedup": speedup, "speedup_min": speedup,
                "speedup_max": speedup, "model_evals": evals}

    data = {"meta": {"model": "m", "calibration": {"r2": 0.5}},
            "rows": [row("baseline", 100.0, 1.0, 50), row("plain", 30.0, 2.0, 20), row("fitted", 30.2, 2.5, 15)]}
    [line] = calibration_table([data]).splitlines()[2:]
    assert "`plain`" in line and "`fitted`" in line and "30 / 50" in line and "35 / 50" in line
    assert "+0.20" in line and "**1.25**" in line


@pytest.mark.parametrize("goal", [calibration.CURVE, calibration.RATIOS, "0.5"])
def test_calibration_stops_at_a_cancel_and_at_the_time_limit(studio_factory, goal):
    import threading

    from backends.control import RunCancelled, RunTimedOut

    method = "mag_cache" if goal == calibration.RATIOS else "teacache"
    cancelled = threading.Event()
    cancelled.set()
    studio = studio_factory()
    with pytest.raises(RunCancelled):
        calibration.run_calibration(studio, "image", MODEL, method, goal, prompts=1, params=PARAMS, cancel=cancelled)
    with pytest.raises(RunTimedOut):
        calibration.run_calibration(studio_factory(time_limit_s=1e-6), "image", MODEL, method, goal, prompts=1,
                                    params=PARAMS)
    assert calibration.calibration_table(studio.history, MODEL) == []  # nothing stored


def test_calibration_is_costed_against_max_cost(studio_factory):
    with pytest.raises(ValidationError, match="--max-cost"):
        calibration.run_calibration(studio_factory(max_cost=0.001), "image", MODEL, "teacache", prompts=1,
                                    params=PARAMS)
