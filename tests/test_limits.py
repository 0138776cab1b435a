"""Cost limit, cancel, time limit and out-of-memory (issue 15, item 4): a request over the
cost limit is refused before anything runs; a run can be stopped from another thread, by
its time limit, or by its client going away, and is recorded as such; an allocation
failure is recorded as ``oom`` with one line and memory handed back."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from backends.types import MethodChoice, OutOfMemoryError, Request, StudioError, ValidationError


def image_request(steps=3, **params):
    return Request("image", "dummy-sd", "a red circle", seed=5, params={"steps": steps, **params})


class RecordingExecutor:
    """Stands in for the executor: records whether a request reached it."""

    def __init__(self):
        self.ran = []

    def run(self, request, progress=None, cancel=None):
        self.ran.append(request)
        raise StudioError("the recording executor runs nothing")


# -- cost limit ------------------------------------------------------------------------
@pytest.mark.parametrize("modality,params", [
    ("image", {"width": 2048, "height": 2048, "steps": 150}),
    ("video", {"width": 1280, "height": 1280, "frames": 257, "steps": 150}),
])
def test_request_over_the_cost_limit_is_refused_before_running_and_not_recorded(studio_factory, modality, params):
    executor = RecordingExecutor()
    studio = studio_factory(executor=executor)
    request = Request(modality, "dummy-sd" if modality == "image" else "dummy-wan", "a red circle", params=params)
    with pytest.raises(ValidationError) as refused:
        studio.generate(request)
    message = str(refused.value)
    assert "--max-cost" in message and "500" in message and "\n" not in message
    assert executor.ran == [] and studio.history.count() == 0


def test_default_requests_and_bundled_sizes_are_within_the_default_limit():
    from backends.catalog import BUNDLED
    from studio.limits import DEFAULT_MAX_COST, estimate_cost

    defaults = {"image": {"steps": 25}, "video": {"steps": 25}, "audio": {"steps": 25}, "text": {}}
    for model in BUNDLED:
        assert estimate_cost(Request(model.modality, model.name, "x" * 4000, params=defaults[model.modality])) \
            < DEFAULT_MAX_COST
    for params in ({"width": 1024, "height": 1024, "steps": 100}, {}):  # the UI's largest image; a hub default
        assert estimate_cost(Request("image", "owner/model", "x", params=params)) < DEFAULT_MAX_COST
    assert estimate_cost(Request("text", "owner/model", "x" * 4000, params={"max_new_tokens": 2048})) < DEFAULT_MAX_COST


def test_text_cost_counts_the_system_prompt():
    from studio.limits import estimate_cost

    plain = estimate_cost(Request("text", "owner/model", "x" * 300, params={"max_new_tokens": 100}))
    with_system = estimate_cost(Request("text", "owner/model", "x" * 300,
                                        params={"max_new_tokens": 100, "system_prompt": "y" * 3000}))
    assert with_system == pytest.approx(plain + 10)  # 3,000 characters at 3 a token: 1,000 tokens


def test_cost_limit_is_a_flag(studio_factory):
    import app as app_module

    args = app_module.parse_args(["--max-cost", "0.001", "--time-limit", "30"])
    assert (args.max_cost, args.time_limit) == (0.001, 30)
    studio = studio_factory(max_cost=args.max_cost)
    with pytest.raises(ValidationError, match="--max-cost"):
        studio.generate(image_request())
    assert studio.history.count() == 0


# -- cancel ------------------------------------------------------------------------------
def test_cancel_from_another_thread_stops_the_run_and_the_next_run_is_normal(studio_factory):
    from backends.control import CancelToken, RunCancelled

    studio = studio_factory()
    first = studio.generate(image_request(steps=4)).result
    token = CancelToken()
    first_step, cancelled = threading.Event(), threading.Event()
    steps_seen = []

    def progress(done, total, stage):
        steps_seen.append(done)
        first_step.set()
        cancelled.wait(30)  # the run goes on only once the other thread has cancelled: no race

    def cancel_from_another_thread():
        first_step.wait(30)
        token.cancel("test")
        cancelled.set()

    canceller = threading.Thread(target=cancel_from_another_thread)
    canceller.start()
    with pytest.raises(RunCancelled) as stopped:
        studio.generate(image_request(steps=40), progress=progress, cancel=token)
    canceller.join()
    assert "\n" not in str(stopped.value) and len(steps_seen) == 1  # stopped at the very next evaluation
    row = studio.history.query(limit=1)[0]
    assert row.status == "cancelled" and row.output_path is None
    after = studio.generate(image_request(steps=4))
    assert after.result.model_evals == first.model_evals == 4  # batched CFG: one call a step
    assert np.array_equal(np.asarray(first.output), np.asarray(after.result.output))


@pytest.mark.parametrize("modality,model,params", [
    ("text", "dummy-llama", {"max_new_tokens": 40}),
    ("audio", "dummy-musicgen", {"seconds": 1.0}),
])
def test_cancel_reaches_every_decoding_loop(studio_factory, modality, model, params):
    """Text streaming and the codec LM check the token on each token: a cancel after the
    first token stops the run there."""
    from backends.control import CancelToken, RunCancelled

    studio = studio_factory()
    token = CancelToken()
    seen = []

    def progress(done, total, stage):
        seen.append(done)
        token.cancel("test")

    with pytest.raises(RunCancelled):
        studio.generate(Request(modality, model, "def add(a, b):", params=params), progress=progress, cancel=token)
    assert len(seen) == 1 and studio.history.query(limit=1)[0].status == "cancelled"


@pytest.mark.parametrize("method", [
    ("speculative", {"num_assistant_tokens": 3}),
    ("prompt_lookup", {}),
    ("lookahead", {}),
    ("static_cache", {}),
])
def test_cancel_stops_every_text_decoding_path(method):
    """The speculative, prompt-lookup and lookahead loops and the static cache stop at the first
    token after a cancel; the model's next plain run is the same as before."""
    from backends.control import CancelToken, RunCancelled
    from backends.text import TextBackend
    from backends.tiny.dummy import dummy_llama

    model, tokenizer = dummy_llama()
    backend = TextBackend.from_model(model, tokenizer, model_id="dummy-llama",
                                     drafts={"tiny-code-draft": (model, tokenizer)})
    plain = Request("text", "dummy-llama", "def add(a, b):\n    return a + b\n\ndef add(", params={"max_new_tokens": 24})
    before = backend.run(plain).output
    token, seen = CancelToken(), []

    def progress(done, total, text):
        seen.append(done)
        token.cancel("test")

    request = plain.replace(methods=[MethodChoice(method[0], dict(method[1]))])
    with pytest.raises(RunCancelled):
        backend.run(request, progress, cancel=token)
    assert len(seen) == 1
    assert backend.run(plain).output == before


def test_time_limit_applies_without_a_progress_callback(studio_factory):
    """The API's /run passes no progress callback: the check before every model
    evaluation still stops the run."""
    from backends.control import RunTimedOut

    studio = studio_factory(time_limit_s=0.001)
    unet = studio.manager.get("image", "dummy-sd").pipe.unet
    pause, calls = threading.Event(), []

    def slow_down(*_args) -> None:
        calls.append(1)
        pause.wait(0.01)

    handle = unet.register_forward_pre_hook(slow_down)
    try:
        with pytest.raises(RunTimedOut):
            studio.generate(image_request(steps=30))
    finally:
        handle.remove()
    assert len(calls) < 30 and studio.history.query(limit=1)[0].status == "timeout"


def test_compare_cancel_stops_the_run_in_progress(studio_factory):
    """One token for a whole comparison: set during the baseline, it stops that run at its
    next step (recorded cancelled) and no configuration after it runs."""
    from backends.control import CancelToken
    from studio.compare import parse_configs, run_compare

    studio = studio_factory()
    unet = studio.manager.get("image", "dummy-sd").pipe.unet
    token, calls = CancelToken(), []

    def cancel_in_the_kept_run(*_args) -> None:
        calls.append(1)
        if len(calls) == 12 + 2:  # the warm-up's 12 calls, then 2 of the kept baseline run
            token.cancel("test")

    handle = unet.register_forward_pre_hook(cancel_in_the_kept_run)
    try:
        report = run_compare(studio, image_request(steps=12), parse_configs("deepcache(interval=2)"),
                             warmup=True, cancel=token)
    finally:
        handle.remove()
    assert [row.error for row in report.rows] == ["cancelled"]
    assert len(calls) < 12 + 12  # the kept baseline run stopped at its next step
    assert [row.status for row in studio.history.query()] == ["cancelled"]


def test_closing_the_handler_stream_cancels_the_run(studio_factory):
    """What Gradio does when a client cancels its job or disconnects: it closes the
    handler's generator. The run stops and is recorded as cancelled."""
    from studio.ui.runs import Progress, SessionRuns, run_with_token

    studio = studio_factory()
    runs = SessionRuns()
    stream = run_with_token(runs, None, lambda token, progress: studio.generate(
        image_request(steps=60), progress=progress, cancel=token))
    for item in stream:
        if isinstance(item, Progress):
            break
    stream.close()  # GeneratorExit, as on a cancel or a lost connection
    for _ in range(600):  # the worker thread records the row when it reaches its next step
        rows = studio.history.query(limit=1)
        if rows:
            break
        threading.Event().wait(0.05)
    assert rows and rows[0].status == "cancelled"


def test_a_session_cancels_only_its_own_runs():
    from studio.ui.runs import SessionRuns

    runs = SessionRuns()
    mine, theirs = runs.start("me"), runs.start("you")
    assert runs.cancel("me") == 1
    assert mine.is_set() and not theirs.is_set()


# -- time limit --------------------------------------------------------------------------
def test_run_over_the_time_limit_is_stopped_and_recorded_as_timeout(studio_factory):
    from backends.control import RunTimedOut

    studio = studio_factory(time_limit_s=0.001)
    gate = threading.Event()
    with pytest.raises(RunTimedOut) as stopped:
        studio.generate(image_request(steps=30), progress=lambda *a: gate.wait(0.01))
    assert "--time-limit" in str(stopped.value) and "\n" not in str(stopped.value)
    row = studio.history.query(limit=1)[0]
    assert row.status == "timeout" and "time limit" in row.error


# -- out of memory -------------------------------------------------------------------------
def test_allocation_failure_is_recorded_as_oom_and_memory_is_freed(studio_factory, monkeypatch):
    studio = studio_factory()
    backend = studio.manager.get("image", "dummy-sd")
    original = backend.generate

    def allocate_too_much(*args, **kwargs):
        torch.empty(2**45, dtype=torch.float32)  # 128 TiB: the CPU allocator refuses
        return original(*args, **kwargs)

    freed = []
    real_free = studio.manager.free_caches
    monkeypatch.setattr(studio.manager, "free_caches", lambda: (freed.append(True), real_free()))
    monkeypatch.setattr(backend, "generate", allocate_too_much)
    with pytest.raises(OutOfMemoryError) as failed:
        studio.generate(image_request())
    message = str(failed.value)
    assert message.startswith("out of memory") and "\n" not in message and "alloc_cpu" not in message
    row = studio.history.query(limit=1)[0]
    assert row.status == "oom" and row.error == message
    assert freed
    monkeypatch.setattr(backend, "generate", original)
    assert studio.generate(image_request()).result.output is not None


def test_other_runtime_errors_are_not_called_oom(studio_factory, monkeypatch):
    studio = studio_factory()
    backend = studio.manager.get("image", "dummy-sd")
    monkeypatch.setattr(backend, "generate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(StudioError, match="the run failed"):
        studio.generate(image_request())
    assert studio.history.query(limit=1)[0].status == "failed"


# -- through the served app ------------------------------------------------------------------
def _generate_image_args(steps):
    """Named arguments of /generate_image: everything else keeps its default."""
    return {"model": "dummy-sd", "prompt": "a red circle at top left on white", "steps": steps}


@pytest.fixture
def slow_served(tmp_path):
    """The served app with dummy-sd slowed to ~20 steps a second, so a run is still going
    when the client cancels it."""
    from conftest import ServedApp

    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path), "--device", "cpu"])
    unet = served.studio.manager.get("image", "dummy-sd").pipe.unet
    calls = []
    pause = threading.Event()

    def slow_down(*_args) -> None:
        calls.append(1)
        pause.wait(0.05)

    handle = unet.register_forward_pre_hook(slow_down)
    yield served, calls
    handle.remove()
    served.close()


def _wait_for_row(studio, status, attempts=600):
    for _ in range(attempts):
        rows = studio.history.query(limit=1)
        if rows and rows[0].status == status:
            return rows[0]
        threading.Event().wait(0.05)
    return studio.history.query(limit=1)[0] if studio.history.count() else None


@pytest.mark.parametrize("how", ["job.cancel", "cancel endpoint"])
def test_a_cancelled_api_job_stops_its_run(slow_served, how):
    from gradio_client import Client

    served, calls = slow_served
    client = Client(served.url, verbose=False)
    job = client.submit(**_generate_image_args(90), api_name="/generate_image")
    for _ in range(600):  # until the run is inside the denoising loop
        if calls:
            break
        threading.Event().wait(0.05)
    assert calls, "the run never started"
    if how == "job.cancel":
        job.cancel()
    else:
        client.predict(api_name="/cancel_image")  # the tab's Cancel button, same session
    row = _wait_for_row(served.studio, "cancelled")
    assert row is not None and row.status == "cancelled", row and (row.status, row.error)
    assert len(calls) < 90


def test_a_client_that_disconnects_stops_its_run(slow_served):
    """A browser tab closed mid-run: the event stream drops, Gradio closes the handler, the
    run stops at its next step and is recorded as cancelled."""
    import httpx
    from gradio_client import Client

    served, calls = slow_served
    client = Client(served.url, verbose=False)
    named = _generate_image_args(90)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    parameters = endpoints["/generate_image"]["parameters"]
    args = [named.get(p["parameter_name"], p["parameter_default"]) for p in parameters]  # the raw queue takes a list
    config = httpx.get(served.url + "config").json()
    fn_index = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "generate_image")
    session = "disconnecting-client"
    joined = httpx.post(served.url + "gradio_api/queue/join", json={
        "data": args, "fn_index": fn_index, "session_hash": session, "event_data": None, "trigger_id": None})
    assert joined.status_code == 200, joined.text
    with httpx.stream("GET", served.url + "gradio_api/queue/data", params={"session_hash": session},
                      timeout=30) as stream:
        for line in stream.iter_lines():
            if calls:
                break  # the run is inside the denoising loop: drop the connection
    row = _wait_for_row(served.studio, "cancelled")
    assert row is not None and row.status == "cancelled", row and (row.status, row.error)
    assert len(calls) < 90


def test_a_ray_worker_enforces_the_time_limit_itself():
    """A running task of a synchronous Ray actor cannot be cancelled from the driver, so the
    worker gets the limit and stops its own run (checked here without starting Ray)."""
    from backends.control import RunTimedOut
    from backends.executor import StudioWorker

    worker = StudioWorker("w", device="cpu", dummy_models=True)
    unet = worker.manager.get("image", "dummy-sd").pipe.unet
    pause, calls = threading.Event(), []

    def slow_down(*_args) -> None:
        calls.append(1)
        pause.wait(0.01)

    unet.register_forward_pre_hook(slow_down)
    with pytest.raises(RunTimedOut):
        worker.run(image_request(steps=30), 0.001)
    assert len(calls) < 30


def test_a_hub_id_that_starts_like_a_bundled_name_is_costed_as_a_hub_model():
    """Review finding: "tiny-" and "dummy-" prefixes alone no longer buy the bundled size."""
    from studio.limits import check_cost

    big = Request("video", "tiny-lab/wan-14b", "a fox", params={"steps": 150})
    with pytest.raises(ValidationError, match="--max-cost"):
        check_cost(big, 500)
    check_cost(Request("video", "dummy-wan", "a fox", params={"steps": 150}), 500)  # a registered test model


def test_only_user_errors_reach_the_browser(tmp_path):
    """Review finding: with show_error on, Gradio sends the text of any exception."""
    import app as app_module

    args = app_module.parse_args(["--dummy-models", "--data-dir", str(tmp_path)])
    _, studio = app_module.create_app(args)
    try:
        assert app_module.launch_options(args, studio)["show_error"] is False
    finally:
        studio.close()
