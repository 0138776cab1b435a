"""Shared test setup: offline, single-threaded, tiny models built from configs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# remote code the tests load (tests/test_dllm_hub.py) is copied by transformers into its
# modules cache: a throwaway one per run, never the user's ~/.cache/huggingface/modules
if "HF_MODULES_CACHE" not in os.environ:
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="fastgen-hf-modules-")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention on small CI machines


@pytest.fixture
def studio_factory(tmp_path, db_url):
    """Build a Studio in a temp data dir with the tiny dummy image models registered."""
    from backends.manager import BackendManager
    from backends.tiny.dummy import register_dummy_models
    from studio.service import Studio

    made = []

    def make(**kwargs):
        manager = kwargs.pop("manager", None) or BackendManager(device="cpu")
        register_dummy_models(manager)
        kwargs.setdefault("db_url", db_url)
        studio = Studio(data_dir=kwargs.pop("data_dir", tmp_path / "data"), manager=manager, **kwargs)
        made.append(studio)
        return studio

    yield make
    for studio in made:
        studio.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """The real app (``app.create_app``) served on a free loopback port, launched with the
    real settings (``app.launch_options``: what is served, what is blocked, auth)."""

    def __init__(self, argv: list[str]):
        import app as app_module

        self.args = app_module.parse_args(argv)
        self.demo, self.studio = app_module.create_app(self.args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        options = {**app_module.launch_options(self.args, self.studio), "server_name": "127.0.0.1",
                   "server_port": self.port, "share": False}
        self.demo.launch(**options, prevent_thread_lock=True, quiet=True)

    def close(self) -> None:
        self.demo.close()
        self.studio.close()


# -- databases ---------------------------------------------------------------------------
# History and studio tests run on SQLite and on a real PostgreSQL server that the tests
# start themselves (Debian's ``postgresql`` package: initdb + pg_ctl in a temp dir, as an
# unprivileged user, on a loopback port). A module opts in by overriding ``db_kind``
# with a fixture parametrized over DB_KINDS.

DB_KINDS = ("sqlite", "postgresql")


class PostgresServer:
    """A throwaway PostgreSQL cluster: one fresh database per test, removed at the end."""

    def __init__(self, root):
        import glob
        import shutil
        import subprocess

        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
        if not bins or not bins[-1]:
            raise FileNotFoundError("no PostgreSQL server binaries (install Debian's 'postgresql' package)")
        try:
            import psycopg  # noqa: F401
        except ImportError as exc:
            raise FileNotFoundError("no psycopg driver (pip install -e '.[postgres]')") from exc
        self.bin = os.path.dirname(bins[-1])
        self.root = root
        self.data = os.path.join(root, "pgdata")
        self.port = free_port()
        self.run_as = self._unprivileged_user()
        if self.run_as:
            shutil.chown(root, user=self.run_as)
        self._run(["initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        self._run(["pg_ctl", "-D", self.data, "-l", os.path.join(root, "log"), "-w", "-o",
                   f"-p {self.port} -k {root} -h 127.0.0.1 -c fsync=off -c full_page_writes=off", "start"])
        self.count = 0
        self.subprocess = subprocess

    @staticmethod
    def _unprivileged_user():
        """PostgreSQL refuses to run as root: CI runs as root, so use the package's user."""
        if os.geteuid() != 0:
            return None
        import pwd

        for name in ("postgres", "nobody"):
            try:
                pwd.getpwnam(name)
                return name
            except KeyError:
                continue
        raise FileNotFoundError("running as root and no unprivileged user to run PostgreSQL as")

    def _run(self, argv):
        import subprocess

        command = [os.path.join(self.bin, argv[0]), *argv[1:]]
        if self.run_as:
            command = ["runuser", "-u", self.run_as, "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.root)

    def fresh_url(self) -> str:
        from sqlalchemy import create_engine

        self.count += 1
        name = f"test_{self.count}"
        admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres",
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(["pg_ctl", "-D", self.data, "-m", "immediate", "stop"])
        except Exception:
            pass


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    import tempfile

    root = tempfile.mkdtemp(prefix="fastgen-pg-")  # short path: the socket name has a length limit
    try:
        server = PostgresServer(root)
    except FileNotFoundError as exc:
        pytest.skip(f"PostgreSQL tests skipped: {exc}")
    yield server
    server.stop()
    import shutil

    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def db_kind():
    """SQLite unless a module overrides this fixture with one parametrized over DB_KINDS."""
    return "sqlite"


@pytest.fixture
def db_url(db_kind, request):
    """None for SQLite (the Studio's default file under its data dir), else a fresh
    PostgreSQL database shared by every Studio the test makes."""
    if db_kind == "sqlite":
        return None
    return request.getfixturevalue("postgres_server").fresh_url()
