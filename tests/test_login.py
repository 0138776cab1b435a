"""Login and exposure: a throttled --auth, nothing of the API for visitors who have not
logged in, and a warning plus the local-folder restriction whenever the studio listens
beyond this machine (issue 15, item 11)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import httpx
import pytest

import app as app_module
from conftest import free_port

API_NAMES = ("generate_image", "run_request", "history_delete", "presets_import")


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def throttle(clock=None, **kwargs):
    from studio.auth import LoginThrottle

    return LoginThrottle("ada", "secret", clock=clock or FakeClock(), **kwargs)


# -- the throttle on its own -----------------------------------------------------------
def test_five_failures_in_a_minute_lock_the_client_out_briefly():
    from studio.auth import TooManyLogins

    clock = FakeClock()
    guard = throttle(clock)
    assert guard.check("ada", "secret", "10.0.0.1") is True
    for _ in range(5):
        assert guard.check("ada", "wrong", "10.0.0.1") is False
    with pytest.raises(TooManyLogins) as locked:  # even the right password is not checked now
        guard.check("ada", "secret", "10.0.0.1")
    assert locked.value.status_code == 429 and "try again in 5 s" in locked.value.detail
    assert guard.check("ada", "secret", "10.0.0.2") is True  # another client is not locked out
    clock.now += 5
    assert guard.check("ada", "secret", "10.0.0.1") is True


def lockout_after_five_failures(guard, clock, client="c") -> float:
    """Fail five times, then return how long the client is locked out for (from the 429)."""
    from studio.auth import TooManyLogins

    for _ in range(5):
        assert guard.check("ada", "wrong", client) is False
    with pytest.raises(TooManyLogins) as locked:
        guard.check("ada", "secret", client)
    return locked.value.retry_after


def test_lockouts_grow_but_are_capped_and_attempts_while_locked_do_not_extend_them():
    from studio.auth import TooManyLogins

    clock = FakeClock()
    guard = throttle(clock)
    lockouts = []
    for _ in range(6):
        lockout = lockout_after_five_failures(guard, clock)
        for _ in range(50):  # hammering while locked out changes nothing
            with pytest.raises(TooManyLogins) as again:
                guard.check("ada", "wrong", "c")
            assert again.value.retry_after == lockout
        lockouts.append(lockout)
        clock.now += lockout
    assert lockouts == [5, 10, 20, 40, 60, 60]
    clock.now += 601  # a quiet spell: the next lockout is short again
    assert lockout_after_five_failures(guard, clock) == 5
    clock.now += 5
    assert guard.check("ada", "secret", "c") is True  # and a success resets the count
    assert lockout_after_five_failures(guard, clock) == 5


def test_failures_spread_over_more_than_a_minute_do_not_lock():
    clock = FakeClock()
    guard = throttle(clock)
    for _ in range(20):
        assert guard.check("ada", "wrong", "c") is False
        clock.now += 16  # 4 failures per minute at most
    assert guard.check("ada", "secret", "c") is True


def test_both_name_and_password_must_match():
    guard = throttle()
    assert not guard.check("ada", "secret2") and not guard.check("ad", "secret") and not guard.check("", "")
    assert not guard.check("ADA", "secret") and guard.check("ada", "secret")


# -- over HTTP -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """The app with --auth, launched with the same login options as ``main``; its throttle's
    clock is ours to move."""
    from studio.auth import launch_auth_options

    args = app_module.parse_args(["--dummy-models", "--data-dir", str(tmp_path_factory.mktemp("auth")),
                                  "--auth", "ada:secret"])
    demo, studio = app_module.create_app(args)
    clock = FakeClock()
    options = launch_auth_options(args.auth_pair, throttle(clock))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **options)
    yield f"http://127.0.0.1:{port}", clock
    demo.close()
    studio.close()


def login(url: str, password: str) -> httpx.Response:
    return httpx.post(url + "/login", data={"username": "ada", "password": password}, timeout=30)


def test_login_is_throttled_over_http(guarded):
    url, clock = guarded
    clock.now += 10_000
    for _ in range(5):
        assert login(url, "wrong").status_code == 400
    refused = login(url, "secret")
    assert refused.status_code == 429 and "too many failed logins" in refused.json()["detail"]
    assert int(refused.headers["retry-after"]) >= 1
    clock.now += 61
    assert login(url, "secret").status_code == 200


def test_main_passes_the_throttled_login_to_launch(monkeypatch, tmp_path):
    from studio.auth import LoginThrottle

    seen = {}

    class FakeApp:
        def launch(self, **kwargs):
            seen.update(kwargs)

    studio = app_module.create_studio(app_module.parse_args(["--data-dir", str(tmp_path)]))
    monkeypatch.setattr(app_module, "create_app", lambda args: (FakeApp(), studio))
    try:
        assert app_module.main(["--data-dir", str(tmp_path), "--auth", "ada:secret"]) == 0
    finally:
        studio.close()
    assert isinstance(seen["auth"], LoginThrottle) and seen["app_kwargs"]["middleware"]


def leaked(text: str) -> list[str]:
    return [name for name in API_NAMES if name in text]


def launched_like_main(tmp_path, argv):
    """Launch with the options ``main`` would give (plain Gradio auth where the app has no
    login helper, as on the code before this change)."""
    args = app_module.parse_args(argv)
    demo, studio = app_module.create_app(args)
    options_for = getattr(app_module, "auth_launch_options", lambda a: {"auth": a.auth_pair})
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **options_for(args))
    return f"http://127.0.0.1:{port}", demo, studio


def test_visitors_who_have_not_logged_in_get_nothing_of_the_api(tmp_path):
    url, demo, studio = launched_like_main(tmp_path, ["--dummy-models", "--data-dir", str(tmp_path),
                                                      "--auth", "ada:secret"])
    try:
        for path in ("/", "/?view=api", "/gradio_api/runs", "/config", "/gradio_api/info",
                     "/gradio_api/info?all_endpoints=true", "/gradio_api/openapi.json", "/openapi.json",
                     "/gradio_api/app_id", "/manifest.json"):
            reply = httpx.get(url + path, timeout=30)
            assert leaked(reply.text) == [], (path, reply.status_code, leaked(reply.text))
        assert httpx.get(url + "/openapi.json", timeout=30).status_code == 401
        page = httpx.get(url + "/", timeout=30)
        assert page.status_code == 200 and '"auth_required": true' in page.text.replace('":true', '": true')
        with httpx.Client(base_url=url, timeout=30) as client:  # once logged in, everything is there
            assert client.post("/login", data={"username": "ada", "password": "secret"}).status_code == 200
            assert "generate_image" in client.get("/").text
            assert "generate_image" in client.get("/gradio_api/info").text
            assert client.get("/openapi.json").status_code == 200
    finally:
        demo.close()
        studio.close()


# -- listening beyond this machine ------------------------------------------------------
@pytest.mark.parametrize("argv, warned", [
    (["--host", "0.0.0.0"], "WARNING: --host 0.0.0.0 without --auth"),
    (["--host", "192.168.1.20"], "WARNING: --host 192.168.1.20 without --auth"),
    (["--host", "::"], "WARNING: --host :: without --auth"),
    (["--share"], "WARNING: --share without --auth"),
    (["--host", "0.0.0.0", "--auth", "ada:secret"], None),
    (["--host", "127.0.0.1"], None),
    (["--host", "localhost"], None),
    (["--host", "::1"], None),
])
def test_listening_beyond_loopback_without_auth_warns(capsys, monkeypatch, argv, warned):
    monkeypatch.setattr(app_module, "create_app", lambda args: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        app_module.main([*argv, "--data-dir", tempfile.mkdtemp()])
    err = capsys.readouterr().err
    if warned:
        assert warned in err
    else:
        assert "WARNING" not in err


@pytest.mark.parametrize("argv, restricted", [
    (["--host", "0.0.0.0"], True),
    (["--host", "0.0.0.0", "--auth", "ada:secret"], True),  # a login does not make any folder fair game
    (["--host", "10.1.2.3"], True),
    (["--share"], True),
    (["--host", "0.0.0.0", "--allow-local-models"], False),
    (["--host", "127.0.0.1"], False),
    ([], False),
])
def test_local_model_folders_are_restricted_whenever_other_machines_can_reach_the_studio(tmp_path, argv, restricted):
    studio = app_module.create_studio(app_module.parse_args([*argv, "--data-dir", str(tmp_path / "data")]))
    try:
        roots = studio.manager.allowed_roots
        assert roots == ([tmp_path / "data" / "models"] if restricted else None)
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        from backends.catalog import resolve_source
        from backends.types import ModelLoadError

        if restricted:
            with pytest.raises(ModelLoadError, match="must be inside"):
                resolve_source(str(outside), roots)
        else:
            assert resolve_source(str(outside), roots) == str(Path(outside).resolve())
    finally:
        studio.close()


@pytest.mark.slow
def test_the_login_page_still_works_in_a_browser(guarded):
    """The blanked API description must not break Gradio's login form, and logging in must
    still load the whole studio."""
    import shutil

    playwright_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no system Chromium")
    url, clock = guarded
    clock.now += 100_000  # whatever the other tests did, this client is not locked out
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.locator("input[type=password]").wait_for()
            assert page.evaluate("Object.keys(window.gradio_api_info.named_endpoints).length") == 0
            page.locator("input[type=text]").first.fill("ada")
            page.locator("input[type=password]").fill("secret")
            page.locator("button", has_text="Login").click()
            page.wait_for_selector("#image-generate")
        finally:
            browser.close()
