"""``/run``: one strict schema, one-line errors without internals, one history row per
accepted run and none per refusal; fuzzed in-process with hypothesis, then over HTTP."""

from __future__ import annotations

import json
import re
import socket

import gradio as gr
import pytest
from gradio_client import Client
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import app as app_module
from conftest import ServedApp

FORBIDDEN = ("SELECT", "INSERT", "Traceback", "/work", "/tmp", "sqlite", "sqlalchemy", 'File "')
CLASS_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The real app with the dummy models; ``run`` is its /run function as Gradio calls it."""
    args = app_module.parse_args(["--dummy-models", "--data-dir", str(tmp_path_factory.mktemp("run-api")),
                                  "--device", "cpu"])
    demo, studio = app_module.create_app(args)
    run = next(fn.fn for fn in demo.fns.values() if fn.api_name == "run")
    yield run, studio
    studio.close()


def call(run, body: str) -> tuple[dict | None, str | None]:
    """(result, None) or (None, error message), as a client would see them."""
    try:
        return json.loads(run(body)), None
    except gr.Error as exc:
        return None, str(exc.message)


def assert_clean_error(message: str, sent: str = "") -> None:
    assert message and "\n" not in message and len(message) <= 300, message
    for marker in FORBIDDEN:
        if marker not in sent:
            assert marker not in message, message
    hostname = socket.gethostname()
    if len(hostname) >= 4 and hostname not in sent:
        assert hostname not in message, message
    match = CLASS_NAME.search(message)
    assert match is None or match.group(0) in sent, message


def image(**changes) -> dict:
    body = {"modality": "image", "model": "dummy-sd", "prompt": "a red circle", "seed": 1,
            "params": {"width": 16, "height": 16, "steps": 1}}
    body.update(changes)
    return body


def text(**changes) -> dict:
    body = {"modality": "text", "model": "dummy-llama", "prompt": "def f():", "params": {"max_new_tokens": 2}}
    body.update(changes)
    return body


REFUSED = [
    ("[1]", "JSON object"),
    ("null", "JSON object"),
    ('"s"', "JSON object"),
    ("1", "JSON object"),
    ("{not json", "not valid JSON"),
    (json.dumps(image(steps=999)), "'steps'"),
    (json.dumps(image(methods="tome")), "methods must be a list"),
    (json.dumps(text(params={"max_new_tokens": 2, "chat_template": "no"})), "chat_template"),
    (json.dumps(text(params={"max_new_tokens": 2, "do_sample": 1})), "do_sample"),
    (json.dumps(image(params={"steps": "2"})), "steps must be a number"),
    (json.dumps(image(params={"steps": [1]})), "steps must be a number"),
    (json.dumps(image(methods=[{"name": "tome", "oops": 1}])), "'oops'"),
    (json.dumps(image(methods=[{"name": "tome", "params": {"use_rand": "no"}}])), "use_rand"),
    (json.dumps(image(methods=[{"name": "tome", "params": {"ratio": [0.5]}}])), "plain value"),
    (json.dumps(image(methods=[{"name": "tome", "params": {"max_downsample": True}}])), "must be one of"),
    (json.dumps(image(methods=[["tome", {}]])), "name or an object"),
    (json.dumps(image(methods=["tome", "tome"])), "listed twice"),
    (json.dumps(image(model="dummy-flux", methods=["teacache", "first_block_cache"])), "cannot be combined"),
    (json.dumps(image(model="dummy-flux", methods=["deepcache"])), "does not apply to this model"),
    (json.dumps(image(prompt="\ud800")), "surrogate"),
    (json.dumps(image(prompt="a\u0000b")), "NUL"),
    (json.dumps(image(compare_group={"a": 1})), "compare_group"),
    (json.dumps(image(compare_group="x" * 65)), "compare_group"),
    (json.dumps(image(compare_group="a b'; drop table runs")), "compare_group"),
    ('{"modality": "image", "modality": "text", "model": "dummy-sd", "prompt": "x"}', "appears twice"),
    (json.dumps(image(params={"steps": 1, "guidance": float("nan")})), "not a number JSON allows"),
    (json.dumps(image(seed=10**400)), "out of range"),
    ('{"prompt": ' + "[" * 30000 + "]" * 30000 + "}", "nested"),
    ("[" * 100000, "larger than"),
    (json.dumps(image(prompt="x" * 70000)), "larger than"),
]


@pytest.mark.parametrize("body, message", REFUSED, ids=[m for _, m in REFUSED])
def test_refusals_are_one_clean_line_and_record_nothing(built, body, message):
    run, studio = built
    before = studio.history.count()
    result, error = call(run, body)
    assert result is None and message in error, error
    assert_clean_error(error)
    assert studio.history.count() == before


def test_accepted_runs_get_exactly_one_row_with_their_compare_group(built):
    run, studio = built
    before = studio.history.count()
    result, error = call(run, json.dumps(image(compare_group="grp-1.ok_2", methods=[
        {"name": "tome", "params": {"use_rand": False}}])))
    assert error is None and studio.history.count() == before + 1
    row = studio.history.get(result["run_id"])
    assert row.status == "ok" and row.compare_group == "grp-1.ok_2" and row.methods[0]["name"] == "tome"
    result, error = call(run, json.dumps(text(params={"max_new_tokens": 2, "chat_template": False})))
    assert error is None and studio.history.get(result["run_id"]).params["chat_template"] is False
    assert studio.history.count() == before + 2


def test_a_load_failure_is_a_recorded_run_with_a_clean_message(built):
    run, studio = built
    before = studio.history.count()
    result, error = call(run, json.dumps(image(model="nobody/nothing")))
    assert result is None and "could not load" in error
    assert_clean_error(error)
    assert studio.history.count() == before + 1 and studio.history.query(limit=1)[0].status == "failed"


def test_an_unexpected_error_gives_a_fixed_line_and_is_logged(built, monkeypatch, caplog):
    run, studio = built

    def broken(*_a, **_k):
        raise RuntimeError(f"(sqlite3.OperationalError) SELECT * FROM runs [/work/data/history.db] on "
                           f"{socket.gethostname()}")

    monkeypatch.setattr(studio, "generate", broken)
    result, error = call(run, json.dumps(image()))
    assert result is None and error.startswith("internal error")
    assert_clean_error(error)
    assert "SELECT * FROM runs" in caplog.text  # the details are in the server log, not the reply


# -- property-based fuzzing ------------------------------------------------------------
safe_text = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="/"), max_size=12)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(safe_text, inner, max_size=3),
    max_leaves=8,
)
valid_image = st.fixed_dictionaries(
    {"modality": st.just("image"), "model": st.sampled_from(["dummy-sd", "dummy-flux"]),
     "prompt": st.sampled_from(["a red circle", "a blue square at top left"]),
     "params": st.fixed_dictionaries({"width": st.just(16), "height": st.just(16), "steps": st.sampled_from([1, 2])},
                                     optional={"guidance": st.sampled_from([0, 3.5])})},
    optional={"seed": st.sampled_from([0, 7, -1, None]), "negative_prompt": st.sampled_from(["", "blurry"]),
              "methods": st.sampled_from([[], ["cfg_truncation"],
                                          [{"name": "cfg_truncation", "params": {"fraction": 0.5}}],
                                          [{"name": "tome", "params": {"use_rand": False}}], ["teacache"],
                                          ["deepcache"], [{"name": "sampler", "params": {"steps": 2}}]]),
              "compare_group": st.sampled_from([None, "g1", "grp.2-x_y"])})
valid_text = st.fixed_dictionaries(
    {"modality": st.just("text"), "model": st.just("dummy-llama"), "prompt": st.sampled_from(["def f():", "x = 1"]),
     "params": st.fixed_dictionaries({"max_new_tokens": st.sampled_from([1, 2, 3])},
                                     optional={"chat_template": st.booleans(), "do_sample": st.just(False),
                                               "temperature": st.sampled_from([0, 0.7])})},
    optional={"seed": st.sampled_from([0, 3]),
              "methods": st.sampled_from([[], ["prompt_lookup"], [{"name": "lookahead", "params": {"window": 2}}]])})
# one wrong thing put into an otherwise valid body: (where, key, value)
MUTATIONS = st.sampled_from([
    ((), "steps", 999), ((), "prompt", ""), ((), "prompt", "   "), ((), "prompt", "\ud800"), ((), "prompt", "x\u0000"),
    ((), "prompt", 5), ((), "model", "nobody/nothing"), ((), "model", ""), ((), "modality", "smell"),
    ((), "seed", 2**32), ((), "seed", "1"), ((), "seed", True), ((), "seed", 1.5), ((), "negative_prompt", 3),
    ((), "methods", "tome"), ((), "methods", {}), ((), "methods", [["tome", {}]]), ((), "methods", ["nope"]),
    ((), "methods", [{"name": "tome", "extra": 1}]), ((), "methods", [{"name": "tome", "params": {"use_rand": "no"}}]),
    ((), "methods", [{"name": "tome", "params": {"bogus": 1}}]), ((), "methods", [{"name": "tome", "params": []}]),
    ((), "methods", ["cfg_truncation", "cfg_truncation"]), ((), "methods", ["teacache", "first_block_cache"]),
    ((), "compare_group", ""), ((), "compare_group", "x" * 65), ((), "compare_group", "a b"), ((), "compare_group", 5),
    ((), "compare_group", {"a": 1}), ((), "params", [1]), ((), "params", None),
    (("params",), "steps", 0), (("params",), "steps", "2"), (("params",), "width", 17), (("params",), "guidance", 31),
    (("params",), "chat_template", "no"), (("params",), "do_sample", 1), (("params",), "max_new_tokens", 0),
    (("params",), "temperature", -1), (("params",), "colour", 1), (("params",), "steps", [1]),
    (("params",), "steps", {"a": {"b": {"c": {"d": {"e": 1}}}}}),
])


@st.composite
def mutated(draw):
    body = draw(st.one_of(valid_image, valid_text))
    path, key, value = draw(MUTATIONS)
    target = body
    for part in path:
        target = target.setdefault(part, {})
    target[key] = value
    return body


junk_objects = st.fixed_dictionaries({"modality": st.sampled_from(["image", "text", "smell", 1]), "model": any_json,
                                      "prompt": any_json}, optional={"params": any_json, "methods": any_json})
# about 4 in 10 bodies are valid runs (cheap ones: 16x16 images in 1-2 steps, a few tokens of text)
bodies = st.one_of(
    *(strategy.map(json.dumps) for strategy in (valid_image, valid_text, valid_image, valid_text,
                                                mutated(), mutated(), junk_objects, any_json)),
    st.text(max_size=40), st.sampled_from(["[" * 5000, '{"a": ' * 3000, "", "nul\x00", "[1]", "null", '"s"']),
)


@pytest.mark.slow
@settings(max_examples=600, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(body=bodies)
def test_fuzzed_run_bodies_get_a_result_or_one_clean_line_and_exact_rows(built, body):
    run, studio = built
    before = studio.history.count()
    result, error = call(run, body)
    added = studio.history.count() - before
    event("accepted: ran" if result is not None else "accepted: failed run" if added else "refused")
    if result is not None:
        assert added == 1 and studio.history.get(result["run_id"]).status == "ok"
        return
    assert_clean_error(error, sent=body)
    if added:  # a run that was accepted and failed (an unknown model): recorded once, as failed
        row = studio.history.query(limit=1)[0]
        assert added == 1 and row.status == "failed" and " ".join(row.error.split())[:200] == error[:200]
    else:
        assert added == 0


def test_fuzz_strategy_makes_a_fair_share_of_accepted_runs(built):
    """The fuzz above is only worth something if many bodies are valid runs; over a whole
    batch, history grows by exactly the number of runs that were accepted."""
    run, studio = built
    outcomes = []
    start = studio.history.count()

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(body=bodies)
    def sample(body):
        failed_before = studio.history.count(status="failed")
        result, _error = call(run, body)
        outcomes.append("ran" if result is not None else
                        "failed run" if studio.history.count(status="failed") > failed_before else "refused")

    sample()
    accepted = outcomes.count("ran") + outcomes.count("failed run")
    assert studio.history.count() - start == accepted
    assert outcomes.count("ran") >= 5, f"only {outcomes.count('ran')} of {len(outcomes)} fuzzed bodies were valid runs"


# -- the served endpoint behaves the same ---------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path_factory.mktemp("run-http")), "--device", "cpu"])
    yield Client(served.url, verbose=False), served.studio
    served.close()


@pytest.mark.parametrize("body, message", [
    ("[1]", "JSON object"),
    (json.dumps(image(steps=999)), "'steps'"),
    (json.dumps(image(compare_group={"a": 1})), "compare_group"),
    ('{"prompt": ' + "[" * 20000 + "]" * 20000 + "}", "nested"),
    (json.dumps(image(methods=["tome", "tome"])), "listed twice"),
])
def test_served_run_refuses_the_same_way(served, body, message):
    client, studio = served
    before = studio.history.count()
    with pytest.raises(Exception) as caught:
        client.predict(body, api_name="/run")
    assert message in str(caught.value)
    assert_clean_error(str(caught.value).strip())
    assert studio.history.count() == before


def test_served_run_accepts_a_valid_body(served):
    client, studio = served
    before = studio.history.count()
    reply = json.loads(client.predict(json.dumps(image(compare_group="http-1")), api_name="/run"))
    assert studio.history.get(reply["run_id"]).compare_group == "http-1"
    assert studio.history.count() == before + 1
