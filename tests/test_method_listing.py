"""``python -m benchmarks --list-methods --json FILE``: every registered method, from its spec."""

import json
import runpy
import sys

import pytest

from backends.accel.base import all_methods

METHOD_KEYS = {"name", "title", "summary", "modalities", "families", "slots", "lossless", "paper", "defaults_note",
               "params"}
PARAM_KEYS = {"name", "kind", "default", "min", "max", "step", "choices", "help", "paper", "only_if"}


def test_list_methods_writes_every_registered_method_with_its_config_fields(tmp_path, monkeypatch):
    out = tmp_path / "methods.json"
    monkeypatch.setattr(sys, "argv", ["benchmarks", "--list-methods", "--json", str(out)])
    with pytest.raises(SystemExit) as done:
        runpy.run_module("benchmarks", run_name="__main__")
    assert done.value.code == 0
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["import_errors"] == {}
    listed = {m["name"]: m for m in data["methods"]}
    assert set(listed) == set(all_methods())
    for name, entry in listed.items():
        spec = all_methods()[name].spec
        assert set(entry) == METHOD_KEYS
        assert entry["modalities"] == list(spec.modalities) and entry["slots"] == list(spec.slots)
        assert [p["name"] for p in entry["params"]] == [p.name for p in spec.params]
        assert all(set(p) == PARAM_KEYS and p["help"] for p in entry["params"])

    deepcache = listed["deepcache"]
    assert (deepcache["families"], deepcache["lossless"], deepcache["slots"]) == (["unet", "audio-unet"], False, [])
    assert deepcache["params"][0] == {"name": "interval", "kind": "int", "default": 3, "min": 1, "max": 10,
                                      "step": None, "choices": [], "help": "run the full UNet every N steps (paper: 3-5)",
                                      "paper": None, "only_if": None}
    assert listed["fast_dllm"]["params"][0]["only_if"] == ["factor", 0.0]  # threshold: read while factor is 0
    assert listed["faster_cache"]["slots"] == ["dit-cache", "guidance"]
    assert listed["lookahead"]["lossless"] is True and listed["lookahead"]["params"][0]["paper"] == 15
    stream = data["modes"][0]  # StreamDiffusion: a mode of the Image tab, with its seed paper
    assert stream["name"] == "streamdiffusion" and "StreamDiffusion" in stream["paper"]
    assert [p["name"] for p in stream["params"]][:2] == ["stream_batch", "rcfg"]
    position = next(p for p in listed["block_cache"]["params"] if p["name"] == "position")
    assert (position["kind"], position["choices"], position["default"]) == ("choice", ["rear", "front"], "rear")


def test_list_methods_prints_without_a_file(capsys):
    from benchmarks.listing import main

    assert main(["--list-methods"]) == 0
    assert len(json.loads(capsys.readouterr().out)["methods"]) == len(all_methods())
