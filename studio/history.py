"""Run history and user presets in one SQL database, through SQLAlchemy 2.0.

SQLite under the data dir by default (WAL, so the UI can read while a run writes); any
SQLAlchemy URL works through ``--db``. Outputs live in files; rows hold their paths.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import JSON, DateTime, Float, Integer, String, Text, create_engine, event, func, or_, select, update
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from backends.types import Request, Result, StudioError


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
    seed: Mapped[int] = mapped_column(Integer, default=0)
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    methods: Mapped[list] = mapped_column(JSON, default=list)
    method_names: Mapped[str] = mapped_column(String(512), default="", index=True)  # ",a,b," for filtering
    status: Mapped[str] = mapped_column(String(16), index=True)  # ok | failed
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    timings: Mapped[dict] = mapped_column(JSON, default=dict)
    total_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    peak_memory_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    model_evals: Mapped[int | None] = mapped_column(Integer, nullable=True)
    method_stats: Mapped[dict] = mapped_column(JSON, default=dict)
    output_path: Mapped[str | None] = mapped_column(String(1024), nullable=True)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    compare_group: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    parent_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    device: Mapped[str | None] = mapped_column(String(64), nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    notes: Mapped[list] = mapped_column(JSON, default=list)

    def to_dict(self) -> dict[str, Any]:
        data = {c.name: getattr(self, c.name) for c in self.__table__.columns}
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


def sqlite_url(path: str | os.PathLike) -> str:
    return f"sqlite:///{Path(path).resolve()}"


RUN_COLUMNS = [c.name for c in Run.__table__.columns]


class HistoryStore:
    def __init__(self, url: str, outputs=None):
        """``outputs`` (an OutputStore) is where stored paths are resolved; without one,
        deleting a row never touches a file."""
        self.url = url
        self.outputs = outputs
        connect_args = {"timeout": 30, "check_same_thread": False} if url.startswith("sqlite") else {}
        try:
            self.engine = create_engine(url, connect_args=connect_args)
        except Exception as exc:  # bad URL, missing driver
            raise StudioError(f"cannot open the history database {url!r}: {exc}") from exc
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        try:
            Base.metadata.create_all(self.engine)
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT count(*) FROM runs")
        except (DatabaseError, OperationalError) as exc:
            self.engine.dispose()
            raise StudioError(
                f"the history database {url!r} cannot be used ({str(exc.orig or exc).splitlines()[0]}); "
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
        methods = [m.to_dict() for m in request.methods]
        row = Run(
            modality=request.modality,
            model=request.model,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or "",
            seed=int(request.seed),
            params=_json_safe(request.params),
            methods=methods,
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
            stmt = stmt.where(Run.method_names.contains(f",{method},"))
        if status:
            stmt = stmt.where(Run.status == status)
        if compare_group:
            stmt = stmt.where(Run.compare_group == compare_group)
        if text:
            like = f"%{text}%"
            stmt = stmt.where(or_(Run.prompt.ilike(like), Run.model.ilike(like), Run.error.ilike(like)))
        return stmt

    def query(self, *, limit: int = 50, offset: int = 0, **filters: Any) -> list[Run]:
        stmt = self._filtered(select(Run), **filters).order_by(Run.id.desc()).limit(limit).offset(offset)
        with self.sessions() as session:
            return list(session.scalars(stmt))

    def count(self, **filters: Any) -> int:
        with self.sessions() as session:
            return int(session.scalar(self._filtered(select(func.count(Run.id)), **filters)))

    def delete(self, run_ids: Iterable[int], delete_files: bool = True) -> int:
        """Delete rows, their child rows (a story's stages), and their output files. Rows
        go first: a crash in between leaves an orphan file, which the startup repair moves
        to the trash, never a dangling row. Files are removed only inside the outputs
        folder, whatever a row's path says."""
        with self.sessions.begin() as session:
            ids = set(run_ids)
            frontier = set(ids)
            while frontier:  # descendants: stories' stages, and anything below them
                frontier = set(session.scalars(select(Run.id).where(Run.parent_id.in_(list(frontier))))) - ids
                ids |= frontier
            rows = list(session.scalars(select(Run).where(Run.id.in_(list(ids)))))
            doomed = [(row.id, row.modality, row.output_path) for row in rows]
            for row in rows:
                session.delete(row)
        if delete_files and self.outputs is not None:
            for run_id, modality, stored in doomed:
                self._delete_files(run_id, modality, stored)
        return len(rows)

    def _delete_files(self, run_id: int, modality: str, stored: str | None) -> None:
        path = self.outputs.resolve(stored)
        if path is not None and path.is_file():
            path.unlink(missing_ok=True)
        if modality == "story":  # story.md and the step images live beside story.html
            folder = self.outputs.story_folder(run_id)
            if folder.is_dir() and not folder.is_symlink() and self.outputs.resolve(folder) is not None:
                shutil.rmtree(folder, ignore_errors=True)

    def output_paths(self) -> set[str]:
        with self.sessions() as session:
            return {p for p in session.scalars(select(Run.output_path).where(Run.output_path.is_not(None)))}

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
            rows = session.execute(select(Run.id, Run.output_path).where(Run.output_path.is_not(None))).all()
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
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for row in self.query(limit=1_000_000, **filters):
            data = row.to_dict()
            writer.writerow({k: csv_safe(json.dumps(v) if isinstance(v, (dict, list)) else v)
                             for k, v in data.items()})
        return buffer.getvalue()

    def trend(self, model: str, method: str) -> list[dict[str, Any]]:
        """Speedup of ``method`` over the baseline runs of the same model, prompt-agnostic:
        each method run is compared with the median of the ok baseline runs of the same
        model, device and params it ran with before it."""
        with self.sessions() as session:
            rows = list(
                session.scalars(
                    select(Run).where(Run.model == model, Run.status == "ok").order_by(Run.id.asc())
                )
            )
        baseline: dict[tuple, list[float]] = {}
        points = []
        for row in rows:
            key = (row.device, json.dumps(row.params, sort_keys=True))
            if not row.methods:
                baseline.setdefault(key, []).append(row.total_seconds or 0.0)
            elif f",{method}," in (row.method_names or "") and baseline.get(key) and row.total_seconds:
                base = sorted(baseline[key])[len(baseline[key]) // 2]
                points.append({"run_id": row.id, "time": row.created_at, "device": row.device,
                               "speedup": base / row.total_seconds})
        return points

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
        with self.sessions.begin() as session:
            if session.scalar(select(PresetRow).where(PresetRow.name == new)) is not None:
                raise StudioError(f"a preset named '{new}' already exists")
            row = session.scalar(select(PresetRow).where(PresetRow.name == old))
            if row is None:
                return False
            row.name = new
            return True

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


def csv_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula gets a leading quote
    (OWASP's CSV injection advice); numbers stay numbers."""
    if isinstance(value, str) and value.startswith(FORMULA_LEADS):
        return "'" + value
    return value


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
