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
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence, dataclass_transform

from backends.plan import Handle, RunPlan
from backends.types import MethodChoice, ValidationError

if TYPE_CHECKING:  # pragma: no cover
    from backends.base import Backend

_PARAM = "fastgen_param"  # the dataclasses.field metadata key of a user-facing parameter


def param(default: Any, *, help: str, min: float | None = None, max: float | None = None,
          step: float | None = None, choices: Iterable[Any] = (), paper: Any = None,
          only_if: tuple[str, Any] | None = None) -> Any:
    """A ``*Config`` field a user sets. ``paper``: the paper's own setting, only where the
    default differs from it (shown in the UI and the listing). ``only_if=(other, value)``:
    the method reads this parameter only while ``other`` has ``value`` (a rule that a
    second parameter replaces), so the tuner does not draw it otherwise and two
    configurations that differ only in it are one run. Fields made without ``param`` are
    filled in by the method at run time (a step count, a fitted curve)."""
    info = {"min": min, "max": max, "step": step, "choices": tuple(choices), "help": help, "paper": paper,
            "only_if": tuple(only_if) if only_if is not None else None}
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
    only_if: tuple[str, Any] | None = None  # (other parameter, the value under which this one is read)

    def is_read(self, values: Mapping[str, Any]) -> bool:
        """Whether the method reads this parameter under ``values`` (complete, validated)."""
        return self.only_if is None or values[self.only_if[0]] == self.only_if[1]

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
        by_name = {p.name: p for p in self.params}  # a malformed field fails at import, not at the first request
        for p in self.params:
            if p.only_if is None:
                continue
            other, value = p.only_if
            if other == p.name or other not in by_name or by_name[other].only_if is not None:
                raise TypeError(f"method {self.name!r}: parameter {p.name!r} must be read only under another, "
                                f"unconditional parameter's value, not {other!r}")
            try:
                takes = by_name[other].coerce(value) == value
            except ValidationError:
                takes = False
            if not takes:
                raise TypeError(f"method {self.name!r}: {p.name!r} is read only if {other!r} is {value!r}, "
                                f"which {other!r} cannot take")

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

    def canonical(self, values: dict[str, Any]) -> dict[str, Any]:
        """``values`` (validated) with every parameter the method does not read under them
        set to its default: two configurations that run alike compare equal."""
        return {p.name: values[p.name] if p.is_read(values) else p.default for p in self.params}

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


# A bound of ``Limits.ranges``: a number, None (the Config's own bound), the name of
# another parameter of the same method, whose value is the bound (``tree_size >= depth``),
# or (name, offset): that value plus offset (a strict order: ``("timestep_low", 1)``).
Bound = int | float | str | tuple[str, float] | None


@dataclass(frozen=True)
class Limits:
    """What one loaded model allows of a method: ranges and choices within its Config's,
    or no use at all. The Config says what a parameter may be for any model; a model may
    take less (DeepCache's branch must stay above this UNet's deepest level, a
    noise-prediction model has no flow solvers). The tuner's search space reads these, so
    it never proposes a value the model refuses; ``Backend.run`` checks them before
    attaching, so such a value is a one-line refusal before any work.

    ``ranges``: parameter -> (low, high), inclusive, each a ``Bound``. ``choices``:
    parameter -> the choices that fit. ``unfit``: why the method cannot run on this model
    at all (one line), or "". ``search_ranges`` / ``search_choices``: narrower still, for
    the search only, where the refusal depends on several parameters at once (the int4
    group sizes that leave a layer to quantize once the widest skip list is applied): a
    value outside them may run, so it is not refused, but the tuner does not spend a
    trial on it."""

    ranges: Mapping[str, tuple[Bound, Bound]] = field(default_factory=dict)
    choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    unfit: str = ""
    search_ranges: Mapping[str, tuple[Bound, Bound]] = field(default_factory=dict)
    search_choices: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)

    def bounds(self, name: str, values: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """The (low, high) of parameter ``name`` given the other values (None: no limit)."""
        low, high = self.ranges.get(name, (None, None))
        return _resolve(low, values), _resolve(high, values)

    def searched_bounds(self, name: str, values: Mapping[str, Any]) -> tuple[float | None, float | None]:
        """``bounds`` within ``search_ranges``: the range the tuner samples."""
        lows, highs = zip(self.bounds(name, values), _resolve_pair(self.search_ranges.get(name), values))
        return (max((v for v in lows if v is not None), default=None),
                min((v for v in highs if v is not None), default=None))

    def searched_choices(self, name: str) -> tuple[Any, ...] | None:
        """The choices the tuner samples (None: the Config's own)."""
        hard, soft = self.choices.get(name), self.search_choices.get(name)
        if hard is None or soft is None:
            return hard if soft is None else soft
        return tuple(c for c in hard if c in soft)

    def references(self, name: str) -> set[str]:
        """The other parameters the bounds of ``name`` are read from (sampled before it)."""
        pairs = [*self.ranges.get(name, ()), *self.search_ranges.get(name, ())]
        return {b[0] if isinstance(b, tuple) else b for b in pairs if isinstance(b, (str, tuple))}

    def refusal(self, method: str, values: Mapping[str, Any]) -> str | None:
        """One line saying which value this model cannot take, or None when all fit."""
        if self.unfit:
            return self.unfit
        for name, allowed in self.choices.items():
            if name in values and values[name] not in allowed:
                return (f"{method}: {name}={values[name]!r} does not fit this model; "
                        f"use one of {list(allowed)}")
        for name in self.ranges:
            if name not in values:
                continue
            low, high = self.bounds(name, values)
            value = values[name]
            # a bound read from another value (low_start + 0.05) carries float error: 1e-9 slack
            if low is not None and value < low - 1e-9 or high is not None and value > high + 1e-9:
                bound_low, bound_high = self.ranges[name]
                return f"{method}: {name} must be {_span(bound_low, bound_high, values)}, got {value}"
        return None


def _resolve_pair(pair: tuple[Bound, Bound] | None, values: Mapping[str, Any]) -> tuple[float | None, float | None]:
    return (None, None) if pair is None else (_resolve(pair[0], values), _resolve(pair[1], values))


def _resolve(bound: Bound, values: Mapping[str, Any]) -> float | None:
    if isinstance(bound, tuple):
        other = values.get(bound[0])
        return None if other is None else other + bound[1]
    return values.get(bound) if isinstance(bound, str) else bound


def _shown(bound: Bound, values: Mapping[str, Any]) -> str:
    if isinstance(bound, tuple):
        name, offset = bound
        return f"{name} {'+' if offset >= 0 else '-'} {abs(offset)} ({_resolve(bound, values)})"
    return f"{bound} ({values.get(bound)})" if isinstance(bound, str) else str(bound)


def _span(low: Bound, high: Bound, values: Mapping[str, Any]) -> str:
    """``between 0 and 1 for this model`` / ``at least depth (6)``."""
    shown = lambda b: _shown(b, values)  # noqa: E731
    where = "" if isinstance(low, (str, tuple)) or isinstance(high, (str, tuple)) else " for this model"
    if low is not None and high is not None:
        return f"between {shown(low)} and {shown(high)}{where}"
    return (f"at least {shown(low)}" if low is not None else f"at most {shown(high)}") + where


NO_LIMITS = Limits()


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

    @classmethod
    def limits(cls, backend: "Backend") -> Limits:
        """What ``backend``'s loaded model allows of this method (``Limits``); by default
        all its Config allows. Cheap: read off the model's structure, nothing run."""
        return NO_LIMITS

    def check_limits(self, backend: "Backend") -> None:
        """Refuse, in one line, a configuration ``backend``'s model cannot take."""
        values = {f.name: getattr(self.config, f.name) for f in dataclasses.fields(self.config)} \
            if self.config is not None else {}
        reason = type(self).limits(backend).refusal(self.spec.name, values)
        if reason:
            raise ValidationError(reason)

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
