"""The app as a user reaches it: CLI flags, the served page, named API endpoints."""

import json

import httpx
import pytest
from gradio_client import Client
from PIL import Image

import app as app_module
from backends.params import params_for
from conftest import ServedApp


def test_cli_flags():
    args = app_module.parse_args(["--host", "0.0.0.0", "--port", "8000", "--share", "--auth", "u:p",
                                  "--data-dir", "/tmp/x", "--db", "sqlite:///tmp/y.db", "--device", "cpu"])
    assert (args.host, args.port, args.share, args.auth_pair) == ("0.0.0.0", 8000, True, ("u", "p"))
    assert (args.data_dir, args.db, args.device) == ("/tmp/x", "sqlite:///tmp/y.db", "cpu")
    for bad in (["--auth", "nopassword"], ["--auth", ":p"], ["--port", "0"], ["--concurrency", "0"]):
        with pytest.raises(SystemExit):
            app_module.parse_args(bad)


def test_share_without_auth_warns(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(app_module, "create_app", lambda args: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        app_module.main(["--share", "--data-dir", str(tmp_path)])
    assert "WARNING: --share without --auth" in capsys.readouterr().err


def test_ray_workers_keep_disk_state_under_the_data_dir(tmp_path, monkeypatch):
    """A Ray worker has no data dir: the studio hands it the data dir's cache folder, so the
    prefix cache and the retrieval datastore never write under the worker's working dir."""
    from backends import executor as executor_module

    made = {}
    monkeypatch.setattr(executor_module, "RayExecutor", lambda **kwargs: made.update(kwargs) or object())
    studio = app_module.create_studio(app_module.parse_args(["--ray", "--data-dir", str(tmp_path),
                                                             "--dummy-models"]))
    worker = executor_module.StudioWorker("w", device="cpu", dummy_models=True, cache_dir=made["cache_dir"])
    assert worker.manager.get("text", "dummy-llama").cache_dir == tmp_path / "cache" == studio.data_dir / "cache"


def test_bad_database_gives_clear_startup_message(tmp_path, capsys):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 200)
    assert app_module.main(["--data-dir", str(tmp_path), "--db", f"sqlite:///{bad}"]) == 2
    assert "--db" in capsys.readouterr().err


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path_factory.mktemp("served")), "--device", "cpu"])
    yield served.url, served.studio
    served.close()


def test_page_is_served_offline_with_all_tabs(served):
    url, _ = served
    page = httpx.get(url, timeout=30)
    assert page.status_code == 200
    config = httpx.get(url + "config", timeout=30).json()
    labels = {c.get("props", {}).get("label") for c in config["components"]}
    assert {"Image", "Video", "Audio", "Text", "Compare", "History", "Presets"} <= labels


def test_generate_image_with_only_a_prompt_returns_an_image(served):
    """Issue 16: a named endpoint takes named parameters with defaults (it was 67
    positional arguments, one per control, popped by position)."""
    url, studio = served
    client = Client(url, verbose=False)
    before = studio.history.count()
    image_path, info = client.predict(prompt="a red circle", api_name="/generate_image")
    with Image.open(image_path) as image:
        assert image.format == "PNG" and min(image.size) >= 16
    assert "Model evaluations" in info and studio.history.count() == before + 1
    row = studio.history.query(limit=1)[0]  # the tab's first model at the table's defaults
    assert (row.model, row.prompt, row.status, row.seed) == ("tiny-sd-shapes", "a red circle", "ok", 0)
    assert row.params == {"steps": 25, "guidance": 5.0} and row.methods == []


def test_named_endpoints_take_the_modality_parameters_and_methods_by_name(served):
    url, studio = served
    client = Client(url, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    # every endpoint is one the app names on purpose: UI-only events (a control greying
    # another out, a model pick filling a box) are not part of the API
    assert not [name for name in endpoints if name.startswith("/lambda") or "_on_" in name]
    for modality in ("image", "video", "audio", "text"):  # named from the one table, with its defaults
        parameters = {p["parameter_name"]: p for p in endpoints[f"/generate_{modality}"]["parameters"]}
        assert [n for n in parameters if n not in ("prompt", "model", "negative_prompt", "seed", "methods")] == \
            [spec.name for spec in params_for(modality)]
        assert all(p["parameter_has_default"] for name, p in parameters.items() if name != "prompt")
        assert {name: parameters[name]["parameter_default"] for name in parameters if name not in
                ("prompt", "model", "negative_prompt", "seed", "methods")} == \
            {spec.name: spec.default for spec in params_for(modality)}
    deepcache = [{"name": "deepcache", "params": {"interval": 2}}]
    for methods in (deepcache, json.dumps(deepcache)):  # a list, or that list as JSON text
        _image, info = client.predict(prompt="a red circle at top left on white", model="dummy-sd", steps=3, width=32,
                                      height=0, methods=methods, api_name="/generate_image")
        assert "shallow_steps=1" in info
        row = studio.history.query(limit=1)[0]
        assert row.params == {"width": 32, "steps": 3, "guidance": 5.0}  # height 0 = the model's own
        assert [m["name"] for m in row.methods] == ["deepcache"] and row.methods[0]["params"]["interval"] == 2
    kept = studio.history.count()
    for bad, message in ((dict(steps=0), "steps must be between 1 and 150"), (dict(methods="deepcache"), "JSON list"),
                         (dict(methods=[{"name": "deepcache", "params": {"interval": 0}}]), "interval"),
                         (dict(prompt=" "), "prompt is empty")):
        with pytest.raises(Exception, match=message):
            client.predict(**{"prompt": "x", "model": "dummy-sd", **bad}, api_name="/generate_image")
    assert studio.history.count() == kept  # refused before running: no rows


def test_video_and_audio_endpoints_return_their_files(served):
    url, studio = served
    client = Client(url, verbose=False)
    clip, info = client.predict(prompt="a red ball moving right", model="dummy-wan", steps=2, frames=5, fps=4,
                                api_name="/generate_video")
    assert clip.endswith((".mp4", ".gif")) and "Run #" in info
    assert studio.history.query(limit=1)[0].params == {"frames": 5, "fps": 4, "steps": 2, "guidance": 5.0}
    sound, info = client.predict(prompt="a high sine tone", steps=2, seconds=0.5, api_name="/generate_audio")
    assert sound.endswith(".wav") and "Run #" in info
    row = studio.history.query(limit=1)[0]
    assert (row.model, row.params) == ("tiny-audio-synth", {"seconds": 0.5, "steps": 2, "guidance": 3.5})


def test_generate_text_with_only_a_prompt_streams_text(served):
    url, studio = served
    client = Client(url, verbose=False)
    job = client.submit(prompt="def read_lines(path):", api_name="/generate_text")
    text, info = job.result(timeout=300)
    partial = [t for t, _status in job.outputs()[:-1] if t]
    assert text and all(text.startswith(t) for t in partial)  # each update is the text so far
    assert len({t for t in partial if len(t) < len(text)}) >= 2  # streamed: it grew over several updates
    assert "Run #" in info
    row = studio.history.query(limit=1)[0]
    assert (row.modality, row.model, row.status) == ("text", "tiny-code-llama", "ok")
    assert row.params == {"max_new_tokens": 128, "temperature": 0.0, "chat_template": True}


def test_json_run_endpoint_and_clear_errors(served):
    url, studio = served
    client = Client(url, verbose=False)
    reply = json.loads(client.predict(json.dumps({
        "modality": "image", "model": "dummy-flux", "prompt": "a blue square", "seed": 1,
        "params": {"steps": 2}, "methods": [{"name": "cfg_truncation", "params": {"fraction": 0.5}}]}), api_name="/run"))
    assert reply["run_id"] and reply["output_path"].endswith(".png") and reply["model_evals"] == 3
    # the stored, relative form: the reply does not reveal the server's data folder
    assert reply["output_path"].startswith("outputs/") and reply["output_url"].startswith("gradio_api/file=")
    kept = studio.history.count()
    for bad, message in ((dict(prompt=""), "prompt is empty"), (dict(params={"width": 99999}), "width"),
                         (dict(model="nobody/nothing"), "could not load")):
        request = {"modality": "image", "model": "dummy-sd", "prompt": "x", **bad}
        with pytest.raises(Exception, match=message):
            client.predict(json.dumps(request), api_name="/run")
    assert studio.history.count() == kept + 1  # the load failure is a recorded run; bad input is not
    assert studio.history.get(reply["run_id"]).status == "ok"


def test_auth_protects_pages_and_api(tmp_path):
    served = ServedApp(["--dummy-models", "--data-dir", str(tmp_path), "--auth", "ada:secret"])
    try:
        url = served.url
        assert httpx.get(url + "config", timeout=30).status_code in (401, 403)
        with pytest.raises(Exception):
            Client(url, verbose=False)
        client = Client(url, auth=("ada", "secret"), verbose=False)
        reply = json.loads(client.predict(json.dumps({"modality": "image", "model": "dummy-sd", "prompt": "x",
                                                      "params": {"steps": 1}}), api_name="/run"))
        assert reply["run_id"] == 1
    finally:
        served.close()


def test_compare_and_history_through_the_api(served):
    url, studio = served
    client = Client(url, verbose=False)
    summary, gallery, _texts, table, _scatter, _stages, csv_path, html_path, *evidence_views = client.predict(
        "image", "dummy-sd", "a red circle", "", "0", '{"steps": 3, "guidance": 4}',
        "deepcache(interval=2)\nsampler(steps=2)\ncfg_truncation(fraction=0.5)", False, 1, api_name="/compare")
    assert "Compare group" in summary and len(gallery) == 4
    rows = table["data"]
    assert [r[0] for r in rows] == ["baseline", "deepcache(interval=2)", "sampler(steps=2)", "cfg_truncation"]
    assert open(csv_path).read().startswith("config,") and "</table>" in open(html_path).read()
    full_table, timeline = evidence_views[:2]
    assert "ideal_speedup" in full_table["headers"] and timeline  # every figure; the per-step timeline image
    group = summary.split("`")[1]
    grouped = studio.history.query(compare_group=group)
    assert len(grouped) == 4

    # history: show a run's config, re-run it exactly, export, delete
    run_id = grouped[-1].id
    _image, _file, _text, details = client.predict(run_id, api_name="/history_show")
    assert f'"id": {run_id}' in details and '"compare_group"' in details
    new_id, info = client.predict(run_id, api_name="/history_rerun")
    assert int(new_id) != run_id and "Run #" in info
    assert studio.history.get(int(new_id)).seed == studio.history.get(run_id).seed
    csv_file = client.predict("image", "dummy-sd", "", "", "", 1, api_name="/history_export")
    assert str(run_id) in open(csv_file).read()
    before = studio.history.count()
    client.predict(int(new_id), "", "", "", "", "", 1, api_name="/history_delete")
    assert studio.history.count() == before - 1 and studio.history.get(int(new_id)) is None
