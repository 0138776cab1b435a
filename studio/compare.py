"""Compare: the baseline and any number of method configurations, same request and seed.

A configuration is written ``deepcache(interval=3) + sampler(scheduler=dpmpp_2m, steps=20)``;
``baseline`` (or an empty line) means no method. The same syntax serves the Compare tab,
parameter sweeps and ``python -m benchmarks --methods``.
"""

from __future__ import annotations

import html
import logging
import statistics
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pandas as pd

from backends.accel.base import get_method
from backends.types import MethodChoice, Request, ValidationError
from backends.accel._eval_cost import run_ideal
from studio import detectors, metrics
from studio.latent_cache import retrieve_only
from studio.measure import (Cancelled, ConfigRuns, Measurement, Timed, measure, paired_ratios,  # noqa: F401
                            summarize)  # (Cancelled: re-exported)

log = logging.getLogger(__name__)


@dataclass
class CompareConfig:
    label: str
    methods: list[MethodChoice] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return not self.methods


def _split_top_level(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ValidationError(f"unbalanced ')' in {text!r}")
        if ch == separator and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValidationError(f"unbalanced '(' in {text!r}")
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_value(raw: str) -> Any:
    raw = raw.strip()
    low = raw.lower()
    if low in {"true", "false"}:
        return low == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw.strip("'\"")


def parse_method(text: str) -> MethodChoice:
    """``name`` or ``name(key=value, ...)`` -> a validated MethodChoice."""
    text = text.strip()
    name, _, rest = text.partition("(")
    name = name.strip()
    params: dict[str, Any] = {}
    if rest:
        if not rest.endswith(")"):
            raise ValidationError(f"expected ')' at the end of {text!r}")
        for item in _split_top_level(rest[:-1], ","):
            key, eq, value = item.partition("=")
            if not eq:
                raise ValidationError(f"expected key=value in {text!r}, got {item!r}")
            params[key.strip()] = _parse_value(value)
    spec = get_method(name).spec
    return MethodChoice(spec.name, spec.validate(params))


def parse_config(text: str) -> CompareConfig:
    text = text.strip()
    if not text or text.lower() in {"baseline", "none"}:
        return CompareConfig("baseline", [])
    methods = [parse_method(part) for part in _split_top_level(text, "+")]
    return CompareConfig(format_config(methods), methods)


def parse_configs(text: str) -> list[CompareConfig]:
    """One configuration per line (or separated by ';'); blank lines are skipped."""
    lines = [line for chunk in text.splitlines() for line in chunk.split(";")]
    return [parse_config(line) for line in lines if line.strip() and not line.strip().startswith("#")]


def format_config(methods: list[MethodChoice]) -> str:
    if not methods:
        return "baseline"
    parts = []
    for m in methods:
        defaults = get_method(m.name).spec.defaults()
        changed = {k: v for k, v in m.params.items() if defaults.get(k) != v}
        args = ", ".join(f"{k}={v}" for k, v in changed.items())
        parts.append(f"{m.name}({args})" if args else m.name)
    return " + ".join(parts)


def sweep_configs(base: list[MethodChoice], method: str, param: str, values: list[Any]) -> list[CompareConfig]:
    """One configuration per value of ``method.param``, on top of the ``base`` methods."""
    spec = get_method(method).spec
    spec.param(param)  # raises KeyError for an unknown parameter
    configs = []
    for value in values:
        others = [m for m in base if m.name != method]
        current = next((m.params for m in base if m.name == method), {})
        choice = MethodChoice(method, spec.validate({**current, param: value}))
        configs.append(CompareConfig(f"{method}.{param}={value}", [*others, choice]))
    return configs


def parse_values(text: str) -> list[Any]:
    """``0.02, 0.05, 0.1`` or a range ``4..50:8`` (start..stop:count, evenly spaced)."""
    text = text.strip()
    if ".." in text:
        span, _, count = text.partition(":")
        start, stop = (float(x) for x in span.split(".."))
        n = int(count or 5)
        if n < 2 or n > 50:
            raise ValidationError("a sweep takes between 2 and 50 values")
        values = [start + (stop - start) * i / (n - 1) for i in range(n)]
        if float(start).is_integer() and float(stop).is_integer():
            values = sorted({int(round(v)) for v in values})
        return values
    values = [_parse_value(v) for v in text.split(",") if v.strip()]
    if not values:
        raise ValidationError("no sweep values given")
    return values


@dataclass
class CompareRow:
    label: str
    methods: list[MethodChoice]
    seconds: float | None = None
    speedup: float | None = None  # median of paired ratios (studio.measure)
    speedup_min: float | None = None
    speedup_max: float | None = None
    ideal_speedup: float | None = None  # from what the methods skipped (backends.accel._eval_cost)
    efficiency: float | None = None  # speedup / ideal_speedup
    peak_memory_mb: float | None = None
    weight_mb: float | None = None  # weights of the model as run (quantized size when quantized)
    model_evals: int | None = None
    quality: dict[str, float] = field(default_factory=dict)
    task: dict[str, float] | None = None
    stages: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    run_ids: list[int] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    output_paths: list[str] = field(default_factory=list)
    device: str = ""
    worker: str = ""
    # evidence (studio/evidence.py): the last run's per-call records, its extra fields, and
    # per seed (in the order of the seeds) the quality vs the baseline and the speedup
    timeline: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seed_quality: list[dict[str, float]] = field(default_factory=list)
    seed_speedups: list[float | None] = field(default_factory=list)
    findings: list[dict[str, str]] = field(default_factory=list)  # studio.detectors: {key, message}

    def table_row(self) -> dict[str, Any]:
        row = {
            "config": self.label,
            "seconds": _round(self.seconds, 4),
            "speedup": _round(self.speedup, 3),
            "speedup_min": _round(self.speedup_min, 3),
            "speedup_max": _round(self.speedup_max, 3),
            "ideal_speedup": _round(self.ideal_speedup, 3),
            "efficiency": _round(self.efficiency, 3),
            "peak_mem_mb": _round(self.peak_memory_mb, 1),
            "weight_mb": _round(self.weight_mb, 2),
            "model_evals": self.model_evals,
        }
        row.update({k: _round(v, 4) for k, v in self.quality.items()})
        if self.task:
            row.update({f"task_{k}": _round(v, 3) for k, v in self.task.items()})
        row["device"] = self.device
        row["worker"] = self.worker
        row["error"] = self.error or ""
        row["findings"] = detectors.as_text(self.findings)
        row["finding_keys"] = ",".join(f["key"] for f in self.findings)
        return row


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


@dataclass
class CompareReport:
    group: str
    modality: str
    model: str
    rows: list[CompareRow]

    def table(self) -> list[dict[str, Any]]:
        return [row.table_row() for row in self.rows]

    def frame(self) -> pd.DataFrame:
        """The comparison table as a DataFrame: one row per configuration, every column any
        row has (absent values empty)."""
        table = self.table()
        return pd.DataFrame(table, columns=list(dict.fromkeys(k for row in table for k in row)))

    def to_csv(self) -> str:
        return self.frame().to_csv(index=False)

    def pareto(self) -> list[str]:
        """Configurations no other one beats on both speed and quality."""
        scored = [(r.label, r.speedup, quality_score(self.modality, r)) for r in self.rows if r.speedup]
        front = []
        for label, speed, qual in scored:
            dominated = any(
                s >= speed and q >= qual and (s > speed or q > qual) for other, s, q in scored if other != label
            )
            if not dominated:
                front.append(label)
        return front

    def to_html(self, images: dict[str, str] | None = None) -> str:
        rows = self.frame().to_html(index=False, escape=True, na_rep="", border=0)
        pictures = "".join(
            f'<figure><img src="{src}" width="160"><figcaption>{html.escape(label)}</figcaption></figure>'
            for label, src in (images or {}).items()
        )
        return (
            f"<!doctype html><html><head><meta charset='utf-8'><title>FastGen comparison {self.group}</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px}figure{display:inline-block}</style>"
            f"</head><body><h1>{html.escape(self.model)} ({self.modality})</h1><p>compare group {self.group}; "
            f"Pareto front: {html.escape(', '.join(self.pareto()))}</p><div>{pictures}</div>"
            f"{rows}</body></html>"
        )


def quality_score(modality: str, row: CompareRow) -> float:
    """One number per row for the speed-vs-quality plot (higher is better)."""
    q = row.quality
    if modality in ("image", "video"):
        return q.get("psnr", 0.0)
    if modality == "text":
        return q.get("token_agreement", 0.0)
    if modality == "audio":
        return -q.get("lsd", 0.0)
    return 0.0


def quality_label(modality: str) -> str:
    return {"image": "PSNR vs baseline (dB)", "video": "PSNR vs baseline (dB)",
            "text": "token agreement vs baseline", "audio": "-LSD vs baseline (dB)"}[modality]


def run_compare(
    studio,
    request: Request,
    configs: list[CompareConfig],
    *,
    repeats: int = 3,
    warmup: bool = True,
    seeds: list[int] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
    parallel: int = 1,
    perplexity: bool = False,
) -> CompareReport:
    """The baseline and each configuration through ``studio.measure``: a warm-up run each
    (untimed, not kept), then per repetition and seed the baseline and every configuration
    back to back; a speedup is the median of the paired ratios (same seed, same
    repetition) with their range. Every timed run lands in history under one compare
    group. A failing configuration becomes an error row; the others go on. ``parallel`` > 1
    runs the configurations of one round over that many executor workers (Ray); rows say
    which worker and device measured them, and a ratio is only formed within one device.
    ``perplexity`` (text): add each row's held-out perplexity with its methods attached
    and its change from the baseline's (``add_perplexity``). The defaults (3 repeats, warm-up) are the ones whose numbers can be trusted."""
    if not 1 <= repeats <= 20:
        raise ValidationError("repeats must be between 1 and 20")
    if len(configs) > 32:
        raise ValidationError("at most 32 configurations per comparison")
    seeds = seeds or [request.seed]
    group = uuid.uuid4().hex[:12]
    configs = [CompareConfig("baseline", [])] + [c for c in configs if not c.is_baseline]

    def prepared(config: int, case: int) -> Request:
        # timed runs feed no later run of the same comparison (approx_cache reuses, never stores)
        return request.replace(methods=retrieve_only(configs[config].methods), seed=seeds[case],
                               compare_group=group)

    def warm(config: int, case: int) -> None:
        studio.warm_up(prepared(config, case), cancel=cancel)  # not kept: warms caches and allocators

    kept: dict[int, list[Any]] = {i: [] for i in range(len(configs))}  # every timed run, for history and peaks

    def run(config: int, case: int) -> Timed:
        outcome = studio.generate(prepared(config, case), cancel=cancel)  # stops mid-run too
        kept[config].append(outcome)
        result = outcome.result
        return Timed(result.total_seconds, outcome, run_ideal(result.method_stats, result.total_seconds),
                     result.device)

    measured = measure(len(configs), len(seeds), run, repeats=repeats, warm=warm if warmup else None,
                       cancel=cancel, progress=progress, labels=[c.label for c in configs], parallel=parallel)
    rows = compare_rows(configs, measured, kept)
    base = rows[0]
    for row in rows:
        if base.outputs and row.outputs and len(base.outputs) == len(row.outputs):
            per_seed_quality = [metrics.quality(request.modality, b, out) for b, out in zip(base.outputs, row.outputs)]
            row.quality = {k: float(statistics.mean(q[k] for q in per_seed_quality)) for k in per_seed_quality[0]}
            row.seed_quality = per_seed_quality
        if row.outputs:
            row.task = metrics.task_score(request.modality, request.model, row.outputs,
                                          [request.prompt] * len(row.outputs))
        row.findings = row_findings(request.modality, row, base)
    if perplexity and request.modality == "text":
        backend = studio.manager.get("text", request.model)
        if getattr(backend, "family", "") == "diffusion-lm":
            add_output_perplexity(rows, request.prompt)
        else:
            add_perplexity(backend, rows)
    for row in rows:
        for run_id in row.run_ids:
            studio.history.update_metrics(run_id, {"quality": row.quality, "speedup": row.speedup, "task": row.task})
    return CompareReport(group, request.modality, request.model, rows)


def row_findings(modality: str, row: CompareRow, base: CompareRow) -> list[dict[str, str]]:
    """What the detectors find in a row: skipped nothing, NaN/Inf, blank, and (against the
    baseline row) bit-identical output without a speed-up."""
    if row.error or not row.outputs:
        return []
    lossless = all(get_method(m.name).spec.lossless is True for m in row.methods) if row.methods else None
    found = detectors.compared_findings(modality, row.outputs, row.stats, baselines=base.outputs,
                                        speedup=row.speedup, lossless=lossless, is_baseline=row is base)
    return detectors.as_dicts(found)


def add_output_perplexity(rows: list[CompareRow], prompt: str) -> None:
    """Diffusion LMs: the perplexity of each row's generated code under tiny-code-llama
    (``backends.text_eval.output_perplexity``) and its change from the baseline's, as
    quality columns: held-out perplexity needs next-token prediction, which a masked
    diffusion LM does not do, and its methods change how it decodes, not what it scores."""
    from backends.text_eval import output_perplexity

    for row in rows:
        if row.error or not row.outputs:
            continue
        try:
            row.quality["perplexity"] = output_perplexity([prompt] * len(row.outputs), row.outputs)
        except Exception:  # noqa: BLE001 - one row's evaluation must not lose the others' metrics
            log.exception("output perplexity of %s failed", row.label)
            row.notes = [*row.notes, "perplexity could not be computed (the server log has the details)"]
    base = rows[0].quality.get("perplexity") if rows else None
    for row in rows:
        if base and row.quality.get("perplexity"):
            row.quality["perplexity_delta_pct"] = 100 * (row.quality["perplexity"] / base - 1)


def add_perplexity(backend: Any, rows: list[CompareRow]) -> None:
    """Text: each row's held-out perplexity (a few thousand tokens of the code corpus's
    held-out split, ``backends.text_eval``) with its methods attached, and its change in
    percent from the baseline's, as quality columns. A lossy method moves greedy output
    off the baseline within a few tokens on a tiny model; perplexity says whether it hurt."""
    from backends.text_eval import backend_perplexity

    for row in rows:
        if row.error:
            continue
        try:
            row.quality["perplexity"] = backend_perplexity(backend, row.methods)
        except Exception:  # noqa: BLE001 - one row's evaluation must not lose the others' metrics
            log.exception("perplexity of %s failed", row.label)
            row.notes = [*row.notes, "perplexity could not be computed (the server log has the details)"]
    base = rows[0].quality.get("perplexity") if rows else None  # the baseline's only: no other row is the reference
    for row in rows:
        if base and "perplexity" in row.quality:
            row.quality["perplexity_delta_pct"] = 100 * (row.quality["perplexity"] / base - 1)


def compare_rows(configs: list[CompareConfig], measured: Measurement, kept: dict[int, list[Any]]) -> list[CompareRow]:
    """One row per configuration the measurement reached (the baseline always): its figures
    from ``summarize``, its outputs from the last repetition of each seed."""
    rows = []
    for config, runs, summary in zip(configs, measured.runs, summarize(measured)):
        if not runs.started and not runs.error and config is not configs[0]:
            continue  # a cancel came before this configuration's first run
        row = CompareRow(config.label, config.methods, error=runs.error)
        if runs.index == 0 and measured.cancelled and not runs.error:
            row.error = "cancelled"
        outcomes = [runs.last[case] for case in sorted(runs.last)]
        row.run_ids = [o.run_id for o in kept[runs.index]]
        if outcomes and not row.error:
            last = outcomes[-1].result
            row.outputs = [o.result.output for o in outcomes]
            row.output_paths = [o.result.output_path for o in outcomes]
            row.model_evals, row.stats, row.notes = last.model_evals, last.method_stats, last.notes
            row.timeline, row.extra = list(last.timeline), dict(last.extra)
            row.seed_speedups = seed_speedups(measured.runs[0], runs, len(outcomes))
            row.device, row.worker = last.device, last.worker
            row.peak_memory_mb = max(o.result.peak_memory_bytes for o in kept[runs.index]) / 2**20
            row.weight_mb = last.weight_bytes / 2**20 if last.weight_bytes else None
            row.stages = {k: statistics.median(o.result.timings.get(k, 0.0) for o in outcomes) for k in last.timings}
            row.seconds = summary.seconds
            if summary.speedup:
                row.speedup, row.speedup_min, row.speedup_max = (
                    summary.speedup.median, summary.speedup.low, summary.speedup.high)
            row.ideal_speedup, row.efficiency = summary.ideal, summary.efficiency
        rows.append(row)
    return rows



def seed_speedups(base: ConfigRuns, runs: ConfigRuns, cases: int) -> list[float | None]:
    """Per case (seed), the median of the paired ratios of that seed alone: how the speedup
    drifts from seed to seed, from the same measurement as the row's speedup."""
    out = []
    for case in range(cases):
        ratios = paired_ratios(ConfigRuns(base.index, [t for t in base.trials if t.case == case]),
                               ConfigRuns(runs.index, [t for t in runs.trials if t.case == case]))
        out.append(statistics.median(ratios) if ratios else None)
    return out
