"""The run plan: what a backend is about to run, as typed fields a method can edit.

A backend turns a ``Request`` into a plan (``Backend.build_plan``); each method of the
request then attaches once to the backend and that plan (``Method.attach(backend, plan)``)
and returns a ``Handle`` holding that run's state; the backend runs the plan; the handles
report (``stats``, ``warnings``, ``skipped_evals``) and are removed in reverse order by
``attached``, whatever happens. Nothing here imports a method module.

The plans replace the string-keyed ``call`` dict methods used to edit: the fields are
the seams methods use (steps, guidance branches, step-end callbacks, a decoding loop,
the library call's own keyword arguments, extra result fields).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch

COND, UNCOND = "cond", "uncond"


@dataclass
class RunPlan:
    """Fields every plan has. ``kwargs``: keyword arguments of the library call (the
    diffusers pipeline, transformers' ``generate``), under the library's own names.
    ``extra``: fields the run adds to ``Result.extra``. ``notes``: what the model itself
    wants the user told about this run (words a tiny model does not know), shown with the
    methods' warnings."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    # the request's methods as (name, params), set before attaching: a method whose state
    # outlives the run (approx_cache's stored latents) keys it on what else shaped the run
    methods: tuple[tuple[str, dict[str, Any]], ...] = ()
    notes: list[str] = field(default_factory=list)


@dataclass
class Guidance:
    """Classifier-free guidance as the denoiser sees it.

    ``passes``: denoiser passes per step (2 with CFG, 1 without). ``batched``: one call on
    an [uncond, cond] batch (SD, PixArt...) rather than separate calls per branch (FLUX
    true CFG, Wan). ``branch``: for separate calls, the branch the denoiser call now
    running belongs to (``COND``/``UNCOND``, None outside a branch), kept up to date by
    the backend from the pipeline's own ``cache_context`` marks, so a method never has to
    assume an order of the calls."""

    scale: float = 0.0
    passes: int = 1
    batched: bool = True
    branch: str | None = None

    @property
    def separate(self) -> bool:
        return self.passes > 1 and not self.batched


StepCallback = Callable[[Any, int, Any, dict[str, Any]], "dict[str, Any] | None"]


@dataclass
class DiffusionPlan(RunPlan):
    """A diffusers pipeline call. ``callbacks``: step-end callbacks run in order (each may
    set ``tensor_inputs`` to the pipeline tensors it reads or replaces)."""

    steps: int = 0
    guidance: Guidance = field(default_factory=Guidance)
    callbacks: list[StepCallback] = field(default_factory=list)
    # img2img (image backend): {"image": PIL image, "strength": float}; None = from noise
    img2img: dict[str, Any] | None = None


@dataclass
class DecodingPlan(RunPlan):
    """Token-by-token decoding (a causal LM or a codec LM). ``decoder``: None runs
    transformers' ``generate`` with ``kwargs``; otherwise the backend's own decoding loop
    (see ``backends/text.py`` and ``backends/codec_lm.py`` for its signature)."""

    input_ids: torch.Tensor | None = None
    max_new_tokens: int = 0
    sampling: Any = None
    decoder: Callable[..., Any] | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    attention_mask: torch.Tensor | None = None  # codec LMs: the text prompt's mask
    guidance_scale: float | None = None  # codec LMs: CFG over the text condition
    # functions ``edit(backend, input_ids) -> input_ids`` that rewrite the prompt's tokens
    # (prompt compression), run in order inside the timed decoding before the first
    # forward, so their cost counts in the time to first token; any decoder then runs on
    # the rewritten prompt
    prompt_edits: list[Callable[[Any, torch.Tensor], torch.Tensor]] = field(default_factory=list)


@dataclass
class ARImagePlan(RunPlan):
    """An autoregressive image model's token loop (``backends/ar_image.py``). ``decoder``:
    ``loop(session, progress) -> tokens``, the plain loop unless a method replaced it
    (``backends/accel/_ar_decoding.py``); ``sampling``: an ``ARSampling`` (CFG, temperature,
    top-k); ``size``: the (height, width) the decoded image is resized to."""

    prompt: str = ""
    sampling: Any = None
    decoder: Callable[..., Any] | None = None
    size: tuple[int, int] = (64, 64)
    negative_prompt: str | None = None  # the guidance row's text, for a model that reads one (Emu3)


class Handle(Protocol):
    """One method attached to one run."""

    def remove(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...

    def warnings(self) -> list[str]: ...

    def skipped_evals(self) -> int: ...


class RunHandle:
    """A handle that undoes what its method did, in reverse order: ``on_remove`` registers
    each undo step as the patch is made; ``undo_on_error`` wraps the setup, so a failed
    attach leaves nothing behind. ``plan`` is the run's plan, final once every method has
    attached: ``notes(plan)`` (the warnings) reads it then. ``stats`` and ``skipped``
    report the run's figures, read when the run is over."""

    def __init__(self, plan: RunPlan, stats: Callable[[], dict[str, Any]] | None = None,
                 notes: Callable[[Any], list[str]] | None = None, skipped: Callable[[], int] | None = None):
        self.plan = plan
        self._undo = contextlib.ExitStack()
        self._stats, self._notes, self._skipped = stats, notes, skipped

    def on_remove(self, undo: Callable[..., Any], *args: Any) -> None:
        self._undo.callback(undo, *args)

    def remove(self) -> None:
        self._undo.close()

    @contextlib.contextmanager
    def undo_on_error(self) -> Iterator["RunHandle"]:
        try:
            yield self
        except BaseException:
            self.remove()
            raise

    def stats(self) -> dict[str, Any]:
        return self._stats() if self._stats is not None else {}

    def warnings(self) -> list[str]:
        return self._notes(self.plan) if self._notes is not None else []

    def skipped_evals(self) -> int:
        return self._skipped() if self._skipped is not None else 0


class Attachable(Protocol):
    def attach(self, backend: Any, plan: RunPlan) -> Handle: ...


@contextlib.contextmanager
def attached(backend: Any, plan: RunPlan, methods: Sequence[Attachable]) -> Iterator[list[Handle]]:
    """Attach ``methods`` in order to ``plan``; remove the handles in reverse order on exit,
    whatever happens (a failed attach removes those attached before it)."""
    with contextlib.ExitStack() as stack:
        handles: list[Handle] = []
        for method in methods:
            handle = method.attach(backend, plan)
            stack.callback(handle.remove)
            handles.append(handle)
        yield handles


@contextlib.contextmanager
def tracking_branches(denoiser: Any, guidance: Guidance) -> Iterator[None]:
    """Keep ``guidance.branch`` equal to the ``cache_context`` the pipeline has entered on
    ``denoiser`` (diffusers pipelines mark each separate CFG pass with one)."""
    original = getattr(type(denoiser), "cache_context", None)
    if original is None or not guidance.separate:
        yield
        return

    @contextlib.contextmanager
    def cache_context(name: str, *args: Any, **kwargs: Any) -> Iterator[None]:
        previous, guidance.branch = guidance.branch, name
        try:
            with original(denoiser, name, *args, **kwargs):
                yield
        finally:
            guidance.branch = previous

    denoiser.cache_context = cache_context  # an instance attribute over the class method
    try:
        yield
    finally:
        del denoiser.cache_context


def require_from_noise(plan: Any, method: str, why: str) -> None:
    """Refuse an img2img run (``plan.img2img`` set) for a method whose step bookkeeping
    assumes the whole schedule runs from noise: img2img runs only its tail."""
    if getattr(plan, "img2img", None):
        from backends.types import ValidationError

        raise ValidationError(f"{method} does not apply to img2img runs: {why}")
