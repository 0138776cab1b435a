"""Shared test setup: offline, single-threaded, tiny models built from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention on small CI machines


@pytest.fixture
def studio_factory(tmp_path):
    """Build a Studio in a temp data dir with the tiny dummy image models registered."""
    from backends.manager import BackendManager
    from backends.tiny.dummy import register_dummy_models
    from studio.service import Studio

    made = []

    def make(**kwargs):
        manager = kwargs.pop("manager", None) or BackendManager(device="cpu")
        register_dummy_models(manager)
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
