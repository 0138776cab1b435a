"""Run history and user presets in one SQL database, through SQLAlchemy 2.0.

SQLite under the data dir by default (WAL, so the UI can read while a run writes); any
SQLAlchemy URL works through ``--db``. Outputs live in files; rows hold their paths.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import numpy as np
from sqlalchemy import (JSON, BigInteger, DateTime, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, and_,
                        cast, create_engine, delete, event, func, inspect, or_, select, text, update)
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from backends.types import Request, Result, StudioError

log = logging.getLogger(__name__)


class Base(DeclarativeBase):
    pass


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now, index=True)
    modality: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str] = mapped_column(String(512), index=True)
    prompt: Mapped[str] = mapped_column(Text, default="")
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(BigInteger, default=0)  # seeds reach 2**32 - 1: beyond a 32-bit INTEGER
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    methods: Mapped[list] = mapped_column(JSON, default=list)
    method_names: Mapped[str] = mapped_column(String(512), default="")  # ",a,b,": display only
    # What makes two runs comparable (same model, prompt, negative prompt, seed, params and
    # device), hashed so one indexed equality finds a run's baseline; and the methods with
    # their settings, hashed the same way ("" for the baseline). Speed hints pair runs on these.
    config_key: Mapped[str | None] = mapped_column(String(40), nullable=True)
    methods_key: Mapped[str | None] = mapped_column(String(40), nullable=True)
    single_method: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the method, when alone
    status: Mapped[str] = mapped_column(String(16), index=True)  # ok | failed
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    total_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    model_evals: Mapped[int | None] = mapped_column(Integer, nullable=True)
    method_stats: Mapped[dict] = mapped_column(JSON, default=dict)
    output_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    compare_group: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    parent_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    notes: Mapped[list] = mapped_column(JSON, default=list)

    __table_args__ = (
        Index("ix_runs_hint", "model", "device", "status", "single_method"),
        Index("ix_runs_pair", "config_key", "methods_key", "status"),
    )

    def to_dict(self) -> dict[str, Any]:
        data = {c.name: getattr(self, c.name) for c in self.__table__.columns if c.name not in INTERNAL_COLUMNS}
        data["created_at"] = self.created_at.isoformat(timespec="seconds") if self.created_at else None
        return data

    def to_request(self) -> Request:
        """The exact request that produced this row, for a re-run."""
        return Request.from_dict(
            {
                "modality": self.modality,
                "model": self.model,
                "prompt": self.prompt,
                "negative_prompt": self.negative_prompt,
                "seed": self.seed,
                "params": self.params or {},
                "methods": self.methods or [],
            }
        )


class RunMethod(Base):
    """One method of one run, in the order applied: filters by method are an indexed
    lookup here instead of a LIKE scan over every run."""

    __tablename__ = "run_methods"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))

    __table_args__ = (Index("ix_run_methods_name", "name", "run_id"),)


class RunSummary(Base):
    """Per workload and method setting: how many ok runs and their total time. Kept up to
    date as runs are recorded and deleted, so speed hints read a few thousand summary rows
    instead of every run: their cost stays flat as history grows."""

    __tablename__ = "run_summaries"

    config_key: Mapped[str] = mapped_column(String(40), primary_key=True)
    methods_key: Mapped[str] = mapped_column(String(40), primary_key=True)
    model: Mapped[str] = mapped_column(String(512))
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    single_method: Mapped[str | None] = mapped_column(String(64), nullable=True)
    runs: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)  # the sum over those runs
    last_run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    params: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the single method's settings

    __table_args__ = (Index("ix_run_summaries_model", "model", "device", "single_method"),)


INTERNAL_COLUMNS = {"config_key", "methods_key", "single_method"}


def config_key(model: str, prompt: str, negative_prompt: str, seed: int, params: dict, device: str | None) -> str:
    """The identity of a run's workload: two runs with the same key did the same work
    unless their methods differ, so their times can be divided."""
    return _digest([model, prompt, negative_prompt or "", int(seed), params or {}, device or ""])


def methods_key(methods: list[dict]) -> str:
    """The methods and their settings, in order; "" for the baseline."""
    return _digest(methods) if methods else ""


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


class PresetRow(Base):
    __tablename__ = "presets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    modality: Mapped[str] = mapped_column(String(16), index=True)
    model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    methods: Mapped[list] = mapped_column(JSON, default=list)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=_now, onupdate=_now)


class CalibrationRow(Base):
    """One stored calibration of a method for a model (``backends.accel._calibration``):
    a TeaCache rescale curve, MagCache ratios or a threshold for a target skip rate, with
    the run settings it was made at (``settings``, hashed in ``settings_key`` so one
    setting keeps one row per kind), the device and the date. A new table: ``create_all``
    adds it to an older database."""

    __tablename__ = "calibrations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    model: Mapped[str] = mapped_column(String(512))
    method: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))  # rescale | ratios | threshold
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    settings_key: Mapped[str] = mapped_column(String(40))
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)

    __table_args__ = (Index("ix_calibrations_model", "model", "method", "kind", "settings_key"),)

    def to_record(self) -> dict[str, Any]:
        """The record a method reads (``MethodChoice.calibrations``): its data plus the
        id, kind, settings, device and date."""
        return {**(self.data or {}), "id": self.id, "kind": self.kind, "method": self.method, "model": self.model,
                "settings": self.settings or {}, "device": self.device,
                "created_at": self.created_at.isoformat(timespec="seconds") if self.created_at else None}


class CachedLatentRow(Base):
    """The intermediate latents one finished run kept for approximate caching
    (``backends.accel.approx_cache``): a file under the outputs folder (one tensor per kept
    step), the steps it holds, the run settings a reuse must match exactly (hashed in
    ``settings_key``) and the prompt's token embedding (float16 bytes + its shape), which
    the method compares with a new prompt's. Deleting the run deletes its rows and files."""

    __tablename__ = "cached_latents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=_now)
    model: Mapped[str] = mapped_column(String(512))
    settings_key: Mapped[str] = mapped_column(String(40))
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    steps: Mapped[list] = mapped_column(JSON, default=list)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    embedding_shape: Mapped[list] = mapped_column(JSON, default=list)
    path: Mapped[str] = mapped_column(String(1024))

    __table_args__ = (Index("ix_cached_latents_model", "model", "settings_key", "id"),)


def _display_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: the message says so without echoing it
        return "(unreadable database URL)"


def sqlite_url(path: str | os.PathLike) -> str:
    return f"sqlite:///{Path(path).resolve()}"


RUN_COLUMNS = [c.name for c in Run.__table__.columns if c.name not in INTERNAL_COLUMNS]


class HistoryStore:
    def __init__(self, url: str, outputs=None):
        """``outputs`` (an OutputStore) is where stored paths are resolved; without one,
        deleting a row never touches a file."""
        self.url = _display_url(url)  # what logs and messages may show: never the password
        self.outputs = outputs
        connect_args = {"timeout": 30, "check_same_thread": False} if url.startswith("sqlite") else {}
        try:
            self.engine = create_engine(url, connect_args=connect_args)
        except Exception as exc:  # bad URL, missing driver
            raise StudioError(f"cannot open the history database {self.url!r}: {str(exc).splitlines()[0]}") from exc
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT count(*) FROM runs")
            upgrade_schema(self.engine)
        except (DatabaseError, OperationalError) as exc:
            self.engine.dispose()
            raise StudioError(
                f"the history database {self.url!r} cannot be used ({str(exc.orig or exc).splitlines()[0]}); "
                "it may be corrupt or locked by another program. Start with --db to pick another file."
            ) from exc
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # -- runs --------------------------------------------------------------------------
    def record_run(
        self,
        request: Request,
        result: Result | None = None,
        *,
        status: str = "ok",
        error: str | None = None,
        output_path: str | None = None,
        metrics: dict | None = None,
        parent_id: int | None = None,
    ) -> int:
        methods = _json_safe([m.to_dict() for m in request.methods])
        params = _json_safe(request.params)
        device = result.device if result is not None else None
        row = Run(
            modality=request.modality,
            model=request.model,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or "",
            seed=int(request.seed),
            params=params,
            methods=methods,
            config_key=config_key(request.model, request.prompt, request.negative_prompt, request.seed, params, device),
            methods_key=methods_key(methods),
            single_method=methods[0]["name"] if len(methods) == 1 else None,
            method_names="," + ",".join(m["name"] for m in methods) + ("," if methods else ""),
            status=status,
            error=error,
            output_path=output_path,
            metrics=_json_safe(metrics or {}),
            compare_group=request.compare_group,
            parent_id=parent_id,
        )
        if result is not None:
            row.timings = result.timings
            row.total_seconds = result.total_seconds
            row.peak_memory_bytes = int(result.peak_memory_bytes)
            row.model_evals = int(result.model_evals)
            row.method_stats = _json_safe(result.method_stats)
            row.device = result.device
            row.worker = result.worker
            row.notes = list(result.notes)
        with self.sessions.begin() as session:
            session.add(row)
            session.flush()
            session.add_all(RunMethod(run_id=row.id, position=i, name=m["name"]) for i, m in enumerate(methods))
            if _summarised(row):
                _add_to_summary(session, row, +1)
            return row.id

    def finish_run(self, run_id: int, *, status: str, error: str | None = None, timings: dict | None = None,
                   output_path: str | None = None, metrics: dict | None = None) -> None:
        """Close a parent run (a story) recorded as 'running' when it started."""
        with self.sessions.begin() as session:
            row = session.get(Run, run_id)
            if row is None:
                return
            row.status, row.error = status, error
            if timings is not None:
                row.timings = _json_safe(timings)
                row.total_seconds = timings.get("total")
            if output_path is not None:
                row.output_path = output_path
            if metrics is not None:
                row.metrics = _json_safe(metrics)

    def children(self, parent_id: int) -> list[Run]:
        with self.sessions() as session:
            return list(session.scalars(select(Run).where(Run.parent_id == parent_id).order_by(Run.id)))

    def update_metrics(self, run_id: int, metrics: dict) -> None:
        with self.sessions.begin() as session:
            row = session.get(Run, run_id)
            if row is not None:
                row.metrics = {**(row.metrics or {}), **_json_safe(metrics)}

    def get(self, run_id: int) -> Run | None:
        with self.sessions() as session:
            return session.get(Run, run_id)

    def _filtered(self, stmt, modality=None, model=None, method=None, status=None, text=None, compare_group=None):
        if modality:
            stmt = stmt.where(Run.modality == modality)
        if model:
            stmt = stmt.where(Run.model == model)
        if method:
            # through the (name, run_id) index: the method's runs, not a scan of every run
            stmt = stmt.where(Run.id.in_(select(RunMethod.run_id).where(RunMethod.name == method)))
        if status:
            stmt = stmt.where(Run.status == status)
        if compare_group:
            stmt = stmt.where(Run.compare_group == compare_group)
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            # SQLite's LIKE already ignores ASCII case; its ILIKE wraps both sides in lower()
            # per row, which doubles a scan's cost. PostgreSQL needs ILIKE.
            match = (lambda c: c.like(like, escape="\\")) if self.engine.dialect.name == "sqlite" else (
                lambda c: c.ilike(like, escape="\\"))
            stmt = stmt.where(or_(match(Run.prompt), match(Run.model), match(Run.error)))
        return stmt

    def query(self, *, limit: int = 50, offset: int = 0, **filters: Any) -> list[Run]:
        stmt = self._filtered(select(Run), **filters).order_by(Run.id.desc()).limit(limit).offset(offset)
        with self.sessions() as session:
            return list(session.scalars(stmt))

    def count(self, cap: int | None = None, **filters: Any) -> int:
        """How many runs match. With ``cap``, counting stops after ``cap + 1`` matches (a
        result above ``cap`` means "more than cap"): a text search over a large history
        then costs what finding those matches costs, not a scan of every run."""
        with self.sessions() as session:
            if cap is None:
                return int(session.scalar(self._filtered(select(func.count(Run.id)), **filters)))
            first = self._filtered(select(Run.id), **filters).limit(cap + 1).subquery()
            return int(session.scalar(select(func.count()).select_from(first)))

    def delete(self, run_ids: Iterable[int], delete_files: bool = True) -> int:
        """Delete rows, their child rows (a story's stages), and their output files. Rows
        go first: a crash in between leaves a file no row points to, never a row without
        its file. Files are removed only inside the outputs folder, whatever a row's path
        says."""
        with self.sessions.begin() as session:
            ids = set(run_ids)
            frontier = set(ids)
            while frontier:  # descendants: stories' stages, and anything below them
                frontier = set(session.scalars(select(Run.id).where(Run.parent_id.in_(list(frontier))))) - ids
                ids |= frontier
            rows = list(session.scalars(select(Run).where(Run.id.in_(list(ids)))))
            session.execute(delete(RunMethod).where(RunMethod.run_id.in_([row.id for row in rows])))
            latent_files = list(session.scalars(select(CachedLatentRow.path).where(
                CachedLatentRow.run_id.in_([row.id for row in rows]))))
            session.execute(delete(CachedLatentRow).where(CachedLatentRow.run_id.in_([row.id for row in rows])))
            deleted = []
            for row in rows:
                # only a row this transaction really deleted leaves the summaries: two
                # deletes of one run at once must not subtract it twice
                if not session.execute(delete(Run).where(Run.id == row.id)).rowcount:
                    continue
                deleted.append((row.id, row.modality, row.output_path))
                if _summarised(row):
                    _add_to_summary(session, row, -1)
        if delete_files and self.outputs is not None:
            for run_id, modality, stored in deleted:
                self._delete_files(run_id, modality, stored)
            for stored in latent_files:
                path = self.outputs.deletable(stored)
                if path is not None and path.is_file():
                    path.unlink(missing_ok=True)
        return len(deleted)

    def _delete_files(self, run_id: int, modality: str, stored: str | None) -> None:
        path = self.outputs.deletable(stored)
        if path is not None and path.is_file():
            path.unlink(missing_ok=True)
        if modality == "story":  # story.md and the step images live beside its own story.html
            folder = self.outputs.story_folder_of(stored)
            if folder is not None and folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)

    def newest_run_time(self) -> datetime | None:
        """When the newest run was recorded (UTC): files written after it can only come
        from a run that crashed before its row."""
        with self.sessions() as session:
            return session.scalar(select(func.max(Run.created_at)))

    def output_paths(self) -> set[str]:
        """Every file under the outputs folder a row points to: the runs' outputs and the
        latents kept for approximate caching."""
        with self.sessions() as session:
            paths = set(session.scalars(select(Run.output_path).where(Run.output_path.is_not(None))))
            return paths | set(session.scalars(select(CachedLatentRow.path)))

    def write_csv(self, out, progress=None, batch: int = 2000, **filters: Any) -> int:
        """Stream the filtered runs, newest first, as CSV into the text file ``out``.

        Rows are read through a server-side cursor in batches of ``batch`` and written as
        they come, so memory stays flat whatever the history's size; ``progress(done,
        total)`` is called after each batch. Returns the number of rows written."""
        total = self.count(**filters) if progress else 0
        writer = csv.writer(out)
        writer.writerow(RUN_COLUMNS)
        # JSON columns travel as their stored text: no parse and re-serialise per cell.
        columns = [cast(getattr(Run, name), Text).label(name) if isinstance(getattr(Run, name).type, JSON)
                   else getattr(Run, name) for name in RUN_COLUMNS]
        stmt = self._filtered(select(*columns), **filters).order_by(Run.id.desc())
        converters = _csv_converters(Run.__table__.columns[name] for name in RUN_COLUMNS)
        written = 0
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=batch).execute(stmt)
            for chunk in result.partitions(batch):
                writer.writerows(_csv_rows(chunk, converters))
                written += len(chunk)
                if progress:
                    progress(written, total)
        return written

    def mark_interrupted(self) -> int:
        """Rows still 'running' at startup belong to a process that died (a story cut
        short by a crash): they are 'interrupted', not running forever."""
        with self.sessions.begin() as session:
            result = session.execute(
                update(Run).where(Run.status == "running").values(status="interrupted",
                                                                   error="interrupted: the studio stopped during this run")
            )
            return int(result.rowcount or 0)

    def migrate_absolute_paths(self, outputs) -> int:
        """Rows written before paths were stored relative: an absolute path under the
        current outputs folder becomes relative; one from an older data dir location is
        matched by its part after ``outputs/`` when that file exists here. Others are left
        as they are (shown as a missing file, never read)."""
        changed = 0
        with self.sessions.begin() as session:
            # rows written since paths became relative start with "outputs/": skipped in SQL,
            # so a large history costs nothing here at each start-up
            rows = session.execute(select(Run.id, Run.output_path).where(
                Run.output_path.is_not(None), ~Run.output_path.startswith(outputs.root.name + "/"))).all()
            for run_id, stored in rows:
                if not os.path.isabs(stored):
                    continue
                relative = None
                if outputs.resolve(stored) is not None:
                    relative = outputs.relative(stored)
                else:
                    relative = outputs.match_moved(stored)
                if relative is not None:
                    session.execute(update(Run).where(Run.id == run_id).values(output_path=relative))
                    changed += 1
        return changed

    def database_files(self) -> list[Path]:
        """The SQLite file and its journal companions: never to be served to anyone."""
        database = self.engine.url.database if self.engine.url.get_backend_name() == "sqlite" else None
        if not database or database == ":memory:":
            return []
        path = Path(database).resolve()
        return [path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm", "-journal"))]

    def export_csv(self, **filters: Any) -> str:
        """The whole filtered history as one CSV string (small histories, tests); the UI
        streams to a file with ``write_csv``."""
        buffer = io.StringIO()
        self.write_csv(buffer, **filters)
        return buffer.getvalue()

    def _pair_ratios(self, model: str, device: str | None = None, method: str | None = None):
        """Per comparable workload (same config_key) and method setting: the baseline's mean
        time over the method's mean time. Only runs with one method are paired, so a
        combination's time is never credited to each of its parts. Read from the summary
        table: the cost grows with distinct workloads and settings, not with runs."""
        tried = RunSummary.__table__.alias("tried")
        base = RunSummary.__table__.alias("base")
        stmt = (
            select(tried.c.single_method, tried.c.methods_key, tried.c.params, tried.c.runs,
                   ((base.c.seconds / base.c.runs) / (tried.c.seconds / tried.c.runs)).label("ratio"))
            .join(base, and_(base.c.config_key == tried.c.config_key, base.c.methods_key == ""))
            .where(tried.c.model == model, tried.c.single_method.is_not(None), tried.c.runs > 0, base.c.runs > 0,
                   tried.c.seconds > 0)
        )
        if device is not None:
            stmt = stmt.where(tried.c.device == device)
        if method is not None:
            stmt = stmt.where(tried.c.single_method == method)
        with self.sessions() as session:
            return session.execute(stmt).all()

    def method_speedups(self, model: str, device: str, method: str | None = None) -> dict[str, dict[str, Any]]:
        """What history says of each method on this model and device: for the setting
        measured on the most workloads, the median of baseline/method time ratios over
        workloads run both ways. A method run with no comparable baseline is reported with
        ``pairs == 0`` so the UI can say "not enough data" rather than guess."""
        by_setting: dict[tuple[str, str], list] = {}
        settings: dict[tuple[str, str], dict] = {}
        for name, setting, params, _runs, ratio in self._pair_ratios(model, device, method):
            by_setting.setdefault((name, setting), []).append(ratio)
            settings[(name, setting)] = params or {}
        out: dict[str, dict[str, Any]] = {}
        # the setting measured on the most workloads; ties go to the same one every time
        for (name, setting), ratios in sorted(by_setting.items(), key=lambda item: (-len(item[1]), item[0])):
            if name in out:
                continue
            ratios = sorted(ratios)
            out[name] = {"speedup": _median(ratios), "min": ratios[0], "max": ratios[-1], "pairs": len(ratios),
                         "params": settings[(name, setting)]}
        with self.sessions() as session:
            stmt = select(RunSummary.single_method).distinct().where(
                RunSummary.model == model, RunSummary.device == device, RunSummary.runs > 0,
                RunSummary.single_method.is_not(None))
            tried = session.scalars(stmt.where(RunSummary.single_method == method) if method else stmt)
            for name in tried:
                out.setdefault(name, {"speedup": None, "pairs": 0})
        return out

    def trend(self, model: str, method: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Speedup of ``method`` run alone over the baseline of the same workload (model,
        prompt, seed, params, device), one point per method run, oldest first; the last
        ``limit`` runs."""
        base = RunSummary.__table__.alias("base")
        stmt = (
            select(Run.id, Run.created_at, Run.device,
                   ((base.c.seconds / base.c.runs) / Run.total_seconds).label("speedup"))
            .join(base, and_(base.c.config_key == Run.config_key, base.c.methods_key == "", base.c.runs > 0))
            .where(Run.model == model, Run.status == "ok", Run.single_method == method, Run.total_seconds > 0)
            .order_by(Run.id.desc())
            .limit(limit)
        )
        with self.sessions() as session:
            rows = session.execute(stmt).all()
        return [{"run_id": r.id, "time": r.created_at, "device": r.device, "speedup": float(r.speedup)}
                for r in reversed(rows)]

    # -- presets -----------------------------------------------------------------------
    def save_preset(self, name: str, modality: str, model: str | None, params: dict, methods: list, description: str) -> None:
        with self.sessions.begin() as session:
            row = session.scalar(select(PresetRow).where(PresetRow.name == name))
            if row is None:
                row = PresetRow(name=name)
                session.add(row)
            row.modality, row.model, row.description = modality, model, description
            row.params, row.methods = _json_safe(params), _json_safe(methods)

    def presets(self) -> list[PresetRow]:
        with self.sessions() as session:
            return list(session.scalars(select(PresetRow).order_by(PresetRow.name)))

    def rename_preset(self, old: str, new: str) -> bool:
        """Rename a user preset; the new name must fit the column (the caller checks the
        full naming rule, see ``studio.presets.validate_preset_name``)."""
        if not new or len(new) > PresetRow.name.type.length:
            raise StudioError(f"a preset name must be 1 to {PresetRow.name.type.length} characters")
        with self.sessions.begin() as session:
            if session.scalar(select(PresetRow).where(PresetRow.name == new)) is not None:
                raise StudioError(f"a preset named '{new}' already exists")
            row = session.scalar(select(PresetRow).where(PresetRow.name == old))
            if row is None:
                return False
            row.name = new
            return True

    # -- calibrations ------------------------------------------------------------------
    def save_calibration(self, model: str, method: str, record: dict[str, Any], device: str | None) -> int:
        """Keep ``record`` (a dict with ``kind``, ``settings`` and its data); it replaces an
        earlier calibration of the same model, method, kind and settings."""
        kind, settings = str(record["kind"]), dict(record.get("settings") or {})
        data = _json_safe({k: v for k, v in record.items() if k not in ("kind", "settings", "id", "created_at",
                                                                        "device", "model", "method")})
        key = _digest(settings)
        with self.sessions.begin() as session:
            session.execute(delete(CalibrationRow).where(
                CalibrationRow.model == model, CalibrationRow.method == method, CalibrationRow.kind == kind,
                CalibrationRow.settings_key == key))
            row = CalibrationRow(model=model, method=method, kind=kind, settings=_json_safe(settings),
                                 settings_key=key, data=data, device=device)
            session.add(row)
            session.flush()
            return row.id

    def calibrations(self, model: str | None = None, method: str | None = None) -> list[dict[str, Any]]:
        """Stored calibrations as records, newest first (all models when ``model`` is None)."""
        stmt = select(CalibrationRow).order_by(CalibrationRow.created_at.desc(), CalibrationRow.id.desc())
        if model is not None:
            stmt = stmt.where(CalibrationRow.model == model)
        if method is not None:
            stmt = stmt.where(CalibrationRow.method == method)
        with self.sessions() as session:
            return [row.to_record() for row in session.scalars(stmt)]

    def delete_calibration(self, calibration_id: int) -> bool:
        with self.sessions.begin() as session:
            row = session.get(CalibrationRow, int(calibration_id))
            if row is None:
                return False
            session.delete(row)
            return True

    # -- cached latents (approximate caching) --------------------------------------------
    def save_latents(self, run_id: int, model: str, record: dict[str, Any], path: str) -> int:
        """Keep the latents run ``run_id`` stored in the file ``path`` (relative to the data
        dir): ``record`` has ``settings``, ``settings_key``, ``steps`` and ``embedding`` (an
        array of float16 token states)."""
        embedding = np.asarray(record["embedding"], dtype=np.float16)
        row = CachedLatentRow(run_id=int(run_id), model=model, settings_key=str(record["settings_key"]),
                              settings=_json_safe(record.get("settings") or {}),
                              steps=[int(k) for k in record["steps"]], embedding=embedding.tobytes(),
                              embedding_shape=list(embedding.shape), path=path)
        with self.sessions.begin() as session:
            session.add(row)
            session.flush()
            return row.id

    def latent_records(self, model: str, limit: int = 256) -> list[dict[str, Any]]:
        """The newest ``limit`` kept latents of ``model`` as the records the method reads
        (``kind`` "latents", the embedding as an array, the file's stored path)."""
        stmt = (select(CachedLatentRow).where(CachedLatentRow.model == model)
                .order_by(CachedLatentRow.id.desc()).limit(limit))
        with self.sessions() as session:
            rows = list(session.scalars(stmt))
        return [{"kind": "latents", "id": row.id, "run_id": row.run_id, "settings_key": row.settings_key,
                 "settings": row.settings or {}, "steps": list(row.steps or []), "stored_path": row.path,
                 "embedding": np.frombuffer(row.embedding, dtype=np.float16).reshape(row.embedding_shape)}
                for row in rows]

    def latent_rows_of(self, run_id: int) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count(CachedLatentRow.id)).where(CachedLatentRow.run_id == run_id)))

    def delete_preset(self, name: str) -> bool:
        with self.sessions.begin() as session:
            row = session.scalar(select(PresetRow).where(PresetRow.name == name))
            if row is None:
                return False
            session.delete(row)
            return True


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


FORMULA_LEADS = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value: str) -> str:
    """A text cell that a spreadsheet will not run as a formula (CSV injection): cells
    starting with = + - @ tab or CR get a leading apostrophe, which spreadsheets hide."""
    return "'" + value if value.startswith(FORMULA_LEADS) else value


def _csv_converters(columns) -> list:
    """Per column, how its value becomes a cell (None: as is), decided once per export
    rather than per cell: the export's speed is this loop's speed."""
    out = []
    for column in columns:
        if isinstance(column.type, DateTime):
            out.append(lambda v: v.isoformat(timespec="seconds") if v is not None else None)
        elif isinstance(column.type, (String, Text, JSON)):
            out.append(lambda v: csv_safe(v) if v else v)
        else:
            out.append(None)
    return out


def _csv_rows(chunk, converters):
    pairs = list(enumerate(converters))
    for row in chunk:
        cells = list(row)
        for i, convert in pairs:
            if convert is not None:
                cells[i] = convert(cells[i])
        yield cells


def _summarised(row: Run) -> bool:
    """Runs that count in speed summaries: finished, timed, with their workload key."""
    return row.status == "ok" and bool(row.total_seconds) and row.config_key is not None and row.device is not None


def _add_to_summary(session, row: Run, sign: int) -> None:
    """Add (sign +1) or remove (-1) one run's time in its summary row, inside the
    caller's transaction, so the summary and the runs never disagree. One atomic upsert:
    concurrent writers of the same workload add up instead of colliding."""
    seconds = sign * float(row.total_seconds)
    table = RunSummary.__table__
    if sign < 0:
        session.execute(update(table).where(
            table.c.config_key == row.config_key, table.c.methods_key == (row.methods_key or "")).values(
            runs=table.c.runs - 1, seconds=table.c.seconds + seconds))
        return
    values = {"config_key": row.config_key, "methods_key": row.methods_key or "", "model": row.model,
              "device": row.device, "single_method": row.single_method, "runs": 1, "seconds": seconds,
              "last_run_id": row.id,
              "params": (row.methods[0].get("params") or {}) if row.single_method and row.methods else None}
    dialect = (getattr(session, "dialect", None) or session.get_bind().dialect).name
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as upsert
        else:
            from sqlalchemy.dialects.postgresql import insert as upsert
        stmt = upsert(table).values(**values)
        session.execute(stmt.on_conflict_do_update(
            index_elements=[table.c.config_key, table.c.methods_key],
            set_={"runs": table.c.runs + 1, "seconds": table.c.seconds + seconds, "last_run_id": row.id}))
        return
    changed = session.execute(update(table).where(
        table.c.config_key == row.config_key, table.c.methods_key == (row.methods_key or "")).values(
        runs=table.c.runs + 1, seconds=table.c.seconds + seconds, last_run_id=row.id)).rowcount
    if not changed:
        session.execute(table.insert().values(**values))


def _median(values: list[float]) -> float:
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def upgrade_schema(engine) -> None:
    """Bring a history database written by an older version up to this schema, in place:
    add the comparison columns, fill them (and the run_methods table) for old rows in
    batches, and create missing indexes. Idempotent; a no-op on a current database."""
    present = {c["name"]: c["type"] for c in inspect(engine).get_columns("runs")}
    with engine.begin() as conn:
        for column in Run.__table__.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=engine.dialect)
                conn.execute(text(f"ALTER TABLE runs ADD COLUMN {column.name} {kind}"))
        if engine.dialect.name == "postgresql":  # older tables made these 32-bit
            for name in ("seed", "peak_memory_bytes"):
                if name in present and not isinstance(present[name], BigInteger):
                    conn.execute(text(f"ALTER TABLE runs ALTER COLUMN {name} TYPE BIGINT"))
    for index in Run.__table__.indexes:
        index.create(engine, checkfirst=True)
    with engine.connect() as conn:
        summaries_kept = conn.execute(select(RunSummary.config_key).limit(1)).first() is not None
    _backfill_keys(engine, add_to_summaries=summaries_kept)
    _build_summaries(engine)
    if engine.dialect.name == "postgresql":
        _trigram_indexes(engine)


def _trigram_indexes(engine) -> None:
    """PostgreSQL: trigram indexes make the History search (ILIKE '%text%') an index
    lookup instead of a scan of every run. They need the pg_trgm extension (shipped with
    PostgreSQL's contrib modules); without the right to create it, search still works,
    only by a scan."""
    try:
        with engine.begin() as conn:
            conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
            for column in ("prompt", "model", "error"):
                conn.execute(text(f"CREATE INDEX IF NOT EXISTS ix_runs_{column}_trgm ON runs "
                                  f"USING gin ({column} gin_trgm_ops)"))
    except (DatabaseError, OperationalError) as exc:
        log.info("history search without trigram indexes (%s)", str(getattr(exc, "orig", exc)).splitlines()[0])


def _build_summaries(engine) -> None:
    """Fill the summary table from the runs when it is empty but runs exist (a database
    from before the table): one GROUP BY in SQL."""
    with engine.begin() as conn:
        if conn.execute(select(RunSummary.config_key).limit(1)).first() is not None:
            return
        ok = and_(Run.status == "ok", Run.total_seconds > 0, Run.config_key.is_not(None), Run.device.is_not(None))
        grouped = (
            select(Run.config_key, Run.methods_key, func.max(Run.model), func.max(Run.device),
                   func.max(Run.single_method), func.count(Run.id), func.sum(Run.total_seconds), func.max(Run.id))
            .where(ok, Run.methods_key.is_not(None))  # every row has one once _backfill_keys ran
            .group_by(Run.config_key, Run.methods_key)
        )
        conn.execute(RunSummary.__table__.insert().from_select(
            ["config_key", "methods_key", "model", "device", "single_method", "runs", "seconds", "last_run_id"],
            grouped))
        table = RunSummary.__table__
        singles = conn.execute(select(table.c.config_key, table.c.methods_key, Run.methods).join(
            Run, Run.id == table.c.last_run_id).where(table.c.single_method.is_not(None))).all()
        for key, setting, methods in singles:  # the setting of each single-method summary
            conn.execute(update(table).where(table.c.config_key == key, table.c.methods_key == setting).values(
                params=(methods[0].get("params") or {}) if methods else {}))


def _backfill_keys(engine, batch: int = 5000, add_to_summaries: bool = False) -> None:
    """Give rows written by an older version their comparison keys and run_methods rows;
    ``add_to_summaries``: the summary table is already kept (rows an older version wrote
    after an earlier upgrade), so count these rows in it too."""
    columns = (Run.id, Run.model, Run.prompt, Run.negative_prompt, Run.seed, Run.params, Run.methods, Run.device,
               Run.status, Run.total_seconds)
    filled = 0
    while True:
        with engine.begin() as conn:
            rows = conn.execute(select(*columns).where(Run.config_key.is_(None)).limit(batch)).all()
            if not rows:
                break
            for row in rows:
                methods = row.methods or []
                keys = SimpleNamespace(
                    id=row.id, model=row.model, device=row.device, methods=methods, status=row.status,
                    total_seconds=row.total_seconds, methods_key=methods_key(methods),
                    config_key=config_key(row.model, row.prompt or "", row.negative_prompt or "", row.seed or 0,
                                          row.params or {}, row.device),
                    single_method=methods[0].get("name") if len(methods) == 1 else None)
                conn.execute(update(Run).where(Run.id == row.id).values(
                    config_key=keys.config_key, methods_key=keys.methods_key, single_method=keys.single_method))
                if add_to_summaries and _summarised(keys):
                    _add_to_summary(conn, keys, +1)
                if methods:
                    conn.execute(delete(RunMethod).where(RunMethod.run_id == row.id))
                    conn.execute(RunMethod.__table__.insert(), [
                        {"run_id": row.id, "position": i, "name": m.get("name", "")} for i, m in enumerate(methods)])
            filled += len(rows)
    if filled:
        log.info("history: added comparison keys to %d older run(s)", filled)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
