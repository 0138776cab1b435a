"""The modality parameters of a ``Request`` (size, steps, guidance, frames, tokens...),
declared once.

Each entry is the single source for the tab's control (label, range, step, starting value),
the validator (``studio.validation``: type, range, multiple), the named API endpoints
(``/generate_image`` ... take these as named parameters, with these defaults) and the
backends' own defaults when a request leaves a parameter out.

The ranges are the validator's (e.g. width up to 2048, steps up to 150), not narrower UI
ones: a value the API accepts must also show in the tab (a preset or a history row made
through the API loads into the sliders), and expensive combinations are refused by the
cost limit (``--max-cost``, ``studio.limits``), not by a range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from backends.types import ValidationError, shown


@dataclass(frozen=True)
class Range:
    """A number's type and bounds, checked with a message that names the value."""

    kind: type
    low: float
    high: float
    multiple_of: int | None = None
    label: str = ""

    def check(self, name: str, value: Any) -> Any:
        label = self.label or name
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValidationError(f"{label} must be a number, got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:
            raise ValidationError(f"{label} is out of range") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ValidationError(f"{label} must be a finite number")
        if self.kind is int:
            if not number.is_integer():
                raise ValidationError(f"{label} must be a whole number, got {shown(value)}")
            number = int(number)
        if not self.low <= number <= self.high:
            raise ValidationError(f"{label} must be between {self.low:g} and {self.high:g}, got {number:g}")
        if self.multiple_of and number % self.multiple_of:
            raise ValidationError(f"{label} must be a multiple of {self.multiple_of}, got {number:g}")
        return number


@dataclass(frozen=True)
class ModalityParam:
    """One knob of a modality.

    ``default``: the control's starting value and the API's default (None: the backend's
    or model's own choice). ``zero_means_default``: 0 (like None) leaves the value to the
    model, so the slider starts at 0 and a request never carries a 0. ``control``: shown in
    the tab; the others are for the API and ``/run`` only. For ints, a ``step`` above 1 is
    also the multiple a value must be (sizes in multiples of 8)."""

    name: str
    kind: type  # int | float | bool | str (str: ``high`` is the most characters)
    default: Any
    low: float = 0
    high: float = 1
    step: float = 1
    label: str = ""
    help: str = ""
    noun: str = ""  # how error messages name it ("guidance scale"); the name when empty
    zero_means_default: bool = False
    control: bool = True

    @property
    def range(self) -> Range:
        multiple = int(self.step) if self.kind is int and self.step > 1 else None
        return Range(self.kind, self.low, self.high, multiple, self.noun or self.name)

    def leaves_to_model(self, value: Any) -> bool:
        """None, or 0 where 0 means the model's default: the request leaves it to the model."""
        if self.kind is str:
            return value is None or value == ""
        return value is None or (self.zero_means_default and value == 0 and not isinstance(value, bool))

    def check(self, value: Any) -> Any:
        """The value as this parameter's type, or ValidationError; None = leave it to the model."""
        if self.leaves_to_model(value):
            return None
        if self.kind is str:
            if not isinstance(value, str):
                raise ValidationError(f"{self.noun or self.name} must be text, got {shown(value)}")
            if len(value) > self.high:
                raise ValidationError(f"{self.noun or self.name} is too long ({len(value)} characters, at most "
                                      f"{self.high:g})")
            return value
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ValidationError(f"{self.noun or self.name} must be true or false, got {shown(value)}")
            return value
        return self.range.check(self.name, value)

    @property
    def control_low(self) -> float:
        """The slider's lower end: 0 where 0 means "the model's default"."""
        return 0 if self.zero_means_default else self.low


def _size(name: str, high: int) -> ModalityParam:
    return ModalityParam(name, int, 0, 16, high, 8, f"{name.capitalize()} (0 = model default)", noun=name,
                         zero_means_default=True)


def _steps(high: int = 150) -> ModalityParam:
    return ModalityParam("steps", int, 25, 1, high, 1, "Steps", "denoising steps")


def _guidance(default: float) -> ModalityParam:
    return ModalityParam("guidance", float, default, 0, 30, 0.5, "Guidance scale",
                         "classifier-free guidance; 1 or less runs one pass per step", noun="guidance scale")


# the prompt and the system prompt together (characters): the system prompt is counted
# with the prompt in the cost and the limits, never a way around them
MAX_TEXT_INPUT_CHARS = 16_000
# an init image as a base64 PNG: about 4 MB of PNG (a 1024x1024 photo fits)
MAX_INIT_IMAGE_CHARS = 6_000_000

MODALITY_PARAMS: dict[str, tuple[ModalityParam, ...]] = {
    "image": (
        _size("width", 2048), _size("height", 2048), _steps(), _guidance(5.0),
        # img2img (``backends.img2img``): the API's; the Image tab's Stream section sets them itself
        ModalityParam("init_image", str, None, 0, MAX_INIT_IMAGE_CHARS, label="Init image",
                      help="img2img: a data:image/png;base64 URL of the image to start from", noun="init image",
                      control=False),
        ModalityParam("strength", float, None, 0, 1, 0.05, "Strength",
                      "img2img: how much of the schedule runs (1 = all of it, from pure noise)", control=False),
        # autoregressive (token) image models only; diffusion pipelines ignore them
        ModalityParam("temperature", float, None, 0, 5, 0.05, "Token temperature (AR image models; 0 = greedy)",
                      noun="temperature", control=False),
        ModalityParam("top_k", int, None, 0, 65536, 1, "Token top-k (AR image models; 0 = all codes)",
                      noun="top-k", zero_means_default=True, control=False),
    ),
    "video": (
        _size("width", 1280), _size("height", 1280),
        ModalityParam("frames", int, 0, 1, 257, 1, "Frames (0 = model default)", zero_means_default=True),
        ModalityParam("fps", int, 8, 1, 60, 1, "Frames per second", "of the saved clip"),
        _steps(), _guidance(5.0),
    ),
    "audio": (
        ModalityParam("seconds", float, 0, 0.1, 60, 0.5, "Duration (s, 0 = model default)",
                      noun="duration (seconds)", zero_means_default=True),
        _steps(200), _guidance(3.5),
    ),
    "text": (
        ModalityParam("max_new_tokens", int, 128, 1, 2048, 1, "Max new tokens", noun="max new tokens"),
        ModalityParam("temperature", float, 0.0, 0, 5, 0.05, "Temperature (0 = greedy)", noun="temperature"),
        ModalityParam("chat_template", bool, True, label="Apply the chat template when the tokenizer has one"),
        # diffusion LMs only (tiny-code-dllm, LLaDA, Dream); causal LMs ignore them
        ModalityParam("steps", int, 0, 1, 2048, 1, "Denoising steps (diffusion LMs; 0 = one per new token)",
                      noun="denoising steps", zero_means_default=True),
        ModalityParam("block_length", int, 0, 1, 2048, 1, "Block length (diffusion LMs; 0 = 32)",
                      "semi-autoregressive blocks decoded left to right", noun="block length",
                      zero_means_default=True),
        ModalityParam("top_p", float, None, 0.01, 1, 0.01, "Top-p", "nucleus sampling (1 = off)", noun="top-p",
                      control=False),
        ModalityParam("top_k", int, None, 0, 1000, 1, "Top-k", "sample from the k likeliest tokens (0 = off)",
                      noun="top-k", control=False),
        ModalityParam("do_sample", bool, None, label="Sample", help="default: sample when temperature > 0",
                      control=False),
        ModalityParam("system_prompt", str, None, 0, MAX_TEXT_INPUT_CHARS, label="System prompt / few-shot examples",
                      help="sent before the prompt (as the system message under a chat template); requests that "
                           "share it share a prefix the prefix cache reuses", noun="system prompt"),
    ),
}


def params_for(modality: str) -> tuple[ModalityParam, ...]:
    return MODALITY_PARAMS[modality]


def controls_for(modality: str) -> tuple[ModalityParam, ...]:
    """The parameters the modality's tab shows, in order."""
    return tuple(p for p in MODALITY_PARAMS[modality] if p.control)


def param(modality: str, name: str) -> ModalityParam:
    return next(p for p in MODALITY_PARAMS[modality] if p.name == name)


def default(modality: str, name: str) -> Any:
    """What a backend uses when a request leaves ``name`` out."""
    return param(modality, name).default


def request_params(modality: str, values: dict[str, Any]) -> dict[str, Any]:
    """Control or API values -> a request's ``params``: values left to the model (None, or 0
    where 0 means the model's default) are left out; nothing else is changed here, the
    validator checks the rest."""
    out = {}
    for spec in MODALITY_PARAMS[modality]:
        value = values.get(spec.name)
        if spec.leaves_to_model(value):
            continue
        out[spec.name] = value
    return out
