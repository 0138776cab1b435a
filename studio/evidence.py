"""Evidence for a comparison: what each configuration computed, where its output differs.

The Compare table says how fast and how close; these views say why. All pure functions
over a ``CompareReport`` (no gradio, no model): the per-step timeline of computed /
partial / reused denoiser calls (from the run's ``CallRecord``s, ``backends.timing``),
the |difference| against the baseline image, the first token where a text differs, the
grid of an XYZ sweep over two parameters, and the spread of quality over seeds.
"""

from __future__ import annotations

import html
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from backends.timing import COMPUTED, PARTIAL, REUSED, CallRecord
from backends.types import MethodChoice, ValidationError
from studio.compare import CompareConfig, CompareReport, CompareRow, parse_values

KIND_LEVEL = {COMPUTED: 2, PARTIAL: 1, REUSED: 0}  # the timeline heatmap's colour index
NO_BRANCH = "all"  # calls that carry every CFG branch at once (batched), or no guidance
MAX_GRID_CELLS = 25


# -- the per-step timeline ---------------------------------------------------------------
def step_timeline(records: list[CallRecord]) -> dict[str, str]:
    """Per CFG branch, one character per denoising step (``F`` computed, ``P`` partial,
    ``R`` reused): the calls of a branch in order, the i-th call being step i. A call no
    method marked but smaller than the branch's largest batch (batched CFG without its
    unconditional half, CFG truncation past its cut) ran part of the work: partial."""
    out: dict[str, list[CallRecord]] = {}
    for record in records:
        out.setdefault(record.branch or NO_BRANCH, []).append(record)
    return {branch: "".join(_kind(r, calls) for r in calls) for branch, calls in out.items()}


def _kind(record: CallRecord, calls: list[CallRecord]) -> str:
    largest = max((c.batch for c in calls if c.batch), default=None)
    if record.kind == COMPUTED and record.batch and largest and record.batch < largest:
        return PARTIAL
    return record.kind


def block_timeline(records: list[CallRecord], branch: str | None = None) -> list[str] | None:
    """Per step of ``branch`` (the first one by default), one character per block or
    attention layer, ``1`` computed and ``0`` answered from a cache; None when no call of
    the run said which blocks it ran (the method does not work per block)."""
    if not records:
        return None
    branch = branch or records[0].branch or NO_BRANCH
    chosen = [r for r in records if (r.branch or NO_BRANCH) == branch]
    width = max((len(r.blocks) for r in chosen if r.blocks), default=0)
    if not width:
        return None
    return [r.blocks if r.blocks and len(r.blocks) == width else ("0" if r.kind == REUSED else "1") * width
            for r in chosen]


def timeline_matrix(rows: list[CompareRow]) -> tuple[list[str], np.ndarray]:
    """The heatmap's data: one line per configuration and CFG branch, one column per step
    (``KIND_LEVEL`` values, NaN past a line's last step)."""
    labels, lines = [], []
    for row in rows:
        timeline = step_timeline(row.timeline)
        for branch, kinds in timeline.items():
            labels.append(row.label if len(timeline) == 1 else f"{row.label} [{branch}]")
            lines.append([KIND_LEVEL[k] for k in kinds])
    width = max((len(line) for line in lines), default=0)
    matrix = np.full((len(lines), width), np.nan)
    for i, line in enumerate(lines):
        matrix[i, : len(line)] = line
    return labels, matrix


def draft_lengths(row: CompareRow) -> list[int] | None:
    """Text: tokens kept per verification forward (speculative, lookahead...) or committed
    per denoising forward (a diffusion LM), when the decoding loop reported them."""
    steps = row.extra.get("tokens_per_step")
    return list(steps) if steps else None


# -- images --------------------------------------------------------------------------------
def first_frame(output: Any, frame: int = 0) -> Any:
    """The picture a row's output shows: the image itself, or a video's ``frame``."""
    if isinstance(output, (list, tuple)):
        return output[min(max(frame, 0), len(output) - 1)] if output else None
    return output


def abs_difference(baseline: Any, other: Any) -> np.ndarray:
    """|baseline - other| per pixel, averaged over the colour channels (0-255, float):
    zero for identical images. Sizes must match (same request, same seed)."""
    a = np.asarray(baseline.convert("RGB"), dtype=np.float32)
    b = np.asarray(other.convert("RGB"), dtype=np.float32)
    if a.shape != b.shape:
        raise ValidationError(f"the images differ in size ({a.shape[1]}x{a.shape[0]} vs {b.shape[1]}x{b.shape[0]})")
    return np.abs(a - b).mean(axis=2)


# -- text --------------------------------------------------------------------------------
def whitespace_tokens(text: str) -> list[str]:
    """Words with the whitespace before them, so joining them gives the text back."""
    import re

    return re.findall(r"\s*\S+|\s+$", text)


def first_difference(a: list[Any], b: list[Any]) -> int | None:
    """The position of the first token where ``a`` and ``b`` differ (the shorter one's
    length when one is a prefix of the other); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def first_difference_html(baseline: str | list[str], other: str | list[str],
                          tokenize: Callable[[str], list[str]] | None = None,
                          keys: tuple[list[Any], list[Any]] | None = None) -> str:
    """``other`` against ``baseline``: the common prefix plain, the first differing token
    marked with its position (and the baseline's token there), the rest dimmed. Texts are
    split by ``tokenize`` (pieces that join back to the text) or into whitespace-separated
    words; lists are taken as the pieces already (the model's tokens, decoded one by one),
    compared by ``keys`` (their token ids) when given. Everything is HTML-escaped."""
    words = tokenize is None and isinstance(baseline, str)
    tokenize = tokenize or whitespace_tokens
    a = baseline if isinstance(baseline, list) else tokenize(baseline)
    b = other if isinstance(other, list) else tokenize(other)
    unit = "word" if words else "token"
    at = first_difference(*(keys or (a, b)))
    if at is None:
        return f"<div class='fg-tokens'><p><b>identical to the baseline</b> ({len(b)} {unit}s)</p>" \
               f"<pre style='white-space:pre-wrap'>{html.escape(''.join(b))}</pre></div>"
    expected = html.escape(a[at]) if at < len(a) else "(end)"
    got = html.escape(b[at]) if at < len(b) else "(end)"
    head = f"<p>first difference at {unit} <b>{at}</b>: baseline <code>{expected}</code>, here <code>{got}</code></p>"
    body = (html.escape("".join(b[:at])) + f"<mark title='{unit} {at}'>{got}</mark>"
            + f"<span style='opacity:0.45'>{html.escape(''.join(b[at + 1:]))}</span>")
    return f"<div class='fg-tokens'>{head}<pre style='white-space:pre-wrap'>{body}</pre></div>"


def tokenizer_pieces(tokenizer: Any) -> Callable[[str], list[str]] | None:
    """A ``tokenize`` for ``first_difference_html`` from a transformers tokenizer: each
    token decoded on its own (so the pieces join back to the text); None without one."""
    if tokenizer is None or not hasattr(tokenizer, "encode"):
        return None

    def pieces(text: str) -> list[str]:
        return [tokenizer.decode([t]) for t in tokenizer.encode(text, add_special_tokens=False)]

    return pieces


def text_difference_html(baseline: CompareRow, row: CompareRow, tokenizer: Any = None) -> str:
    """A text row against the baseline: by the token ids the model generated, decoded one by
    one, when both rows kept them and the tokenizer is at hand; else by re-tokenizing the
    texts with it; else by words."""
    ids_a, ids_b = baseline.extra.get("output_token_ids"), row.extra.get("output_token_ids")
    if tokenizer is not None and ids_a is not None and ids_b is not None:
        decode = tokenizer.decode
        return first_difference_html([decode([t]) for t in ids_a], [decode([t]) for t in ids_b],
                                     keys=(list(ids_a), list(ids_b)))
    return first_difference_html(baseline.outputs[0], row.outputs[0], tokenizer_pieces(tokenizer))


# -- the XYZ grid ------------------------------------------------------------------------
@dataclass
class GridAxis:
    method: str
    param: str
    values: list[Any]

    @property
    def name(self) -> str:
        return f"{self.method}.{self.param}"


def parse_axis(name: str, values_text: str) -> GridAxis:
    """``deepcache.interval`` and ``2, 3, 4`` (or ``4..50:6``) -> an axis, checked against
    the method's parameters."""
    from backends.accel.base import get_method

    method, dot, param = (name or "").strip().partition(".")
    if not dot or not method or not param:
        raise ValidationError(f"an axis is method.parameter (e.g. deepcache.interval), got {name!r}")
    spec = get_method(method.strip()).spec
    try:
        spec.param(param.strip())
    except KeyError:
        raise ValidationError(f"method '{method.strip()}' has no parameter '{param.strip()}'") from None
    return GridAxis(spec.name, param.strip(), parse_values(values_text or ""))


def grid_configs(base: list[MethodChoice], x: GridAxis, y: GridAxis) -> list[list[CompareConfig]]:
    """The configurations of a grid, ``[row (y value)][column (x value)]``: ``base`` with
    both parameters set (the two axes may name the same method or two methods, which are
    then both on). Refused past ``MAX_GRID_CELLS`` cells."""
    cells = len(x.values) * len(y.values)
    if cells > MAX_GRID_CELLS:
        raise ValidationError(f"a grid of {len(x.values)} x {len(y.values)} = {cells} cells is over the "
                              f"{MAX_GRID_CELLS}-cell limit: use fewer values")
    from backends.accel.base import get_method

    grid = []
    for y_value in y.values:
        line = []
        for x_value in x.values:
            chosen: dict[str, dict[str, Any]] = {m.name: dict(m.params) for m in base}
            for axis, value in ((y, y_value), (x, x_value)):
                chosen.setdefault(axis.method, {})[axis.param] = value
            methods = [MethodChoice(name, get_method(name).spec.validate(params)) for name, params in chosen.items()]
            line.append(CompareConfig(f"{x.name}={x_value} · {y.name}={y_value}", methods))
        grid.append(line)
    return grid


def cell_caption(row: CompareRow | None, modality: str) -> str:
    """What a grid cell says under its picture: speed and quality, or the error."""
    if row is None:
        return "not run"
    if row.error:
        return f"error: {row.error}"[:60]
    parts = [f"{row.speedup:.2f}x" if row.speedup else "-x"]
    quality = row.quality
    if "psnr" in quality:
        parts.append(f"{quality['psnr']:.1f} dB")
    elif "token_agreement" in quality:
        parts.append(f"agree {quality['token_agreement']:.2f}")
    elif "lsd" in quality:
        parts.append(f"LSD {quality['lsd']:.2f}")
    if row.task and row.task.get("all") is not None:  # prompt adherence of the bundled graders
        parts.append(f"adh {row.task['all']:.2f}")
    return " · ".join(parts)


def grid_rows(report: CompareReport, grid: list[list[CompareConfig]]) -> list[list[CompareRow | None]]:
    """The report's rows laid out as the grid (None for a cell the comparison did not
    reach: cancelled)."""
    by_label = {row.label: row for row in report.rows}
    return [[by_label.get(cell.label) for cell in line] for line in grid]


# -- seeds -------------------------------------------------------------------------------
def seed_drift(row: CompareRow, seeds: list[int], metric: str) -> list[dict[str, Any]]:
    """One entry per seed: the seed, ``metric`` of this seed's output vs the baseline's,
    and this seed's speedup (median of its own paired ratios)."""
    out = []
    for i, seed in enumerate(seeds):
        quality = row.seed_quality[i].get(metric) if i < len(row.seed_quality) else None
        speed = row.seed_speedups[i] if i < len(row.seed_speedups) else None
        out.append({"seed": seed, metric: quality, "speedup": speed})
    return out


def drift_summary(entries: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Mean, min and max over seeds of the quality and the speedup (finite values only)."""
    out = []
    for key in (metric, "speedup"):
        values = [e[key] for e in entries if e.get(key) is not None and np.isfinite(e[key])]
        if values:
            out.append({"figure": key, "mean": round(statistics.mean(values), 4), "min": round(min(values), 4),
                        "max": round(max(values), 4), "seeds": len(values)})
        else:
            out.append({"figure": key, "mean": None, "min": None, "max": None, "seeds": 0})
    return out


def primary_metric(modality: str) -> str:
    return {"image": "psnr", "video": "psnr", "text": "token_agreement", "audio": "lsd"}.get(modality, "psnr")


# -- the compact table -------------------------------------------------------------------
QUALITY_HEADERS = {"psnr": "PSNR dB", "token_agreement": "agree", "lsd": "LSD dB"}


def draft_forwards(method_stats: Mapping[str, Any] | None) -> int:
    """A run's draft-model forwards (speculative decoding and its kin report
    ``draft_forwards``). Model evaluations count the model's own (the target's) forwards only,
    for text, audio and AR images alike; a draft's are shown beside them, never added."""
    return sum(int(s.get("draft_forwards") or 0) for s in (method_stats or {}).values() if isinstance(s, Mapping))


def compact_table(report: CompareReport) -> Any:
    """The table that fits a 1400 px screen: configuration, speedup (min-max), the main
    quality figure, the perplexity change where text rows have one (a diffusion LM's lossy
    rows agree with the baseline on few tokens; the change in perplexity is the figure its
    methods are judged by), prompt adherence, peak memory, evaluations, notes. Short
    headers; the full table (every figure) is ``report.frame()``."""
    import pandas as pd

    metric = primary_metric(report.modality)
    with_perplexity = any("perplexity_delta_pct" in row.quality for row in report.rows)
    lines = []
    for row in report.rows:
        speed = "" if row.speedup is None else f"{row.speedup:.2f}x"
        if row.speedup is not None and row.speedup_min is not None and row.speedup_max is not None:
            speed += f" ({row.speedup_min:.2f}–{row.speedup_max:.2f})"
        quality = row.quality.get(metric)
        adherence = (row.task or {}).get("all")
        notes = [f"error: {row.error}"] if row.error else [*row.notes, *(f"⚠️ {f['message']}" for f in row.findings)]
        drafted = draft_forwards(row.stats)
        if drafted and not row.error:
            notes.insert(0, f"evals: the target's only, plus {drafted} draft forwards")
        line = {"config": row.label, "speedup": speed,
                QUALITY_HEADERS.get(metric, metric): None if quality is None else round(float(quality), 2)}
        if with_perplexity:
            delta = row.quality.get("perplexity_delta_pct")
            line["ppl Δ%"] = None if delta is None else round(float(delta), 1)
        lines.append({
            **line,
            "adh.": None if adherence is None else round(float(adherence), 2),
            "peak MB": None if row.peak_memory_mb is None else round(row.peak_memory_mb),
            "evals": row.model_evals,
            "notes": "; ".join(notes),
        })
    return pd.DataFrame(lines)


def loaded_tokenizer(manager: Any, model: str) -> Any:
    """The text model's tokenizer when it is loaded in this process (no load for it: with
    remote workers the view falls back to words)."""
    backend = getattr(manager, "_backends", {}).get(("text", model))
    return getattr(backend, "tokenizer", None)


def drift_table(entries: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """The seed-drift table: one line per seed, then mean, min and max over the seeds."""
    summary = {s["figure"]: s for s in drift_summary(entries, metric)}
    lines = [{"seed": str(e["seed"]), metric: _rounded(e.get(metric)), "speedup": _rounded(e.get("speedup"))}
             for e in entries]
    for stat in ("mean", "min", "max"):
        lines.append({"seed": stat, metric: summary[metric][stat], "speedup": summary["speedup"][stat]})
    return lines


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)
