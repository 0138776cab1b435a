"""No-op and harm detectors: what a run's own figures say went wrong, in one sentence.

A default threshold that never triggers looks like a working method (sglang #33828); a
cache that skipped nothing and ran slower gives bit-identical output silently
(Comfy-WaveSpeed PR #149); a NaN or a blank picture is easy to miss in a table. Each
detector reads what a run already has (its output, the methods' stats with their skipped
evaluations, ``backends/accel/_eval_cost.py``'s full vs partial counts) and, where
available, the baseline's output and the measured speedup, and returns ``Finding``s: a
machine key and a short sentence for the user. Pure functions, no model, no UI.

Findings that need no baseline (``SKIPPED_NOTHING``, ``NON_FINITE``, ``BLANK``) are made
for every single run (``run_findings``); ``IDENTICAL_SLOWER`` needs the baseline's
output and the measured speedup (a Compare row, a benchmark row).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import numpy as np

SKIPPED_NOTHING = "skipped_nothing"
IDENTICAL_SLOWER = "identical_and_slower"
NON_FINITE = "non_finite_output"
BLANK = "blank_output"

# a picture, frame or sound whose values' standard deviation is under this (0-255 pixels,
# a waveform's own units) carries nothing: a flat colour give or take a little noise, silence
# (tiny-flux-shapes with 12 flow-Euler steps drew "a yellow square at top left on white",
# seed 7, as a white picture of std 1.4: blank to the eye; the faintest real shape image,
# a small yellow shape on white, has a std over 20)
BLANK_STD = {"image": 3.0, "audio": 1e-4}


@dataclass(frozen=True)
class Finding:
    key: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def skipped_nothing(method_stats: dict[str, dict[str, Any]]) -> list[Finding]:
    """A caching or skipping method (one that meters full vs partial evaluations, or
    counts skipped ones) that answered no call from its cache."""
    findings = []
    for name, stats in (method_stats or {}).items():
        if not isinstance(stats, dict) or "evals_partial" not in stats:
            continue  # not a method that skips (a sampler, compile, a drafting method)
        partial = stats.get("evals_partial") or 0
        skipped = stats.get("skipped_evals") or stats.get("skipped_calls") or 0
        calls = (stats.get("evals_full") or 0) + partial
        if calls and not partial and not skipped:
            findings.append(Finding(SKIPPED_NOTHING,
                                    f"{name} skipped nothing: all {calls} model evaluations ran in full, so it "
                                    "cannot be faster (raise its threshold, or it does not suit this model)"))
    return findings


def _arrays(modality: str, output: Any) -> list[np.ndarray]:
    """The output's numbers: one array per image or frame, the waveform for audio."""
    if output is None:
        return []
    if modality == "audio":
        wave = output[0] if isinstance(output, tuple) else output
        return [np.asarray(wave, dtype=np.float64)]
    frames = output if isinstance(output, (list, tuple)) else [output]
    return [np.asarray(frame, dtype=np.float64) for frame in frames]


def non_finite(modality: str, output: Any) -> list[Finding]:
    if modality == "text":
        return []
    bad = sum(int((~np.isfinite(a)).sum()) for a in _arrays(modality, output))
    if bad:
        return [Finding(NON_FINITE, f"the output has {bad} NaN or infinite value(s): the run broke numerically")]
    return []


def blank(modality: str, output: Any) -> list[Finding]:
    """Empty text; a constant (or nearly constant) image, every frame constant, silence."""
    if modality == "text":
        if output is None or not str(output).strip():
            return [Finding(BLANK, "the output text is empty")]
        return []
    arrays = _arrays(modality, output)
    if not arrays:
        return [Finding(BLANK, "the run produced no output")]
    limit = BLANK_STD["audio" if modality == "audio" else "image"]
    if all(_spread(a) < limit for a in arrays):
        what = {"image": "the image is a single flat colour", "video": "every frame is a single flat colour",
                "audio": "the audio is silent (or constant)"}.get(modality, "the output is constant")
        return [Finding(BLANK, f"blank output: {what}")]
    return []


def _spread(values: np.ndarray) -> float:
    """How much a picture (or a waveform) varies: the largest per-channel standard
    deviation over its pixels (a flat red picture has std ~120 over all its numbers, but
    none within a channel); non-finite values left out."""
    if values.ndim == 3:  # H x W x C
        channels = [c[np.isfinite(c)] for c in np.moveaxis(values, -1, 0)]
    else:
        channels = [values[np.isfinite(values)]]
    return max((float(c.std()) for c in channels if c.size), default=0.0)


def outputs_identical(modality: str, output: Any, baseline: Any) -> bool:
    if modality == "text":
        return output == baseline
    mine, theirs = _arrays(modality, output), _arrays(modality, baseline)
    return len(mine) == len(theirs) and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(mine, theirs))


def identical_and_slower(modality: str, outputs: Iterable[Any], baselines: Iterable[Any],
                         speedup: float | None, lossless: bool | None = None) -> list[Finding]:
    """Output bit-identical to the baseline's on every case while no faster (speedup ≤ 1):
    the method did nothing but cost time. For a lossless method the exact output is its
    promise, so the sentence says it does not pay here instead."""
    outputs, baselines = list(outputs), list(baselines)
    if speedup is None or speedup > 1.0 or not outputs or len(outputs) != len(baselines):
        return []
    if not all(outputs_identical(modality, o, b) for o, b in zip(outputs, baselines)):
        return []
    if lossless:
        return [Finding(IDENTICAL_SLOWER, f"exact, as a lossless method should be, but not faster than the "
                                          f"baseline here ({speedup:.2f}x): it does not pay on this model")]
    return [Finding(IDENTICAL_SLOWER, f"bit-identical to the baseline and slower ({speedup:.2f}x): "
                                      "this setting changes nothing but the time")]


def run_findings(modality: str, output: Any, method_stats: dict[str, dict[str, Any]] | None) -> list[Finding]:
    """The findings one run has on its own: skipped nothing, NaN/Inf, blank."""
    return [*skipped_nothing(method_stats or {}), *non_finite(modality, output), *blank(modality, output)]


def compared_findings(modality: str, outputs: list[Any], method_stats: dict[str, dict[str, Any]] | None,
                      baselines: list[Any] | None = None, speedup: float | None = None,
                      lossless: bool | None = None, is_baseline: bool = False) -> list[Finding]:
    """A compared configuration's findings over its outputs (one per prompt or seed): the
    run findings of each output (each key once) and, against the baseline's outputs and
    the measured speedup, identical-and-slower. The baseline row gets only NaN/blank."""
    found: dict[str, Finding] = {}
    for finding in skipped_nothing(method_stats or {}):
        found.setdefault(finding.message, finding)  # one per method
    for output in outputs:
        for finding in (*non_finite(modality, output), *blank(modality, output)):
            found.setdefault(finding.key, finding)
    if not is_baseline and baselines is not None:
        for finding in identical_and_slower(modality, outputs, baselines, speedup, lossless):
            found.setdefault(finding.key, finding)
    return list(found.values())


def as_dicts(findings: Iterable[Finding]) -> list[dict[str, str]]:
    return [f.to_dict() for f in findings]


def as_text(findings: Iterable[Finding | dict[str, str]]) -> str:
    """Findings as one cell of a table: their sentences joined."""
    return "; ".join(f.message if isinstance(f, Finding) else str(f.get("message", "")) for f in findings)
