"""The history benchmark runs end to end on a small history, and hints stay correct on
its synthetic data (a method's speedup is the ratio the data was built with)."""

import json
from statistics import median

import pytest

from benchmarks import history as bench
from studio.history import HistoryStore, sqlite_url


def test_history_benchmark_writes_one_row_per_operation(tmp_path):
    out = tmp_path / "h.json"
    assert bench.main(["--rows", "400", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["operation"] for r in rows] == [
        "fill (bulk insert)", "page load with hints", "one hint", "one page + count", "filter by method + count",
        "text search, 2% of runs match",
        "text search, nothing matches", "CSV export", "startup repair"]
    assert all(r["rows"] == 400 and r["seconds"] >= 0 and r["database"] == "sqlite" for r in rows)
    table = bench.markdown_table([str(out)])
    assert "| page load with hints | <= 1000 ms |" in table and "rows/s" in table


def test_bulk_filled_history_gives_the_same_hints_as_recorded_runs(tmp_path):
    """The benchmark fills rows in bulk and rebuilds the summaries in SQL: the hints must
    equal the ratios computed directly from the rows."""
    store = HistoryStore(sqlite_url(tmp_path / "h.db"))
    try:
        bench.fill(store, 2000)
        rows = [row for row, _ in bench.synthetic_rows(2000)]
        base, tried = {}, {}
        for row in rows:
            if row["status"] != "ok":
                continue
            if not row["methods"]:
                base.setdefault(row["config_key"], []).append(row["total_seconds"])
            elif row["single_method"] == "speculative":
                tried.setdefault((row["config_key"], row["methods_key"]), []).append(row["total_seconds"])
        by_setting = {}
        for (key, setting), times in tried.items():
            if key in base:
                ratio = (sum(base[key]) / len(base[key])) / (sum(times) / len(times))
                by_setting.setdefault(setting, []).append(ratio)
        most = max(len(r) for r in by_setting.values())
        medians = [median(r) for r in by_setting.values() if len(r) == most]
        info = store.method_speedups(bench.MODEL, bench.DEVICE, method="speculative")["speculative"]
        assert info["pairs"] == most
        assert any(info["speedup"] == pytest.approx(m) for m in medians)
    finally:
        store.close()
