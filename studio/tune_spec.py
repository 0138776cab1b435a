"""What an auto-tune is asked (``studio.tune``): the quality floor, the tune request
(``TuneSpec``, from the tab, the ``/tune`` JSON or the CLI) and the search space built
from the method specs. Pure data and checks: nothing here runs a model or opens a database.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from backends.accel.base import NO_LIMITS, Limits, MethodSpec, Param, get_method, methods_for
from backends.catalog import find_bundled, recommended_params
from backends.params import default as param_default
from backends.types import MODALITIES, MethodChoice, Request, StudioError, ValidationError, shown
from benchmarks.prompts import PROMPT_KINDS

MAX_TRIALS = 500
MAX_MINUTES = 24 * 60
MAX_PROMPTS = 64
MAX_REPEATS = 10

# -- the quality floor --------------------------------------------------------------------

# The metrics of the Compare table, per modality (``studio.metrics.quality``).
QUALITY_METRICS = {"image": ("psnr", "ssim"), "video": ("psnr", "ssim"), "audio": ("lsd", "snr"),
                   "text": ("exact_match", "token_agreement")}
GRADED = ("image", "video", "audio")  # modalities whose bundled models have a task grader
# The one quality number per modality the search maximises (the Compare plot's axis).
PRIMARY = {"image": ("psnr", 1.0), "video": ("psnr", 1.0), "audio": ("lsd", -1.0), "text": ("token_agreement", 1.0)}
# Diffusion LMs: the change (%) of their generated code's perplexity under tiny-code-llama
# from the baseline's (``backends.text_eval.output_perplexity``), their comparable quality
# figure: token agreement falls off after the first changed token of a lossy run.
OUTPUT_PERPLEXITY = "perplexity_delta_pct"
_CLAUSE = re.compile(r"^([a-z_]+)\s*(>=|<=|>|<|=)?\s*([+-]?\d+(?:\.\d+)?)?\s*(%)?$")


@dataclass(frozen=True)
class FloorClause:
    """One condition: ``metric op value`` (``exact`` alone: every output bit-identical)."""

    metric: str
    op: str = ""
    value: float = 0.0

    def violation(self, figures: Mapping[str, float]) -> float:
        """<= 0 when met; otherwise how far off (optuna's constraint convention)."""
        if self.metric == "exact":
            return 0.0 if figures.get("exact", 0.0) >= 1.0 else 1.0
        value = figures.get(self.metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return 1e6  # not measured (no grader output): never counts as met
        gap = self.value - value if self.op in (">=", ">") else value - self.value
        if self.op in (">", "<") and gap == 0:
            return 1e-9  # a strict bound exactly on the line is not met
        if self.op in (">=", ">", "<=", "<"):
            return gap
        return abs(value - self.value)  # "="

    def __str__(self) -> str:
        return self.metric if self.metric == "exact" else f"{self.metric}{self.op}{self.value:g}"


@dataclass(frozen=True)
class QualityFloor:
    clauses: tuple[FloorClause, ...]

    @property
    def exact(self) -> bool:
        return any(c.metric == "exact" for c in self.clauses)

    @property
    def needs_output_perplexity(self) -> bool:
        return any(c.metric == OUTPUT_PERPLEXITY for c in self.clauses)

    @property
    def needs_grader(self) -> bool:
        return any(c.metric == "adherence" or c.metric.startswith("task_") for c in self.clauses)

    def violations(self, figures: Mapping[str, float]) -> list[float]:
        return [c.violation(figures) for c in self.clauses]

    def met(self, figures: Mapping[str, float]) -> bool:
        return all(v <= 0 for v in self.violations(figures))

    def __str__(self) -> str:
        return ", ".join(str(c) for c in self.clauses)


def parse_floor(text: str, modality: str) -> QualityFloor:
    """``adherence>=-5, psnr>=28`` (also joined by `` and ``) -> a QualityFloor.

    ``adherence``: the bundled classifier's ``task_all`` minus the baseline's, in
    percentage points; ``task_<attr>``: that classifier score itself (0-1); ``exact``:
    every output bit-identical to the baseline's; the Compare table's quality columns
    (psnr, ssim / lsd, snr / exact_match, token_agreement) by name. Anything else is a
    one-line ValidationError."""
    if modality not in MODALITIES:
        raise ValidationError(f"modality must be one of {list(MODALITIES)}")
    if not isinstance(text, str) or not text.strip():
        raise ValidationError("give a quality floor, e.g. 'adherence>=-5, psnr>=28' or 'exact'")
    if len(text) > 300:
        raise ValidationError("the quality floor is longer than 300 characters")
    parts = [p.strip() for chunk in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE)
             for p in chunk.split(",")]
    clauses = [_parse_clause(part, modality) for part in parts if part]
    if not clauses:
        raise ValidationError("give a quality floor, e.g. 'adherence>=-5, psnr>=28' or 'exact'")
    return QualityFloor(tuple(clauses))


def floor_metrics(modality: str) -> list[str]:
    names = ["exact", *QUALITY_METRICS[modality]]
    return names + (["adherence", "task_all"] if modality in GRADED else [])


def _parse_clause(part: str, modality: str) -> FloorClause:
    match = _CLAUSE.match(part.strip().lower().replace(" ", ""))
    if not match:
        raise ValidationError(f"cannot read the floor condition {shown(part)}; write e.g. psnr>=28 or exact")
    metric, op, value, percent = match.groups()
    if metric == "perplexity":
        raise ValidationError("the text backend does not report held-out perplexity, so a perplexity floor cannot "
                              f"be checked; use exact or token_agreement>=0.9 ({OUTPUT_PERPLEXITY}<=5 for a "
                              "diffusion LM)")
    if metric == OUTPUT_PERPLEXITY and modality == "text":
        if not op or value is None:
            raise ValidationError(f"the floor condition {shown(part)} needs a comparison and a number, "
                                  f"e.g. {OUTPUT_PERPLEXITY}<=5")
        return FloorClause(metric, op, float(value))
    known = floor_metrics(modality)
    if metric == "exact":
        if op or value:
            raise ValidationError("'exact' takes no value: it means every output identical to the baseline's")
        return FloorClause("exact")
    graded = metric == "adherence" or metric.startswith("task_")
    if metric not in known and not (graded and modality in GRADED):
        other = [m for m, names in QUALITY_METRICS.items() if metric in names]
        where = f"it is a {other[0]} metric; " if other else ""
        raise ValidationError(f"unknown metric {shown(metric)} in the quality floor for {modality}: {where}"
                              f"use {', '.join(known)}")
    if not op or value is None:
        raise ValidationError(f"the floor condition {shown(part)} needs a comparison and a number, e.g. {metric}>=28")
    if percent:
        raise ValidationError(f"'%' only applies to a perplexity floor; write {metric}{op}{value}")
    return FloorClause(metric, op, float(value))


# -- the request of a tune ---------------------------------------------------------------

@dataclass(frozen=True)
class TuneSpec:
    """What to tune. ``prompts`` empty: ``n_prompts`` bundled benchmark prompts
    (``benchmarks.prompts``). ``trials`` / ``minutes``: the search budget (either or both;
    the held-out confirmation runs after it). ``methods`` None: every method that applies
    to the model, except the implementation switches in ``NOT_SEARCHED_BY_DEFAULT``.
    ``split``: the fraction of prompts tuned on (the rest confirm). ``repeats``: timed
    runs per prompt and configuration. ``confirm_top``: how many of the fastest feasible
    configurations are confirmed. ``compare_singles``: also measure each allowed method at
    its defaults in the confirmation (the benchmark table's rows)."""

    modality: str
    model: str
    floor: str
    prompts: tuple[str, ...] = ()
    n_prompts: int = 8
    prompt_kind: str = "mixed"
    params: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    trials: int | None = 20
    minutes: float | None = None
    methods: tuple[str, ...] | None = None
    split: float = 0.5
    repeats: int = 2
    confirm_top: int = 3
    compare_singles: bool = False
    study: str | None = None
    save_preset: bool = True

    def checked(self) -> "TuneSpec":
        """The spec with its values checked (ValidationError otherwise)."""
        if self.modality not in MODALITIES:
            raise ValidationError(f"modality must be one of {list(MODALITIES)}")
        if not isinstance(self.model, str) or not self.model.strip() or len(self.model) > 512:
            raise ValidationError("pick a model")
        if self.trials is None and self.minutes is None:
            raise ValidationError("give a budget: a number of trials, minutes, or both")
        if self.trials is not None and not (isinstance(self.trials, int) and 1 <= self.trials <= MAX_TRIALS):
            raise ValidationError(f"trials must be a whole number between 1 and {MAX_TRIALS}")
        if self.minutes is not None and not (isinstance(self.minutes, (int, float)) and 0 < self.minutes <= MAX_MINUTES):
            raise ValidationError(f"minutes must be between 0 and {MAX_MINUTES}")
        if not 0.1 <= float(self.split) <= 0.9:
            raise ValidationError("split must be between 0.1 and 0.9 (the fraction of prompts tuned on)")
        if not 1 <= int(self.repeats) <= MAX_REPEATS:
            raise ValidationError(f"repeats must be between 1 and {MAX_REPEATS}")
        if not 1 <= int(self.confirm_top) <= 8:
            raise ValidationError("confirm_top must be between 1 and 8")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ValidationError("seed must be a whole number between 0 and 2^31")
        if self.prompt_kind not in PROMPT_KINDS:
            raise ValidationError(f"prompt_kind must be one of {', '.join(PROMPT_KINDS)}; got {shown(self.prompt_kind)}")
        if len(self.prompts) > MAX_PROMPTS or not self.prompts and not 2 <= self.n_prompts <= MAX_PROMPTS:
            raise ValidationError(f"use between 2 and {MAX_PROMPTS} prompts")
        if any(not isinstance(p, str) or not p.strip() or len(p) > 4000 for p in self.prompts):
            raise ValidationError("each prompt must be non-empty text of at most 4000 characters")
        if self.study is not None and (not self.study.strip() or len(self.study) > 120):
            raise ValidationError("a study name must be non-empty and at most 120 characters")
        floor = parse_floor(self.floor, self.modality)
        if floor.needs_grader:
            entry = find_bundled(self.model)
            if entry is None or entry.grader is None:
                raise ValidationError(f"adherence needs a bundled model with a task grader; {shown(self.model)} has "
                                      "none: use psnr, ssim, lsd or exact instead")
        for name in self.methods or ():
            get_method(name)  # an unknown name is a one-line error
        from studio.validation import validate_request

        validate_request(Request(self.modality, self.model, "a prompt", params=self.request_params()))
        return self

    def quality_floor(self) -> QualityFloor:
        return parse_floor(self.floor, self.modality)

    def request_params(self) -> dict[str, Any]:
        """The modality params every run of the tune uses: the model's recommended settings
        under the user's."""
        return {**recommended_params(self.model), **dict(self.params)}

    def prompt_list(self) -> list[str]:
        if self.prompts:
            return list(self.prompts)
        from benchmarks.prompts import default_prompts

        return default_prompts(self.modality, self.n_prompts, self.prompt_kind, self.seed)

    def fingerprint(self) -> str:
        """What makes two tunes the same study (the budget and the name do not)."""
        data = {"modality": self.modality, "model": self.model, "floor": str(self.quality_floor()),
                "prompts": self.prompt_list(), "params": self.request_params(), "seed": self.seed,
                "methods": sorted(self.methods) if self.methods else None, "split": self.split,
                "repeats": self.repeats}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:10]

    def study_name(self) -> str:
        return self.study.strip() if self.study else f"{self.model} [{self.quality_floor()}] {self.fingerprint()}"


SPEC_KEYS = {f.name for f in dataclasses.fields(TuneSpec)}


def parse_tune_json(text: Any) -> TuneSpec:
    """The ``/tune`` body: JSON text under ``/run``'s strict rules (size, depth, no
    duplicate keys or NaN, plain strings), then ``spec_from_dict``."""
    from studio.validation import MAX_BODY_BYTES, _strict_json, check_plain_data

    if not isinstance(text, str):
        raise ValidationError("the tune request must be JSON text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BODY_BYTES:
        raise ValidationError(f"the tune request is larger than {MAX_BODY_BYTES // 1024} KiB")
    try:
        data = _strict_json(text, "the tune request")
    except json.JSONDecodeError as exc:
        raise ValidationError(f"the tune request is not valid JSON: {exc.msg} at character {exc.pos}") from None
    except (ValueError, RecursionError):
        raise ValidationError("the tune request is not valid JSON") from None
    check_plain_data(data)
    return spec_from_dict(data)


def default_methods(modality: str, family: str | None) -> list[str]:
    """The methods a tune searches when none are named: those that apply to the model,
    without the implementation switches."""
    return [cls.spec.name for cls in sorted(methods_for(modality, family), key=lambda c: c.spec.name)
            if cls.spec.name not in NOT_SEARCHED_BY_DEFAULT]


def spec_from_dict(data: Any) -> TuneSpec:
    """A TuneSpec from decoded JSON (the ``/tune`` endpoint): known keys only, plain types."""
    if not isinstance(data, dict):
        raise ValidationError("the tune request must be a JSON object {modality, model, floor, ...}")
    unknown = sorted(str(k) for k in data if k not in SPEC_KEYS)
    if unknown:
        raise ValidationError(f"unknown tune key {shown(unknown[0])}; known: {', '.join(sorted(SPEC_KEYS))}")
    for required in ("modality", "model", "floor"):
        if required not in data:
            raise ValidationError(f"the tune request has no '{required}'")
    values = dict(data)
    for key in ("prompts", "methods"):
        if values.get(key) is not None:
            if not isinstance(values[key], list) or not all(isinstance(v, str) for v in values[key]):
                raise ValidationError(f"'{key}' must be a list of strings")
            values[key] = tuple(values[key])
    for key in ("modality", "model", "floor", "prompt_kind", "study"):
        if key in values and not isinstance(values[key], str) and not (key == "study" and values[key] is None):
            raise ValidationError(f"'{key}' must be a string")
    if not isinstance(values.get("params", {}), dict):
        raise ValidationError("'params' must be an object")
    for key in ("n_prompts", "seed", "trials", "repeats", "confirm_top"):
        if values.get(key) is not None and (isinstance(values[key], bool) or not isinstance(values[key], int)):
            raise ValidationError(f"'{key}' must be a whole number")
    for key in ("minutes", "split"):
        if values.get(key) is not None and (isinstance(values[key], bool) or not isinstance(values[key], (int, float))):
            raise ValidationError(f"'{key}' must be a number")
    for key in ("compare_singles", "save_preset"):
        if key in values and not isinstance(values[key], bool):
            raise ValidationError(f"'{key}' must be true or false")
    if values.get("methods") == ():
        values["methods"] = None
    return TuneSpec(**values).checked()


# -- the search space --------------------------------------------------------------------

def canonical_config(methods: Sequence[MethodChoice]) -> str:
    """One string per distinct configuration: methods by name, every parameter filled in.
    ``deepcache + cfg_truncation(fraction=0.5)`` and ``cfg_truncation + deepcache(interval=3)``
    name the same run (the order methods are listed in does not change what runs: the
    plan editors attach first, the others patch what they each own), so a configuration
    already measured is reused, never measured twice."""
    full = sorted((m.name, get_method(m.name).spec.canonical(get_method(m.name).spec.validate(dict(m.params))))
                  for m in methods)
    return json.dumps(full, sort_keys=True, default=str)


# Methods left out unless named: they switch an implementation (compile takes minutes per
# configuration on a CPU; an attention backend is the same maths), they do not trade
# quality for speed; or their speed comes from the history of earlier prompts
# (approx_cache), which the tuner's repeated prompts would fill with themselves; or they
# fit a request's token count rather than a model (sparse_vdit's blocks must tile the
# clip's tokens, and its patterns come from a calibration pass of that size).
NOT_SEARCHED_BY_DEFAULT = ("compile", "attention_backend", "approx_cache", "sparse_vdit")
# Parameters kept at their defaults: they pick an implementation or a data source.
FIXED_PARAMS = {"sta": {"backend"}, "attention_backend": {"backend"}, "speculative": {"draft"},
                "mag_cache": {"ratios"}, "teacache": {"rescale"}, "compile": {"scope", "mode", "compiler", "fullgraph"},
                "int8_attention": {"kernel"}, "dynamic_tree": {"draft"}, "retrieval_draft": {"corpus_tokens"},
                "awq": {"calib_tokens", "grid"}, "prefix_cache": {"budget_mb", "disk"},
                "token_recycling": {"persist"}, "chunk_cache": {"budget_mb", "separator"},
                "prompt_compress": {"scorer"}, "t_stitch": {"small_model"}, "sparse_vdit": {"backend"}}
# Without a loaded model to ask (``Method.limits``): LCM needs a distilled model, fp8
# weights a GPU with fp8 support. With one, its limits decide.
UNUSABLE_CHOICES = {("sampler", "scheduler"): {"lcm"}, ("weight_quant", "weights"): {"fp8"}}
NONE = "none"


class Conflict(StudioError):
    """The sampled methods cannot run together (slots); the trial is pruned."""


@dataclass
class SearchSpace:
    """Per slot group, none or one method; per method, its searched parameters."""

    groups: list[tuple[str, list[MethodSpec]]]
    params: dict[str, list[Param]]
    bounds: dict[tuple[str, str], tuple[float, float]]
    notes: list[str] = field(default_factory=list)
    # what the loaded model allows of each method (``Method.limits``); NO_LIMITS when unknown
    limits: dict[str, Limits] = field(default_factory=dict)
    # parameters left with one value by the model's limits (not searched, not the default)
    fixed: dict[tuple[str, str], Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [spec.name for _, specs in self.groups for spec in specs]

    def suggest(self, trial) -> list[MethodChoice]:
        """The configuration of one optuna trial (conditional: a method's parameters are
        only sampled when it is chosen; a slot already taken by a two-slot method is skipped)."""
        chosen: list[MethodChoice] = []
        taken: set[str] = set()
        for slot, specs in self.groups:
            if slot in taken:
                continue
            name = trial.suggest_categorical(f"slot:{slot}", [NONE, *[s.name for s in specs]])
            if name == NONE:
                continue
            spec = get_method(name).spec
            if set(spec.slots) & taken:
                raise Conflict(f"{name} shares a slot with a method already chosen")
            taken |= set(spec.slots) | {slot}
            values = {p: v for (m, p), v in self.fixed.items() if m == name}
            for p in sampling_order(self.params[name]):
                if p.only_if is not None and not p.is_read({**spec.defaults(), **values}):
                    values.setdefault(p.name, p.default)  # a rule another parameter replaced: not drawn
                    continue
                values[p.name] = self._suggest_param(trial, name, p, values)
            chosen.append(MethodChoice(name, spec.validate(values)))
        return chosen

    def choices(self, method: str, p: Param) -> list[Any]:
        """The choices of ``p`` searched for this model."""
        allowed = self.limits.get(method, NO_LIMITS).searched_choices(p.name)
        options = (False, True) if p.kind == "bool" else p.choices  # a model may refuse one side of a switch
        if allowed is None:
            banned = UNUSABLE_CHOICES.get((method, p.name), set())
            return [c for c in options if c not in banned]
        return [c for c in options if c in allowed]

    def _suggest_param(self, trial, method: str, p: Param, values: Mapping[str, Any]) -> Any:
        key = f"{method}.{p.name}"
        if p.kind in ("bool", "choice"):
            return trial.suggest_categorical(key, self.choices(method, p))
        low, high = self.bounds[(method, p.name)]
        # a bound naming another parameter (tree_size >= depth) narrows this trial's range;
        # the static range alone decides the scale, which optuna needs the same every trial
        above, below = self.limits.get(method, NO_LIMITS).searched_bounds(p.name, values)
        trial_low = min(high, max(low, above)) if above is not None else low
        trial_high = max(trial_low, min(high, below)) if below is not None else high
        if p.kind == "int":
            step = int(p.step or 1)
            use_log = step == 1 and low >= 1 and high / low >= 64
            if not use_log and step > 1:  # keep the step grid of the static range
                trial_low = low + math.ceil((trial_low - low) / step) * step
                trial_high = max(trial_low, low + math.floor((trial_high - low) / step) * step)
            return trial.suggest_int(key, int(trial_low), int(trial_high), step=1 if use_log else step, log=use_log)
        if p.step:
            trial_high = trial_low + math.floor(round((trial_high - trial_low) / p.step, 6)) * p.step
            return round(trial.suggest_float(key, trial_low, trial_high, step=p.step), 6)
        return trial.suggest_float(key, trial_low, trial_high)

    def signature(self) -> str:
        """What optuna's stored distributions depend on: the slots' choices, each searched
        parameter's choices (a switch's too: a model may narrow it to one side) or static
        range, the fixed values (a study resumes only in the same space)."""
        shape = {"groups": [[slot, [s.name for s in specs]] for slot, specs in self.groups],
                 "params": {m: [[p.name, p.kind, self.choices(m, p) if p.kind in ("bool", "choice") else
                                 list(self.bounds.get((m, p.name), ()))] for p in ps] for m, ps in self.params.items()},
                 "fixed": sorted([f"{m}.{p}", v] for (m, p), v in self.fixed.items())}
        return hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def single_defaults(self) -> list[list[MethodChoice]]:
        """Each method alone at its defaults (a starting point, and a benchmark row)."""
        return [[MethodChoice(name, get_method(name).spec.defaults())] for name in self.methods]

    def trial_params(self, methods: list[MethodChoice]) -> dict[str, Any] | None:
        """The optuna parameters that describe ``methods`` (to enqueue a known
        configuration), or None when it lies outside this space."""
        out: dict[str, Any] = {}
        by_name = {m.name: m for m in methods}
        if any(name not in self.params for name in by_name):
            return None
        for m in methods:  # a value this model cannot take (a preset made for another model)
            values = {**get_method(m.name).spec.defaults(), **m.params}
            if self.limits.get(m.name, NO_LIMITS).refusal(m.name, values):
                return None
        taken: set[str] = set()
        for slot, specs in self.groups:
            if slot in taken:
                continue
            hit = [s for s in specs if s.name in by_name]
            out[f"slot:{slot}"] = hit[0].name if hit else NONE
            if hit:
                taken |= set(hit[0].slots)
                chosen = {**hit[0].defaults(), **by_name[hit[0].name].params}
                for p in self.params[hit[0].name]:
                    if not p.is_read(chosen):
                        continue  # never drawn under the chosen values (``suggest``)
                    value = chosen[p.name]
                    if p.kind in ("int", "float"):
                        low, high = self.bounds[(hit[0].name, p.name)]
                        if not low <= value <= high:
                            return None
                    out[f"{hit[0].name}.{p.name}"] = value
        return out


def sampling_order(params: Sequence[Param]) -> list[Param]:
    """``params`` in Config order (a bound naming an earlier parameter is known when it is
    drawn), except that a parameter read only under another's value waits until that one
    is drawn (fast_dllm's threshold after its factor); everything else keeps its place."""
    at = {p.name: i for i, p in enumerate(params)}

    def position(p: Param) -> tuple[int, int]:  # controllers are unconditional (checked at import)
        if p.only_if is not None and at.get(p.only_if[0], -1) > at[p.name]:
            return at[p.only_if[0]], 1  # right after its controller
        return at[p.name], 0

    return sorted(params, key=position)


def build_space(modality: str, family: str | None, allowed: Sequence[str] | None, base_params: Mapping[str, Any],
                exact: bool, limits: Mapping[str, Limits] | None = None) -> SearchSpace:
    """The search space for one model: the allowed methods that attach to it (the others
    skipped with a note), grouped by slot. ``limits``: what the loaded model allows of each
    method (``Method.limits``, from the executor's ``method_limits``): a method it cannot run is left out
    with a note, and each parameter is searched only within the model's range and choices,
    so no trial is spent on a configuration the model refuses."""
    notes: list[str] = []
    limits = dict(limits or {})
    applicable = {cls.spec.name: cls.spec for cls in methods_for(modality, family)}
    if allowed:
        names = [get_method(name).spec.name for name in dict.fromkeys(allowed)]  # unknown: a one-line error
        skipped = [name for name in names if name not in applicable]
        if skipped:
            notes.append(f"skipped, they do not apply to this model ({family or modality}): {', '.join(skipped)}")
        names = [name for name in names if name in applicable]
    else:
        names = [n for n in sorted(applicable) if n not in NOT_SEARCHED_BY_DEFAULT]
        left = sorted(set(applicable) & set(NOT_SEARCHED_BY_DEFAULT))
        if left:
            notes.append(f"{', '.join(left)} not searched (implementation switches); name them to include them")
    if exact:
        lossy = [n for n in names if applicable[n].lossless is not True]
        if lossy:
            notes.append(f"floor 'exact': lossy methods left out ({', '.join(lossy)})")
        names = [n for n in names if applicable[n].lossless is True]
    unfit = {n: f"{n} ({limits[n].unfit})" if limits[n].unfit else _fixed_misfit(n, limits[n])
             for n in names if n in limits}
    unfit = {n: why for n, why in unfit.items() if why}
    if unfit:
        notes.append(f"skipped, this model cannot run them: {'; '.join(unfit.values())}")
        names = [n for n in names if n not in unfit]
    steps = int(base_params.get("steps") or (param_default(modality, "steps") if modality != "text" else 0) or 0)
    groups: dict[str, list[MethodSpec]] = {}
    params: dict[str, list[Param]] = {}
    bounds: dict[tuple[str, str], tuple[float, float]] = {}
    fixed: dict[tuple[str, str], Any] = {}
    for name in names:
        spec = applicable[name]
        groups.setdefault(spec.slots[0] if spec.slots else name, []).append(spec)
        params[name] = []
        for p in _ordered(list(spec.params), limits.get(name, NO_LIMITS)):
            if p.name in FIXED_PARAMS.get(name, ()):
                continue
            if p.kind in ("int", "float"):
                low, high = _model_bounds(_bounds(name, p, steps), limits.get(name, NO_LIMITS), p.name)
                if low >= high:  # one value only: nothing to search
                    if not low <= p.default <= high or low > high:
                        fixed[(name, p.name)] = int(low) if p.kind == "int" else low
                    continue
                bounds[(name, p.name)] = (low, high)
            params[name].append(p)
    # a method holding two slots is sampled first, so the slot it also takes is skipped after it
    ordered = sorted(groups.items(), key=lambda item: -max(len(s.slots) for s in item[1]))
    return SearchSpace(ordered, params, bounds, notes, limits, fixed)


def _model_bounds(bounds: tuple[float, float], limits: Limits, name: str) -> tuple[float, float]:
    """The Config's search range within the model's numeric limits (a bound naming another
    parameter is applied per trial, in ``SearchSpace.suggest``)."""
    low, high = bounds
    for above, below in (limits.ranges.get(name, (None, None)), limits.search_ranges.get(name, (None, None))):
        if isinstance(above, (int, float)):
            low = max(low, above)
        if isinstance(below, (int, float)):
            high = min(high, below)
    return low, high


def _fixed_misfit(name: str, limits: Limits) -> str | None:
    """A parameter the search keeps at its default whose default this model refuses."""
    spec = get_method(name).spec
    for pname in FIXED_PARAMS.get(name, ()):
        allowed = limits.searched_choices(pname)
        if allowed is not None and spec.param(pname).default not in allowed:
            return f"{name} ({pname}={spec.param(pname).default!r} does not fit this model; name it to search it)"
    return None


def _ordered(params: list[Param], limits: Limits) -> list[Param]:
    """Config order, except that a parameter whose bound reads another comes after it."""
    out: list[Param] = []
    pending = list(params)
    while pending:
        waiting = {q.name for q in pending}
        ready = next((p for p in pending if not limits.references(p.name) & (waiting - {p.name})), pending[0])
        out.append(ready)
        pending.remove(ready)
    return out



def _bounds(method: str, p: Param, steps: int) -> tuple[float, float]:
    low = p.min if p.min is not None else 0
    high = p.max if p.max is not None else max(low, p.default) * 4
    if method == "sampler" and p.name == "steps" and steps:
        return max(low, math.ceil(steps / 5)), min(high, steps)  # fewer steps than the baseline's, not more
    if p.name.endswith("_steps") and steps:
        high = min(high, steps)
    return low, high
