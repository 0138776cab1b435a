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
from studio.outputs import OutputStore
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
        self.history = HistoryStore(db_url or sqlite_url(self.data_dir / "history.db"))
        self.outputs = OutputStore(self.data_dir / "outputs")
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
        after recording the failed run; a request that fails validation, before the run or
        once the model is loaded (ValidationError), is not a run and is not recorded."""
        request = validate_request(request)
        try:
            result = self.executor.run(request, progress)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            self.manager.free_caches()
            message = f"out of memory: {str(exc).splitlines()[0] if str(exc) else 'the run needed more memory than is available'}; caches were freed, try a smaller size or fewer steps"
            self._record_failure(request, message, parent_id)
            raise OutOfMemoryError(message) from exc
        except ValidationError:
            raise  # refused once the model was known (a method that does not fit it): a refusal, not a run
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
        try:
            run_id = self.history.record_run(
                request, result, status="ok", output_path=str(path), metrics=metrics, parent_id=parent_id
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
        return hints

    # -- upkeep ------------------------------------------------------------------------
    def repair(self) -> dict[str, int]:
        """Startup repair: remove output files no row points to (a crash between file and
        row), and clear paths of rows whose file was deleted by hand."""
        referenced = self.history.output_paths()
        orphans = self.outputs.orphans(referenced)
        for path in orphans:
            path.unlink(missing_ok=True)
        missing = [p for p in referenced if not Path(p).exists()]
        if missing:
            from sqlalchemy import update

            from studio.history import Run

            with self.history.sessions.begin() as session:
                session.execute(update(Run).where(Run.output_path.in_(missing)).values(output_path=None))
        return {"orphan_files_removed": len(orphans), "rows_with_missing_files": len(missing)}

    def close(self) -> None:
        self.history.close()
