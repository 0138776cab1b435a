"""The Ray executor: same outputs as local, worker failures handled, one row per request."""

import os
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is the optional extra fastgen-studio[ray]")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from backends.executor import LocalExecutor, RayExecutor  # noqa: E402
from backends.manager import BackendManager  # noqa: E402
from backends.tiny.dummy import register_dummy_models  # noqa: E402
from backends.types import Request, StudioError  # noqa: E402
from studio.service import Studio  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_executor():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    executor = RayExecutor(num_workers=2, device="cpu", dummy_models=True)
    yield executor
    executor.shutdown()
    ray.shutdown()


def requests(n):
    return [Request("image", "dummy-sd" if i % 2 else "dummy-flux", f"request {i}", seed=i, params={"steps": 3})
            for i in range(n)]


def test_concurrent_requests_over_two_workers_match_local(ray_executor, tmp_path):
    manager = BackendManager(device="cpu")
    register_dummy_models(manager)
    local = LocalExecutor(manager)
    expected = [np.asarray(local.run(r).output) for r in requests(4)]
    got = [None] * 4

    def run(i, request):
        got[i] = ray_executor.run(request)

    threads = [threading.Thread(target=run, args=(i, r)) for i, r in enumerate(requests(4))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for want, result in zip(expected, got):
        assert np.array_equal(want, np.asarray(result.output))
    assert len({r.worker for r in got}) == 2  # both workers served
    assert all(r.device == "cpu" for r in got)


def test_killed_worker_is_retried_or_recorded_and_app_keeps_serving(ray_executor, tmp_path):
    studio = Studio(data_dir=tmp_path, manager=BackendManager(device="cpu"), executor=ray_executor)
    slow = Request("image", "dummy-sd", "slow one", seed=1, params={"steps": 150})
    outcome = {}

    def run():
        try:
            outcome["ok"] = studio.generate(slow)
        except StudioError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 30
    while time.time() < deadline and not any(ray_executor.in_flight):
        time.sleep(0.05)
    time.sleep(0.5)  # well inside the 150 steps
    busy = [i for i, n in enumerate(ray_executor.in_flight) if n]
    assert busy, "the slow request should be running on a worker"
    ray.kill(ray_executor.workers[busy[0]], no_restart=False)
    thread.join(timeout=300)
    assert "ok" in outcome or "died" in outcome.get("error", "")
    after = studio.generate(Request("image", "dummy-sd", "after the crash", seed=2, params={"steps": 2}))
    assert after.result.output is not None
    rows = studio.history.query(limit=10)
    assert [r.prompt for r in rows] == ["after the crash", "slow one"]  # one row per request
    studio.close()
