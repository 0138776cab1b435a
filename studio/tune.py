"""Auto-tune: the fastest method configuration that keeps a quality floor on prompts it
was not tuned on.

The prompt set is split once (deterministically) into a *tune* part and a *held-out*
part. optuna searches method combinations and parameters on the tune prompts, two
objectives (speedup up, quality up) with the floor as a constraint; every trial is one
``studio.measure`` run of the baseline and the candidate, interleaved, speedup = median
of paired ratios. Then the few fastest candidates that met the floor are measured again
on the held-out prompts, in one interleaved run together with the model's shipped
presets (and, if asked, each single method at its defaults), so their figures are
comparable. The winner is the fastest candidate that also meets the floor there: a
configuration that only fits the tune prompts (the blank image of ``sampler(steps=12)``
on an unseen FLUX prompt) does not win.

The study lives in optuna's RDB storage at the studio's own history database URL
(SQLite or PostgreSQL), so a study of the same name resumes after a restart (trials
already made are kept, not run again) and past studies can be listed. Every timed run
goes through ``Studio.generate`` under a ``tune-...`` compare group, so it is in History.

The floor, the request (``TuneSpec``) and the search space live in ``studio.tune_spec``.
The search space (``SearchSpace``): per slot (``MethodSpec.slots``; a method without one
is a slot of its own) none or one method, and that method's quality/speed parameters from
its Config (int/float ranges with their step, bools, choices). Parameters that pick an
implementation rather than trade speed for quality (an attention backend, a draft model,
a calibration source) stay at their defaults. With the floor ``exact`` only lossless
methods are searched.
"""

from __future__ import annotations

import logging
import math
import random
import re
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable


from backends.accel._eval_cost import run_ideal
from backends.accel.base import methods_for
from backends.types import MethodChoice, Request, StudioError, ValidationError, shown
from studio import metrics
from studio.detectors import outputs_identical
from studio.compare import format_config
from studio.latent_cache import retrieve_only
from studio.measure import Spread, Timed, measure, summarize
from studio.tune_spec import (MAX_TRIALS, OUTPUT_PERPLEXITY, PRIMARY, QUALITY_METRICS, Conflict, QualityFloor, SearchSpace, TuneSpec,
                               build_space, canonical_config)

log = logging.getLogger(__name__)

STUDY_KIND = "fastgen-tune"  # the user attr that marks an optuna study as ours

# -- running configurations ---------------------------------------------------------------

class StudioTuneRunner:
    """What the tuner needs from a Studio: runs kept in History, the quality metrics,
    the shipped presets, the preset library and the database URL optuna stores into.
    A test passes its own object with the same methods (known speeds and qualities)."""

    def __init__(self, studio):
        self.studio = studio

    @property
    def device(self) -> str:
        return str(self.studio.manager.device)

    @property
    def storage_url(self) -> str:
        return self.studio.history.engine.url.render_as_string(hide_password=False)

    @property
    def parallel(self) -> int:
        return len(getattr(self.studio.executor, "workers", ())) or 1

    def family(self, modality: str, model: str) -> str | None:
        return self.studio.describe_model(modality, model).get("family")

    def limits(self, modality: str, model: str, names: list[str]) -> dict:
        """What the loaded model allows of each method (``Method.limits``): the search
        space is narrowed to it."""
        return self.studio.executor.method_limits(modality, model, names)

    def run(self, request: Request, cancel) -> Timed:
        result = self.studio.generate(request, cancel=cancel).result
        return Timed(result.total_seconds, result.output, run_ideal(result.method_stats, result.total_seconds),
                     result.device)

    def warm(self, request: Request, cancel) -> None:
        self.studio.warm_up(request, cancel=cancel)

    def quality(self, modality: str, reference: Any, output: Any) -> dict[str, float]:
        return {**metrics.quality(modality, reference, output), "exact": float(outputs_identical(modality, reference, output))}

    def task(self, modality: str, model: str, outputs: list, prompts: list[str]) -> dict[str, float] | None:
        return metrics.task_score(modality, model, outputs, prompts)

    def output_perplexity(self, prompts: list[str], outputs: list[str]) -> float | None:
        """A diffusion LM's quality figure: its generated code's perplexity under tiny-code-llama."""
        from backends.text_eval import output_perplexity

        return output_perplexity(prompts, outputs)

    def shipped_presets(self, modality: str, model: str) -> list:
        presets, _ = self.studio.presets.shipped()
        return [p for p in presets if p.modality == modality and p.model == model]

    def save_preset(self, preset) -> None:
        self.studio.presets.save(preset)


@dataclass
class Measured:
    """One configuration measured against the baseline on a set of prompts."""

    label: str
    methods: list[MethodChoice]
    speedup: Spread | None = None
    figures: dict[str, float] = field(default_factory=dict)  # quality means, exact, adherence, task_*
    task: dict[str, float] | None = None
    device: str = ""
    error: str | None = None
    unfit: bool = False  # refused by the model (a parameter value it cannot take): costs no budget

    def summary(self) -> dict[str, Any]:
        s = self.speedup
        return {"config": self.label, "methods": [m.to_dict() for m in self.methods],
                "speedup": _r(s.median if s else None), "speedup_min": _r(s.low if s else None),
                "speedup_max": _r(s.high if s else None), "pairs": s.pairs if s else 0,
                "quality": {k: _r(v, 4) for k, v in self.figures.items()}, "device": self.device,
                "error": self.error}


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


@dataclass
class Cases:
    """Prompts with their seeds (seed + the prompt's index in the whole set)."""

    prompts: list[str]
    seeds: list[int]


def split_prompts(prompts: list[str], fraction: float, seed: int) -> tuple[Cases, Cases]:
    """A deterministic split: shuffled with ``seed``, the first ``fraction`` tuned on, the
    rest held out; each prompt keeps the seed of its place in the original list."""
    if len(prompts) < 2:
        raise ValidationError("a tune needs at least 2 prompts: some to tune on, some held out")
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    n_tune = min(len(prompts) - 1, max(1, round(len(prompts) * fraction)))
    pick = lambda idx: Cases([prompts[i] for i in idx], [seed + i for i in idx])  # noqa: E731
    return pick(sorted(order[:n_tune])), pick(sorted(order[n_tune:]))


class Measurer:
    """Measures configurations on one prompt set through ``studio.measure``, interleaved
    with the baseline; remembers the baseline's outputs and task score of each prompt set
    (runs are deterministic: each later baseline run is checked against the first)."""

    def __init__(self, runner, spec: TuneSpec, cancel, group_prefix: str):
        self.runner, self.spec, self.cancel, self.prefix = runner, spec, cancel, group_prefix
        self.params = spec.request_params()
        self.baselines: dict[tuple, tuple[list[Any], dict | None]] = {}
        self.output_ppl = spec.quality_floor().needs_output_perplexity
        self.baseline_ppl: dict[tuple, float | None] = {}
        self.nondeterministic = False

    def measure(self, configs: list[tuple[str, list[MethodChoice]]], cases: Cases, tag: str,
                progress: Callable[[int, int, str], None] | None = None) -> tuple[list[Measured], bool]:
        """The baseline (index 0 of the answer) and each configuration; True when cancelled."""
        group = _group_name(self.prefix, tag)
        configs = [("baseline", []), *configs]
        spec = self.spec

        def request(config: int, case: int) -> Request:
            return Request(spec.modality, spec.model, cases.prompts[case], seed=cases.seeds[case], params=self.params,
                           methods=retrieve_only(configs[config][1]), compare_group=group)

        warmed_base = tuple(cases.seeds) in self.baselines

        def warm(config: int, case: int) -> None:
            if config or not warmed_base:  # the baseline is warm after its first measurement
                self.runner.warm(request(config, case), self.cancel)

        measured = measure(len(configs), len(cases.prompts), lambda c, k: self.runner.run(request(c, k), self.cancel),
                           repeats=spec.repeats, warm=warm, cancel=self.cancel, progress=progress,
                           labels=[label for label, _ in configs], parallel=self.runner.parallel)
        rows = [Measured(label, methods, error=runs.error, unfit=runs.unfit)
                for (label, methods), runs in zip(configs, measured.runs)]
        if measured.cancelled:
            return rows, True
        base_runs = measured.runs[0]
        if all(row.error for row in rows[1:]) and not base_runs.error:
            return rows, False  # every candidate failed (the engine then stops timing the baseline)
        if base_runs.error or len(base_runs.last) < len(cases.prompts):
            raise StudioError(f"the baseline failed: {base_runs.error or 'no output'}")
        base_out = [base_runs.last[i] for i in range(len(cases.prompts))]
        base_task = self._baseline(cases, base_out)
        for row, runs, summary in zip(rows, measured.runs, summarize(measured)):
            if row.error or len(runs.last) < len(cases.prompts):
                row.error = row.error or "no output"
                continue
            outputs = [runs.last[i] for i in range(len(cases.prompts))]
            row.speedup = summary.speedup
            row.device = runs.trials[-1].device if runs.trials else ""
            row.figures, row.task = self._figures(base_out, base_task, outputs, cases.prompts)
            if self.output_ppl:
                row.figures.update(self._perplexity_figures(cases, base_out, outputs))
        return rows, False

    def _perplexity_figures(self, cases: Cases, base_out: list[Any], outputs: list[Any]) -> dict[str, float]:
        """The generated text's perplexity under tiny-code-llama and its change (%) from the
        baseline's on the same prompts (the diffusion LM's floor, ``perplexity_delta_pct``)."""
        key = tuple(cases.seeds)
        if key not in self.baseline_ppl:
            self.baseline_ppl[key] = self.runner.output_perplexity(cases.prompts, base_out)
        base, value = self.baseline_ppl[key], self.runner.output_perplexity(cases.prompts, outputs)
        if not base or value is None:
            return {}
        return {"perplexity": float(value), OUTPUT_PERPLEXITY: 100.0 * (value / base - 1)}

    def _baseline(self, cases: Cases, outputs: list[Any]) -> dict | None:
        key = tuple(cases.seeds)
        if key not in self.baselines:
            task = self.runner.task(self.spec.modality, self.spec.model, outputs, cases.prompts)
            self.baselines[key] = (outputs, task)
        reference, task = self.baselines[key]
        if not all(self.runner.quality(self.spec.modality, a, b).get("exact") for a, b in zip(reference, outputs)):
            self.nondeterministic = True
        return task

    def _figures(self, base_out, base_task, outputs, prompts) -> tuple[dict[str, float], dict | None]:
        per_case = [self.runner.quality(self.spec.modality, b, o) for b, o in zip(base_out, outputs)]
        figures = {k: float(statistics.mean(q[k] for q in per_case)) for k in per_case[0]}
        figures["exact"] = float(min(q.get("exact", 0.0) for q in per_case))
        task = self.runner.task(self.spec.modality, self.spec.model, outputs, prompts) if base_task else None
        if task and base_task:
            figures["adherence"] = 100.0 * (task["all"] - base_task["all"])
            figures.update({f"task_{k}": float(v) for k, v in task.items() if k != "n"})
        return figures, task


def _group_name(prefix: str, tag: str) -> str:
    """A compare group History can filter on (``[A-Za-z0-9_.-]{1,64}``)."""
    return f"{prefix}-{tag}"[:64]


# -- the result ----------------------------------------------------------------------------

@dataclass
class TrialRow:
    number: int
    config: str
    methods: list[MethodChoice]
    speedup: float | None
    speedup_min: float | None
    speedup_max: float | None
    quality: dict[str, float]
    feasible: bool
    state: str = "COMPLETE"
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"trial": self.number, "config": self.config, "methods": [m.to_dict() for m in self.methods],
                "speedup": _r(self.speedup), "speedup_min": _r(self.speedup_min), "speedup_max": _r(self.speedup_max),
                "quality": {k: _r(v, 4) for k, v in self.quality.items()}, "feasible": self.feasible,
                "state": self.state, "error": self.error}


@dataclass
class Confirmed:
    """One configuration of the held-out confirmation."""

    kind: str  # "tuned" | "shipped" | "single"
    label: str  # the configuration string, or the preset's name
    heldout: Measured
    feasible: bool
    tune: TrialRow | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "config": self.heldout.label,
                "feasible_heldout": self.feasible, "heldout": self.heldout.summary(),
                "tune": self.tune.to_dict() if self.tune else None}


@dataclass
class TuneResult:
    study: str
    modality: str
    model: str
    floor: str
    device: str
    tune_prompts: list[str]
    heldout_prompts: list[str]
    trials: list[TrialRow] = field(default_factory=list)
    pareto: list[TrialRow] = field(default_factory=list)
    best_tune: TrialRow | None = None
    confirmed: list[Confirmed] = field(default_factory=list)
    winner: Confirmed | None = None
    best_shipped: Confirmed | None = None
    preset: str | None = None
    notes: list[str] = field(default_factory=list)
    cancelled: bool = False
    new_trials: int = 0  # trials this call added to the study
    failed: int = 0  # trials of the study that failed (an error) or were pruned (a slot conflict)
    params: dict[str, Any] = field(default_factory=dict)
    primary: str = "psnr"

    def quality_keys(self) -> list[str]:
        keys = list(QUALITY_METRICS[self.modality])
        seen = [c.heldout.figures for c in self.confirmed] + [t.quality for t in self.trials]
        keys += [OUTPUT_PERPLEXITY] if any(OUTPUT_PERPLEXITY in f for f in seen) else []
        return keys + (["adherence"] if any("adherence" in f for f in seen) else []) + ["exact"]

    def pareto_rows(self) -> list[dict[str, Any]]:
        """The Pareto front as table rows (tune prompts)."""
        keys = self.quality_keys()
        return [{"trial": t.number, "config": t.config, "speedup": _r(t.speedup), "min": _r(t.speedup_min),
                 "max": _r(t.speedup_max), **{k: _r(t.quality.get(k), 3) for k in keys},
                 "meets floor": "yes" if t.feasible else "no"} for t in self.pareto]

    def confirmed_rows(self) -> list[dict[str, Any]]:
        """The held-out confirmation as table rows, with each row's tune speedup."""
        keys = self.quality_keys()
        rows = []
        for c in self.confirmed:
            s = c.heldout.speedup
            rows.append({"kind": c.kind, "config": c.label, "tune speedup": _r(c.tune.speedup if c.tune else None),
                         "held-out speedup": _r(s.median if s else None), "min": _r(s.low if s else None),
                         "max": _r(s.high if s else None), **{k: _r(c.heldout.figures.get(k), 3) for k in keys},
                         "meets floor": "yes" if c.feasible else ("error" if c.heldout.error else "no")})
        return rows

    def to_dict(self) -> dict[str, Any]:
        winner = self.winner
        return {
            "study": self.study, "modality": self.modality, "model": self.model, "floor": self.floor,
            "device": self.device, "params": self.params, "quality_axis": self.primary,
            "tune_prompts": self.tune_prompts, "heldout_prompts": self.heldout_prompts,
            "trials": len(self.trials), "failed_trials": self.failed, "new_trials": self.new_trials,
            "cancelled": self.cancelled,
            "pareto": [t.to_dict() for t in self.pareto],
            "best_tune": self.best_tune.to_dict() if self.best_tune else None,
            "confirmed": [c.to_dict() for c in self.confirmed],
            "winner": winner_dict(winner, self.device) if winner else None,
            "best_shipped": self.best_shipped.to_dict() if self.best_shipped else None,
            "preset": self.preset, "notes": self.notes,
        }


def winner_dict(winner: Confirmed, device: str) -> dict[str, Any]:
    """The winner as a script checks it: configuration, methods, tune and held-out figures."""
    held = winner.heldout.summary()
    tune = winner.tune.to_dict() if winner.tune else {}
    return {"config": winner.heldout.label, "methods": held["methods"], "device": winner.heldout.device or device,
            "tune": {"speedup": tune.get("speedup"), "speedup_min": tune.get("speedup_min"),
                     "speedup_max": tune.get("speedup_max"), "quality": tune.get("quality", {})},
            "heldout": {"speedup": held["speedup"], "speedup_min": held["speedup_min"],
                        "speedup_max": held["speedup_max"], "quality": held["quality"]}}


def pareto_front(rows: list[TrialRow], primary_sign: float, primary: str) -> list[TrialRow]:
    """Trials no other trial beats on both speedup and the primary quality metric (one per
    configuration)."""
    scored = {}
    for row in rows:
        if row.speedup is None or primary not in row.quality:
            continue
        scored.setdefault(row.config, (row, row.speedup, primary_sign * row.quality[primary]))
    front = []
    for config, (row, speed, qual) in scored.items():
        beaten = any(s >= speed and q >= qual and (s > speed or q > qual) for other, (_, s, q) in scored.items()
                     if other != config)
        if not beaten:
            front.append(row)
    return sorted(front, key=lambda r: -r.speedup)


# -- optuna storage --------------------------------------------------------------------------

def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines only
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


def open_storage(url: str):
    """optuna's RDB storage on the studio's database (its own tables beside History's)."""
    optuna = _optuna()
    kwargs = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as exc:
        log.exception("cannot open optuna storage")
        raise StudioError("cannot open the tune studies in the history database; the server log has the details") \
            from exc


def close_storage(storage) -> None:
    engine = getattr(storage, "engine", None)
    if engine is not None:
        engine.dispose()


def list_studies(url: str) -> list[dict[str, Any]]:
    """The tune studies stored at ``url``: name, model, floor, trials, best held-out speedup.
    A database no tune has used yet answers [] without gaining optuna's tables."""
    from sqlalchemy import create_engine, inspect

    probe = create_engine(url)
    try:
        if not inspect(probe).has_table("studies"):
            return []
    except Exception:
        log.exception("cannot read the tune studies")
        raise StudioError("cannot read the tune studies in the history database; the server log has the details") \
            from None
    finally:
        probe.dispose()
    optuna = _optuna()
    storage = open_storage(url)
    try:
        out = []
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            attrs = summary.user_attrs
            if attrs.get("kind") != STUDY_KIND:
                continue
            out.append({"study": summary.study_name, "modality": attrs.get("modality"), "model": attrs.get("model"),
                        "floor": attrs.get("floor"), "trials": summary.n_trials,
                        "best_heldout_speedup": attrs.get("best_heldout_speedup"),
                        "winner": attrs.get("winner"), "preset": attrs.get("preset"), "device": attrs.get("device"),
                        "started": summary.datetime_start.isoformat(timespec="seconds")
                        if summary.datetime_start else None})
        return sorted(out, key=lambda s: s["started"] or "", reverse=True)
    finally:
        close_storage(storage)


def _constraints(trial) -> list[float]:
    return list(trial.user_attrs.get("constraints", [1.0]))


def _set_constraints(trial, violations: list[float]) -> None:
    """The floor as optuna constraints (<= 0: met), so the sampler steers to feasible
    configurations: ``Trial.set_constraint`` on optuna 5, ``constraints_func`` before."""
    if hasattr(trial, "set_constraint"):
        for i, value in enumerate(violations):
            trial.set_constraint(f"floor{i}", min(value, 1e6))


def _load_study(storage, name: str, spec: TuneSpec, floor: QualityFloor, seed_offset: int, space: str | None = None):
    """A multi-objective TPE study (maximise speedup and quality), seeded for
    reproducibility; an existing one of the same name is loaded (resumed)."""
    optuna = _optuna()
    legacy = {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": _constraints}
    sampler = optuna.samplers.TPESampler(seed=spec.seed + seed_offset, **legacy,
                                         n_startup_trials=max(4, min(10, (spec.trials or 40) // 4)))
    study = optuna.create_study(storage=storage, study_name=name, sampler=sampler, load_if_exists=True,
                                directions=["maximize", "maximize"])
    attrs = study.user_attrs
    if attrs.get("kind") not in (None, STUDY_KIND) or attrs.get("fingerprint") not in (None, spec.fingerprint()):
        raise ValidationError(f"study {shown(name)} was made with other settings (model, prompts, floor or methods); "
                              "pick another study name")
    if attrs.get("space") not in (None, space):
        raise ValidationError(f"study {shown(name)} was made with another search space (this model's limits or the "
                              "methods' parameters have changed since); pick another study name")
    if not attrs:
        for key, value in {"kind": STUDY_KIND, "fingerprint": spec.fingerprint(), "modality": spec.modality,
                           "model": spec.model, "floor": str(floor), "space": space}.items():
            study.set_user_attr(key, value)
    return study


def _row(trial, floor: QualityFloor) -> TrialRow:
    attrs = trial.user_attrs
    quality = attrs.get("quality", {})
    methods = [MethodChoice.from_obj(m) for m in attrs.get("methods", [])]
    return TrialRow(trial.number, attrs.get("config", "?"), methods, attrs.get("speedup"), attrs.get("speedup_min"),
                    attrs.get("speedup_max"), quality, floor.met(quality) if quality else False,
                    trial.state.name, attrs.get("error"))


# -- the tune ----------------------------------------------------------------------------------

def _model_limits(runner, spec: TuneSpec, family: str | None) -> dict | None:
    """The model's limits for every method that applies to it; None from a runner that
    cannot tell (the space is then the Configs' own)."""
    ask = getattr(runner, "limits", None)
    if ask is None:
        return None
    return ask(spec.modality, spec.model, [cls.spec.name for cls in methods_for(spec.modality, family)])


def run_tune(studio_or_runner, spec: TuneSpec, progress: Callable[[int, int, str], None] | None = None,
             cancel: Any = None) -> TuneResult:
    """Search, confirm on held-out prompts, save the winner as a preset (see the module
    docstring). ``cancel``: a CancelToken / threading.Event; a cancel keeps the trials made
    so far in the study (the same study name resumes) and skips the confirmation."""
    spec = spec.checked()
    runner = studio_or_runner if hasattr(studio_or_runner, "storage_url") else StudioTuneRunner(studio_or_runner)
    cancel = cancel if cancel is not None else threading.Event()
    floor = spec.quality_floor()
    primary, sign = PRIMARY[spec.modality]
    tune_cases, heldout_cases = split_prompts(spec.prompt_list(), spec.split, spec.seed)
    family = runner.family(spec.modality, spec.model)
    if floor.needs_output_perplexity and family != "diffusion-lm":
        raise ValidationError(f"{OUTPUT_PERPLEXITY} is the diffusion LM's quality figure; for this model use exact "
                              "or token_agreement>=0.9")
    space = build_space(spec.modality, family, spec.methods, spec.request_params(), floor.exact,
                        _model_limits(runner, spec, family))
    if not space.methods:
        raise ValidationError("no allowed method applies to this model" + (f" ({'; '.join(space.notes)})"
                                                                           if space.notes else ""))
    # the default name holds the search space too: a study of an older space (other
    # choices for a parameter) cannot resume under optuna, so it is not picked up
    name = spec.study if spec.study else f"{spec.study_name()} {space.signature()[:4]}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.model)[:24] + "-" + spec.fingerprint()[:8]
    result = TuneResult(name, spec.modality, spec.model, str(floor), runner.device, tune_cases.prompts,
                        heldout_cases.prompts, notes=list(space.notes), params=spec.request_params(), primary=primary)
    measurer = Measurer(runner, spec, cancel, f"tune-{slug}")
    storage = open_storage(runner.storage_url)
    try:
        study = _load_study(storage, name, spec, floor, 0, space.signature())
        study = _search(study, storage, name, spec, floor, space, measurer, tune_cases, result, progress, cancel)
        stored = study.get_trials(deepcopy=False)
        rows = [_row(t, floor) for t in stored if t.state.name == "COMPLETE"]
        result.trials = rows
        result.failed = sum(1 for t in stored if t.state.name in ("FAIL", "PRUNED") and not t.user_attrs.get("cancelled"))
        result.pareto = pareto_front(rows, sign, primary)
        feasible = sorted((r for r in rows if r.feasible and r.methods and r.speedup), key=lambda r: -r.speedup)
        result.best_tune = feasible[0] if feasible else None
        if measurer.nondeterministic:
            result.notes.append("the baseline's outputs differed between runs of the same prompt and seed: quality "
                                "figures are less reliable on this device")
        if result.cancelled:
            result.notes.append("cancelled: the trials made so far are kept in the study; run it again to resume")
            return result
        if not feasible:
            result.notes.append("no configuration met the floor on the tune prompts; nothing to confirm")
            return result
        _confirm(runner, spec, floor, space, measurer, heldout_cases, feasible, result, progress)
        if result.cancelled:
            return result
        _finish(runner, spec, study, result)
        return result
    finally:
        close_storage(storage)


def _search(study, storage, name, spec, floor, space, measurer, cases, result, progress, cancel):
    """The optuna loop (ask/tell). Trials are asked in batches of the executor's worker
    count (1 in-process): a batch is one interleaved measurement (the baseline and each
    candidate per round, spread over the workers). A failed trial is recorded as failed
    and the search goes on; it stops at the budget, the deadline or a cancel."""
    study = _resume(study, storage, name, spec, floor, space, measurer.runner)
    known = {_canonical_of(t): t for t in study.get_trials(deepcopy=False)
             if t.state.name == "COMPLETE" and "config" in t.user_attrs}
    deadline = time.monotonic() + spec.minutes * 60 if spec.minutes else None
    budget = spec.trials if spec.trials is not None else MAX_TRIALS
    batch_size = max(1, measurer.runner.parallel)
    done = _counted(study)
    # a configuration the model refuses (DeepCache's branch past this UNet's depth, a
    # solver without a flow form, a skip list that leaves nothing to quantize) fails at
    # attach, before any timed run: it costs no budget, up to this many per budgeted trial
    unfit_allowance = UNFIT_PER_TRIAL * budget
    while done < budget and not cancel.is_set() and (deadline is None or time.monotonic() < deadline):
        batch, added = _ask_batch(study, space, known, min(batch_size, budget - done))
        done += added
        result.new_trials += added
        if not batch:
            continue
        stage = (f"trial {done + 1}/{budget if spec.trials else '?'}: " + " | ".join(label for _, label, _ in batch))
        if progress:
            progress(done, budget, stage)
        try:
            rows, cancelled = measurer.measure([(label, methods) for _, label, methods in batch], cases,
                                               f"t{batch[0][0].number}", _sub_progress(progress, done, budget, stage))
        except StudioError as exc:  # the baseline itself failed
            rows, cancelled = [Measured(label, methods, error=str(exc)) for _, label, methods in batch], False
            rows.insert(0, rows[0])
        if cancelled:
            for trial, _, _ in batch:
                trial.set_user_attr("cancelled", True)
                study.tell(trial, state=_optuna().trial.TrialState.FAIL)
            result.cancelled = True
            break
        for (trial, label, _), candidate in zip(batch, rows[1:]):
            if candidate.unfit and unfit_allowance > 0:
                unfit_allowance -= 1
                trial.set_user_attr("unfit", True)
            else:
                done += 1
            result.new_trials += 1
            if _tell(study, trial, candidate, floor, spec.modality):
                known[canonical_config(candidate.methods)] = study.get_trials(deepcopy=False)[trial.number]
    if cancel.is_set():
        result.cancelled = True
    return study


def _resume(study, storage, name, spec, floor, space, runner):
    """A stored study: trials left running by a process that died are failed, and the
    sampler gets a fresh seed (so it does not propose its first trials again). A new one:
    the known starting points are queued."""
    optuna = _optuna()
    trials = study.get_trials(deepcopy=False)
    for trial in trials:
        if trial.state.name == "RUNNING":
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    if trials:
        return _load_study(storage, name, spec, floor, len(trials), space.signature())
    for params in _starting_points(spec, space, runner):
        study.enqueue_trial(params, skip_if_exists=True)
    return study


def _ask_batch(study, space, known, size: int):
    """Up to ``size`` new trials to measure, as (trial, label, methods); also returns how
    many trials were settled without a measurement (a slot conflict is pruned; a
    configuration measured before, or twice in this batch, reuses that measurement)."""
    optuna = _optuna()
    batch, settled, repeats = [], 0, []
    for _ in range(size):
        trial = study.ask()
        try:
            methods = space.suggest(trial)
        except (Conflict, ValidationError) as exc:
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            settled += 1
            continue
        if not methods:  # every slot "none": the baseline itself, nothing to measure
            trial.set_user_attr("error", "no method chosen: the baseline itself")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            settled += 1
            continue
        label, key = format_config(methods), canonical_config(methods)
        trial.set_user_attr("config", label)
        trial.set_user_attr("methods", [m.to_dict() for m in methods])
        if key in known:  # the same configuration again: its measurement is reused, not repeated
            _copy_trial(study, trial, known[key])
            settled += 1
        elif key in [canonical_config(item[2]) for item in batch]:
            repeats.append(trial)
        else:
            batch.append((trial, label, methods))
    for trial in repeats:  # measured once in this batch: settled once that measurement is told
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        settled += 1
    return batch, settled


def _canonical_of(trial) -> str:
    """The canonical configuration of a stored trial (its label where the methods are unreadable)."""
    try:
        return canonical_config([MethodChoice.from_obj(m) for m in trial.user_attrs.get("methods", [])])
    except (ValidationError, KeyError, TypeError, ValueError):
        return trial.user_attrs["config"]


def _tell(study, trial, candidate: Measured, floor: QualityFloor, modality: str) -> bool:
    """Record one measured trial (failed when it has no speedup); True when it completed."""
    if candidate.error or candidate.speedup is None:
        trial.set_user_attr("error", candidate.error or "not measured")
        study.tell(trial, state=_optuna().trial.TrialState.FAIL)
        return False
    _record(trial, candidate, floor)
    primary, sign = PRIMARY[modality]
    study.tell(trial, [candidate.speedup.median, sign * candidate.figures.get(primary, 0.0)])
    return True


def _sub_progress(progress, done: int, budget: int, stage: str):
    if progress is None:
        return None
    return lambda _n, _total, label: progress(done, budget, f"{stage} · {label}")


UNFIT_PER_TRIAL = 3


def _counted(study) -> int:
    """Trials that used the budget: finished, failed or pruned, not cancelled ones, nor
    configurations the model refused before running them."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state.name in ("COMPLETE", "FAIL", "PRUNED")
               and not t.user_attrs.get("cancelled") and not t.user_attrs.get("unfit"))


def _record(trial, measured: Measured, floor: QualityFloor) -> None:
    s = measured.speedup
    for key, value in {"speedup": s.median, "speedup_min": s.low, "speedup_max": s.high, "pairs": s.pairs,
                       "quality": measured.figures, "device": measured.device,
                       "constraints": floor.violations(measured.figures)}.items():
        trial.set_user_attr(key, value)
    _set_constraints(trial, floor.violations(measured.figures))


def _copy_trial(study, trial, source) -> None:
    for key, value in source.user_attrs.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("reused_from", source.number)
    _set_constraints(trial, source.user_attrs.get("constraints", [1.0]))
    study.tell(trial, list(source.values))


def _starting_points(spec: TuneSpec, space: SearchSpace, runner) -> list[dict[str, Any]]:
    """Known configurations tried first: the model's shipped presets (the bar to beat),
    then each method alone at its defaults, together at most a third of the trial budget
    (the presets always, budget permitting)."""
    presets = [space.trial_params(p.methods) for p in runner.shipped_presets(spec.modality, spec.model)]
    singles = [space.trial_params(m) for m in space.single_defaults()]
    out: list[dict[str, Any]] = []
    for params in presets + singles:
        if params is not None and params not in out:
            out.append(params)
    n_presets = len([p for p in presets if p is not None])
    trials = spec.trials or 30
    return out[:min(trials, max(n_presets, trials // 3, 2))]


def _confirm(runner, spec, floor, space, measurer, cases, feasible, result, progress) -> None:
    """The top candidates, the shipped presets (and the single methods) on the held-out
    prompts, in one interleaved measurement."""
    picked: list[TrialRow] = []
    for row in feasible:  # distinct runs (an older study may hold two labels of one run)
        if canonical_config(row.methods) not in {canonical_config(p.methods) for p in picked}:
            picked.append(row)
        if len(picked) == spec.confirm_top:
            break
    entries: list[tuple[str, str, list[MethodChoice], TrialRow | None]] = [
        ("tuned", row.config, row.methods, row) for row in picked]
    allowed = set(space.methods)
    for preset in runner.shipped_presets(spec.modality, spec.model):
        entries.append(("shipped", preset.name, preset.methods, None))
    if spec.compare_singles:
        entries += [("single", format_config(m), m, None) for m in space.single_defaults()]
    # one measurement per distinct configuration: a tuned candidate that is a shipped preset
    # or a single method (in another order, or with its defaults spelled out) shares its figure
    configs: list[tuple[str, list[MethodChoice]]] = []
    keys: list[str] = []
    index: list[int] = []
    for _kind, _label, methods, _row in entries:
        key = canonical_config(methods)
        if key not in keys:
            keys.append(key)
            configs.append((format_config(methods), methods))
        index.append(1 + keys.index(key))
    if progress:
        progress(0, 1, f"confirming {len(configs)} configuration(s) on {len(cases.prompts)} held-out prompt(s)")
    sub = (lambda n, total, label: progress(n, total, f"held-out: {label}")) if progress else None
    rows, cancelled = measurer.measure(configs, cases, "heldout", sub)
    if cancelled:
        result.cancelled = True
        result.notes.append("cancelled during the held-out confirmation")
        return
    for (kind, label, methods, row), at in zip(entries, index):
        measured = rows[at]
        ok = measured.error is None and measured.speedup is not None and floor.met(measured.figures)
        result.confirmed.append(Confirmed(kind, label, measured, ok, row))
    for (kind, label, _methods, _row), at in zip(entries, index):
        same = [other for (k, other, _m, _r), a in zip(entries, index) if a == at and k != "tuned"]
        if kind == "tuned" and same:
            result.notes.append(f"the tuned candidate {label} is the configuration of {', '.join(same)}: "
                                "measured once, one figure for both")
    skipped = [c.label for c in result.confirmed if c.kind == "shipped" and not {m.name for m in c.heldout.methods}
               <= allowed]
    if skipped:
        result.notes.append(f"shipped preset(s) {', '.join(skipped)} use methods outside the allowed list; "
                            "measured for reference")
    fastest = lambda kind: max((c for c in result.confirmed if c.kind == kind and c.feasible),  # noqa: E731
                               key=lambda c: c.heldout.speedup.median, default=None)
    result.winner = fastest("tuned")
    result.best_shipped = fastest("shipped")
    if result.winner is None:
        result.notes.append("none of the confirmed configurations met the floor on the held-out prompts")
    elif result.winner.heldout.speedup.median <= 1.0:  # meets the floor but buys nothing: not worth a preset
        result.notes.append(f"the fastest configuration meeting the floor on the held-out prompts, "
                            f"{result.winner.heldout.label}, was not faster than the baseline there "
                            f"({result.winner.heldout.speedup.median:.2f}x): no winner")
        result.winner = None
    shipped, winner = result.best_shipped, result.winner
    if shipped is not None and (winner is None or shipped.heldout.speedup.median > winner.heldout.speedup.median):
        result.notes.append(f"the shipped preset '{shipped.label}' was faster at this floor on the held-out prompts "
                            f"({shipped.heldout.speedup.median:.2f}x): give the tune more trials, or allow its "
                            f"methods ({shipped.heldout.label})")


def describe_winner(result: TuneResult, spec: TuneSpec) -> str:
    """The saved preset's description: what was measured, where, and how."""
    w = result.winner
    held, q = w.heldout.speedup, w.heldout.figures
    parts = [f"held-out speedup {held.median:.2f}x (min {held.low:.2f}-max {held.high:.2f}x) on "
             f"{len(result.heldout_prompts)} prompt(s)"]
    parts += [f"{k} {q[k]:.3f}" for k in QUALITY_METRICS[spec.modality] if k in q]
    if OUTPUT_PERPLEXITY in q:
        parts.append(f"generated-code perplexity {q[OUTPUT_PERPLEXITY]:+.1f}% vs baseline")
    if "adherence" in q:
        parts.append(f"adherence {q['adherence']:+.1f} pts vs baseline")
    if w.tune and w.tune.speedup:
        parts.append(f"tune prompts {w.tune.speedup:.2f}x")
    return (f"Auto-tuned for the floor '{result.floor}' (study '{result.study}', {len(result.trials)} trials): "
            + ", ".join(parts) + f"; measured on {w.heldout.device or result.device}.")


def _finish(runner, spec: TuneSpec, study, result: TuneResult) -> None:
    """Save the winner as a user preset and note the outcome on the study."""
    from studio.presets import Preset

    if result.winner is not None:
        study.set_user_attr("best_heldout_speedup", round(result.winner.heldout.speedup.median, 3))
        study.set_user_attr("winner", result.winner.heldout.label)
        study.set_user_attr("device", result.winner.heldout.device or result.device)
        if spec.save_preset:
            name = f"{spec.model} tuned [{result.floor}]"[:200]
            preset = Preset(name, spec.modality, spec.model, spec.request_params(),
                            list(result.winner.heldout.methods), describe_winner(result, spec))
            runner.save_preset(preset)
            result.preset = name
            study.set_user_attr("preset", name)
