"""Where a Request runs. The studio talks to an executor and never to a backend directly,
so running in-process (LocalExecutor) or on remote workers is invisible above this line."""

from __future__ import annotations

import socket

from backends.base import ProgressFn
from backends.control import CancelToken
from backends.manager import BackendManager
from backends.types import Request, Result


class LocalExecutor:
    """In-process: the manager's cache and per-model locks do all the work."""

    def __init__(self, manager: BackendManager):
        self.manager = manager
        self.name = f"local@{socket.gethostname()}"

    def run(self, request: Request, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Result:
        backend = self.manager.get(request.modality, request.model)
        result = backend.run(request, progress, cancel=cancel)
        result.worker = self.name
        return result

    def describe(self, modality: str, model: str) -> dict:
        return self.manager.get(modality, model).describe()

    def method_limits(self, modality: str, model: str, names: list[str]) -> dict:
        """What the loaded model allows of each named method (``Method.limits``)."""
        return method_limits(self.manager.get(modality, model), names)

    def shutdown(self) -> None:
        self.manager.unload_all()


class StudioWorker:
    """One Ray actor: its own BackendManager, so each model is loaded once per worker.
    Wrapped with ``ray.remote`` by RayExecutor (this module imports without Ray)."""

    def __init__(self, name: str, device: str = "auto", dummy_models: bool = False, cache_dir: str | None = None):
        """``cache_dir``: the studio's data dir cache folder, where methods keep their disk
        state (prefix cache, retrieval datastore); a worker has no data dir of its own, and
        without it that state would land under the worker's working directory."""
        import os
        from pathlib import Path

        os.environ.setdefault("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
        self.manager = BackendManager(device=device)
        if cache_dir is not None:
            self.manager.cache_dir = Path(cache_dir)
        if dummy_models:
            from backends.tiny.dummy import register_dummy_models

            register_dummy_models(self.manager)
        self.name = f"{name}@{socket.gethostname()}:{os.getpid()}"

    def run(self, request: Request, time_limit_s: float | None = None) -> Result:
        """Run on this worker; the time limit is enforced here, at every step, because a
        running task of a synchronous actor cannot be cancelled from the driver."""
        backend = self.manager.get(request.modality, request.model)
        result = backend.run(request, cancel=CancelToken(time_limit_s))
        result.worker = self.name
        return result

    def describe(self, modality: str, model: str) -> dict:
        return self.manager.get(modality, model).describe()

    def method_limits(self, modality: str, model: str, names: list[str]) -> dict:
        """What the loaded model allows of each named method (``Method.limits``)."""
        return method_limits(self.manager.get(modality, model), names)


class RayExecutor:
    """Requests scheduled over Ray actors (one per GPU where there are GPUs).

    The studio stays the one writer of history: workers only return ``Result`` objects.
    A worker that dies mid-request is restarted by Ray; the request is retried once on
    the least busy worker and, if that fails too, surfaces as a failed run with the reason.
    """

    def __init__(self, num_workers: int | None = None, address: str | None = None, device: str = "auto",
                 dummy_models: bool = False, num_cpus: int | None = None, retries: int = 1,
                 cpus_per_worker: float = 1.0, cache_dir: str | None = None):
        import threading

        import ray

        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                     ignore_reinit_error=True)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = num_workers or max(1, gpus)
        per_worker_gpu = 1 if gpus >= count and device != "cpu" else 0
        remote = ray.remote(num_cpus=cpus_per_worker, num_gpus=per_worker_gpu, max_restarts=1,
                            max_task_retries=0)(StudioWorker)
        folder = str(cache_dir) if cache_dir is not None else None  # a str: the same path on every worker
        self.workers = [remote.remote(f"ray-worker-{i}", device, dummy_models, folder) for i in range(count)]
        self.in_flight = [0] * count
        self.retries = retries
        self._lock = threading.Lock()
        self.name = f"ray({count} workers)"

    def _pick(self, exclude: set[int]) -> int:
        with self._lock:
            candidates = [i for i in range(len(self.workers)) if i not in exclude] or list(range(len(self.workers)))
            index = min(candidates, key=lambda i: self.in_flight[i])
            self.in_flight[index] += 1
            return index

    def run(self, request: Request, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Result:
        from backends.types import StudioError

        tried: set[int] = set()
        last_error: Exception | None = None
        for _ in range(self.retries + 1):
            index = self._pick(tried)
            tried.add(index)
            try:
                limit = cancel.time_limit_s if cancel is not None else None
                result = self._wait(self.workers[index].run.remote(request, limit), cancel)
                if progress is not None:
                    progress(1, 1, "done")
                return result
            except self.ray.exceptions.RayTaskError as exc:  # the request itself failed: no retry
                cause = exc.cause if getattr(exc, "cause", None) is not None else exc
                raise cause if isinstance(cause, Exception) else StudioError(str(exc)) from None
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.WorkerCrashedError) as exc:
                last_error = exc
            finally:
                with self._lock:
                    self.in_flight[index] -= 1
        raise StudioError(f"the worker running this request died and the retry failed too: "
                          f"{str(last_error).splitlines()[0] if last_error else 'unknown'}")

    def _wait(self, ref, cancel: CancelToken | None) -> Result:
        """The task's result; a cancelled token cancels the Ray task. The time limit is the
        worker's to enforce (it starts when the worker holds the model)."""
        if cancel is None:
            return self.ray.get(ref)
        while True:
            ready, _ = self.ray.wait([ref], timeout=0.2)
            if ready:
                return self.ray.get(ref)
            try:
                cancel.check()
            except Exception:
                try:  # a queued task is dropped; a running one on a sync actor finishes unseen
                    self.ray.cancel(ref)
                except Exception:  # noqa: BLE001 - cancelling is best effort, the run is stopped here
                    pass
                raise

    def describe(self, modality: str, model: str) -> dict:
        index = self._pick(set())
        try:
            return self.ray.get(self.workers[index].describe.remote(modality, model))
        finally:
            with self._lock:
                self.in_flight[index] -= 1

    def method_limits(self, modality: str, model: str, names: list[str]) -> dict:
        index = self._pick(set())  # the workers share one device type: any of them answers for all
        try:
            return self.ray.get(self.workers[index].method_limits.remote(modality, model, names))
        finally:
            with self._lock:
                self.in_flight[index] -= 1

    def shutdown(self) -> None:
        for worker in self.workers:
            self.ray.kill(worker)


def method_limits(backend, names: list[str]) -> dict:
    """``{method: Limits}`` for ``backend``'s loaded model (imported here: the method
    registry imports every method module)."""
    from backends.accel.base import get_method

    return {name: get_method(name).limits(backend) for name in names}
