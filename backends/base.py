"""The Backend contract: one loaded model of one modality, run under its own lock."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, ClassVar, Iterator

import torch

from backends.control import CancelToken, ProgressFn
from backends.plan import DiffusionPlan, Handle, RunPlan, attached
from backends.timing import EvalCounter, PeakMemory, StageTimer
from backends.catalog import resolve_source
from backends.types import ModelLoadError, Request, Result, StudioError, ValidationError



def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; for a tensor subclass (torchao's quantized weights), the bytes
    of the inner tensors it stores, not of the dtype it presents."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)
    if t.is_quantized and t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return (t.numel() * t.element_size() + tensor_bytes(t.q_per_channel_scales())
                + tensor_bytes(t.q_per_channel_zero_points()))
    return t.numel() * t.element_size()


def module_bytes(*modules: Any) -> int:
    """Bytes held by the parameters and buffers of the given modules (None skipped), as
    they are now (quantized weights at their stored size; a shared tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            for t in [*module.parameters(), *module.buffers()]:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += tensor_bytes(t)
    return total


class Backend:
    """A loaded model plus everything needed to run a ``Request`` on it.

    Subclasses implement ``build_plan`` (request -> a typed ``RunPlan``), ``generate``
    (run the plan, timing its stages) and set ``family`` (what kind of network it is,
    which decides which acceleration methods apply). ``run`` is the same for every
    modality: it builds the plan, attaches the methods, measures, and removes them.
    """

    modality: ClassVar[str] = ""
    # request parameters of the modality this kind of model does not read (a token image
    # model has no denoising steps); the tabs hide their controls for it
    unused_params: ClassVar[tuple[str, ...]] = ()

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

    def weight_bytes(self) -> int:
        """Bytes of the weights a run uses, as it runs (quantized size under quantization)."""
        return self.memory_bytes()

    def build_plan(self, request: Request) -> RunPlan:
        raise NotImplementedError

    def generate(self, plan: Any, timer: StageTimer, progress: ProgressFn | None) -> Any:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"model": self.model_id, "modality": self.modality, "family": self.family, "device": str(self.device),
                "unused_params": list(self.unused_params)}

    def unload(self) -> None:
        """Drop references to the weights so memory can be reclaimed."""

    # -- shared ------------------------------------------------------------------------
    def run(self, request: Request, progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> Result:
        """Run ``request``. With ``cancel``, the run stops (``RunCancelled``) at the first
        model evaluation or progress report after the token is set or its time limit
        passes; the methods are removed as on any other exit, so the next run is normal."""
        if request.modality != self.modality:
            raise ValidationError(f"a {request.modality} request was sent to a {self.modality} model")
        methods = _instantiate(request, self)
        with self.lock:
            if cancel is not None:
                cancel.start()  # the time limit counts from here, not from the queue
                cancel.check()
                if progress is not None:
                    progress = cancel.guard(progress)
            timer = StageTimer(self.device)
            plan = self.build_plan(request)
            plan.methods = tuple((m.name, dict(m.params)) for m in request.methods)
            # plan editors (the sampler) attach first, so the others read the final plan
            order = sorted(range(len(methods)), key=lambda i: not methods[i].attach_first)
            with attached(self, plan, [methods[i] for i in order]) as in_order, _stop_hook(self.denoiser, cancel):
                handles: list[Handle] = [in_order[order.index(i)] for i in range(len(methods))]
                notes = [note for handle in handles for note in handle.warnings()]
                with PeakMemory(self.device) as memory, EvalCounter(self.denoiser, _branch_of(plan)) as evals:
                    with timer.stage("total"):
                        output = self.generate(plan, timer, progress)
                weight_bytes = self.weight_bytes()  # with the methods still attached: the model as run
        method_stats = {m.spec.name: h.stats() for m, h in zip(methods, handles)}  # after removal, as before
        skipped = sum(h.skipped_evals() for h in handles)
        timings = timer.as_dict()
        return Result(
            output=output,
            timings=timings,
            total_seconds=timings.get("total", 0.0),
            peak_memory_bytes=memory.peak_bytes,
            weight_bytes=weight_bytes,
            model_evals=max(0, evals.count - skipped),
            method_stats=method_stats,
            notes=notes + plan.notes,
            device=str(self.device),
            extra=plan.extra,
            timeline=evals.records if isinstance(plan, DiffusionPlan) else [],  # steps: denoiser calls
        )


def _branch_of(plan: RunPlan) -> Callable[[], str | None]:
    """The CFG branch of the denoiser call now running (plans without guidance: None)."""
    guidance = getattr(plan, "guidance", None)
    return lambda: getattr(guidance, "branch", None)


def _instantiate(request: Request, backend: "Backend") -> list[Any]:
    """The request's methods, checked against this backend's modality, family and slots,
    and against what its loaded model allows (``Method.limits``): a value the model cannot
    take is refused here, before any work. Imported here, when a run needs it: the method
    registry imports every method module, which this module must not depend on."""
    from backends.accel.base import instantiate

    methods = instantiate(request.methods, request.modality, backend.family)
    for method in methods:
        method.check_limits(backend)
    return methods


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

    def weight_bytes(self) -> int:
        return module_bytes(self.model)  # drafts are extra models, not the one run

    def unload(self) -> None:
        self.model = None
        self.drafts.clear()
