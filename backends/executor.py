"""Where a Request runs. The studio talks to an executor and never to a backend directly,
so running in-process (LocalExecutor) or on remote workers is invisible above this line."""

from __future__ import annotations

import socket

from backends.base import ProgressFn
from backends.manager import BackendManager
from backends.types import Request, Result


class LocalExecutor:
    """In-process: the manager's cache and per-model locks do all the work."""

    def __init__(self, manager: BackendManager):
        self.manager = manager
        self.name = f"local@{socket.gethostname()}"

    def run(self, request: Request, progress: ProgressFn | None = None) -> Result:
        backend = self.manager.get(request.modality, request.model)
        result = backend.run(request, progress)
        result.worker = self.name
        return result

    def describe(self, modality: str, model: str) -> dict:
        return self.manager.get(modality, model).describe()

    def shutdown(self) -> None:
        self.manager.unload_all()
