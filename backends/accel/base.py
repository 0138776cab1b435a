"""The method framework: typed parameter configs, a registry, and reversible application.

A method attaches to a loaded backend and the run plan it built, once per run, and its
handle restores the model exactly on ``remove``. Backends attach the methods of a request
around one run, so toggling a method never reloads the model and a run without methods is
the baseline.

A method's parameters are one frozen ``*Config`` dataclass whose ``param(...)`` fields
carry the default, range, choices, help and the paper's setting: the UI controls, the
validator, the presets, ``--list-methods`` and the method's own code all read that one
definition. Methods that cannot run together share a ``slot`` ("dit-cache", "decoder"...).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence, dataclass_transform

from backends.plan import Handle, RunPlan
from backends.types import MethodChoice, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from backends.base import Backend

_PARAM = "fastgen_param"  # the dataclasses.field metadata key of a user-facing parameter


def param(default: Any, *, help: str, min: float | None = None, max: float | None = None,
          step: float | None = None, choices: Iterable[Any] = (), paper: Any = None) -> Any:
    """A ``*Config`` field a user sets. ``paper``: the paper's own setting, only where the
    default differs from it (shown in the UI and the listing). Fields made without
    ``param`` are filled in by the method at run time (a step count, a fitted curve)."""
    info = {"min": min, "max": max, "step": step, "choices": tuple(choices), "help": help, "paper": paper}
    return dataclasses.field(default=default, metadata={_PARAM: info})


@dataclass_transform(frozen_default=True, field_specifiers=(param,))
class MethodConfig:
    """Base of each method's ``*Config``: a subclass becomes a frozen dataclass whose
    ``param(...)`` fields are the one definition of the method's parameters."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dataclass(frozen=True)(cls)


@dataclass(frozen=True)
class Param:
    """One tunable of a method, read off its Config field; the UI builds its control from
    this, the validator checks requests against it."""

    name: str
    kind: str  # "int" | "float" | "bool" | "choice"
    default: Any
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] = ()
    help: str = ""
    step: float | None = None
    paper: Any = None

    @classmethod
    def of(cls, f: dataclasses.Field) -> "Param":
        info = f.metadata[_PARAM]
        type_name = f.type if isinstance(f.type, str) else f.type.__name__
        kind = "choice" if info["choices"] else type_name
        if kind not in _PARSERS and kind != "choice":  # a spec bug, caught at import
            raise TypeError(f"parameter {f.name!r} of type {type_name} needs choices")
        return cls(f.name, kind, f.default, **info)

    def coerce(self, value: Any) -> Any:
        """Return ``value`` as this parameter's type, or raise ValidationError."""
        label = f"parameter '{self.name}'"
        if self.kind == "choice":
            if value not in self.choices:
                raise ValidationError(f"{label} must be one of {list(self.choices)}, got {value!r}")
            return value
        try:
            value = _PARSERS[self.kind](value)
        except (TypeError, ValueError):
            raise ValidationError(f"{label} must be a {self.kind}, got {value!r}") from None
        if self.min is not None and value < self.min or self.max is not None and value > self.max:
            raise ValidationError(f"{label} must be between {self.min} and {self.max}, got {value}")
        return value


_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        value = _WORDS.get(value.lower(), value)
    if not isinstance(value, (bool, int)):
        raise ValueError(value)
    return bool(value)


def _as_number(value: Any, integer: bool) -> int | float:
    number = float(value)
    if isinstance(value, bool) or not math.isfinite(number) or integer and not number.is_integer():
        raise ValueError(value)
    return int(number) if integer else number


_PARSERS = {"bool": _as_bool, "int": lambda v: _as_number(v, True), "float": lambda v: _as_number(v, False)}


@dataclass(frozen=True)
class MethodSpec:
    """What a method is, for the UI, the validator, the listing and the benchmark tables."""

    name: str
    title: str
    modalities: tuple[str, ...]
    families: tuple[str, ...]
    summary: str
    paper: str = ""
    lossless: bool | None = None  # None: depends on parameters
    config: type[MethodConfig] | None = None  # its parameters
    # resources the method takes over; two methods sharing one cannot run together
    slots: tuple[str, ...] = ()
    # where the defaults are not the paper's own settings, why (shown in the preset)
    defaults_note: str = ""

    def __post_init__(self):
        if self.config is not None and not issubclass(self.config, MethodConfig):
            raise TypeError(f"method {self.name!r}: config must be a MethodConfig subclass")
        self.params  # noqa: B018  (a malformed field fails at import, not at the first request)

    @cached_property
    def params(self) -> tuple[Param, ...]:
        fields = dataclasses.fields(self.config) if self.config is not None else ()
        return tuple(Param.of(f) for f in fields if _PARAM in f.metadata)

    def param(self, name: str) -> Param:
        return {p.name: p for p in self.params}[name]  # KeyError for an unknown name

    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def validate(self, params: dict[str, Any] | None) -> dict[str, Any]:
        """Fill defaults and coerce every value; unknown keys are an error, not ignored."""
        params, known = dict(params or {}), {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValidationError(f"method '{self.name}' has no parameter {', '.join(map(repr, unknown))}; "
                                  f"it takes {sorted(known) or 'none'}")
        return {p.name: p.coerce(params.get(p.name, p.default)) for p in self.params}

    def build(self, values: dict[str, Any]) -> MethodConfig | None:
        """The ``*Config`` of values ``validate`` returned."""
        return self.config(**values) if self.config is not None else None

    def describe(self) -> dict[str, Any]:
        """Everything a listing or a doc page shows about the method, as JSON-ready data."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "config"}
        return {**data, "params": [dataclasses.asdict(p) for p in self.params]}


def check_combinable(spec: MethodSpec, earlier: Iterable[MethodSpec]) -> None:
    """Refuse ``spec`` after ``earlier`` when it repeats one of them or shares a slot."""
    for other in earlier:
        if other.name == spec.name:
            raise ValidationError(f"method '{spec.name}' is listed twice")
        if set(other.slots) & set(spec.slots):
            raise ValidationError(f"methods '{other.name}' and '{spec.name}' cannot be combined")


class Method:
    """Base class: subclasses set ``spec`` and implement ``attach``.

    ``attach(backend, plan)`` runs once per generation, after the backend built its run
    plan (``backends.plan``): it edits the plan and patches the model as needed, and
    returns a ``Handle`` that holds this run's state, reports its ``stats``, ``warnings``
    (when a setting makes the method pointless for this request) and ``skipped_evals``,
    and undoes every patch in ``remove``. The method object itself keeps no run state.
    """

    spec: ClassVar[MethodSpec]
    # attached before the others whatever the listed order: it edits what others read
    # when they attach (the sampler: the scheduler and the step count)
    attach_first: ClassVar[bool] = False
    # its effect only exists in token-by-token decoding (a decode-time skip, a cache that
    # compresses what later tokens read): held-out perplexity is then measured by
    # teacher-forced decoding rather than one parallel forward (``backends.text_eval``)
    acts_while_decoding: ClassVar[bool] = False
    # stored calibrations for this run's model (``backends.accel._calibration``), handed
    # over by ``instantiate`` from the request's ``MethodChoice``; empty when none
    calibrations: Sequence[dict[str, Any]] = ()

    def __init__(self, config: MethodConfig | None = None, **params: Any):
        if config is None:
            config = self.spec.build(self.spec.validate(params))
        elif not isinstance(config, self.spec.config or ()):
            raise TypeError(f"method {self.spec.name!r} got a {type(config).__name__}")
        self.config = config

    def attach(self, backend: "Backend", plan: RunPlan) -> Handle:
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    name = cls.spec.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method {name!r} registered twice")
    _REGISTRY[name] = cls
    return cls


def all_methods() -> dict[str, type[Method]]:
    """Every registered method: importing this module imports the ``backends.accel``
    package first, which imports (and so registers) every method module."""
    return dict(_REGISTRY)


def get_method(name: str) -> type[Method]:
    methods = all_methods()
    if name not in methods:
        raise ValidationError(f"unknown acceleration method '{name}'; known: {', '.join(sorted(methods))}")
    return methods[name]


def methods_for(modality: str, family: str | None = None) -> list[type[Method]]:
    """Methods that apply to a modality (and to a model family, when it is known)."""
    return [cls for cls in all_methods().values()
            if modality in cls.spec.modalities and (family is None or family in cls.spec.families)]


def instantiate(choices: Sequence[MethodChoice], modality: str, family: str | None) -> list[Method]:
    """Validate a list of choices against specs, families and slots, then build them."""
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
        check_combinable(spec, seen.values())
        seen[spec.name] = spec
        # a choice validated upstream carries its Config: not validated a second time
        method = cls(config=choice.config) if choice.config is not None else cls(**choice.params)
        method.calibrations = list(choice.calibrations)
        methods.append(method)
    return methods


# Importing this module imports its package first, whose ``__init__`` imports every method
# module (each registers itself): the registry is complete before ``all_methods`` can run.
import backends.accel  # noqa: E402,F401
