"""Compare's evidence views (studio/evidence.py): the per-step timeline of what each method
computed, the difference heatmap, the first differing token, the XYZ grid, seed drift and
the compact table. Tiny random models, few steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from backends.timing import CallRecord
from backends.types import MethodChoice, Request, ValidationError
from studio import evidence
from studio.compare import CompareReport, CompareRow, parse_configs, run_compare
from studio.plots import figure_image, grid_figure, timeline_figure

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manager():
    from backends.manager import BackendManager
    from backends.tiny.dummy import register_dummy_models

    manager = BackendManager(device="cpu")
    register_dummy_models(manager)
    return manager


def run(manager, model, methods=(), steps=6, **params):
    request = Request("image", model, "a red circle at top left on white", "", 0,
                      {"steps": steps, "height": 32, "width": 32, **params}, list(methods))
    return manager.get("image", model).run(request)


# -- the timeline --------------------------------------------------------------------------
def test_baseline_timeline_is_every_step_computed(manager):
    result = run(manager, "dummy-sd", steps=5)
    assert evidence.step_timeline(result.timeline) == {evidence.NO_BRANCH: "FFFFF"}  # batched CFG: one call a step
    assert evidence.block_timeline(result.timeline) is None


@pytest.mark.parametrize("interval,expected", [(3, "FPPFPPF"), (2, "FPFPFPF")])
def test_deepcache_timeline_follows_its_interval(manager, interval, expected):
    result = run(manager, "dummy-sd", [MethodChoice("deepcache", {"interval": interval})], steps=7)
    timeline = evidence.step_timeline(result.timeline)
    assert timeline == {evidence.NO_BRANCH: expected}
    assert len(timeline[evidence.NO_BRANCH]) == 7  # one entry per step
    stats = result.method_stats["deepcache"]
    assert expected.count("F") == stats["full_steps"] and expected.count("P") == stats["shallow_steps"]


def test_block_cache_timeline_per_branch_and_per_block(manager):
    baseline = evidence.step_timeline(run(manager, "dummy-flux", steps=5).timeline)
    assert baseline == {"cond": "FFFFF", "uncond": "FFFFF"}  # true CFG: two calls a step
    method = MethodChoice("block_cache", {"interval": 2, "num_blocks": 2, "warmup_steps": 1})
    result = run(manager, "dummy-flux", [method], steps=5)
    timeline = evidence.step_timeline(result.timeline)
    assert timeline == {"cond": "FFPFP", "uncond": "FFPFP"}  # a rear span cached: the rest is computed
    blocks = evidence.block_timeline(result.timeline, "cond")
    assert len(blocks) == 5 and blocks[0] == "1" * len(blocks[0])
    assert blocks[2].endswith("00") and "0" not in blocks[2][:-2]  # the two rear blocks were reused
    whole = run(manager, "dummy-flux", [MethodChoice("block_cache", {"interval": 2, "num_blocks": 0})], steps=5)
    assert evidence.step_timeline(whole.timeline)["cond"] == "FFRFR"  # the whole stack answered from the cache


def test_cfg_truncation_shows_the_steps_without_the_unconditional_half(manager):
    result = run(manager, "dummy-sd", [MethodChoice("cfg_truncation", {"fraction": 0.5})], steps=6)
    assert evidence.step_timeline(result.timeline) == {evidence.NO_BRANCH: "FFFPPP"}  # batch 2 -> 1 past the cut
    truncated = run(manager, "dummy-flux", [MethodChoice("cfg_truncation", {"fraction": 0.5})], steps=4)
    assert evidence.step_timeline(truncated.timeline) == {"cond": "FFFF", "uncond": "FFRR"}  # true CFG: answered


def test_timeline_figure_rows_and_columns():
    rows = [CompareRow("baseline", [], timeline=[CallRecord(None, "F")] * 4),
            CompareRow("deepcache", [], timeline=[CallRecord(None, k) for k in "FPPF"]),
            CompareRow("flux", [], timeline=[CallRecord("cond", "F"), CallRecord("uncond", "R")] * 3)]
    labels, matrix = evidence.timeline_matrix(rows)
    assert labels == ["baseline", "deepcache", "flux [cond]", "flux [uncond]"]
    assert matrix.shape == (4, 4)
    assert list(matrix[1]) == [2, 1, 1, 2] and list(matrix[3, :3]) == [0, 0, 0] and np.isnan(matrix[3, 3])
    assert timeline_figure([CompareRow("text", [])]) is None  # nothing recorded: no figure
    assert figure_image(timeline_figure(rows)).size[0] > 200


# -- the difference heatmap ------------------------------------------------------------------
def test_difference_is_zero_for_identical_images_and_marks_where_they_differ():
    a = Image.new("RGB", (8, 6), (10, 20, 30))
    assert not evidence.abs_difference(a, a.copy()).any()
    b = a.copy()
    b.putpixel((3, 2), (40, 20, 30))
    diff = evidence.abs_difference(a, b)
    assert diff.shape == (6, 8) and diff[2, 3] == pytest.approx(10.0)  # 30 on one channel of three
    assert np.count_nonzero(diff) == 1
    with pytest.raises(ValidationError):
        evidence.abs_difference(a, Image.new("RGB", (4, 4)))


def test_first_frame_of_a_video():
    frames = [Image.new("RGB", (2, 2), (i, 0, 0)) for i in range(3)]
    assert evidence.first_frame(frames).getpixel((0, 0))[0] == 0
    assert evidence.first_frame(frames, 2).getpixel((0, 0))[0] == 2
    assert evidence.first_frame(frames, 99).getpixel((0, 0))[0] == 2  # clamped
    assert evidence.first_frame(frames[0]) is frames[0]


# -- the first differing token -------------------------------------------------------------
def test_first_difference_positions():
    assert evidence.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert evidence.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert evidence.first_difference([1, 2], [1, 2, 3]) == 2  # a prefix: differs where it ends


def test_first_difference_html_marks_the_token_and_escapes():
    page = evidence.first_difference_html("x = a < b and c", "x = a < d and <script>")
    assert "first difference at word <b>4</b>" in page
    assert "<mark title='word 4'> d</mark>" in page
    assert "x = a &lt;" in page and "<script>" not in page and "&lt;script&gt;" in page
    assert "opacity" in page.split("<mark")[1]  # the rest is dimmed
    same = evidence.first_difference_html("a b", "a b")
    assert "identical to the baseline" in same


def test_first_difference_html_with_the_model_tokenizer():
    from backends.tiny.dummy import byte_level_tokenizer

    pieces = evidence.tokenizer_pieces(byte_level_tokenizer())
    baseline, other = "a red circle at top", "a red square at top"
    assert "".join(pieces(other)) == other
    page = evidence.first_difference_html(baseline, other, pieces)
    at = evidence.first_difference(pieces(baseline), pieces(other))
    assert f"first difference at token <b>{at}</b>" in page and "<mark" in page


# -- the XYZ grid ---------------------------------------------------------------------------
def test_grid_configs_cover_every_combination():
    x = evidence.parse_axis("deepcache.interval", "2, 3, 4")
    y = evidence.parse_axis("sampler.steps", "4, 6")
    grid = evidence.grid_configs([], x, y)
    assert [len(line) for line in grid] == [3, 3]
    cell = grid[1][2]
    assert cell.label == "deepcache.interval=4 · sampler.steps=6"
    params = {m.name: m.params for m in cell.methods}
    assert params["deepcache"]["interval"] == 4 and params["sampler"]["steps"] == 6
    same = evidence.grid_configs([], x, evidence.parse_axis("deepcache.branch", "0, 1"))
    assert [m.name for m in same[1][0].methods] == ["deepcache"] and same[1][0].methods[0].params["branch"] == 1


def test_grid_refuses_more_than_25_cells_and_bad_axes():
    x = evidence.parse_axis("deepcache.interval", "1..10:10")
    y = evidence.parse_axis("sampler.steps", "4, 6, 8")
    with pytest.raises(ValidationError, match="25-cell limit"):
        evidence.grid_configs([], x, y)
    for name in ("deepcache", "deepcache.speed", ".interval"):
        with pytest.raises((ValidationError, KeyError)):
            evidence.parse_axis(name, "1, 2")


def test_grid_figure_has_a_labelled_cell_per_configuration():
    picture = Image.new("RGB", (16, 16), (200, 0, 0))
    pictures = [[picture, picture, None], [picture, picture, picture]]
    captions = [[f"{1 + i + j:.2f}x · 30.0 dB" for i in range(3)] for j in range(2)]
    fig = grid_figure(pictures, captions, "deepcache.interval", [2, 3, 4], "sampler.steps", [4, 6])
    axes = fig.axes
    assert len(axes) == 6
    assert [ax.get_title() for ax in axes[:3]] == [f"deepcache.interval={v}" for v in (2, 3, 4)]
    assert axes[0].get_ylabel() == "sampler.steps=4" and axes[3].get_ylabel() == "sampler.steps=6"
    assert [ax.get_xlabel() for ax in axes] == [c for line in captions for c in line]
    width, height = figure_image(fig).size
    assert width > height  # three columns, two rows


def test_cell_caption_says_speed_quality_and_adherence():
    row = CompareRow("x", [], speedup=1.5, quality={"psnr": 31.25}, task={"all": 0.75})
    assert evidence.cell_caption(row, "image") == "1.50x · 31.2 dB · adh 0.75"
    assert evidence.cell_caption(CompareRow("x", [], error="boom"), "image") == "error: boom"


# -- seed drift, the compact table (through one real comparison) ----------------------------
def test_seed_drift_and_compact_table_from_one_comparison(studio_factory):
    studio = studio_factory()
    request = Request("image", "dummy-sd", "a red circle", "", 0, {"steps": 4, "height": 32, "width": 32})
    seeds = [0, 1, 2]
    report = run_compare(studio, request, parse_configs("deepcache(interval=2)"), repeats=1, warmup=False,
                         seeds=seeds)
    row = report.rows[1]
    assert len(row.seed_quality) == 3 and len(row.seed_speedups) == 3
    assert all(s is not None and s > 0 for s in row.seed_speedups)
    assert evidence.step_timeline(row.timeline) == {evidence.NO_BRANCH: "FPFP"}
    assert evidence.step_timeline(report.rows[0].timeline) == {evidence.NO_BRANCH: "FFFF"}
    entries = evidence.seed_drift(row, seeds, "psnr")
    assert [e["seed"] for e in entries] == seeds
    assert len({round(e["psnr"], 6) for e in entries}) == 3  # each seed its own figure
    table = evidence.drift_table(entries, "psnr")
    assert [line["seed"] for line in table] == ["0", "1", "2", "mean", "min", "max"]
    assert table[4]["psnr"] <= table[3]["psnr"] <= table[5]["psnr"]
    assert table[3]["psnr"] == pytest.approx(np.mean([e["psnr"] for e in entries]), abs=1e-3)

    compact = evidence.compact_table(report)
    assert list(compact.columns) == ["config", "speedup", "PSNR dB", "adh.", "peak MB", "evals", "notes"]
    assert compact["config"].tolist() == ["baseline", "deepcache(interval=2)"]
    assert compact["speedup"][1].endswith(")") and "–" in compact["speedup"][1]
    assert len(report.frame().columns) > len(compact.columns)  # the full table keeps every figure


def test_grid_rows_find_each_cell_in_the_report():
    x = evidence.parse_axis("deepcache.interval", "2, 3")
    y = evidence.parse_axis("deepcache.branch", "0")
    grid = evidence.grid_configs([], x, y)
    rows = [CompareRow("baseline", [])] + [CompareRow(c.label, c.methods, speedup=1.0) for c in grid[0]]
    report = CompareReport("g", "image", "dummy-sd", rows)
    laid_out = evidence.grid_rows(report, grid)
    assert [r.label for r in laid_out[0]] == [c.label for c in grid[0]]


# -- text: tokens kept per verification step -------------------------------------------------
def test_lookahead_reports_tokens_per_step(manager):
    request = Request("text", "dummy-llama", "for i in range(10):", "", 0, {"max_new_tokens": 12},
                      [MethodChoice("lookahead")])
    result = manager.get("text", "dummy-llama").run(request)
    steps = result.extra["tokens_per_step"]
    assert sum(steps) == result.extra["tokens_generated"] and all(n >= 1 for n in steps)
    plain = manager.get("text", "dummy-llama").run(Request("text", "dummy-llama", "for i", "", 0,
                                                           {"max_new_tokens": 4}))
    assert "tokens_per_step" not in plain.extra  # transformers' generate: no per-step figures


def test_text_rows_show_tokens_per_step_not_denoising_steps(manager):
    from studio.plots import draft_length_figure

    result = manager.get("text", "dummy-llama").run(
        Request("text", "dummy-llama", "for i in", "", 0, {"max_new_tokens": 6}, [MethodChoice("lookahead")]))
    assert result.timeline == []  # LM forwards are not denoising steps
    row = CompareRow("lookahead", [], extra=result.extra)
    assert evidence.draft_lengths(row) == result.extra["tokens_per_step"]
    assert draft_length_figure([CompareRow("baseline", []), row]) is not None
    assert draft_length_figure([CompareRow("baseline", [])]) is None


def test_text_rows_compared_by_the_generated_token_ids():
    from backends.tiny.dummy import byte_level_tokenizer

    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode("a red circle at top", add_special_tokens=False)
    changed = ids[:2] + [tokenizer.encode(" blue", add_special_tokens=False)[0]] + ids[3:]
    base = CompareRow("baseline", [], outputs=[tokenizer.decode(ids)], extra={"output_token_ids": ids})
    row = CompareRow("x", [], outputs=[tokenizer.decode(changed)], extra={"output_token_ids": changed})
    page = evidence.text_difference_html(base, row, tokenizer)
    assert "first difference at token <b>2</b>" in page
    words = evidence.text_difference_html(base, row)  # no tokenizer at hand: words
    assert "first difference at word" in words
    assert "identical" in evidence.text_difference_html(base, base, tokenizer)
