"""The Backend contract: one loaded model of one modality, run under its own lock."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, ClassVar

import torch

from backends.accel.base import applied, instantiate
from backends.timing import EvalCounter, PeakMemory, StageTimer
from backends.catalog import resolve_source
from backends.types import ModelLoadError, Request, Result, StudioError, ValidationError

ProgressFn = Callable[[int, int, str], None]


def module_bytes(*modules: Any) -> int:
    """Bytes held by the parameters and buffers of the given modules (None skipped)."""
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in module.parameters())
            total += sum(t.numel() * t.element_size() for t in module.buffers())
    return total


class Backend:
    """A loaded model plus everything needed to run a ``Request`` on it.

    Subclasses implement ``build_call`` (request -> call kwargs), ``generate`` (run the
    call, timing its stages) and set ``family`` (what kind of network it is, which
    decides which acceleration methods apply). ``run`` is the same for every modality:
    it validates methods, applies them, measures, and removes them again.
    """

    modality: ClassVar[str] = ""

    def __init__(self, model_id: str, device: torch.device, dtype: torch.dtype):
        self.model_id = model_id
        self.device = torch.device(device)
        self.dtype = dtype
        self.family = "unknown"
        self.lock = threading.RLock()
        self.last_used = time.monotonic()

    # -- to override -------------------------------------------------------------------
    @property
    def denoiser(self) -> torch.nn.Module | None:
        """The network whose forward calls count as model evaluations."""
        return None

    def memory_bytes(self) -> int:
        return 0

    def build_call(self, request: Request) -> dict[str, Any]:
        raise NotImplementedError

    def generate(self, call: dict[str, Any], timer: StageTimer, progress: ProgressFn | None) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "modality": self.modality, "family": self.family, "device": str(self.device)}

    def unload(self) -> None:
        """Drop references to the weights so memory can be reclaimed."""

    # -- shared ------------------------------------------------------------------------
    def run(self, request: Request, progress: ProgressFn | None = None) -> Result:
        if request.modality != self.modality:
            raise ValidationError(f"a {request.modality} request was sent to a {self.modality} model")
        methods = instantiate(request.methods, self.modality, self.family)
        with self.lock:
            self.last_used = time.monotonic()
            timer = StageTimer(self.device)
            with applied(self, methods):
                call = self.build_call(request)
                for method in methods:
                    call = method.prepare_call(self, call)
                notes = [note for method in methods for note in method.warnings(self, call)]
                with PeakMemory(self.device) as memory, EvalCounter(self.denoiser) as evals:
                    with timer.stage("total"):
                        output = self.generate(call, timer, progress)
            self.last_used = time.monotonic()
        timings = timer.as_dict()
        method_stats = {m.spec.name: m.stats() for m in methods}
        skipped = sum(int(stats.get("skipped_evals", 0)) for stats in method_stats.values())
        return Result(
            output=output,
            timings=timings,
            total_seconds=timings.get("total", 0.0),
            peak_memory_bytes=memory.peak_bytes,
            model_evals=evals.count - skipped,  # calls a method answered without computing
            method_stats=method_stats,
            notes=notes,
            device=str(self.device),
            extra=call.get("_extra", {}),
        )


class DraftingBackend(Backend):
    """A language model (text or audio codes) with the smaller models that draft for it.

    Subclasses set ``load_model(source, device, dtype) -> (model, tokenizer_or_processor)``;
    drafts (bundled name, folder or hub id) load through it once and stay cached here.
    """

    load_model: ClassVar[Callable[[str, torch.device, torch.dtype], tuple[Any, Any]]]

    def __init__(self, model_id: str, model: Any, device: torch.device | str | None, dtype: torch.dtype | None,
                 draft_id: str | None):
        device = torch.device(device) if device is not None else model.device
        super().__init__(model_id, device, dtype or model.dtype)
        self.model = model.eval()
        self.draft_id = draft_id  # the paired draft ('auto' in the speculative method)
        self.drafts: dict[str, tuple[Any, Any]] = {}

    @classmethod
    def from_model(cls, model: Any, helper: Any, model_id: str = "in-memory",
                   drafts: dict[str, tuple[Any, Any]] | None = None, draft_id: str | None = None):
        """An in-memory model (tests, notebooks) with its tokenizer or processor;
        ``drafts`` pre-seeds the draft cache."""
        backend = cls(model_id, model, helper, draft_id=draft_id or next(iter(drafts or {}), None))
        backend.drafts.update(drafts or {})
        return backend

    def get_draft(self, draft_id: str) -> tuple[Any, Any]:
        """Load a draft once, by the manager's path."""
        if draft_id not in self.drafts:
            try:
                self.drafts[draft_id] = type(self).load_model(resolve_source(draft_id), self.device, self.dtype)
            except StudioError:
                raise
            except Exception as exc:
                raise ModelLoadError(f"could not load draft model '{draft_id}': {str(exc)[:300]}") from exc
        return self.drafts[draft_id]

    def memory_bytes(self) -> int:
        return module_bytes(self.model, *(m for m, _ in self.drafts.values()))

    def unload(self) -> None:
        self.model = None
        self.drafts.clear()
