"""The Studio: the one object the UI, the API and the benchmarks call.

It validates a request, hands it to the executor, saves the output file, and writes the
history row, failed runs included, so whatever happens nothing already kept is lost.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from backends.base import ProgressFn
from backends.control import CancelToken, RunCancelled, is_allocation_failure
from backends.executor import LocalExecutor
from backends.manager import BackendManager
from backends.types import OutOfMemoryError, Request, Result, StudioError, ValidationError
from studio.calibration import CALIBRATABLE, calibration_hint, keep_run_calibrations, with_stored_calibrations
from studio.detectors import as_dicts, run_findings
from studio.history import HistoryStore, sqlite_url
from studio.latent_cache import discard_run_latents, keep_run_latents, with_cached_latents
from studio.limits import DEFAULT_MAX_COST, DEFAULT_TIME_LIMIT_S, check_cost, release_memory
from studio.outputs import ExportFolder, OutputStore
from studio.presets import PresetLibrary
from studio.validation import validate_request

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_id: int
    request: Request
    result: Result


def format_hint(info: dict, device: str) -> str:
    """One line of Markdown for a method toggle from ``HistoryStore.method_speedups``."""
    if not info.get("pairs"):
        return (f"Not enough data on `{device}`: no baseline run with the same prompt, seed and settings "
                "to compare with.")
    settings = ", ".join(f"{k}={v}" for k, v in sorted(info.get("params", {}).items())) or "defaults"
    verdict = "⚠️ slower than baseline here" if info["speedup"] < 1.0 else "faster than baseline here"
    spread = f" (range {info['min']:.2f}–{info['max']:.2f}x)" if info["pairs"] > 1 else ""
    return (f"Measured on `{device}`: median **{info['speedup']:.2f}x**{spread} over {info['pairs']} "
            f"prompt(s) run both ways, with {settings}; {verdict}.")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no details"


TMP_LEFTOVER_AGE_S = 3600  # a .tmp- file younger than this may be a write in progress


def crash_leftovers(unmatched: list[Path], newest_run: datetime | None) -> list[Path]:
    """The unmatched files a crash could have left: written after the newest run of this
    history (an output is saved just before its row is written), or ``.tmp-`` files older
    than ``TMP_LEFTOVER_AGE_S``. When unsure, a file stays where it is."""
    newest = newest_run.replace(tzinfo=timezone.utc).timestamp() if newest_run else None
    now = time.time()
    out = []
    for path in unmatched:
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        if path.name.startswith(".tmp-"):
            if now - mtime > TMP_LEFTOVER_AGE_S:
                out.append(path)
        elif newest is not None and mtime > newest:
            out.append(path)
    return out


def default_data_dir() -> Path:
    return Path(os.environ.get("FASTGEN_DATA_DIR", Path.cwd() / "data"))


class Studio:
    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        db_url: str | None = None,
        device: str = "auto",
        manager: BackendManager | None = None,
        executor: Any = None,
        allowed_roots: list[Path] | None = None,
        max_cost: float | None = DEFAULT_MAX_COST,
        time_limit_s: float | None = DEFAULT_TIME_LIMIT_S,
    ):
        """``max_cost``: the most a request may cost (``studio.limits``), None = no limit;
        ``time_limit_s``: a run still going after this many seconds stops at its next step."""
        self.data_dir = Path(data_dir or default_data_dir())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.outputs = OutputStore(self.data_dir / "outputs")
        self.exports = ExportFolder(self.data_dir / "exports")
        self.history = HistoryStore(db_url or sqlite_url(self.data_dir / "history.db"), outputs=self.outputs)
        self.manager = manager or BackendManager(device=device, allowed_roots=allowed_roots)
        if getattr(self.manager, "cache_dir", "") is None:
            self.manager.cache_dir = self.data_dir / "cache"  # methods' disk state (prefix cache, datastore)
        self.executor = executor or LocalExecutor(self.manager)
        self.presets = PresetLibrary(self.history)
        self.max_cost = max_cost
        self.time_limit_s = time_limit_s
        self.repaired = self.repair()

    # -- generation --------------------------------------------------------------------
    def generate(
        self,
        request: Request | dict,
        progress: ProgressFn | None = None,
        parent_id: int | None = None,
        metrics_fn=None,
        cancel: Any = None,
    ) -> RunOutcome:
        """Run one request and keep it. Raises StudioError (with a user-facing message)
        after recording the failed run; a request that fails validation (before the run, or
        once the model is loaded: a method that does not fit it) or is over the cost limit
        is not a run and is not recorded.

        ``cancel``: a ``CancelToken`` (or ``threading.Event``) the caller may set from another
        thread to stop the run at its next step (recorded as ``cancelled``). Each run gets
        its own token under it, carrying the studio's time limit (recorded as ``timeout``)."""
        request = validate_request(request)
        check_cost(request, self.max_cost)
        request = with_stored_calibrations(self.history, request)
        request = with_cached_latents(self.history, self.outputs, request)
        token = CancelToken(self.time_limit_s, parent=cancel)
        try:
            result = self.executor.run(request, progress, cancel=token)
        except RunCancelled as exc:
            self._record_failure(request, str(exc), parent_id, status=exc.status)
            raise
        except ValidationError:
            raise  # refused once the model was known (a method that does not fit it): a refusal, not a run
        except StudioError as exc:
            self._record_failure(request, str(exc), parent_id)
            raise
        except Exception as exc:
            if not is_allocation_failure(exc):
                log.exception("run failed")
                # the exception's own text may carry paths or library internals: the log has it
                message = "the run failed unexpectedly; the server log has the details"
                self._record_failure(request, message, parent_id)
                raise StudioError(message) from exc
            log.warning("run out of memory: %s", first_line(exc))  # the details stay in the server log
            traceback.clear_frames(exc.__traceback__)  # the frames hold the run's tensors
            message = ("out of memory: the run needed more memory than is available; caches were freed, "
                       "try a smaller size, fewer frames or fewer steps")
        else:
            try:
                return self._keep(request, result, parent_id, metrics_fn)
            except Exception as exc:  # disk full, folder gone: the run happened, so it gets its row
                log.exception("could not keep the output of a finished run")
                message = f"the run finished but its output could not be saved ({type(exc).__name__}); " \
                          "check the free space of the data dir"
                self._record_failure(request, message, parent_id)
                raise StudioError(message) from exc
        # only an allocation failure gets here, outside the except block so that the
        # exception and its frames are gone before memory is collected
        release_memory(self.manager)
        self._record_failure(request, message, parent_id, status="oom")
        raise OutOfMemoryError(message)

    def warm_up(self, request: Request | dict, cancel: Any = None) -> Result:
        """Run without keeping anything (a comparison's untimed warm-up): the same validation,
        cost limit, time limit and cancel as ``generate``, but no file and no history row."""
        request = validate_request(request)
        check_cost(request, self.max_cost)
        request = with_stored_calibrations(self.history, request)
        request = with_cached_latents(self.history, self.outputs, request)
        result = self.executor.run(request, None, cancel=CancelToken(self.time_limit_s, parent=cancel))
        keep_run_calibrations(self.history, request, result)
        discard_run_latents(result)
        return result

    def _keep(self, request: Request, result: Result, parent_id: int | None, metrics_fn) -> RunOutcome:
        """Save the output file and write the run's row (no row, no file). Before: a
        calibration the run measured is kept, and the run's own findings (skipped nothing,
        NaN/Inf, blank; ``studio.detectors``) go on the result and into its metrics."""
        keep_run_calibrations(self.history, request, result)
        result.findings = as_dicts(run_findings(request.modality, result.output, result.method_stats))
        fps = int(request.params.get("fps", 8))
        path = self.outputs.save(request.modality, result.output, fps=fps)
        result.output_path = str(path)
        metrics = metrics_fn(result) if metrics_fn else {}
        if result.findings:
            metrics = {**metrics, "findings": result.findings}
        try:  # the row keeps the path relative to the data dir: the data dir can move
            run_id = self.history.record_run(
                request, result, status="ok", output_path=self.outputs.relative(path), metrics=metrics,
                parent_id=parent_id
            )
        except Exception:
            path.unlink(missing_ok=True)  # no row, no file: never an orphan
            raise
        keep_run_latents(self.history, self.outputs, run_id, request, result)
        return RunOutcome(run_id, request, result)

    def _record_failure(self, request: Request, message: str, parent_id: int | None, status: str = "failed") -> None:
        try:
            self.history.record_run(request, None, status=status, error=message, parent_id=parent_id)
        except Exception:  # the DB itself failing must not hide the run's own error
            log.exception("could not record the failed run")

    def rerun(self, run_id: int, progress: ProgressFn | None = None) -> RunOutcome:
        row = self.history.get(run_id)
        if row is None:
            raise ValidationError(f"no run #{run_id} in history")
        if any(m.get("name") == "streamdiffusion" for m in row.methods or []):
            raise ValidationError(f"run #{run_id} is a stream: its input frames are not kept; run it again "
                                  "from the Image tab's Stream section")
        return self.generate(row.to_request(), progress)

    def describe_model(self, modality: str, model: str) -> dict:
        return self.executor.describe(modality, model)

    def method_hints(self, modality: str, model: str) -> dict[str, str]:
        """What history says about each method on this model and this device. Only
        comparable runs count: the method alone against a baseline of the same prompt,
        seed, params and device, one setting at a time; otherwise "not enough data"."""
        from backends.accel.base import methods_for

        device = str(self.manager.device)
        measured = self.history.method_speedups(model, device)
        hints = {}
        for cls in methods_for(modality):
            info = measured.get(cls.spec.name)
            if info is None:
                continue
            hints[cls.spec.name] = format_hint(info, device)
        for name in CALIBRATABLE:  # a stored calibration, and whether the method uses it by itself
            line = calibration_hint(self.history, model, name) if any(
                cls.spec.name == name for cls in methods_for(modality)) else ""
            if line:
                hints[name] = f"{hints[name]}\n\n{line}" if name in hints else line
        return hints

    # -- upkeep ------------------------------------------------------------------------
    def repair(self) -> dict[str, Any]:
        """Startup repair, which never deletes: stale 'running' rows become 'interrupted';
        absolute paths of older rows become relative; crash leftovers move to
        DATA_DIR/trash/. Rows whose file is missing keep their path.

        A file no row points to is a crash leftover only when the crash could have made it:
        written after this history's newest run (the output is saved just before its row),
        or a half-written ``.tmp-`` file older than an hour. Any other unmatched file
        belongs to something else (another --db on this data dir, a file put there by
        hand) and is left alone; when no row matches any file at all, nothing is moved."""
        report: dict[str, Any] = {"interrupted_runs": self.history.mark_interrupted(),
                                  "story_folders_moved": self.outputs.adopt_legacy_stories(),
                                  "paths_migrated": self.history.migrate_absolute_paths(self.outputs),
                                  "orphans_moved_to_trash": 0, "unmatched_files_left": 0,
                                  "rows_with_missing_files": 0, "refused": None}
        stored = self.history.output_paths()
        on_disk = self.outputs.real_files()  # one walk of the folder, reused below
        for database_file in self.history.database_files():  # a database kept under outputs/
            on_disk.pop(str(database_file), None)
        present = self.outputs.resolve_many(stored, on_disk)
        report["rows_with_missing_files"] = len(stored) - len(present)
        unmatched = self.outputs.orphans(present, on_disk)
        kept = len(on_disk) - len(unmatched)
        if unmatched and not kept:
            report["refused"] = (f"{len(unmatched)} file(s) in the outputs folder but no history row points to any "
                                 f"of them (another --db, or a data dir the rows do not belong to?): nothing was moved")
            log.warning("startup repair skipped: %s", report["refused"])
            return report
        leftovers = crash_leftovers(unmatched, self.history.newest_run_time())
        report["unmatched_files_left"] = len(unmatched) - len(leftovers)
        if leftovers:
            moved, trash = self.outputs.move_to_trash(leftovers)
            report["orphans_moved_to_trash"] = moved
            log.warning("startup repair: %d file(s) left by an interrupted run moved to %s", moved, trash)
        if report["unmatched_files_left"]:
            log.warning("startup repair: %d file(s) in the outputs folder belong to no run of this history "
                        "(older than its newest run: another --db?); left in place", report["unmatched_files_left"])
        if report["rows_with_missing_files"]:
            log.warning("startup repair: %d history row(s) point to a file that is missing (kept, shown as "
                        "'file missing')", report["rows_with_missing_files"])
        if report["interrupted_runs"] or report["paths_migrated"]:
            log.info("startup repair: %d stale running row(s) marked interrupted, %d path(s) made relative",
                     report["interrupted_runs"], report["paths_migrated"])
        return report

    def close(self) -> None:
        self.history.close()
