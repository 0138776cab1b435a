"""The Studio: the one object the UI, the API and the benchmarks call.

It validates a request, hands it to the executor, saves the output file, and writes the
history row, failed runs included, so whatever happens nothing already kept is lost.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from backends.base import ProgressFn
from backends.executor import LocalExecutor
from backends.manager import BackendManager
from backends.types import OutOfMemoryError, Request, Result, StudioError, ValidationError
from studio.history import HistoryStore, sqlite_url
from studio.outputs import ExportFolder, OutputStore
from studio.presets import PresetLibrary
from studio.validation import validate_request

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    run_id: int
    request: Request
    result: Result


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
    ):
        self.data_dir = Path(data_dir or default_data_dir())
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.outputs = OutputStore(self.data_dir / "outputs")
        self.exports = ExportFolder(self.data_dir / "exports")
        self.history = HistoryStore(db_url or sqlite_url(self.data_dir / "history.db"), outputs=self.outputs)
        self.manager = manager or BackendManager(device=device, allowed_roots=allowed_roots)
        self.executor = executor or LocalExecutor(self.manager)
        self.presets = PresetLibrary(self.history)
        self.repaired = self.repair()

    # -- generation --------------------------------------------------------------------
    def generate(
        self,
        request: Request | dict,
        progress: ProgressFn | None = None,
        parent_id: int | None = None,
        metrics_fn=None,
    ) -> RunOutcome:
        """Run one request and keep it. Raises StudioError (with a user-facing message)
        after recording the failed run; a request that fails validation is not a run and
        is not recorded."""
        request = validate_request(request)
        try:
            result = self.executor.run(request, progress)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.manager.free_caches()
            message = f"out of memory: {str(exc).splitlines()[0] if str(exc) else 'the run needed more memory than is available'}; caches were freed, try a smaller size or fewer steps"
            self._record_failure(request, message, parent_id)
            raise OutOfMemoryError(message) from exc
        except StudioError as exc:
            self._record_failure(request, str(exc), parent_id)
            raise
        except Exception as exc:
            log.exception("run failed")
            message = f"the run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self._record_failure(request, message, parent_id)
            raise StudioError(message) from exc
        fps = int(request.params.get("fps", 8))
        path = self.outputs.save(request.modality, result.output, fps=fps)
        result.output_path = str(path)
        metrics = metrics_fn(result) if metrics_fn else {}
        try:  # the row keeps the path relative to the data dir: the data dir can move
            run_id = self.history.record_run(
                request, result, status="ok", output_path=self.outputs.relative(path), metrics=metrics,
                parent_id=parent_id
            )
        except Exception:
            path.unlink(missing_ok=True)  # no row, no file: never an orphan
            raise
        return RunOutcome(run_id, request, result)

    def _record_failure(self, request: Request, message: str, parent_id: int | None) -> None:
        try:
            self.history.record_run(request, None, status="failed", error=message, parent_id=parent_id)
        except Exception:  # the DB itself failing must not hide the run's own error
            log.exception("could not record the failed run")

    def rerun(self, run_id: int, progress: ProgressFn | None = None) -> RunOutcome:
        row = self.history.get(run_id)
        if row is None:
            raise ValidationError(f"no run #{run_id} in history")
        return self.generate(row.to_request(), progress)

    def describe_model(self, modality: str, model: str) -> dict:
        return self.executor.describe(modality, model)

    def method_hints(self, modality: str, model: str) -> dict[str, str]:
        """What history says about each method on this model and this device: the studio
        learns from its runs, and warns next to a toggle that measured slower than baseline."""
        from backends.accel.base import methods_for

        device = str(self.manager.device)
        hints = {}
        for cls in methods_for(modality):
            points = [p for p in self.history.trend(model, cls.spec.name) if p["device"] == device]
            if not points:
                continue
            speedups = sorted(p["speedup"] for p in points)
            median = speedups[len(speedups) // 2]
            verdict = "⚠️ slower than baseline here" if median < 1.0 else "faster than baseline here"
            hints[cls.spec.name] = f"Measured on `{device}`: median **{median:.2f}x** over {len(points)} run(s), {verdict}."
        return hints

    # -- upkeep ------------------------------------------------------------------------
    def repair(self) -> dict[str, Any]:
        """Startup repair, which never deletes: stale 'running' rows become 'interrupted';
        absolute paths of older rows become relative; files no row points to (a crash
        between file and row) move to DATA_DIR/trash/. When there are files but no row
        points to any of them (another --db, a moved data dir the rows cannot be matched
        to), it moves nothing and says why. Rows whose file is missing keep their path."""
        report: dict[str, Any] = {"interrupted_runs": self.history.mark_interrupted(),
                                  "story_folders_moved": self.outputs.adopt_legacy_stories(),
                                  "paths_migrated": self.history.migrate_absolute_paths(self.outputs),
                                  "orphans_moved_to_trash": 0, "rows_with_missing_files": 0, "refused": None}
        stored = self.history.output_paths()
        resolved = {self.outputs.resolve(p) for p in stored}
        present = {p for p in resolved if p is not None and p.is_file()}
        report["rows_with_missing_files"] = len(stored) - len(present)
        orphans = self.outputs.orphans(present)
        kept = [p for p in self.outputs.files() if p not in orphans]
        if orphans and not kept:
            report["refused"] = (f"{len(orphans)} file(s) under {self.outputs.root} but no history row points to any "
                                 f"of them (another --db, or a data dir the rows do not belong to?): nothing was moved")
            log.warning("startup repair skipped: %s", report["refused"])
        elif orphans:
            trash = self.outputs.move_to_trash(orphans)
            report["orphans_moved_to_trash"] = len(orphans)
            log.warning("startup repair: %d file(s) without a history row moved to %s", len(orphans), trash)
        if report["rows_with_missing_files"]:
            log.warning("startup repair: %d history row(s) point to a file that is missing (kept, shown as "
                        "'file missing')", report["rows_with_missing_files"])
        if report["interrupted_runs"] or report["paths_migrated"]:
            log.info("startup repair: %d stale running row(s) marked interrupted, %d path(s) made relative",
                     report["interrupted_runs"], report["paths_migrated"])
        return report

    def close(self) -> None:
        self.history.close()
