"""Runs started from the UI or the API that can be stopped: Cancel buttons, cancelled
client jobs and closed connections.

Gradio's ``cancels=`` only stops *waiting* for a handler; a thread already running a
model keeps going. So every generate handler is a generator that runs the work in a
worker thread with a ``CancelToken`` and yields while it waits. When Gradio closes the
generator (the Cancel button, ``job.cancel()`` from ``gradio_client``, or a client that
disconnected), ``GeneratorExit`` arrives at a ``yield`` and the ``finally`` sets the
token; the run stops at its next step and is recorded as cancelled. The Cancel button
also sets the tokens of its session directly, for runs that are between yields.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Iterator

import gradio as gr

from backends.control import CancelToken

HEARTBEAT_S = 0.5  # how often a waiting handler yields, so a close reaches it promptly


def session_key(request: Any) -> str:
    """One key per browser session or API client (each gradio_client has its own hash)."""
    return getattr(request, "session_hash", None) or "anonymous"


class SessionRuns:
    """The cancel tokens of one tab's runs in flight, per session: a Cancel button stops
    only its own session's runs, never another user's."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, set[CancelToken]] = {}

    def start(self, key: str) -> CancelToken:
        token = CancelToken()
        with self._lock:
            self._tokens.setdefault(key, set()).add(token)
        return token

    def finish(self, key: str, token: CancelToken) -> None:
        with self._lock:
            tokens = self._tokens.get(key)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._tokens[key]

    def cancel_session(self, request: gr.Request) -> None:
        """A Cancel button's handler: stop the runs of the clicking session (``gr.Request``)."""
        self.cancel(session_key(request))

    def cancel(self, key: str, reason: str = "cancelled by the user") -> int:
        with self._lock:
            tokens = list(self._tokens.get(key, ()))
        for token in tokens:
            token.cancel(reason)
        return len(tokens)


class Progress:
    """A progress report from the worker thread: ``done`` of ``total`` in ``stage``."""

    def __init__(self, done: int, total: int, stage: Any):
        self.done, self.total, self.stage = done, total, stage


def stream_run(work: Callable[[Callable[[int, int, Any], None]], Any], token: CancelToken) -> Iterator[Any]:
    """Run ``work(progress)`` in a worker thread; yield each ``Progress`` it reports, ``None``
    every ``HEARTBEAT_S`` while nothing arrives, and finally its return value (re-raising its
    error). Closing this generator early cancels ``token``."""
    updates: queue.Queue = queue.Queue()
    box: dict[str, Any] = {}
    done = object()

    def report(step: int, total: int, stage: Any) -> None:
        updates.put(Progress(step, total, stage))

    def run() -> None:
        try:
            box["value"] = work(report)
        except BaseException as exc:  # noqa: BLE001 - handed to the handler thread
            box["error"] = exc
        finally:
            updates.put(done)

    finished = False
    # Yield once before the run starts: Gradio keeps a generator where a cancel can close
    # it only after its first output, so a cancel during a first step that never yields
    # would be lost.
    yield None
    threading.Thread(target=run, daemon=True, name="studio-run").start()
    try:
        while True:
            try:
                item = updates.get(timeout=HEARTBEAT_S)
            except queue.Empty:
                yield None
                continue
            if item is done:
                break
            yield item
        finished = True
    finally:
        if not finished:  # closed by Gradio (cancel, disconnect) or an error in the handler
            token.cancel("the client cancelled or disconnected")
    if "error" in box:
        raise box["error"]
    yield box["value"]


def run_with_token(runs: SessionRuns, request: Any, work: Callable[[CancelToken, Callable], Any]) -> Iterator[Any]:
    """``stream_run`` with a token registered for the caller's session, removed afterwards."""
    key = session_key(request)
    token = runs.start(key)
    try:
        yield from stream_run(lambda progress: work(token, progress), token)
    finally:
        runs.finish(key, token)
