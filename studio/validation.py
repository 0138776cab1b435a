"""One validation layer for every request, from the UI and the API alike.

Everything is checked before any model is touched, and every failure is a
``ValidationError`` whose message is shown to the user as is.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from backends.accel.base import all_methods, check_combinable
from backends.params import MAX_TEXT_INPUT_CHARS, MODALITY_PARAMS, Range
from backends.types import MODALITIES, MethodChoice, Request, ValidationError, shown

MAX_PROMPT_CHARS = 4000
MAX_MODEL_ID_CHARS = 512
MAX_METHODS = 8
MAX_METHOD_NAME_CHARS = 64
MAX_SEED = 2**32 - 1
MAX_BODY_BYTES = 64 * 1024
MAX_DEPTH = 6  # {request} > {params} or [methods] > {method} > {params} > value: 4 is all a request needs
MAX_ABS_NUMBER = 2**63  # beyond any knob; also keeps float() from overflowing
COMPARE_GROUP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SCALARS = (str, int, float, bool, type(None))


# -- the /run body: JSON text -> a plain dict, strictly ---------------------------------
def parse_request_json(text: Any) -> dict[str, Any]:
    """Decode the JSON body of ``/run`` under one strict schema's outer rules.

    Bounded before anything is decoded (size, then nesting depth by a scan that never
    recurses), strict JSON (no NaN/Infinity, no duplicate keys), and every string checked
    for NUL and lone surrogates, which cannot be stored or shown. The fields themselves
    are checked by ``validate_request``."""
    if not isinstance(text, str):
        raise ValidationError("the request must be JSON text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise ValidationError(f"the request is larger than {MAX_BODY_BYTES // 1024} KiB")
    try:
        data = _strict_json(text, "the request")
    except json.JSONDecodeError as exc:
        raise ValidationError(f"the request is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError):
        raise ValidationError("the request is not valid JSON") from None
    if not isinstance(data, dict):
        raise ValidationError("the request must be a JSON object {modality, model, prompt, ...}")
    check_plain_data(data)
    return data


def _strict_json(text: str, what: str) -> Any:
    """Decode JSON text under /run's rules: bounded nesting (checked before decoding, so a
    deep body never reaches the recursion limit), no duplicate keys, no NaN or Infinity.
    A ValidationError names ``what``; other decoding errors propagate as ValueError."""
    if nesting_depth(text) > MAX_DEPTH:
        raise ValidationError(f"{what} is nested more than {MAX_DEPTH} levels deep")
    return json.loads(text, object_pairs_hook=_object_without_duplicates, parse_constant=_refuse_constant)


def parse_methods(value: Any) -> list[Any]:
    """The ``methods`` argument of a named endpoint: a list of method names or {name, params}
    objects, or that list as JSON text; decoded under the same strict rules as ``/run``.
    Each entry is checked by ``validate_request``."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        if len(value) > MAX_BODY_BYTES:
            raise ValidationError(f"methods is larger than {MAX_BODY_BYTES // 1024} KiB")
        try:
            value = _strict_json(value, "methods")
        except (ValueError, RecursionError):
            raise ValidationError('methods must be a JSON list such as [{"name": "deepcache", "params": '
                                  '{"interval": 3}}]') from None
    if not isinstance(value, list):
        raise ValidationError("methods must be a list of method names or {name, params} objects")
    check_plain_data(value)
    return value


def nesting_depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text, outside strings; a plain loop, so a body of
    60,000 '[' costs a scan, not a RecursionError."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValidationError(f"key {shown(key)} appears twice")
        data[key] = value
    return data


def _refuse_constant(name: str) -> Any:
    raise ValidationError(f"{name} is not a number JSON allows")


def check_plain_data(data: Any) -> None:
    """Walk decoded JSON without recursion: strings must be storable text, numbers finite
    and of sane size."""
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                check_text("a key", key)
                stack.append(item)
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, str):
            check_text("a text value", value)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, (int, float)):
            if not abs(value) < MAX_ABS_NUMBER:
                raise ValidationError(f"the number {shown(value)} is out of range")


def check_text(label: str, value: str) -> str:
    """NUL and lone surrogates pass Python but break the database, files and the browser."""
    if "\x00" in value:
        raise ValidationError(f"{label} contains a NUL character")
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise ValidationError(f"{label} contains an invalid character (a lone UTF-16 surrogate)")
    return value


# -- the request ------------------------------------------------------------------------
def validate_request(data: Request | dict[str, Any]) -> Request:
    """Check and normalise a request; returns a new Request.

    A dict (decoded JSON from the API) must match the schema exactly; a Request built by
    the UI goes through the same field checks, which expect the typed values the UI's
    controls give (numbers from sliders, booleans from checkboxes)."""
    if isinstance(data, Request):
        request = data
    else:
        request = Request.from_dict(data)
    modality = request.modality
    if not isinstance(modality, str) or modality not in MODALITIES:
        raise ValidationError(f"unknown modality {shown(modality)}; expected one of {', '.join(MODALITIES)}")
    prompt = validate_text("the prompt", request.prompt)
    if not prompt.strip():
        raise ValidationError("the prompt is empty: describe what to generate")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValidationError(f"the prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    negative = validate_text("the negative prompt", request.negative_prompt)
    if len(negative) > MAX_PROMPT_CHARS:
        raise ValidationError(f"the negative prompt must be text of at most {MAX_PROMPT_CHARS} characters")
    model = validate_text("the model id", request.model).strip()
    if not model:
        raise ValidationError("no model chosen")
    if len(model) > MAX_MODEL_ID_CHARS or any(ord(c) < 32 for c in model):
        raise ValidationError("the model id is too long or contains control characters")
    seed = request.seed
    if seed is None or (seed == -1 and not isinstance(seed, bool)):
        seed = random.randint(0, MAX_SEED)
    seed = Range(int, 0, MAX_SEED, label="seed").check("seed", seed)
    params = validate_params(modality, request.params)
    check_text_input(prompt, params)
    methods = validate_methods(modality, request.methods)
    group = validate_compare_group(request.compare_group)
    return request.replace(prompt=prompt, negative_prompt=negative, model=model, seed=seed, params=params,
                           methods=methods, compare_group=group)


def check_text_input(prompt: str, params: dict[str, Any]) -> None:
    """The system prompt goes to the model with the prompt: their lengths are limited together."""
    total = len(prompt) + len(params.get("system_prompt") or "")
    if total > MAX_TEXT_INPUT_CHARS:
        raise ValidationError(f"the prompt and system prompt are {total} characters together; the limit is "
                              f"{MAX_TEXT_INPUT_CHARS}")


def validate_text(label: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(f"{label} must be text")
    return check_text(label, value)


def validate_compare_group(group: Any) -> str | None:
    """A compare group is an id made by the studio; from outside only a short plain token."""
    if group is None:
        return None
    if not isinstance(group, str) or not COMPARE_GROUP.fullmatch(group):
        raise ValidationError("compare_group must be 1 to 64 characters from A-Z, a-z, 0-9, '_', '.' and '-'")
    return group


def validate_params(modality: str, params: dict[str, Any] | None) -> dict[str, Any]:
    """Each parameter known for the modality and in its range (``backends.params``, the
    table the tabs and the named endpoints use too); None, or 0 where 0 means the
    model's default, leaves it to the model."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValidationError("params must be an object")
    specs = {spec.name: spec for spec in MODALITY_PARAMS[modality]}
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in specs:
            raise ValidationError(f"unknown {modality} parameter {shown(name)}; known: {', '.join(sorted(specs))}")
        checked = specs[name].check(value)
        if checked is not None:
            out[name] = checked
    return out


def validate_methods(modality: str, methods: Any) -> list[MethodChoice]:
    """Each method known, typed and fit for the modality; no method twice, no two that share
    a slot: refused here, before any model is loaded, not recorded as a failed run."""
    if methods is None:
        methods = []
    if not isinstance(methods, (list, tuple)):
        raise ValidationError("methods must be a list of method names or {name, params} objects")
    if len(methods) > MAX_METHODS:
        raise ValidationError(f"at most {MAX_METHODS} methods can be combined")
    registry = all_methods()
    out: list[MethodChoice] = []
    for raw in methods:
        choice = MethodChoice.from_obj(raw)
        name = validate_text("a method name", choice.name)
        if name not in registry:
            raise ValidationError(f"unknown acceleration method {shown(name)}; known: {', '.join(sorted(registry))}")
        spec = registry[name].spec
        if modality not in spec.modalities:
            raise ValidationError(f"method '{spec.name}' does not apply to {modality} generation")
        check_combinable(spec, [registry[earlier.name].spec for earlier in out])
        params = check_method_params(spec, choice.params)
        values = spec.validate(params)
        out.append(MethodChoice(spec.name, values, config=spec.build(values)))
    return out


def check_method_params(spec, params: Any) -> dict[str, Any]:
    """Types as JSON gives them: a flag is true/false (never "no", which ``bool()`` reads as
    true), a number is a number; the spec then checks names and ranges."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValidationError(f"the params of method '{spec.name}' must be an object")
    kinds = {p.name: p.kind for p in spec.params}
    choices = {p.name: p.choices for p in spec.params}
    for key, value in params.items():
        label = f"method '{spec.name}' parameter {shown(key)}"
        if not isinstance(value, SCALARS):
            raise ValidationError(f"{label} must be a plain value, not a list or object")
        if isinstance(value, str):
            check_text(label, value)
        kind = kinds.get(key)
        if kind == "bool" and not isinstance(value, bool):
            raise ValidationError(f"{label} must be true or false, got {shown(value)}")
        if kind in ("int", "float") and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValidationError(f"{label} must be a number, got {shown(value)}")
        if kind == "choice" and isinstance(value, bool) and not any(isinstance(c, bool) for c in choices[key]):
            raise ValidationError(f"{label} must be one of {list(choices[key])}, got {shown(value)}")  # True == 1
        if kind in ("int", "float") and not abs(value) < MAX_ABS_NUMBER:
            raise ValidationError(f"{label} is out of range")
    return params
