import json
import sqlite3

import pytest

from backends.types import MethodChoice, Request, Result, StudioError
from studio.history import HistoryStore, sqlite_url


@pytest.fixture
def store(tmp_path):
    s = HistoryStore(sqlite_url(tmp_path / "h.db"))
    yield s
    s.close()


def request(prompt="a red circle", methods=(), model="m1", modality="image", group=None):
    return Request(modality, model, prompt, "blurry", 7, {"steps": 4}, [MethodChoice(*m) for m in methods],
                   compare_group=group)


def result(seconds=1.0):
    return Result(output=None, timings={"denoise": seconds * 0.9, "total": seconds}, total_seconds=seconds,
                  peak_memory_bytes=1234, model_evals=8, method_stats={"deepcache": {"full_steps": 2}}, device="cpu")


def test_round_trip_keeps_every_field(store, tmp_path):
    run_id = store.record_run(request(methods=[("deepcache", {"interval": 3})], group="g1"), result(),
                              output_path=str(tmp_path / "x.png"), metrics={"psnr": 31.5})
    row = store.get(run_id)
    assert row.prompt == "a red circle" and row.negative_prompt == "blurry" and row.seed == 7
    assert row.params == {"steps": 4}
    assert row.methods == [{"name": "deepcache", "params": {"interval": 3}}]
    assert row.timings["total"] == 1.0 and row.total_seconds == 1.0 and row.peak_memory_bytes == 1234
    assert row.model_evals == 8 and row.metrics == {"psnr": 31.5} and row.compare_group == "g1"
    assert row.to_request().methods[0].params == {"interval": 3}


def test_sqlite_uses_wal(store, tmp_path):
    store.record_run(request(), result())
    mode = sqlite3.connect(tmp_path / "h.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_query_filters_and_paging(store):
    store.record_run(request("red circle", model="a"), result())
    store.record_run(request("blue square", model="b", methods=[("deepcache", {})]), result())
    store.record_run(request("green", model="a", modality="text"), None, status="failed", error="boom")
    assert [r.prompt for r in store.query()] == ["green", "blue square", "red circle"]  # newest first
    assert [r.prompt for r in store.query(model="a")] == ["green", "red circle"]
    assert [r.prompt for r in store.query(method="deepcache")] == ["blue square"]
    assert [r.prompt for r in store.query(status="failed")] == ["green"]
    assert [r.prompt for r in store.query(text="SQUARE")] == ["blue square"]
    assert [r.prompt for r in store.query(modality="text")] == ["green"]
    assert [r.prompt for r in store.query(limit=1, offset=1)] == ["blue square"]
    assert store.count(model="a") == 2


def test_failed_runs_are_recorded_with_reason(store):
    run_id = store.record_run(request(), None, status="failed", error="out of memory")
    row = store.get(run_id)
    assert row.status == "failed" and row.error == "out of memory" and row.total_seconds is None


def test_delete_removes_row_and_file(tmp_path):
    from studio.outputs import OutputStore

    outputs = OutputStore(tmp_path / "outputs")
    store = HistoryStore(sqlite_url(tmp_path / "h.db"), outputs=outputs)
    path = outputs.new_path("image")
    path.write_bytes(b"png")
    keep = store.record_run(request("keep"), result())
    gone = store.record_run(request("gone"), result(), output_path=outputs.relative(path))
    assert store.delete([gone]) == 1
    assert store.get(gone) is None and not path.exists()
    assert store.get(keep) is not None
    store.close()


def test_export_csv_has_all_rows(store):
    store.record_run(request("one"), result())
    store.record_run(request("two, with comma"), result())
    text = store.export_csv()
    assert text.splitlines()[0].startswith("id,created_at")
    assert "two, with comma" in text and len(text.strip().splitlines()) == 3


def test_trend_reports_speedup_against_baseline(store):
    store.record_run(request(), result(2.0))
    store.record_run(request(methods=[("deepcache", {})]), result(1.0))
    store.record_run(request(methods=[("deepcache", {})]), result(0.5))
    points = store.trend("m1", "deepcache")
    assert [round(p["speedup"], 2) for p in points] == [2.0, 4.0]


def test_corrupt_database_gives_clear_error(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StudioError, match="--db"):
        HistoryStore(sqlite_url(bad))


def test_json_fields_are_plain_json(store):
    run_id = store.record_run(request(), result())
    json.dumps(store.get(run_id).to_dict())
