"""The app as a user reaches it: CLI flags, the served page, named API endpoints."""

import json

import httpx
import pytest
from gradio_client import Client

import app as app_module
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


def test_generate_button_endpoint_returns_image_and_records_history(served):
    url, studio = served
    client = Client(url, verbose=False)
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    names = endpoints["/generate_image"]["parameters"]
    values = {p["parameter_name"]: p.get("parameter_default") for p in names}
    args = []
    for p in names:
        label = p["label"]
        if label == "Model":
            args.append("dummy-sd")
        elif label == "Prompt":
            args.append("a red circle at top left on white")
        elif label == "Steps":
            args.append(3)
        elif label.startswith("DeepCache (") :
            args.append(True)
        else:
            args.append(values[p["parameter_name"]] if p.get("parameter_has_default") else None)
    before = studio.history.count()
    image_path, info = client.predict(*args, api_name="/generate_image")
    assert image_path and "Model evaluations" in info and "deepcache" in info
    assert studio.history.count() == before + 1
    row = studio.history.query(limit=1)[0]
    assert row.status == "ok" and row.timings["total"] > 0 and row.methods[0]["name"] == "deepcache"


def test_json_run_endpoint_and_clear_errors(served):
    url, studio = served
    client = Client(url, verbose=False)
    reply = json.loads(client.predict(json.dumps({
        "modality": "image", "model": "dummy-flux", "prompt": "a blue square", "seed": 1,
        "params": {"steps": 2}, "methods": [{"name": "cfg_truncation", "params": {"fraction": 0.5}}]}), api_name="/run"))
    assert reply["run_id"] and reply["output_path"].endswith(".png") and reply["model_evals"] == 3
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
    summary, gallery, _texts, table, _scatter, _stages, csv_path, html_path = client.predict(
        "image", "dummy-sd", "a red circle", "", "0", '{"steps": 3, "guidance": 4}',
        "deepcache(interval=2)\nsampler(steps=2)\ncfg_truncation(fraction=0.5)", False, 1, api_name="/compare")
    assert "Compare group" in summary and len(gallery) == 4
    rows = table["data"]
    assert [r[0] for r in rows] == ["baseline", "deepcache(interval=2)", "sampler(steps=2)", "cfg_truncation"]
    assert open(csv_path).read().startswith("config,") and "<table>" in open(html_path).read()
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
