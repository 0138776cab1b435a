"""``/tune`` checks its input and is bounded like every other run: the studio's --time-limit and a
cancel (the client disconnected) stop it, its trials kept in the study."""

from __future__ import annotations

import json
import threading

BODY = {"modality": "image", "model": "dummy-sd", "floor": "ssim>=0.5", "repeats": 1,
        "prompts": ["a red circle", "a blue square"], "params": {"steps": 4}, "methods": ["deepcache"]}


def test_tune_endpoint_stops_when_cancelled(studio_factory):
    from studio.ui.tune import api_tune

    stop = threading.Event()
    stop.set()
    reply = json.loads(api_tune(studio_factory(), json.dumps({**BODY, "trials": 3}), stop))
    assert reply["cancelled"] and not reply["winner"]


def test_tune_endpoint_stops_at_the_studio_time_limit(studio_factory):
    from studio.ui.tune import api_tune

    reply = json.loads(api_tune(studio_factory(time_limit_s=0.2), json.dumps({**BODY, "trials": 3})))
    assert reply["cancelled"]
    assert any("cancelled" in note for note in reply["notes"])


def test_an_unknown_prompt_kind_is_refused_in_one_line():
    import pytest

    from backends.types import ValidationError
    from studio.tune_spec import parse_tune_json

    body = {"modality": "text", "model": "tiny-code-llama", "floor": "exact", "prompt_kind": "bogus"}
    with pytest.raises(ValidationError, match="prompt_kind must be one of mixed, code, edit") as info:
        parse_tune_json(json.dumps(body)).checked()
    assert "\n" not in str(info.value)
    assert parse_tune_json(json.dumps({**body, "prompt_kind": "edit"})).checked().prompt_list()


def test_shipped_preset_file_name_stays_in_its_folder():
    from backends.catalog import BUNDLED
    from benchmarks.tune import preset_file_name

    for entry in BUNDLED:  # the bundled ids keep their files' names
        assert preset_file_name(entry.name, "fast") == f"{entry.name}-fast.json"
    for model in ("/home/me/models/my-llm", "../../etc/x", "owner/name", "C:\\models\\m", "..", "a/../../b"):
        name = preset_file_name(model, "fast")
        assert "/" not in name and "\\" not in name and not name.startswith(".") and name.endswith("-fast.json")
    assert preset_file_name("owner/name", "balanced") == "owner-name-balanced.json"
