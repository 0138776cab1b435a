"""Reversible patching helpers shared by the method files.

``shadow_forward`` replaces a module's ``forward`` with an instance attribute, so
removing the patch (deleting the attribute) restores the class method exactly: no
copy of the original is kept anywhere that could drift.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class ForwardPatch:
    """Patches stack: a patch over another one (a diffusers hook, another method) calls
    it as its ``original`` and puts it back on removal; methods are removed in reverse
    order of application, so the stack unwinds exactly."""

    def __init__(self, module: torch.nn.Module, make_forward: Callable[[Callable], Callable]):
        self.module = module
        self.previous = vars(module).get("forward")  # None: the class method is in force
        self.original = module.forward
        self.patched = make_forward(self.original)
        module.forward = self.patched

    def remove(self) -> None:
        if vars(self.module).get("forward") is not self.patched:
            raise RuntimeError(f"{type(self.module).__name__}.forward patches were removed out of order")
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


class StepCallback:
    """A step-end callback for diffusers pipelines that counts finished denoising steps."""

    tensor_inputs: tuple[str, ...] = ()

    def __init__(self, on_step: Callable[[int], None] | None = None):
        self.step = 0
        self.on_step = on_step

    def __call__(self, pipe, step, timestep, kwargs) -> dict[str, Any]:
        self.step = step + 1
        if self.on_step is not None:
            self.on_step(self.step)
        return {}


def patch_attr(handle: Any, obj: Any, name: str, value: Any) -> None:
    """Set an instance attribute over the class's (or over an earlier method's patch) and
    put back exactly what was there on removal: the earlier patch, or no instance
    attribute at all. An attribute already gone at removal is tolerated (nothing to undo),
    so a method removed after another one's patch was undone never raises."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, value)

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            vars(obj).pop(name, None)

    handle.on_remove(undo)
