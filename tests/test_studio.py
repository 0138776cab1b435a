"""The Studio service: validation, outputs + history rows, failures, repair, compare."""

import csv
import io
import threading
from pathlib import Path

import numpy as np
import pytest

from backends.types import MethodChoice, OutOfMemoryError, Request, Result, StudioError, ValidationError
from conftest import DB_KINDS
from studio.compare import parse_config, parse_configs, parse_values, run_compare, sweep_configs


@pytest.fixture(params=DB_KINDS)
def db_kind(request):
    """Every studio test runs on SQLite and on a real PostgreSQL server."""
    return request.param


def image_request(**kw):
    base = dict(modality="image", model="dummy-sd", prompt="a red circle", seed=5, params={"steps": 3})
    base.update(kw)
    return Request(**base)


def test_generate_saves_file_and_row(studio_factory):
    studio = studio_factory()
    outcome = studio.generate(image_request(methods=[MethodChoice("deepcache", {"interval": 2})]))
    row = studio.history.get(outcome.run_id)
    assert row.output_path.startswith("outputs/") and row.output_path.endswith(".png")  # relative: the dir can move
    assert studio.outputs.resolve(row.output_path) == Path(outcome.result.output_path).resolve()
    assert Path(outcome.result.output_path).is_file()
    assert row.status == "ok" and row.total_seconds > 0 and row.timings["denoise"] > 0
    assert row.model_evals == 3 and row.method_stats["deepcache"]["shallow_steps"] == 1


def test_invalid_request_is_refused_before_running(studio_factory):
    studio = studio_factory()
    for bad in (image_request(prompt="  "), image_request(params={"steps": 0}),
                image_request(params={"width": 100000}), image_request(params={"colour": 1}),
                image_request(methods=[MethodChoice("deepcache", {"interval": 0})])):
        with pytest.raises(ValidationError):
            studio.generate(bad)
    assert studio.history.count() == 0


def test_failed_run_is_recorded_and_history_kept(studio_factory):
    studio = studio_factory()
    ok = studio.generate(image_request())
    with pytest.raises(StudioError, match="unknown model"):
        studio.generate(image_request(model="no such model!"))
    with pytest.raises(ValidationError, match="does not apply"):  # a refusal once the model is known: no row
        studio.generate(image_request(model="dummy-flux", methods=[MethodChoice("deepcache")]))
    failed = studio.history.query(status="failed")
    assert len(failed) == 1 and "unknown model" in failed[-1].error
    assert studio.history.get(ok.run_id).status == "ok" and studio.history.count() == 2


def test_out_of_memory_is_caught_and_next_request_works(studio_factory, monkeypatch):
    studio = studio_factory()
    backend = studio.manager.get("image", "dummy-sd")
    original = backend.generate

    def explode(*a, **k):
        raise MemoryError("simulated")

    monkeypatch.setattr(backend, "generate", explode)
    with pytest.raises(OutOfMemoryError, match="out of memory"):
        studio.generate(image_request())
    monkeypatch.setattr(backend, "generate", original)
    assert studio.generate(image_request()).result.output is not None
    assert [r.status for r in studio.history.query()] == ["ok", "oom"]


def test_rerun_reproduces_the_same_output(studio_factory):
    studio = studio_factory()
    first = studio.generate(image_request(methods=[MethodChoice("cfg_truncation", {"fraction": 0.5})]))
    second = studio.rerun(first.run_id)
    assert second.run_id != first.run_id
    assert np.array_equal(np.asarray(first.result.output), np.asarray(second.result.output))


def test_config_syntax():
    config = parse_config("deepcache(interval=4) + sampler(scheduler=unipc, steps=12)")
    assert [m.name for m in config.methods] == ["deepcache", "sampler"]
    assert config.methods[1].params == {"scheduler": "unipc", "steps": 12}
    assert parse_config("baseline").is_baseline
    assert len(parse_configs("deepcache\n\n# a comment\ncfg_truncation(fraction=0.3)")) == 2
    for bad in ("deepcache(interval=)", "deepcache(interval=3", "nope", "deepcache(speed=2)"):
        with pytest.raises(ValidationError):
            parse_config(bad)
    assert parse_values("4..20:5") == [4, 8, 12, 16, 20]
    assert parse_values("0.1, 0.2") == [0.1, 0.2]


def with_run_seconds(studio, monkeypatch, seconds_for):
    """Each run reports ``seconds_for(method names)`` as its total time, so speedups are
    known in advance instead of whatever this machine's timing noise gives."""
    original = studio.executor.run

    def timed(request, progress=None, cancel=None):
        result = original(request, progress, cancel=cancel)
        result.total_seconds = seconds_for([m.name for m in request.methods])
        return result

    monkeypatch.setattr(studio.executor, "run", timed)


def test_compare_runs_baseline_then_configs_in_one_group(studio_factory, monkeypatch):
    studio = studio_factory()
    with_run_seconds(studio, monkeypatch, lambda names: 0.5 if "deepcache" in names else 1.0 if names else 2.0)
    configs = parse_configs("deepcache(interval=2)\nsampler(steps=2)\ndeepcache(branch=3)")
    seen = []
    report = run_compare(studio, image_request(), configs, repeats=2,
                         progress=lambda i, n, label: seen.append(label))
    labels = [r.label for r in report.rows]
    assert labels[0] == "baseline" and len(labels) == 4
    base, cached, fewer, broken = report.rows
    assert base.speedup == pytest.approx(1.0) and base.quality["psnr"] == 100.0
    assert cached.speedup == pytest.approx(4.0) and fewer.speedup == pytest.approx(2.0)
    assert cached.quality["psnr"] < 100.0 and cached.error is None and broken.speedup is None
    assert fewer.model_evals == 2
    assert broken.error and "branch" in broken.error  # reported, and did not stop the others
    groups = {r.compare_group for r in studio.history.query(limit=100)}
    assert groups == {report.group}
    assert studio.history.count(compare_group=report.group, status="ok") == 6
    assert any("deepcache" in s for s in seen)
    exported = list(csv.DictReader(io.StringIO(report.to_csv())))
    assert [r["config"] for r in exported] == [r.label for r in report.rows] and "speedup" in exported[0]
    page = report.to_html()
    assert page.count("<tr") == len(report.rows) + 1 and "deepcache(interval=2)" in page  # header + one a row
    front = report.pareto()  # the exact baseline and the fastest run are never beaten on both counts
    assert "baseline" in front and "deepcache(interval=2)" in front and "deepcache(branch=3)" not in front


def test_pareto_front_keeps_exactly_the_configurations_nothing_beats_on_both_counts():
    from studio.compare import CompareReport, CompareRow

    def row(label, speedup, psnr):
        return CompareRow(label, [], speedup=speedup, quality={} if psnr is None else {"psnr": psnr})

    report = CompareReport("g", "image", "m", [
        row("baseline", 1.0, 100.0), row("fast", 2.0, 30.0), row("slower and worse", 1.5, 20.0),
        row("fastest", 3.0, 10.0), row("as fast, worse", 3.0, 9.0), row("failed", None, None),
        row("as good as baseline, faster", 1.2, 100.0)])
    assert report.pareto() == ["fast", "fastest", "as good as baseline, faster"]


def test_compare_can_be_cancelled(studio_factory):
    studio = studio_factory()
    cancel = threading.Event()
    cancel.set()
    report = run_compare(studio, image_request(), parse_configs("deepcache"), cancel=cancel)
    assert report.rows[0].error == "cancelled"


def test_sweep_builds_one_config_per_value():
    configs = sweep_configs([MethodChoice("sampler", {"steps": 10, "scheduler": "ddim"})], "deepcache", "interval", [2, 3])
    assert [c.label for c in configs] == ["deepcache.interval=2", "deepcache.interval=3"]
    assert configs[0].methods[0].name == "sampler" and configs[1].methods[1].params["interval"] == 3


def test_video_request_saves_a_clip_and_bad_sizes_are_refused(studio_factory):
    studio = studio_factory()
    outcome = studio.generate(Request("video", "dummy-wan", "a red ball moving right", seed=1,
                                      params={"steps": 2, "fps": 8}))
    assert Path(outcome.result.output_path).suffix in {".mp4", ".gif"} and len(outcome.result.output) > 1
    for params, message in (({"frames": 1000}, "frames"), ({"fps": 0}, "fps"), ({"width": 4000}, "width")):
        with pytest.raises(ValidationError, match=message):
            studio.generate(Request("video", "dummy-wan", "x", params=params))


def test_method_hints_come_from_comparable_runs_only(studio_factory):
    """Trust issue, item 14: a hint divides the times of runs that did the same work
    (same prompt, seed, params, device), the method alone at one setting; anything else
    says "not enough data" instead of a misleading figure."""
    studio = studio_factory()

    def record(prompt, seconds, methods=()):
        request = image_request(prompt=prompt, methods=[MethodChoice(*m) for m in methods])
        studio.history.record_run(request, Result(output=None, total_seconds=seconds, device="cpu"))

    record("a long prompt", 4.0)
    record("a short prompt", 1.0)
    record("a short prompt", 0.5, [("deepcache", {"interval": 3})])  # 2x on the same work
    record("a long prompt", 0.2, [("deepcache", {"interval": 3}), ("tome", {})])  # a combination
    record("never run plainly", 0.1, [("tome", {})])
    hints = studio.method_hints("image", "dummy-sd")
    assert "**2.00x**" in hints["deepcache"] and "interval=3" in hints["deepcache"]
    assert hints["tome"].startswith("Not enough data")
    assert "cfg_truncation" not in hints  # never run: no hint at all


def test_compare_defaults_warm_up_interleave_and_report_ideal(studio_factory):
    """Compare's defaults are the trustworthy ones: a warm-up per configuration, three
    repetitions interleaved (baseline, config, baseline, config...), speedup from paired
    ratios with its range, and DeepCache's ideal speedup and efficiency in the table."""
    studio = studio_factory()
    order = []
    generate, warm_up = studio.generate, studio.warm_up

    def recording_generate(request, *args, **kwargs):
        order.append(("run", request.methods[0].name if request.methods else "baseline"))
        return generate(request, *args, **kwargs)

    def recording_warm_up(request, *args, **kwargs):
        order.append(("warm", request.methods[0].name if request.methods else "baseline"))
        return warm_up(request, *args, **kwargs)

    studio.generate, studio.warm_up = recording_generate, recording_warm_up
    report = run_compare(studio, image_request(params={"steps": 6}), parse_configs("deepcache(interval=3)"))
    assert order == [("warm", "baseline"), ("run", "baseline"), ("warm", "deepcache"), ("run", "deepcache"),
                     ("run", "baseline"), ("run", "deepcache"), ("run", "baseline"), ("run", "deepcache")]
    base, cached = report.rows
    assert base.speedup == base.speedup_min == base.speedup_max == pytest.approx(1.0)
    assert cached.speedup_min <= cached.speedup <= cached.speedup_max
    assert cached.stats["deepcache"]["evals_partial"] > 0 and cached.ideal_speedup is not None
    assert cached.efficiency == pytest.approx(cached.speedup / cached.ideal_speedup)
    assert base.ideal_speedup is None
    row = report.table()[1]
    assert {"speedup_min", "speedup_max", "ideal_speedup", "efficiency"} <= set(row)
    assert studio.history.count(compare_group=report.group, status="ok") == 6


def test_a_run_whose_output_cannot_be_saved_still_gets_its_row(studio_factory, monkeypatch):
    studio = studio_factory()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(studio.outputs, "save", disk_full)
    with pytest.raises(StudioError, match="could not be saved"):
        studio.generate(image_request())
    row = studio.history.query(limit=1)[0]
    assert row.status == "failed" and "could not be saved" in row.error and "/" not in row.error
