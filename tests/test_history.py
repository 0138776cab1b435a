import csv
import io
import json
import sqlite3

import pytest

from backends.types import MethodChoice, Request, Result, StudioError
from conftest import DB_KINDS
from studio.history import HistoryStore, sqlite_url


@pytest.fixture(params=DB_KINDS)
def db_kind(request):
    return request.param


@pytest.fixture
def store(tmp_path, db_url):
    s = HistoryStore(db_url or sqlite_url(tmp_path / "h.db"))
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


def test_sqlite_uses_wal(store, tmp_path, db_kind):
    if db_kind != "sqlite":
        pytest.skip("SQLite only")
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


def timed_result(seconds, device="cpu"):
    return Result(output=None, timings={"total": seconds}, total_seconds=seconds, device=device)


def test_speedups_pair_only_comparable_runs(store):
    """Item 14 of the trust issue: a method is measured against the baseline of the same
    prompt, seed, params and device, alone, one setting at a time."""
    store.record_run(request("slow prompt"), timed_result(2.0))
    store.record_run(request("fast prompt"), timed_result(0.5))
    store.record_run(request("fast prompt", methods=[("deepcache", {"interval": 3})]), timed_result(0.25))
    store.record_run(request("slow prompt", methods=[("deepcache", {"interval": 3}), ("tome", {})]),
                     timed_result(0.1))  # a combination: credits neither method
    store.record_run(request("no baseline", methods=[("tome", {"ratio": 0.5})]), timed_result(0.1))
    store.record_run(request("fast prompt", methods=[("deepcache", {"interval": 3})]), timed_result(0.05, "cuda"))
    store.record_run(request("fast prompt", methods=[("deepcache", {"interval": 3})]), None, status="failed")
    speedups = store.method_speedups("m1", "cpu")
    assert speedups["deepcache"]["speedup"] == pytest.approx(2.0) and speedups["deepcache"]["pairs"] == 1
    assert speedups["deepcache"]["params"] == {"interval": 3}
    assert speedups["tome"] == {"speedup": None, "pairs": 0}  # ran, but never comparably
    assert store.method_speedups("m1", "cpu", method="tome") == {"tome": {"speedup": None, "pairs": 0}}
    assert set(store.method_speedups("m1", "cpu", method="deepcache")) == {"deepcache"}


def test_speedups_keep_settings_apart(store):
    for prompt in ("a", "b", "c"):
        store.record_run(request(prompt), timed_result(1.0))
    for prompt in ("a", "b"):  # interval 2: twice as fast, measured on two prompts
        store.record_run(request(prompt, methods=[("deepcache", {"interval": 2})]), timed_result(0.5))
    store.record_run(request("c", methods=[("deepcache", {"interval": 5})]), timed_result(0.2))
    info = store.method_speedups("m1", "cpu")["deepcache"]
    assert info["pairs"] == 2 and info["speedup"] == pytest.approx(2.0) and info["params"] == {"interval": 2}


def test_method_filter_uses_run_methods_and_delete_clears_them(store):
    keep = store.record_run(request("x", methods=[("tome", {}), ("deepcache", {})]), result())
    store.record_run(request("y", methods=[("deepcachex", {})]), result())
    assert [r.id for r in store.query(method="deepcache")] == [keep]
    store.delete([keep], delete_files=False)
    assert store.query(method="deepcache") == [] and store.count(method="tome") == 0


def test_export_streams_with_progress_and_neutralises_formulas(store):
    for i in range(5):
        store.record_run(request(f"=HYPERLINK(\"x\",{i})" if i == 2 else f"prompt {i}"), result())
    store.record_run(Request("text", "@model", "\tprompt", "", 1, {}, []), None, status="failed", error="-1+2")
    seen = []
    out = io.StringIO()
    assert store.write_csv(out, progress=lambda done, total: seen.append((done, total)), batch=2) == 6
    assert seen[-1] == (6, 6) and len(seen) == 3
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert rows[0]["model"] == "'@model" and rows[0]["prompt"] == "'\tprompt" and rows[0]["error"] == "'-1+2"
    assert rows[3]["prompt"].startswith("'=HYPERLINK") and rows[5]["prompt"] == "prompt 0"
    assert json.loads(rows[5]["params"]) == {"steps": 4} and "config_key" not in rows[0]


def test_old_database_is_upgraded_in_place(tmp_path):
    """A history written before the comparison keys: columns added, old rows keyed, the
    method filter and hints work on them."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE runs (id INTEGER PRIMARY KEY, created_at DATETIME, modality VARCHAR(16), model VARCHAR(512),
          prompt TEXT, negative_prompt TEXT, seed INTEGER, params JSON, methods JSON, method_names VARCHAR(512),
          status VARCHAR(16), error TEXT, timings JSON, total_seconds FLOAT, peak_memory_bytes INTEGER,
          model_evals INTEGER, method_stats JSON, output_path VARCHAR(1024), metrics JSON,
          compare_group VARCHAR(64), parent_id INTEGER, device VARCHAR(64), worker VARCHAR(128), notes JSON);
        INSERT INTO runs (id, created_at, modality, model, prompt, negative_prompt, seed, params, methods,
          method_names, status, total_seconds, device) VALUES
          (1, '2026-01-01 00:00:00', 'image', 'm1', 'p', '', 3, '{"steps": 4}', '[]', '', 'ok', 2.0, 'cpu'),
          (2, '2026-01-01 00:01:00', 'image', 'm1', 'p', '', 3, '{"steps": 4}',
           '[{"name": "deepcache", "params": {"interval": 3}}]', ',deepcache,', 'ok', 1.0, 'cpu');
    """)
    conn.commit()
    conn.close()
    store = HistoryStore(sqlite_url(path))
    try:
        assert [r.id for r in store.query(method="deepcache")] == [2]
        assert store.method_speedups("m1", "cpu")["deepcache"]["speedup"] == pytest.approx(2.0)
        new = store.record_run(request("p", methods=[("deepcache", {"interval": 3})]), timed_result(0.5))
        assert store.get(new).id == 3
    finally:
        store.close()
    HistoryStore(sqlite_url(path)).close()  # a second start is a no-op


def test_trend_ignores_other_prompts_and_combinations(store):
    store.record_run(request("a"), timed_result(4.0))
    store.record_run(request("b"), timed_result(1.0))
    store.record_run(request("b", methods=[("deepcache", {})]), timed_result(0.5))
    store.record_run(request("a", methods=[("deepcache", {}), ("tome", {})]), timed_result(0.5))
    assert [round(p["speedup"], 2) for p in store.trend("m1", "deepcache")] == [2.0]


def test_large_seeds_and_memory_fit(store):
    run_id = store.record_run(Request("image", "m1", "p", "", 2**32 - 1, {}, []),
                              Result(output=None, total_seconds=1.0, peak_memory_bytes=40 * 2**30))
    row = store.get(run_id)
    assert row.seed == 2**32 - 1 and row.peak_memory_bytes == 40 * 2**30


def test_summary_follows_deletes_and_concurrent_writers(store):
    base = store.record_run(request("p"), timed_result(1.0))
    store.record_run(request("p", methods=[("deepcache", {})]), timed_result(0.5))
    assert store.method_speedups("m1", "cpu")["deepcache"]["pairs"] == 1
    store.delete([base], delete_files=False)
    assert store.method_speedups("m1", "cpu")["deepcache"]["pairs"] == 0
    errors = []

    def write():
        try:
            for _ in range(5):
                store.record_run(request("q"), timed_result(2.0))
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    import threading

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.record_run(request("q", methods=[("deepcache", {})]), timed_result(1.0))
    assert not errors and store.count(text="q") == 21
    assert store.method_speedups("m1", "cpu")["deepcache"]["speedup"] == pytest.approx(2.0)


def test_text_search_treats_wildcards_literally(store):
    store.record_run(request("100% red"), result())
    store.record_run(request("1000 red"), result())
    store.record_run(request("a_b"), result())
    store.record_run(request("axb"), result())
    assert [r.prompt for r in store.query(text="0% R")] == ["100% red"]
    assert [r.prompt for r in store.query(text="a_b")] == ["a_b"]


def test_capped_count_stops_after_the_cap(store):
    for i in range(5):
        store.record_run(request(f"red {i}"), result())
    assert store.count(text="red") == 5 and store.count(cap=10, text="red") == 5
    assert store.count(cap=3, text="red") == 4  # above the cap: "more than 3"


def test_hint_settings_come_from_the_summary_not_a_reused_run_id(store):
    """Review finding: SQLite reuses the id of a deleted newest row; a hint must still name
    its own method's settings."""
    store.record_run(request("p"), timed_result(1.0))
    store.record_run(request("p", methods=[("deepcache", {"interval": 3})]), timed_result(0.5))
    newest = store.record_run(request("p", methods=[("deepcache", {"interval": 3})]), timed_result(0.5))
    store.delete([newest], delete_files=False)
    store.record_run(request("p", methods=[("tome", {"ratio": 0.25})]), timed_result(0.9))
    assert store.method_speedups("m1", "cpu")["deepcache"]["params"] == {"interval": 3}


def test_two_deletes_of_one_run_at_once_subtract_it_once(store):
    import threading

    base = store.record_run(request("p"), timed_result(1.0))
    store.record_run(request("p"), timed_result(1.0))
    store.record_run(request("p", methods=[("deepcache", {})]), timed_result(0.5))
    barrier = threading.Barrier(4)

    def delete():
        barrier.wait()
        store.delete([base], delete_files=False)

    threads = [threading.Thread(target=delete) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    info = store.method_speedups("m1", "cpu")["deepcache"]
    assert info["pairs"] == 1 and info["speedup"] == pytest.approx(2.0)  # one baseline left, counted once


def test_rows_an_older_version_writes_after_the_upgrade_are_counted(tmp_path):
    path = tmp_path / "h.db"
    store = HistoryStore(sqlite_url(path))
    store.record_run(request("p"), timed_result(2.0))
    store.close()
    conn = sqlite3.connect(path)  # an older studio, started on this file, writes rows without keys
    conn.execute("""INSERT INTO runs (created_at, modality, model, prompt, negative_prompt, seed, params, methods,
                    method_names, status, total_seconds, device, timings, method_stats, metrics, notes) VALUES
                    ('2026-01-02 00:00:00', 'image', 'm1', 'p', 'blurry', 7, '{"steps": 4}',
                    '[{"name": "deepcache", "params": {}}]', ',deepcache,', 'ok', 1.0, 'cpu', '{}', '{}', '{}', '[]')""")
    conn.commit()
    conn.close()
    store = HistoryStore(sqlite_url(path))
    try:
        assert store.method_speedups("m1", "cpu")["deepcache"]["speedup"] == pytest.approx(2.0)
    finally:
        store.close()
