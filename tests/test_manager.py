import threading
import time

import pytest
import torch

from backends.base import Backend
from backends.manager import BackendManager, pick_device
from backends.plan import RunPlan
from backends.types import ModelLoadError, Request


class FakeBackend(Backend):
    """Records when runs enter and leave, to prove runs on one model never interleave."""

    modality = "image"

    def __init__(self, model_id, size, log):
        super().__init__(model_id, torch.device("cpu"), torch.float32)
        self.size, self.log, self.unloaded = size, log, False

    def memory_bytes(self):
        return self.size

    def build_plan(self, request):
        return RunPlan()

    def generate(self, plan, timer, progress):
        self.log.append(("enter", self.model_id, threading.get_ident()))
        for step in range(3):
            time.sleep(0.01)
            self.log.append(("step", self.model_id, threading.get_ident()))
        self.log.append(("exit", self.model_id, threading.get_ident()))
        return "done"

    def unload(self):
        self.unloaded = True


def make_manager(budget=1000, log=None, loads=None):
    manager = BackendManager(device="cpu", memory_budget_bytes=budget)
    log = [] if log is None else log
    for name, size in (("a", 400), ("b", 400), ("c", 400)):
        def factory(d, t, name=name, size=size):
            if loads is not None:
                loads.append(name)
                time.sleep(0.05)
            return FakeBackend(name, size, log)
        manager.register_factory("image", name, factory)
    return manager


def test_cache_hit_returns_same_backend_without_reload():
    manager = make_manager()
    first = manager.get("image", "a")
    assert manager.get("image", "a") is first
    assert manager.loads == 1


def test_least_recently_used_is_unloaded_over_budget():
    manager = make_manager(budget=1000)
    a = manager.get("image", "a")
    manager.get("image", "b")
    manager.get("image", "a")  # a is now more recent than b
    manager.get("image", "c")  # 1200 > 1000: evict b
    loaded = {m["model"] for m in manager.loaded()}
    assert loaded == {"a", "c"} and a.unloaded is False


def test_busy_model_is_never_evicted():
    manager = make_manager(budget=500)
    a = manager.get("image", "a")
    holding, release = threading.Event(), threading.Event()

    def run_in_progress():
        with a.lock:
            holding.set()
            release.wait(5)

    worker = threading.Thread(target=run_in_progress)
    worker.start()
    holding.wait(5)
    manager.get("image", "b")
    release.set()
    worker.join()
    assert {m["model"] for m in manager.loaded()} == {"a", "b"}
    manager.evict_to_budget(keep=("image", "b"))
    assert {m["model"] for m in manager.loaded()} == {"b"}


def test_concurrent_loads_of_one_model_load_once():
    loads = []
    manager = make_manager(loads=loads)
    got = []
    threads = [threading.Thread(target=lambda: got.append(manager.get("image", "a"))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["a"] and len({id(b) for b in got}) == 1


def test_concurrent_requests_on_one_model_are_serialised():
    log = []
    manager = make_manager(log=log)
    backend = manager.get("image", "a")
    request = Request("image", "a", "x")
    threads = [threading.Thread(target=backend.run, args=(request,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log) == 4 * 5
    for i in range(0, len(log), 5):  # each run's enter..exit block belongs to one thread
        block = log[i:i + 5]
        assert block[0][0] == "enter" and block[-1][0] == "exit"
        assert len({entry[2] for entry in block}) == 1


def test_unknown_model_id_gives_clear_message():
    manager = BackendManager(device="cpu")
    with pytest.raises(ModelLoadError, match="unknown model"):
        manager.get("image", "no such model!")
    with pytest.raises(ModelLoadError, match="no model folder"):
        manager.get("image", "./does-not-exist")


def test_offline_hub_id_gives_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = BackendManager(device="cpu")
    with pytest.raises(ModelLoadError, match="local folder"):
        manager.get("image", "someone/some-model")


def test_local_folders_outside_allowed_roots_are_refused(tmp_path):
    manager = BackendManager(device="cpu", allowed_roots=[tmp_path / "models"])
    with pytest.raises(ModelLoadError, match="must be inside"):
        manager.get("image", "/etc")


def test_device_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
