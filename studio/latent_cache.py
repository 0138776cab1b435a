"""Approximate caching in the studio: where the latents of finished runs are kept and how
earlier ones reach a new run.

The method (``backends.accel.approx_cache``) decides what to reuse and does the hooking;
it never touches the disk's layout or the database. This module keeps what a finished run
captured (one safetensors file per run under ``outputs/latents/``, one row in the history
database's ``cached_latents`` table, tied to the run: deleting the run deletes both) and
puts the stored records of the request's model on the method's ``MethodChoice`` before a
run (``calibrations``, the channel stored calibrations take), so the records travel with
the request to whichever executor runs it. Only a run that finished and got its history
row keeps latents: a failed, cancelled or warm-up run keeps nothing.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from backends.accel.approx_cache import EXTRA_KEY
from backends.types import Request, Result

log = logging.getLogger(__name__)

METHOD = "approx_cache"
MAX_CANDIDATES = 256  # the newest kept runs of a model a request compares its prompt with


def with_cached_latents(history, outputs, request: Request) -> Request:
    """``request`` with its approx_cache choice carrying the model's kept latents (newest
    first, each with the real path of its file); unchanged without that method."""
    if not any(m.name == METHOD for m in request.methods):
        return request
    records = history.latent_records(request.model, limit=MAX_CANDIDATES)
    for record in records:
        resolved = outputs.resolve(record["stored_path"])
        record["path"] = str(resolved) if resolved is not None else ""
    methods = [replace(m, calibrations=records) if m.name == METHOD else m for m in request.methods]
    return request.replace(methods=methods)


def keep_run_latents(history, outputs, run_id: int, request: Request, result: Result) -> int | None:
    """Store what the finished run ``run_id`` captured: the file first, then its row (a crash
    in between leaves a file the startup repair moves to the trash, never a row without its
    file). A failure here costs the cache one entry, never the run: logged, not raised."""
    captured = result.extra.pop(EXTRA_KEY, None)
    if not captured or not captured.get("latents"):
        return None
    latents = captured["latents"]
    path = None
    try:
        path = outputs.save_tensors("latents", {f"step_{k}": v for k, v in sorted(latents.items())})
        record = {**captured, "steps": sorted(latents)}
        row_id = history.save_latents(run_id, request.model, record, outputs.relative(path))
    except Exception as exc:
        log.warning("approx_cache: could not keep the latents of run %s (%s)", run_id, type(exc).__name__)
        if path is not None:
            path.unlink(missing_ok=True)
        return None
    result.method_stats.get(METHOD, {})["latents_kept"] = sorted(latents)
    return row_id


def retrieve_only(methods: list) -> list:
    """``methods`` with approx_cache set to reuse without storing. A measurement's timed runs
    use this: otherwise a configuration's second repetition would reuse its own first one,
    and the figure would be an exact-repeat speedup instead of what the history held when
    the comparison started."""
    return [replace(m, params={**m.params, "store": False}) if m.name == METHOD else m for m in methods]


def discard_run_latents(result: Result) -> None:
    """A run that is not kept (a warm-up) keeps no latents either."""
    result.extra.pop(EXTRA_KEY, None)
