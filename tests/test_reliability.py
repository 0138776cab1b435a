"""Whatever users send, the studio keeps working and keeps every result."""

import json
import random
import threading

import psutil
import pytest
from gradio_client import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.types import MethodChoice, Request, StudioError, ValidationError
from studio.presets import parse_preset
from conftest import ServedApp
from studio.validation import validate_request

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "modality": st.sampled_from(["image", "text", "video", "audio", "smell"]) | json_values,
        "model": st.text(max_size=30) | json_values,
        "prompt": st.text(max_size=50) | json_values,
        "negative_prompt": st.text(max_size=10) | json_values,
        "seed": st.integers(-5, 2**40) | json_values,
        "params": st.dictionaries(st.sampled_from(["steps", "width", "height", "guidance", "max_new_tokens",
                                                   "temperature", "frames", "seconds", "other"]),
                                  json_values, max_size=4) | json_values,
        "methods": st.lists(st.sampled_from(["deepcache", "sampler", "nope"]) | json_values, max_size=3),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_like)
def test_validator_accepts_or_explains_never_crashes(data):
    try:
        request = validate_request(data)
    except ValidationError as exc:
        assert str(exc)
        return
    assert request.prompt.strip() and request.model
    assert 0 <= request.seed < 2**32


@settings(max_examples=300, deadline=None)
@given(json_values | st.text(max_size=200) | st.fixed_dictionaries({"name": st.text(max_size=10),
                                                                     "modality": st.sampled_from(["image", "text"]),
                                                                     "methods": json_values}))
def test_preset_parser_accepts_or_explains_never_crashes(data):
    try:
        preset = parse_preset(data if isinstance(data, str) else json.dumps(data))
    except ValidationError as exc:
        assert str(exc)
        return
    assert preset.name.strip() and preset.modality in ("image", "text", "video", "audio")


def test_presets_are_data_only():
    payload = json.dumps({"name": "x", "modality": "image",
                          "params": {"steps": "__import__('os').system('touch /tmp/pwned')"}})
    preset = parse_preset(payload)  # a string stays a string: nothing is evaluated
    assert preset.params["steps"].startswith("__import__")
    with pytest.raises(ValidationError):
        validate_request({"modality": "image", "model": "m", "prompt": "p", "params": preset.params})


@pytest.mark.slow
def test_eight_clients_at_once_all_get_results_and_rows_exactly_once(tmp_path):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path), "--concurrency", "4"])
    url, studio = served.url, served.studio
    replies, errors = {}, []

    def client_job(i):
        try:
            client = Client(url, verbose=False)
            for j in range(2):
                model = "dummy-sd" if (i + j) % 2 else "dummy-flux"
                request = {"modality": "image", "model": model, "prompt": f"client {i} request {j}", "seed": i,
                           "params": {"steps": 2}}
                replies[(i, j)] = json.loads(client.predict(json.dumps(request), api_name="/run"))
        except Exception as exc:  # collected, asserted below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client_job, args=(i,)) for i in range(8)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert errors == [] and len(replies) == 16
        rows = studio.history.query(limit=100)
        assert len(rows) == 16 and len({r.prompt for r in rows}) == 16
        assert {r.id for r in rows} == {reply["run_id"] for reply in replies.values()}
    finally:
        served.close()


@pytest.mark.slow
def test_soak_mixed_requests_with_injected_failures(studio_factory, monkeypatch):
    """A few hundred mixed requests: valid ones, invalid ones, and injected out-of-memory
    failures. Every run that started has exactly one row; memory stays bounded."""
    studio = studio_factory()
    rng = random.Random(0)
    backend = studio.manager.get("image", "dummy-sd")
    original = backend.generate
    injected = {"count": 0}

    def sometimes_out_of_memory(*args, **kwargs):
        if rng.random() < 0.1:
            injected["count"] += 1
            raise MemoryError("injected")
        return original(*args, **kwargs)

    monkeypatch.setattr(backend, "generate", sometimes_out_of_memory)
    started = ok = refused = 0
    rss = []
    for i in range(240):
        kind = rng.random()
        methods = rng.choice([[], [MethodChoice("deepcache", {"interval": 2})], [MethodChoice("cfg_truncation")]])
        request = Request("image", rng.choice(["dummy-sd", "dummy-flux"]), f"soak {i}", seed=i,
                          params={"steps": 2}, methods=methods if kind > 0.3 else [])
        if kind < 0.1:
            request = request.replace(prompt="")  # invalid: refused, not a run
        try:
            studio.generate(request)
            ok += 1
            started += 1
        except ValidationError:
            refused += 1  # an empty prompt, or deepcache on the DiT: refused, not a run, no row
        except StudioError:
            started += 1
        if i % 40 == 39:
            rss.append(psutil.Process().memory_info().rss)
    print(f"soak: {i + 1} requests, {ok} ok, {started - ok} failed runs ({injected['count']} injected out-of-memory), "
          f"{refused} refused by validation, rows {studio.history.count()} for {started} runs")
    assert injected["count"] > 5 and refused > 10 and ok > 100
    assert studio.history.count() == started
    assert studio.history.count(status="oom") == injected["count"]  # out of memory is its own status
    assert studio.history.count(status="failed") + injected["count"] == started - ok
    assert max(rss[1:]) - rss[1] < 150 * 2**20, [r // 2**20 for r in rss]


@pytest.mark.slow
def test_kill_9_three_times_under_load_loses_no_acknowledged_run_and_never_serves_the_database(tmp_path):
    """The real app as a subprocess, three clients making runs, SIGKILL and restart three
    times, while a fourth client keeps asking for the database and its WAL: every run a
    client was told about is a row with its file, and the database stays sound."""
    import os
    import signal
    import sqlite3
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx

    from conftest import free_port

    root = Path(__file__).resolve().parent.parent
    data_dir = (tmp_path / "data").resolve()
    db = data_dir / "history.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "app.log", "ab")

    def start():
        process = subprocess.Popen([sys.executable, "app.py", "--dummy-models", "--data-dir", str(data_dir),
                                    "--port", str(port), "--device", "cpu"], cwd=root, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "app.log").read_text()[-2000:]
            try:
                if httpx.get(url + "config", timeout=2).status_code == 200:
                    return process
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("the app did not start")

    acknowledged: list[dict] = []
    db_replies: list[tuple[str, int, bool]] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_job(worker):
        client, n = None, 0
        while not stop.is_set():
            try:
                client = client or Client(url, verbose=False)
                prompt = f"client {worker} run {n}"
                reply = json.loads(client.submit(json.dumps({"modality": "image", "model": "dummy-sd",
                                                             "prompt": prompt, "seed": n, "params": {"steps": 1}}),
                                                 api_name="/run").result(timeout=60))
                with lock:
                    acknowledged.append({"prompt": prompt, **reply})
                n += 1
            except Exception:  # the server is down (killed): reconnect when it is back
                if client is not None:
                    client.close()  # stops its heartbeat thread
                client = None
                time.sleep(1.0)

    def db_thief():
        while not stop.is_set():
            for target in (db, db.with_name("history.db-wal"), db.with_name("history.db-shm")):
                try:
                    reply = httpx.get(f"{url}gradio_api/file={target}", timeout=5)
                    db_replies.append((target.name, reply.status_code, b"SQLite format" in reply.content))
                except httpx.HTTPError:
                    pass
            time.sleep(0.25)

    process = start()
    threads = [threading.Thread(target=client_job, args=(i,), daemon=True) for i in range(3)]
    threads.append(threading.Thread(target=db_thief, daemon=True))
    for t in threads:
        t.start()
    kills = 0
    try:
        for cycle in range(4):
            seen = len(acknowledged)
            deadline = time.monotonic() + 60
            while len(acknowledged) < seen + 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            if cycle == 3:
                break
            process.send_signal(signal.SIGKILL)  # mid-request: the clients are always busy
            process.wait(timeout=30)
            kills += 1
            process = start()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=70)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        log.close()

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {r[0]: r[1:] for r in conn.execute("SELECT id, prompt, status, output_path FROM runs")}
    lost = [a for a in acknowledged if rows.get(a["run_id"], (None, None, None))[:2] != (a["prompt"], "ok")]
    files_lost = [a for a in acknowledged if a not in lost and not (data_dir / rows[a["run_id"]][2]).is_file()]
    print(f"durability: {len(acknowledged)} runs acknowledged over {kills} SIGKILLs, {len(rows)} rows, "
          f"{len(lost)} acknowledged runs lost, {len(files_lost)} output files lost, "
          f"{len(db_replies)} database downloads tried, {sum(1 for r in db_replies if r[1] == 200)} served")
    assert kills == 3 and len(acknowledged) >= 12
    assert lost == [] and files_lost == []
    assert db_replies and all(status in (403, 404) and not leaked for _, status, leaked in db_replies)
