"""Login for ``--auth``: a throttled password check, and nothing of the API for visitors
who have not logged in.

Gradio's own ``auth=(user, password)`` has no throttle (60 wrong logins went through in
0.1 s), and the page it serves to a visitor who has not logged in still embeds the full
API description (every endpoint name and parameter). ``launch_auth_options`` gives
``launch`` a callable ``auth`` that throttles, and an ASGI middleware that keeps the API
description out of pages served to unauthenticated visitors.
"""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

# who is trying to log in: set by the middleware for the duration of a request, read by the
# password check (Gradio calls ``auth(username, password)`` without the request)
_client: contextvars.ContextVar[str] = contextvars.ContextVar("fastgen_login_client", default="unknown")


class TooManyLogins(HTTPException):
    """Raised by the check while a client is locked out: Gradio's login route answers
    ``429 Too Many Requests`` with this line and a Retry-After header."""

    def __init__(self, retry_after: float):
        seconds = max(1, round(retry_after))
        super().__init__(429, f"too many failed logins; try again in {seconds} s", {"Retry-After": str(seconds)})
        self.retry_after = retry_after


@dataclass
class _Record:
    failures: list[float]
    locked_until: float = 0.0
    lockouts: int = 0  # consecutive lockouts: each one doubles the next
    last_failure: float = 0.0


class LoginThrottle:
    """Constant-time credential check with a per-client throttle.

    After ``max_failures`` wrong logins within ``window_s`` the client is refused for
    ``base_lockout_s``, doubling with each further lockout up to ``max_lockout_s``. Attempts
    made while locked out are refused without being checked and do not extend the lockout,
    and the lockout is short and capped, so an attacker cannot lock the owner out for
    long; the doubling resets after a successful login or ``reset_after_s`` without
    failures. Clients are told apart by their address (behind a tunnel such as ``--share``
    all clients share the tunnel's address, so there the cap is what protects the owner).
    """

    def __init__(self, username: str, password: str, *, max_failures: int = 5, window_s: float = 60.0,
                 base_lockout_s: float = 5.0, max_lockout_s: float = 60.0, reset_after_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")
        self.max_failures, self.window_s = max_failures, window_s
        self.base_lockout_s, self.max_lockout_s, self.reset_after_s = base_lockout_s, max_lockout_s, reset_after_s
        self.clock = clock
        self._records: dict[str, _Record] = {}
        self._lock = threading.Lock()

    def __call__(self, username: str, password: str) -> bool:
        return self.check(username, password, _client.get())

    def check(self, username: str, password: str, client: str = "unknown") -> bool:
        """True for the right login; False for a wrong one; TooManyLogins while locked out."""
        now = self.clock()
        with self._lock:
            record = self._records.setdefault(client, _Record([]))
            if now < record.locked_until:
                raise TooManyLogins(record.locked_until - now)
        if self._matches(username, password):
            with self._lock:
                self._records.pop(client, None)
            return True
        with self._lock:
            self._failed(record, now, client)
        return False

    def _matches(self, username: str, password: str) -> bool:
        # both compared whatever the first says, each in constant time: no timing signal
        user_ok = hmac.compare_digest(str(username).encode("utf-8", "surrogatepass"), self._username)
        password_ok = hmac.compare_digest(str(password).encode("utf-8", "surrogatepass"), self._password)
        return user_ok & password_ok

    def _failed(self, record: _Record, now: float, client: str) -> None:
        if now - record.last_failure > self.reset_after_s:
            record.lockouts = 0
        record.last_failure = now
        record.failures = [t for t in record.failures if now - t < self.window_s] + [now]
        if len(record.failures) >= self.max_failures:
            lockout = min(self.max_lockout_s, self.base_lockout_s * 2 ** record.lockouts)
            record.locked_until = now + lockout
            record.lockouts += 1
            record.failures = []
            log.warning("login: %d failed attempts from %s; refusing logins from it for %.0f s",
                        self.max_failures, client, lockout)
        if len(self._records) > 10_000:  # a flood of addresses: forget the oldest quiet ones
            for key in [k for k, r in self._records.items() if now >= r.locked_until][:5_000]:
                self._records.pop(key, None)


# FastAPI's schema of Gradio's own routes: not this app's endpoints, but nothing a visitor needs
HIDDEN_BEFORE_LOGIN = {"/openapi.json"}
_API_INFO = re.compile(rb"window\.gradio_api_info\s*=\s*.*?;\s*</script>", re.DOTALL)
_BLANK_API_INFO = b'window.gradio_api_info = {"named_endpoints": {}, "unnamed_endpoints": {}};</script>'


class LoginGuardMiddleware:
    """ASGI middleware (pure, so the request's context reaches Gradio's login handler).

    - Tells the throttle who is logging in (the client's address).
    - For a visitor who has not logged in, removes the API description Gradio embeds in
      every HTML page, so the login page reveals no endpoint names or parameters, and
      refuses ``/openapi.json`` (everything else of the API already needs a login).
    """

    def __init__(self, app, throttle: LoginThrottle):
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _client.set(client[0] if client else "unknown")
        try:
            if scope.get("method") in ("GET", "HEAD") and not self._logged_in(scope):
                if scope.get("path", "").rstrip("/") in HIDDEN_BEFORE_LOGIN:
                    await _send_json(send, 401, {"detail": "Not authenticated"})
                    return
                await self.app(scope, receive, _without_api_info(send))
            else:
                await self.app(scope, receive, send)
        finally:
            _client.reset(token)

    @staticmethod
    def _logged_in(scope) -> bool:
        app = scope.get("app")
        tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
        if tokens is None or cookie_id is None:
            return False  # not a Gradio app: treat as a visitor
        from starlette.requests import HTTPConnection

        cookies = HTTPConnection(scope).cookies
        token = cookies.get(f"access-token-{cookie_id}") or cookies.get(f"access-token-unsecure-{cookie_id}")
        return token is not None and token in tokens


def _without_api_info(send):
    """Wrap ``send``: an HTML response is buffered and its embedded API description blanked."""
    state: dict[str, Any] = {"start": None, "body": []}

    async def wrapped(message):
        if message["type"] == "http.response.start":
            headers = dict((k.lower(), v) for k, v in message.get("headers", []))
            if b"text/html" not in headers.get(b"content-type", b""):
                state["start"] = False
                await send(message)
                return
            state["start"] = message
            return
        if message["type"] != "http.response.body" or state["start"] is False:
            await send(message)
            return
        state["body"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = _API_INFO.sub(_BLANK_API_INFO, b"".join(state["body"]))
        start = state["start"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def launch_auth_options(auth_pair: tuple[str, str] | None, throttle: LoginThrottle | None = None) -> dict[str, Any]:
    """Keyword arguments for ``Blocks.launch`` that set up the login, or none without --auth.

    ``app_kwargs`` installs the middleware on the FastAPI app Gradio creates at launch."""
    if auth_pair is None:
        return {}
    from starlette.middleware import Middleware

    throttle = throttle or LoginThrottle(*auth_pair)
    return {"auth": throttle, "app_kwargs": {"middleware": [Middleware(LoginGuardMiddleware, throttle=throttle)]}}
