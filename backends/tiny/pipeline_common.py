"""What the bundled pipelines share with diffusers' own: the read-only attributes that
step-end callbacks and cache hooks read (``guidance_scale``, ``do_classifier_free_guidance``,
``num_timesteps``), so the studio's methods treat them like any diffusers pipeline."""

from __future__ import annotations


class GuidanceAttributesMixin:
    _guidance_scale: float = 1.0
    _num_timesteps: int = 0

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps
