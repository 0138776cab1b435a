"""The run contract shared by every modality: one ``Request`` in, one ``Result`` out.

The studio (UI, compare, history) only ever sees these two types, which is what lets an
executor run a request in-process or on another worker without the studio knowing.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODALITIES = ("image", "video", "audio", "text")
METHOD_KEYS = ("name", "params")


def shown(value: Any, limit: int = 40) -> str:
    """A user's value quoted for an error message: one line, and short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class StudioError(Exception):
    """An error whose message is meant for the user: shown in the UI as is."""


class ValidationError(StudioError):
    """The request is malformed or out of range; nothing was run."""


class ModelLoadError(StudioError):
    """The model could not be loaded (unknown id, offline hub, broken folder)."""


class OutOfMemoryError(StudioError):
    """The run exceeded device memory or the configured budget; caches were freed."""


@dataclass
class MethodChoice:
    """One acceleration method and its parameters, in the order it is applied."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    # the method's validated ``*Config``, set where the request is validated, so a run
    # builds the method from it instead of checking the same parameters again
    config: Any = field(default=None, compare=False, repr=False)
    # stored calibrations of this method for the request's model (records of
    # ``backends.accel._calibration``), set by the studio after validation; the method picks
    # the one matching its run plan. Not part of the request's identity or its history row.
    calibrations: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_obj(cls, obj: Any) -> "MethodChoice":
        """A method given as a name, or as ``{"name": ..., "params": {...}}`` with no other keys.

        Strict on purpose: a loose reader turned ``"methods": "tome"`` into the methods 't', 'o',
        'm', 'e' and silently dropped misspelt keys."""
        if isinstance(obj, MethodChoice):
            return obj
        if isinstance(obj, str):
            return cls(obj, {})
        if isinstance(obj, dict):
            unknown = sorted(str(k) for k in obj if k not in METHOD_KEYS)
            if unknown:
                raise ValidationError(f"a method entry has unknown key {shown(unknown[0])}; it takes name and params")
            name, params = obj.get("name"), obj.get("params")
            if not isinstance(name, str):
                raise ValidationError("a method entry needs a 'name' that is a string")
            if params is not None and not isinstance(params, dict):
                raise ValidationError(f"the params of method {shown(name)} must be an object")
            return cls(name, dict(params or {}))
        raise ValidationError("each method must be a name or an object {name, params}")


@dataclass
class Request:
    """What to generate. ``params`` holds the modality's own knobs (size, steps, ...)."""

    modality: str
    model: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    methods: list[MethodChoice] = field(default_factory=list)
    compare_group: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["methods"] = [m.to_dict() for m in self.methods]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> "Request":
        """Build a Request from decoded JSON: an object with known keys only.

        An unknown key is refused by name rather than ignored, so ``"steps": 999`` beside
        ``params`` is an error the user sees, not a setting silently dropped."""
        if not isinstance(data, dict):
            raise ValidationError("the request must be a JSON object {modality, model, prompt, ...}")
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ValidationError(f"unknown request key {shown(unknown[0])}; known: {', '.join(known)}")
        for required in ("modality", "model", "prompt"):
            if required not in data:
                raise ValidationError(f"the request has no '{required}'")
        data = dict(data)
        methods = data.get("methods")
        if methods is None:
            methods = []
        if not isinstance(methods, list):
            raise ValidationError("methods must be a list of method names or {name, params} objects")
        data["methods"] = [MethodChoice.from_obj(m) for m in methods]
        if data.get("params") is None:
            data["params"] = {}
        return cls(**data)

    def replace(self, **changes: Any) -> "Request":
        return dataclasses.replace(self, **changes)


@dataclass
class Result:
    """What came out, and what it cost.

    ``output`` is modality specific: a PIL image, a list of frames, ``(waveform, rate)``
    or a string. ``method_stats`` maps a method name to its own counters (cache hits,
    accepted draft tokens, skipped steps...), the numbers users check to see a method
    actually did something.
    """

    output: Any
    timings: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    peak_memory_bytes: int = 0
    weight_bytes: int = 0  # weights of the model as run (quantized size when quantized)
    model_evals: int = 0  # forwards of the model itself (a draft model's: its method's ``draft_forwards``)
    method_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"
    worker: str = "local"
    output_path: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # one ``backends.timing.CallRecord`` per model call: what it computed, per CFG branch
    timeline: list[Any] = field(default_factory=list)
    # what the studio's detectors found wrong with this run ({key, message} each:
    # skipped nothing, NaN/Inf, blank output; ``studio.detectors``)
    findings: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-safe description without the output itself."""
        return json.loads(
            json.dumps(
                {
                    "timings": self.timings,
                    "total_seconds": self.total_seconds,
                    "peak_memory_bytes": self.peak_memory_bytes,
                    "weight_bytes": self.weight_bytes,
                    "model_evals": self.model_evals,
                    "method_stats": self.method_stats,
                    "notes": self.notes,
                    "findings": self.findings,
                    "device": self.device,
                    "worker": self.worker,
                },
                default=str,
            )
        )
