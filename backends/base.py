"""The Backend contract: one loaded model of one modality, run under its own lock."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ClassVar, Iterator

import torch

from backends.accel.base import applied, instantiate
from backends.control import CancelToken
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
    def run(self, request: Request, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Result:
        """Run ``request``. With ``cancel``, the run stops (``RunCancelled``) at the first
        model evaluation or progress report after the token is set or its time limit
        passes; the methods are removed as on any other exit, so the next run is normal."""
        if request.modality != self.modality:
            raise ValidationError(f"a {request.modality} request was sent to a {self.modality} model")
        methods = instantiate(request.methods, self.modality, self.family)
        with self.lock:
            if cancel is not None:
                cancel.start()  # the time limit counts from here, not from the queue
                cancel.check()
                if progress is not None:
                    progress = cancel.guard(progress)
            timer = StageTimer(self.device)
            with applied(self, methods), _stop_hook(self.denoiser, cancel):
                call = self.build_call(request)
                for method in methods:
                    call = method.prepare_call(self, call)
                notes = [note for method in methods for note in method.warnings(self, call)]
                with PeakMemory(self.device) as memory, EvalCounter(self.denoiser) as evals:
                    with timer.stage("total"):
                        output = self.generate(call, timer, progress)
        timings = timer.as_dict()
        method_stats = {m.spec.name: m.stats() for m in methods}
        return Result(
            output=output,
            timings=timings,
            total_seconds=timings.get("total", 0.0),
            peak_memory_bytes=memory.peak_bytes,
            model_evals=evaluations_run(evals.count, method_stats),
            method_stats=method_stats,
            notes=notes,
            device=str(self.device),
            extra=call.get("_extra", {}),
        )


def evaluations_run(calls: int, method_stats: dict[str, dict[str, Any]]) -> int:
    """Denoiser calls minus those a method answered without running the network.

    Every method that can answer a whole call from a cache (TeaCache, AdaCache, MagCache,
    a block cache spanning every block, CFG truncation's dropped unconditional pass)
    reports those calls as ``skipped_evals`` in its stats; partial calls (DeepCache's
    shallow branch, a block span, cached attention layers) ran the network and count."""
    skipped = sum(int(stats.get("skipped_evals", 0) or 0) for stats in method_stats.values())
    return max(0, calls - skipped)


@contextlib.contextmanager
def _stop_hook(module: torch.nn.Module | None, cancel: CancelToken | None) -> Iterator[None]:
    """Check ``cancel`` before every forward of ``module`` (every denoising pass, every
    decoding step, whatever loop a method runs), so no path can outrun a cancel."""
    handle = None
    if cancel is not None and isinstance(module, torch.nn.Module):
        handle = module.register_forward_pre_hook(cancel.check_hook)
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


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
