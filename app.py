"""FastGen Studio: ``python app.py [--host] [--port] [--share] [--auth U:P] [--data-dir] [--db URL] [--device] [--threads N]``."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger("fastgen")

SHARE_WITHOUT_AUTH_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: --share without --auth: anyone with the link can use this studio, !!
!! run models on this machine and read its history. Add --auth USER:PASS.     !!
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""
HOST_WITHOUT_AUTH_WARNING = """
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
!! WARNING: --host {host} without --auth: anyone who can reach this machine
!! can use this studio, run models on it and read its history. Add --auth USER:PASS
!! or listen on 127.0.0.1 only.
!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!
"""


def is_loopback(host: str | None) -> bool:
    """Whether listening on ``host`` keeps the studio on this machine. Unknown names count
    as reachable from outside: the safe answer when unsure."""
    if not host:
        return False  # Gradio then falls back to GRADIO_SERVER_NAME, which may be anything
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def reachable_from_other_machines(args: argparse.Namespace) -> bool:
    """A share link or a non-loopback interface: other machines can reach the studio."""
    return bool(args.share) or not is_loopback(args.host)


def exposure_warnings(args: argparse.Namespace) -> list[str]:
    """The banners printed at startup when the studio is reachable without a login."""
    if args.auth_pair:
        return []
    warnings = []
    if args.share:
        warnings.append(SHARE_WITHOUT_AUTH_WARNING)
    if not is_loopback(args.host):
        warnings.append(HOST_WITHOUT_AUTH_WARNING.format(host=args.host))
    return warnings


def auth_launch_options(args: argparse.Namespace) -> dict:
    """``launch`` keyword arguments for --auth: a throttled login and no API description
    for visitors who have not logged in (see studio.auth); empty without --auth."""
    from studio.auth import launch_auth_options

    return launch_auth_options(args.auth_pair)


def default_threads() -> int:
    """One thread per core but one, kept for the web server and the browser's requests."""
    return max(1, (os.cpu_count() or 1) - 1)


def apply_threads(threads: int) -> None:
    """Set torch's intra-op thread count for this process (its default is every core)."""
    import torch

    torch.set_num_threads(threads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastgen-studio", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (0.0.0.0 for the LAN; then add --auth)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="create a public Gradio link")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this login for every page and API call")
    parser.add_argument("--data-dir", default=os.environ.get("FASTGEN_DATA_DIR", "data"),
                        help="where outputs and the default history database live")
    parser.add_argument("--db", metavar="URL", help="SQLAlchemy URL of the history database "
                        "(default: sqlite:///DATA_DIR/history.db)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cuda, cuda:1, mps or cpu")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="runs at once per generate endpoint (a model is still used by one run at a time)")
    threads = default_threads()
    parser.add_argument("--threads", type=int, default=threads, metavar="N",
                        help="torch CPU threads for generation (default: one less than the CPU count, at least 1, "
                        f"here {threads}: leaves the web server a core; on a busy small machine more "
                        "threads than free cores make generation several times slower)")
    parser.add_argument("--memory-budget-gb", type=float, help="unload least recently used models above this")
    parser.add_argument("--dummy-models", action="store_true",
                        help="also offer tiny random models (dummy-sd, dummy-flux, dummy-llama, dummy-wan, dummy-musicgen, dummy-vits) that load instantly")
    parser.add_argument("--ray", action="store_true", help="run requests on a local Ray instance's workers")
    parser.add_argument("--ray-address", metavar="auto|HOST:PORT", help="join an existing Ray cluster")
    parser.add_argument("--ray-workers", type=int, help="number of Ray workers (default: one per GPU, else 1)")
    parser.add_argument("--allow-local-models", action="store_true",
                        help="with --share or a non-loopback --host: still accept any local folder as a model "
                             "(off: only folders under DATA_DIR/models)")
    parser.add_argument("--max-cost", type=float, default=500.0, help="refuse requests estimated above this many "
                        "cost units (megapixel-steps for image/video; 0 = no limit; see studio/limits.py)")
    parser.add_argument("--time-limit", type=float, default=600.0, metavar="SECONDS",
                        help="stop a run at its next step after this many seconds, recorded as timeout (0 = none)")
    args = parser.parse_args(argv)
    if args.port <= 0 or args.port > 65535:
        parser.error("--port must be between 1 and 65535")
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            parser.error("--auth takes USER:PASS, both non-empty")
        args.auth_pair = (user, password)
    else:
        args.auth_pair = None
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def create_studio(args: argparse.Namespace):
    from backends.manager import BackendManager
    from studio.service import Studio

    data_dir = Path(args.data_dir)
    allowed_roots = None
    if reachable_from_other_machines(args) and not args.allow_local_models:
        allowed_roots = [data_dir / "models"]  # a visitor must not load any folder of this machine
    budget = int(args.memory_budget_gb * 2**30) if args.memory_budget_gb else None
    manager = BackendManager(device=args.device, memory_budget_bytes=budget, allowed_roots=allowed_roots)
    if args.dummy_models:
        from backends.tiny.dummy import register_dummy_models

        register_dummy_models(manager)
    executor = None
    if args.ray or args.ray_address:
        from backends.executor import RayExecutor

        executor = RayExecutor(num_workers=args.ray_workers, address=args.ray_address, device=args.device,
                               dummy_models=args.dummy_models, cache_dir=data_dir / "cache")
    return Studio(data_dir=data_dir, db_url=args.db, manager=manager, executor=executor,
                  max_cost=args.max_cost or None, time_limit_s=args.time_limit or None)


def create_app(args: argparse.Namespace):
    from studio.ui import build_app

    studio = create_studio(args)
    app = build_app(studio)
    app.queue(default_concurrency_limit=args.concurrency)
    return app, studio


def launch_options(args: argparse.Namespace, studio) -> dict:
    """The keyword arguments of ``launch()``, shared by ``main()`` and the tests' served app
    so the tests exercise the real settings. Only the outputs folder (and the folder of
    exports made for download) is ever served: never the history database or its WAL/SHM
    journals (serving them opens and closes the file in this process, which drops
    SQLite's locks), never the trash or anything else in the data dir. Both folders are
    served in place rather than copied into gradio's cache, so a deleted output stops
    being downloadable at once."""
    import gradio as gr

    from studio.ui import STUDIO_CSS

    served = [str(studio.outputs.root.resolve()), str(studio.exports.folder.resolve())]
    gr.set_static_paths(served)
    blocked = [str(p) for p in studio.history.database_files()] + [str((studio.data_dir / "trash").resolve())]
    return dict(server_name=args.host, server_port=args.port, share=args.share, **auth_launch_options(args),
                show_error=False, allowed_paths=served, blocked_paths=blocked, footer_links=["api", "settings"],
                css=STUDIO_CSS)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    apply_threads(args.threads)
    log.info("torch uses %d CPU thread(s) (--threads)", args.threads)
    warnings = exposure_warnings(args)
    for warning in warnings:
        print(warning, file=sys.stderr)
    if warnings:
        log.warning("listening beyond this machine without --auth: the studio is open to anyone who reaches it")
    from backends.types import StudioError

    try:
        app, studio = create_app(args)
    except StudioError as exc:
        print(f"fastgen-studio: {exc}", file=sys.stderr)
        return 2
    log.info("device %s, data dir %s, history %s", studio.manager.device, studio.data_dir, studio.history.url)
    app.launch(**launch_options(args, studio))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
