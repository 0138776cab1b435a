import json

import pytest

from backends.types import ValidationError
from studio.history import HistoryStore, sqlite_url
from studio.presets import SHIPPED_DIR, Preset, PresetLibrary, parse_preset


@pytest.fixture
def library(tmp_path):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "good.json").write_text(json.dumps({
        "name": "deepcache-paper", "modality": "image", "params": {"steps": 50},
        "methods": [{"name": "deepcache", "params": {"interval": 5}}], "description": "paper default"}))
    (shipped / "broken.json").write_text("{ not json")
    (shipped / "wrong-method.json").write_text(json.dumps({"name": "x", "modality": "image", "methods": ["warp"]}))
    store = HistoryStore(sqlite_url(tmp_path / "h.db"))
    yield PresetLibrary(store, shipped)
    store.close()


def test_valid_preset_fills_method_defaults():
    preset = parse_preset({"name": "p", "modality": "image", "methods": [{"name": "deepcache", "params": {"interval": 4}}]})
    assert preset.methods[0].params == {"interval": 4, "branch": 0}


@pytest.mark.parametrize("data, message", [
    ("{", "not valid JSON"),
    ("[]", "JSON object"),
    ({"name": "", "modality": "image"}, "name"),
    ({"name": "p", "modality": "smell"}, "modality"),
    ({"name": "p", "modality": "image", "methods": ["nope"]}, "unknown acceleration method"),
    ({"name": "p", "modality": "image", "methods": [{"name": "deepcache", "params": {"interval": 99}}]}, "between"),
    ({"name": "p", "modality": "image", "methods": [{"name": "deepcache", "params": {"speed": 1}}]}, "no parameter"),
    ({"name": "p", "modality": "image", "params": {"steps": [1, 2]}}, "plain values"),
    ({"name": "p", "modality": "image", "__reduce__": "os.system"}, "unknown fields"),
])
def test_malformed_presets_are_rejected_with_a_reason(data, message):
    with pytest.raises(ValidationError, match=message):
        parse_preset(json.dumps(data) if isinstance(data, dict) else data)


def test_broken_shipped_files_are_reported_and_skipped(library):
    presets, errors = library.shipped()
    assert [p.name for p in presets] == ["deepcache-paper"]
    assert any("broken.json" in e for e in errors) and any("wrong-method.json" in e for e in errors)


def test_save_rename_delete_user_presets(library):
    library.save(Preset("mine", "image", "tiny-sd-shapes", {"steps": 20}, []))
    assert library.get("mine").params == {"steps": 20}
    library.rename("mine", "ours")
    assert library.get("ours").model == "tiny-sd-shapes"
    with pytest.raises(ValidationError):
        library.get("mine")
    library.delete("ours")
    with pytest.raises(ValidationError):
        library.delete("ours")
    with pytest.raises(ValidationError, match="shipped"):
        library.delete("deepcache-paper")


def test_export_then_import_round_trip(library, tmp_path):
    library.save(Preset("mine", "image", None, {"steps": 12}, []))
    exported = library.export_json()
    other_store = HistoryStore(sqlite_url(tmp_path / "other.db"))
    other = PresetLibrary(other_store, tmp_path / "none")
    imported = other.import_json(exported)
    assert {p.name for p in imported} == {"deepcache-paper", "mine"}
    assert other.get("mine").params == {"steps": 12}
    other_store.close()


def test_import_is_all_or_nothing(library):
    bad = json.dumps([{"name": "ok", "modality": "image"}, {"name": "bad", "modality": "image", "methods": ["?"]}])
    with pytest.raises(ValidationError):
        library.import_json(bad)
    assert [p.name for p in library.user()] == []


def test_every_shipped_preset_parses():
    presets, errors = PresetLibrary.__new__(PresetLibrary), None
    presets.shipped_dir = SHIPPED_DIR
    found, errors = presets.shipped()
    assert errors == []
    assert len(found) == len(list(SHIPPED_DIR.glob("*.json")))


def test_every_method_ships_a_paper_default_preset_matching_its_spec():
    from backends.accel.base import all_methods
    from studio.presets import method_preset

    for name, cls in all_methods().items():
        path = SHIPPED_DIR / f"method-{name}.json"
        assert path.is_file(), f"no shipped preset for {name}: run python -m studio.presets"
        shipped = parse_preset(path.read_text())
        assert shipped.to_dict() == method_preset(cls).to_dict(), f"{path.name} is stale"
