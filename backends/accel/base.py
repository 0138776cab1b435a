"""The method framework: typed parameter specs, a registry, and reversible application.

A method is a small object that patches a loaded backend in ``apply`` and restores it
exactly in ``remove``. Backends apply the methods of a request around one run, so
toggling a method never reloads the model and a run without methods is the baseline.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Sequence

from backends.types import MethodChoice, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from backends.base import Backend


@dataclass(frozen=True)
class Param:
    """One tunable of a method; the UI builds its control from this, the validator checks
    requests against it."""

    name: str
    kind: str  # "int" | "float" | "bool" | "choice"
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""
    step: float | None = None

    def coerce(self, value: Any) -> Any:
        """Return ``value`` as this parameter's type, or raise ValidationError."""
        label = f"parameter '{self.name}'"
        try:
            if self.kind == "bool":
                if isinstance(value, str):
                    if value.lower() in {"true", "1", "yes", "on"}:
                        return True
                    if value.lower() in {"false", "0", "no", "off"}:
                        return False
                    raise ValueError(value)
                if not isinstance(value, (bool, int)):
                    raise ValueError(value)
                return bool(value)
            if self.kind == "choice":
                if value not in self.choices:
                    raise ValidationError(f"{label} must be one of {list(self.choices)}, got {value!r}")
                return value
            if isinstance(value, bool):
                raise ValueError(value)
            if self.kind == "int":
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                number = int(number)
            elif self.kind == "float":
                number = float(value)
                if not math.isfinite(number):
                    raise ValueError(value)
            else:  # pragma: no cover - a spec bug, not user input
                raise TypeError(f"unknown parameter kind {self.kind}")
        except ValidationError:
            raise
        except (TypeError, ValueError):
            raise ValidationError(f"{label} must be a {self.kind}, got {value!r}") from None
        if self.min is not None and number < self.min or self.max is not None and number > self.max:
            raise ValidationError(f"{label} must be between {self.min} and {self.max}, got {number}")
        return number


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, for the UI, the validator and the benchmark tables."""

    name: str
    title: str
    modalities: tuple[str, ...]
    families: tuple[str, ...]
    summary: str
    paper: str = ""
    lossless: bool | None = None  # None: depends on parameters
    params: tuple[Param, ...] = ()
    conflicts: tuple[str, ...] = ()
    # where the defaults are not the paper's own settings, what they are instead (shown in the preset)
    defaults_note: str = ""

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Fill defaults and coerce every value; unknown keys are an error, not ignored."""
        params = dict(params or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValidationError(
                f"method '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                f"it takes {sorted(known) or 'none'}"
            )
        return {p.name: p.coerce(params.get(p.name, p.default)) for p in self.params}


class Method:
    """Base class: subclasses set ``spec`` and override what they need.

    ``apply``/``remove`` patch the backend's model; ``prepare_call`` edits the keyword
    arguments of the generation call (scheduler, steps, generate kwargs); ``stats``
    reports what the method did in the last run; ``warnings`` says when a setting makes
    the method pointless for this request, so the UI can say so.
    """

    spec: ClassVar[MethodSpec]

    def __init__(self, **params: Any):
        self.params = self.spec.validate(params)

    def apply(self, backend: "Backend") -> None:
        pass

    def remove(self, backend: "Backend") -> None:
        pass

    def prepare_call(self, backend: "Backend", call: dict[str, Any]) -> dict[str, Any]:
        return call

    def stats(self) -> dict[str, Any]:
        return {}

    def warnings(self, backend: "Backend", call: dict[str, Any]) -> list[str]:
        return []


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    name = cls.spec.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def all_methods() -> dict[str, type[Method]]:
    return dict(_REGISTRY)


def get_method(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        raise ValidationError(f"unknown acceleration method '{name}'; known: {', '.join(sorted(methods))}")
    return methods[name]


def methods_for(modality: str, family: str | None = None) -> list[type[Method]]:
    """Methods that apply to a modality (and to a model family, when it is known)."""
    return [
        cls
        for cls in all_methods().values()
        if modality in cls.spec.modalities and (family is None or family in cls.spec.families)
    ]


def instantiate(choices: Sequence[MethodChoice], modality: str, family: str | None) -> list[Method]:
    """Validate a list of choices against specs, families and conflicts, then build them."""
    seen: dict[str, MethodSpec] = {}
    methods = []
    for choice in choices:
        cls = get_method(choice.name)
        spec = cls.spec
        if modality not in spec.modalities:
            raise ValidationError(f"method '{spec.name}' does not apply to {modality} generation")
        if family is not None and family not in spec.families:
            raise ValidationError(
                f"method '{spec.name}' does not apply to this model (a {family} model); "
                f"it supports {', '.join(spec.families)}"
            )
        if spec.name in seen:
            raise ValidationError(f"method '{spec.name}' is listed twice")
        for other in seen.values():
            if spec.name in other.conflicts or other.name in spec.conflicts:
                raise ValidationError(f"methods '{other.name}' and '{spec.name}' cannot be combined")
        seen[spec.name] = spec
        methods.append(cls(**choice.params))
    return methods


@contextlib.contextmanager
def applied(backend: "Backend", methods: Sequence[Method]) -> Iterator[list[Method]]:
    """Apply ``methods`` in order and remove them in reverse order, whatever happens."""
    done: list[Method] = []
    try:
        for method in methods:
            method.apply(backend)
            done.append(method)
        yield list(methods)
    finally:
        for method in reversed(done):
            method.remove(backend)


# Importing this module imports its package first, whose ``__init__`` imports every method
# module (each registers itself): the registry is complete before ``all_methods`` can run.
import backends.accel  # noqa: E402,F401
