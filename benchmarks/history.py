"""How the history behaves at scale: ``python -m benchmarks.history --rows N [--db URL] --json FILE``.

Fills a fresh database with N synthetic runs of one text model (prompts, seeds, the
baseline, single methods at two settings each, combinations, a few failures: the mix a
user who compares methods leaves behind), then times each user-facing operation once
warm, median of ``--repeats``. Writes one JSON row per operation:
``{"operation", "rows", "seconds"}`` (export also reports rows per second and the
peak memory growth while it ran).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import tempfile
import time
import tracemalloc
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import insert

MODEL = "tiny-code-llama"
DEVICE = "cpu"
METHODS = {  # the text methods and two settings each
    "speculative": [{"num_draft_tokens": 3}, {"num_draft_tokens": 5}],
    "prompt_lookup": [{"num_tokens": 10}, {"num_tokens": 5}],
    "lookahead": [{"window": 2}, {"window": 4}],
    "layer_skip": [{"exit_layer": 4}, {"exit_layer": 3}],
    "snapkv": [{"budget": 64}, {"budget": 128}],
    "sink_cache": [{"window": 64}, {"window": 128}],
    "static_cache": [{}, {"compile": False}],
}


def synthetic_rows(n: int, seed: int = 0):
    """N run rows as dicts ready for a bulk insert, with their run_methods rows."""
    from studio.history import config_key, methods_key

    rng = random.Random(seed)
    prompts = [f"def function_{i}(values):\n    " for i in range(50)]
    start = datetime(2026, 1, 1)
    names = list(METHODS)
    for i in range(n):
        prompt, run_seed = rng.choice(prompts), rng.randrange(10)
        params = {"max_new_tokens": 64, "temperature": 0.0}
        roll = rng.random()
        if roll < 0.3:
            methods = []
        elif roll < 0.8:
            name = rng.choice(names)
            methods = [{"name": name, "params": rng.choice(METHODS[name])}]
        else:
            picked = rng.sample(names, 2)
            methods = [{"name": name, "params": METHODS[name][0]} for name in picked]
        failed = rng.random() < 0.05
        seconds = None if failed else rng.uniform(0.5, 2.0) / (1 + 0.5 * len(methods))
        row = {
            "id": i + 1, "created_at": start + timedelta(seconds=30 * i), "modality": "text", "model": MODEL,
            "prompt": prompt, "negative_prompt": "", "seed": run_seed, "params": params, "methods": methods,
            "method_names": "," + ",".join(m["name"] for m in methods) + ("," if methods else ""),
            "status": "failed" if failed else "ok", "error": "the run failed: out of memory" if failed else None,
            "timings": {} if failed else {"total": seconds}, "total_seconds": seconds,
            "peak_memory_bytes": None if failed else 50_000_000, "model_evals": None if failed else 64,
            "method_stats": {}, "output_path": None if failed else f"outputs/2026-01-01/text-{i:08d}.txt",
            "metrics": {}, "compare_group": None, "parent_id": None, "device": None if failed else DEVICE,
            "worker": "local", "notes": [],
            "config_key": config_key(MODEL, prompt, "", run_seed, params, None if failed else DEVICE),
            "methods_key": methods_key(methods),
            "single_method": methods[0]["name"] if len(methods) == 1 else None,
        }
        yield row, [{"run_id": i + 1, "position": k, "name": m["name"]} for k, m in enumerate(methods)]


def fill(store, n: int, batch: int = 5000) -> None:
    from studio.history import Run, RunMethod, upgrade_schema

    runs, methods = [], []
    with store.engine.begin() as conn:
        for row, method_rows in synthetic_rows(n):
            runs.append(row)
            methods.extend(method_rows)
            if len(runs) >= batch:
                conn.execute(insert(Run), runs)
                conn.execute(insert(RunMethod), methods) if methods else None
                runs, methods = [], []
        if runs:
            conn.execute(insert(Run), runs)
            if methods:
                conn.execute(insert(RunMethod), methods)
    upgrade_schema(store.engine)  # the summaries that recording runs one by one would have kept
    if store.engine.dialect.name == "postgresql":  # explicit ids: move the sequence past them
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SELECT setval('runs_id_seq', (SELECT max(id) FROM runs))")
            conn.exec_driver_sql("ANALYZE")


def timed(fn, repeats: int) -> float:
    fn()  # warm: the first call pays for plans and caches a user's second click does not
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(url: str | None, rows: int, repeats: int = 3) -> list[dict]:
    from studio.history import HistoryStore, sqlite_url
    from studio.service import Studio, format_hint

    work = Path(tempfile.mkdtemp(prefix="fastgen-history-bench-"))
    url = url or sqlite_url(work / "history.db")
    store = HistoryStore(url)
    started = time.perf_counter()
    fill(store, rows)
    fill_seconds = time.perf_counter() - started
    page = 20

    def page_load():  # what the app computes when the page opens: the table, its count, the hints
        store.query(limit=page)
        store.count()
        for info in store.method_speedups(MODEL, DEVICE).values():
            format_hint(info, DEVICE)

    def one_hint():
        store.method_speedups(MODEL, DEVICE, method="speculative")

    def one_page():
        store.query(limit=page, offset=page * 100)
        store.count()

    def a_filter():
        store.query(limit=page, method="lookahead", status="ok")
        store.count(method="lookahead", status="ok")

    def search(words):  # as the History tab does it: a page, and the matches counted up to a cap
        from studio.ui.history import SEARCH_COUNT_CAP

        def run():
            store.query(limit=page, text=words)
            store.count(cap=SEARCH_COUNT_CAP, text=words)

        return run

    results = [
        {"operation": "fill (bulk insert)", "rows": rows, "seconds": fill_seconds},
        {"operation": "page load with hints", "rows": rows, "seconds": timed(page_load, repeats)},
        {"operation": "one hint", "rows": rows, "seconds": timed(one_hint, repeats)},
        {"operation": "one page + count", "rows": rows, "seconds": timed(one_page, repeats)},
        {"operation": "filter by method + count", "rows": rows, "seconds": timed(a_filter, repeats)},
        {"operation": "text search, 2% of runs match", "rows": rows, "seconds": timed(search("function_42"), repeats)},
        {"operation": "text search, nothing matches", "rows": rows,
         "seconds": timed(search("no such prompt"), repeats)},
    ]

    class Discard(io.TextIOBase):
        def write(self, s):
            return len(s)

    start = time.perf_counter()
    written = store.write_csv(Discard())
    export_seconds = time.perf_counter() - start
    tracemalloc.start()  # a second pass for memory: tracing slows Python several times
    store.write_csv(Discard())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    results.append({"operation": "CSV export", "rows": rows, "seconds": export_seconds,
                    "rows_per_second": written / export_seconds, "peak_python_memory_mb": peak / 2**20})
    store.close()

    data_dir = work / "data"  # every ok run's output file, as a real history has them
    for row, _ in synthetic_rows(rows):
        if row["output_path"]:
            path = data_dir / row["output_path"]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x", encoding="utf-8")
    studio = Studio(data_dir=data_dir, db_url=url)  # startup, the repair included
    start = time.perf_counter()
    studio.repair()
    results.append({"operation": "startup repair", "rows": rows, "seconds": time.perf_counter() - start})
    studio.close()
    return results


TARGETS = {  # issue #22's targets, in seconds (export: rows per second)
    "page load with hints": 1.0, "one hint": 0.1, "one page + count": 0.1, "filter by method + count": 0.1,
    "text search, 2% of runs match": 0.1, "text search, nothing matches": 0.1, "startup repair": 5.0,
}


def markdown_table(paths: list[str]) -> str:
    """The README table from one or more result files (one column per database)."""
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    names = [rows[0]["database"] for rows in runs]
    lines = [f"| operation ({runs[0][0]['rows']:,} runs) | target | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for i, row in enumerate(runs[0]):
        op = row["operation"]
        if op == "CSV export":
            target = ">= 20,000 rows/s, flat memory"
            cells = [f"{r[i]['rows_per_second']:,.0f} rows/s, peak {r[i]['peak_python_memory_mb']:.1f} MiB"
                     for r in runs]
        else:
            target = f"<= {TARGETS[op] * 1000:g} ms" if op in TARGETS else "-"
            cells = [f"{r[i]['seconds'] * 1000:,.1f} ms" for r in runs]
        lines.append(f"| {op} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv[:1] == ["--table"]:
        print(markdown_table(argv[1:]))
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.history", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--db", metavar="URL", help="an EMPTY database to fill (default: a new SQLite file)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="write the rows here")
    args = parser.parse_args(argv)
    results = measure(args.db, args.rows, args.repeats)
    backend = (args.db or "sqlite").split(":")[0].split("+")[0]
    for row in results:
        row["database"] = backend
        extra = f"  ({row['rows_per_second']:,.0f} rows/s, peak {row['peak_python_memory_mb']:.1f} MiB)" \
            if "rows_per_second" in row else ""
        print(f"{backend:10} {row['operation']:28} {row['rows']:>8,} rows  {row['seconds'] * 1000:9.1f} ms{extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
