"""Calibrations in the studio: made on request, kept in the history database, handed to
every later run of the model.

The fits themselves live in ``backends.accel._calibration`` (they need a loaded model);
this module decides what to run for a goal, keeps the result (``HistoryStore``'s
``calibrations`` table, with the device and the date) and puts the stored records on each
validated request (``MethodChoice.calibrations``) so the method can use them wherever
the request runs. No gradio here: the Calibrate tab (``studio/ui/calibration.py``) calls
these functions.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from backends.accel import _calibration as fits
from backends.types import Request, Result, ValidationError

# methods that read stored calibrations at run time, and the methods the Calibrate tab offers
USES_CALIBRATION = ("teacache", "mag_cache", "sparse_vdit", "bac")
CALIBRATABLE = ("teacache", "mag_cache", "first_block_cache")
CURVE, RATIOS = "fit rescale curve", "record ratios"
MAX_PROMPTS = 16


def with_stored_calibrations(history, request: Request) -> Request:
    """``request`` with each calibrated method carrying the stored records for its model
    (newest first); unchanged when it has no such method or nothing is stored."""
    if not any(m.name in USES_CALIBRATION for m in request.methods):
        return request
    methods = []
    for choice in request.methods:
        if choice.name in USES_CALIBRATION:
            choice = replace(choice, calibrations=history.calibrations(request.model, choice.name))
        methods.append(choice)
    return request.replace(methods=methods)


def keep_run_calibrations(history, request: Request, result: Result) -> None:
    """Store a calibration a method measured during the run (MagCache's first run for a
    setting), so a restart does not measure it again; the run's stats keep its id
    instead of the curve."""
    for name, stats in result.method_stats.items():
        record = stats.get("calibration") if isinstance(stats, dict) else None
        if isinstance(record, dict) and record.get("kind"):
            stats["calibration_saved"] = history.save_calibration(request.model, name, record, result.device)
            del stats["calibration"]


def default_goal(method: str) -> str:
    return {"teacache": CURVE, "mag_cache": RATIOS}.get(method, "0.5")


def parse_goal(method: str, goal: str | float) -> str | float:
    """``CURVE`` (teacache), ``RATIOS`` (mag_cache), or a target skip rate: a number in
    (0, 1), or a percentage ("40%", 40)."""
    if goal in (CURVE, RATIOS):
        expected = "teacache" if goal == CURVE else "mag_cache"
        if method != expected:
            raise ValidationError(f"'{goal}' is a {expected} calibration, not one for {method}")
        return goal
    text = str(goal).strip().rstrip("%")
    try:
        value = float(text)
    except ValueError:
        raise ValidationError(f"the calibration goal must be '{CURVE}', '{RATIOS}' or a target skip rate "
                              f"such as 0.5; got {str(goal)[:40]!r}") from None
    value = value / 100 if value >= 1 else value
    if method == "mag_cache":
        raise ValidationError("mag_cache has no single threshold to aim at a skip rate here: record its ratios")
    return value


def calibration_prompts(modality: str, count: int, prompts: list[str] | None = None) -> list[str]:
    """The user's prompts, else the bundled models' own vocabulary (seed 101: not the
    benchmark's prompts, so a measurement is not made on what was calibrated)."""
    if not 1 <= count <= MAX_PROMPTS:
        raise ValidationError(f"calibrate on 1 to {MAX_PROMPTS} prompts")
    prompts = [p.strip() for p in (prompts or []) if p and p.strip()]
    if prompts:
        return prompts[:count]
    from benchmarks.prompts import default_prompts

    return default_prompts(modality, count, seed=101)


def run_calibration(studio, modality: str, model: str, method: str, goal: str | float = CURVE, *,
                    prompts: int = 3, prompt_texts: list[str] | None = None, params: dict[str, Any] | None = None,
                    progress: Callable[[str], None] | None = None, cancel: Any = None) -> dict[str, Any]:
    """Calibrate ``method`` for ``model`` towards ``goal`` on a few prompts, store it and
    return the stored record. Runs in this process on the studio's manager (a model
    served only by Ray workers is calibrated where the studio runs). Each request is costed
    against ``--max-cost``; the passes stop at ``--time-limit`` (for the whole calibration)
    or when ``cancel`` (a CancelToken / threading.Event: the Cancel button) is set."""
    from backends.control import CancelToken
    from studio.limits import check_cost
    from studio.validation import validate_params, validate_request

    if method not in CALIBRATABLE:
        raise ValidationError(f"calibration is for {', '.join(CALIBRATABLE)}; not {method}")
    goal = parse_goal(method, goal)
    texts = calibration_prompts(modality, int(prompts), prompt_texts)
    params = validate_params(modality, params or {})
    requests = [validate_request(r) for r in fits.calibration_requests(modality, model, texts, params)]
    for request in requests:
        check_cost(request, studio.max_cost)
    token = CancelToken(studio.time_limit_s, parent=cancel)
    token.start()
    backend = studio.manager.get(modality, model)
    check_applies(method, model, backend)
    if progress is not None:
        progress(f"calibrating {method} on {len(requests)} prompt(s)")
    if goal == CURVE:
        record = fits.fit_rescale_curve(backend, requests, cancel=token)
    elif goal == RATIOS:
        record = fits.record_mag_ratios(backend, requests, cancel=token)
    else:
        stored = studio.history.calibrations(model, method) if method in USES_CALIBRATION else []
        record = fits.choose_threshold(backend, requests, method, float(goal), calibrations=stored,
                                       cancel=token)
    record["id"] = studio.history.save_calibration(model, method, record, str(backend.device))
    return record


def check_applies(method: str, model: str, backend: Any) -> None:
    """A method calibrated only on a model it runs on: an autoregressive image model or a
    UNet has no transformer blocks to fit (the fitting code would fail on its internals)."""
    from backends.accel.base import get_method

    families = get_method(method).spec.families
    family = getattr(backend, "family", None)
    if family not in families:
        raise ValidationError(f"{method} does not apply to {model} (family {family}): it is calibrated on the "
                              f"model families it runs on ({', '.join(families)})")


def describe(record: dict[str, Any]) -> str:
    """One line for a table or a hint: what the calibration holds."""
    kind = record.get("kind")
    if kind == fits.RESCALE:
        r2 = record.get("r2")
        fit = f" (R² {r2:.2f})" if isinstance(r2, (int, float)) else ""
        return f"rescale curve fitted on {len(record.get('points', [[]])[0])} step changes{fit}"
    if kind == fits.RATIOS:
        return f"magnitude ratios for {len(record.get('ratios', []))} steps"
    if kind == fits.THRESHOLD:
        rescale = (record.get("params") or {}).get("rescale")
        extra = f", rescale={rescale}" if rescale else ""
        return (f"threshold {record.get('threshold')} for a {100 * float(record.get('target', 0)):.0f}% skip "
                f"target (measured {100 * float(record.get('skip_rate', 0)):.0f}%{extra})")
    if kind == "head_patterns":  # Sparse-vDiT (measured on a model's first run)
        heads = [h for layer in record.get("patterns", []) for h in layer]
        kept = sum(float(h.get("kept", 1.0)) for h in heads) / len(heads) if heads else 1.0
        sparse = sum(h.get("kind") != "dense" for h in heads)
        return f"sparse attention patterns: {sparse} of {len(heads)} heads sparse, {100 * kept:.0f}% of key blocks kept"
    return str(kind)


def settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items() if v is not None)


def calibration_table(history, model: str) -> list[list[Any]]:
    """Rows for the Calibrate tab: id, method, what, settings, device, date."""
    return [[r["id"], r["method"], describe(r), settings_text(r.get("settings") or {}), r.get("device") or "",
             r.get("created_at") or ""] for r in history.calibrations(model)]


def calibration_hint(history, model: str, method: str) -> str:
    """A line for the method's hint in the generation tabs, when a calibration is stored."""
    records = history.calibrations(model, method)
    if not records:
        return ""
    newest = records[0]
    used = {"teacache": "in use with rescale=auto or calibrated", "mag_cache": "in use with ratios=calibrate",
            "sparse_vdit": "in use at the same settings"}.get(
        method, "set the threshold to use it")
    return (f"Calibrated for this model ({describe(newest)}; {settings_text(newest.get('settings') or {})}, "
            f"{newest.get('created_at')} on `{newest.get('device')}`): {used}.")


def curve_points(record: dict[str, Any], samples: int = 50) -> tuple[list[float], list[float], list[float],
                                                                    list[float]]:
    """The measured (input change, output change) points of a rescale fit and the fitted
    polynomial sampled over their range, for the plot."""
    import numpy as np

    xs, ys = (record.get("points") or [[], []])[:2]
    if not xs:
        return [], [], [], []
    grid = np.linspace(min(xs), max(xs), samples)
    fitted = np.polyval(np.asarray(record["coefficients"]), grid)
    return list(xs), list(ys), grid.tolist(), fitted.tolist()
