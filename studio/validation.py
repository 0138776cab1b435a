"""One validation layer for every request, from the UI and the API alike.

Everything is checked before any model is touched, and every failure is a
``ValidationError`` whose message is shown to the user as is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from backends.accel.base import get_method
from backends.types import MODALITIES, MethodChoice, Request, ValidationError

MAX_PROMPT_CHARS = 4000
MAX_MODEL_ID_CHARS = 512
MAX_METHODS = 8
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Range:
    kind: type
    low: float
    high: float
    multiple_of: int | None = None
    label: str = ""

    def check(self, name: str, value: Any) -> Any:
        label = self.label or name
        if isinstance(value, bool) or value is None or value == "":
            raise ValidationError(f"{label} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValidationError(f"{label} must be a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValidationError(f"{label} must be a finite number")
        if self.kind is int:
            if not number.is_integer():
                raise ValidationError(f"{label} must be a whole number, got {value!r}")
            number = int(number)
        if not self.low <= number <= self.high:
            raise ValidationError(f"{label} must be between {self.low:g} and {self.high:g}, got {number:g}")
        if self.multiple_of and number % self.multiple_of:
            raise ValidationError(f"{label} must be a multiple of {self.multiple_of}, got {number:g}")
        return number


PARAM_RANGES: dict[str, dict[str, Range]] = {
    "image": {
        "width": Range(int, 16, 2048, 8, "width"),
        "height": Range(int, 16, 2048, 8, "height"),
        "steps": Range(int, 1, 150, label="steps"),
        "guidance": Range(float, 0, 30, label="guidance scale"),
    },
    "video": {
        "width": Range(int, 16, 1280, 8, "width"),
        "height": Range(int, 16, 1280, 8, "height"),
        "frames": Range(int, 1, 257, label="frames"),
        "fps": Range(int, 1, 60, label="fps"),
        "steps": Range(int, 1, 150, label="steps"),
        "guidance": Range(float, 0, 30, label="guidance scale"),
    },
    "audio": {
        "seconds": Range(float, 0.1, 60, label="duration (seconds)"),
        "sample_rate": Range(int, 8000, 48000, label="sample rate"),
        "steps": Range(int, 1, 200, label="steps"),
        "guidance": Range(float, 0, 30, label="guidance scale"),
        "max_new_tokens": Range(int, 1, 3000, label="max new tokens"),
    },
    "text": {
        "max_new_tokens": Range(int, 1, 2048, label="max new tokens"),
        "temperature": Range(float, 0, 5, label="temperature"),
        "top_p": Range(float, 0.01, 1, label="top-p"),
        "top_k": Range(int, 0, 1000, label="top-k"),
    },
}
FLAG_PARAMS = {"text": {"chat_template", "do_sample"}}


def validate_request(data: Request | dict[str, Any]) -> Request:
    """Check and normalise a request; returns a new Request."""
    if isinstance(data, dict):
        try:
            request = Request.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"malformed request: {exc}") from None
    else:
        request = data
    if request.modality not in MODALITIES:
        raise ValidationError(f"unknown modality {request.modality!r}; expected one of {', '.join(MODALITIES)}")
    prompt = request.prompt if isinstance(request.prompt, str) else ""
    if not prompt.strip():
        raise ValidationError("the prompt is empty: describe what to generate")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValidationError(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    negative = request.negative_prompt or ""
    if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
        raise ValidationError(f"the negative prompt must be text of at most {MAX_PROMPT_CHARS} characters")
    model = request.model.strip() if isinstance(request.model, str) else ""
    if not model:
        raise ValidationError("no model chosen")
    if len(model) > MAX_MODEL_ID_CHARS or any(ord(c) < 32 for c in model):
        raise ValidationError("the model id is too long or contains control characters")
    seed = request.seed
    if seed is None or seed == -1 or seed == "":
        seed = random.randint(0, MAX_SEED)
    seed = Range(int, 0, MAX_SEED, label="seed").check("seed", seed)
    params = validate_params(request.modality, request.params)
    methods = validate_methods(request.modality, request.methods)
    return request.replace(prompt=prompt, negative_prompt=negative, model=model, seed=seed, params=params, methods=methods)


def validate_params(modality: str, params: dict[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValidationError("params must be an object")
    ranges = PARAM_RANGES[modality]
    flags = FLAG_PARAMS.get(modality, set())
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in ranges:
            if value is None:
                continue  # "use the model's default"
            out[name] = ranges[name].check(name, value)
        elif name in flags:
            out[name] = bool(value)
        else:
            raise ValidationError(f"unknown {modality} parameter '{name}'; known: {', '.join(sorted(ranges) + sorted(flags))}")
    return out


def validate_methods(modality: str, methods: list[Any] | None) -> list[MethodChoice]:
    methods = list(methods or [])
    if len(methods) > MAX_METHODS:
        raise ValidationError(f"at most {MAX_METHODS} methods can be combined")
    out = []
    for raw in methods:
        choice = MethodChoice.from_obj(raw)
        spec = get_method(choice.name).spec
        if modality not in spec.modalities:
            raise ValidationError(f"method '{spec.name}' does not apply to {modality} generation")
        out.append(MethodChoice(spec.name, spec.validate(choice.params)))
    return out
