"""The benchmark CLI contract (DESIGN.md): rows with speedup and quality, JSON out."""

import json

import pytest

from benchmarks.cli import main
from benchmarks.report import table


def test_image_benchmark_writes_rows_with_speedup_and_quality(tmp_path):
    out = tmp_path / "r.json"
    assert main(["--modality", "image", "--model", "dummy-sd", "--methods", "deepcache(interval=2),sampler(steps=2)",
                 "--repeats", "1", "--prompts", "1", "--steps", "4", "--json", str(out), "--no-warmup"]) == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"baseline", "deepcache(interval=2)", "sampler(steps=2)"}
    assert rows["baseline"]["speedup"] == 1.0 and rows["baseline"]["quality"]["psnr"] == 100.0
    assert rows["sampler(steps=2)"]["model_evals"] == 2 and rows["sampler(steps=2)"]["lossless"] is False
    assert all(r["seconds_median"] > 0 for r in rows.values())
    assert "| `deepcache(interval=2)` |" in table(data)


def test_text_benchmark_reports_acceptance_and_forward_costs(tmp_path):
    out = tmp_path / "t.json"
    assert main(["--modality", "text", "--model", "dummy-llama", "--methods", "prompt_lookup", "--repeats", "1",
                 "--prompts", "1", "--prompt-kind", "edit", "--max-new-tokens", "12", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    lookup = data["rows"][1]
    assert lookup["all_exact"] is True and lookup["lossless"] is True
    assert lookup["tokens_per_target_forward"] >= 1.0
    assert data["meta"]["forward_costs"]["target_1_ms"] > 0
    # held-out perplexity of the model as run: a decoding method leaves the model unchanged
    assert data["rows"][0]["quality"]["perplexity"] > 1 and lookup["quality"]["perplexity_delta_pct"] == 0
    assert lookup["weight_bytes"] == data["rows"][0]["weight_bytes"] > 0 and lookup["weight_ratio"] == 1.0


def test_studio_overhead_row(tmp_path):
    out = tmp_path / "o.json"
    assert main(["--modality", "image", "--model", "dummy-sd", "--overhead", "--repeats", "1", "--prompts", "1",
                 "--steps", "2", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["method"] == "studio-overhead" and row["direct_seconds_median"] > 0


def test_benchmark_rows_carry_spread_ideal_and_efficiency(tmp_path):
    """The JSON the README tables come from: paired-ratio range, and for a caching method
    its ideal speedup and efficiency = speedup / ideal; methods that skip nothing have none."""
    from benchmarks.report import ideal_table

    out = tmp_path / "i.json"
    assert main(["--modality", "image", "--model", "dummy-sd", "--methods", "deepcache(interval=2),sampler(steps=2)",
                 "--repeats", "2", "--prompts", "1", "--steps", "4", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    cached = rows["deepcache(interval=2)"]
    assert cached["pairs"] == 2 and cached["speedup_min"] <= cached["speedup"] <= cached["speedup_max"]
    assert cached["method_stats"]["deepcache"]["evals_partial"] == 2 and cached["ideal_speedup"] is not None
    assert cached["efficiency"] == pytest.approx(cached["speedup"] / cached["ideal_speedup"], abs=2e-3)
    assert rows["sampler(steps=2)"]["ideal_speedup"] is None and rows["baseline"]["efficiency"] is None
    rendered = ideal_table([data])
    assert "`deepcache(interval=2)`" in rendered and "sampler" not in rendered
    assert "| range |" in table(data) and "ideal_speedup" in table(data)
