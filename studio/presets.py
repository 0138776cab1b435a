"""Presets: named settings (modality, model, params, methods) as plain JSON data.

Shipped presets live in presets/*.json; user presets live in the history database. A
preset is parsed as data only (``json.loads``, then checked field by field against the
method specs): a broken file is reported and skipped, it never stops the app.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.accel.base import get_method
from backends.types import MODALITIES, MethodChoice, ValidationError, shown
from studio.history import HistoryStore

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "presets"
MAX_PRESET_BYTES = 64 * 1024
MAX_IMPORT_BYTES = 1024 * 1024  # a file of many presets; each one still within MAX_PRESET_BYTES
MAX_NAME_CHARS = 200
ALLOWED_KEYS = {"name", "modality", "model", "params", "methods", "description"}


@dataclass
class Preset:
    name: str
    modality: str
    model: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    methods: list[MethodChoice] = field(default_factory=list)
    description: str = ""
    source: str = "user"  # "shipped" | "user"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modality": self.modality,
            "model": self.model,
            "params": self.params,
            "methods": [m.to_dict() for m in self.methods],
            "description": self.description,
        }


def validate_preset_name(name: Any) -> str:
    """One rule for a preset's name wherever it is set (save, import, rename): a name the
    list can show and the database column can hold, so a preset never silently vanishes."""
    if not isinstance(name, str) or not name.strip() or len(name.strip()) > MAX_NAME_CHARS:
        raise ValidationError(f"a preset name must be non-empty text of at most {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in name):
        raise ValidationError("a preset name cannot contain control characters")
    return name.strip()


def parse_preset(data: Any, source: str = "user") -> Preset:
    """Check a decoded JSON object and build a Preset, or raise ValidationError."""
    if isinstance(data, (str, bytes)):
        if len(data) > MAX_PRESET_BYTES:
            raise ValidationError(f"preset is larger than {MAX_PRESET_BYTES // 1024} KiB")
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise ValidationError(f"preset is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValidationError("a preset must be a JSON object with name, modality, params and methods")
    unknown = sorted(set(data) - ALLOWED_KEYS)
    if unknown:
        raise ValidationError(f"preset has unknown fields {unknown}")
    name = validate_preset_name(data.get("name"))
    modality = data.get("modality")
    if modality not in MODALITIES:
        raise ValidationError(f"preset '{name}': 'modality' must be one of {list(MODALITIES)}")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise ValidationError(f"preset '{name}': 'model' must be a string or null")
    params = data.get("params", {})
    if not isinstance(params, dict) or not all(isinstance(v, (int, float, str, bool)) or v is None for v in params.values()):
        raise ValidationError(f"preset '{name}': 'params' must be an object of plain values")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ValidationError(f"preset '{name}': 'description' must be a string")
    raw_methods = data.get("methods", [])
    if not isinstance(raw_methods, list):
        raise ValidationError(f"preset '{name}': 'methods' must be a list")
    methods = []
    for raw in raw_methods:
        try:
            choice = MethodChoice.from_obj(raw)
            spec = get_method(choice.name).spec
            if modality not in spec.modalities:
                raise ValidationError(f"method '{choice.name}' does not apply to {modality}")
            choice.params = spec.validate(choice.params)
        except ValidationError as exc:
            raise ValidationError(f"preset '{name}': {exc}") from None
        except (TypeError, ValueError, AttributeError):
            raise ValidationError(f"preset '{name}': cannot read method {raw!r}") from None
        methods.append(choice)
    return Preset(name, modality, model, dict(params), methods, description, source)


class PresetLibrary:
    def __init__(self, history: HistoryStore, shipped_dir: Path = SHIPPED_DIR):
        self.history = history
        self.shipped_dir = Path(shipped_dir)

    def shipped(self) -> tuple[list[Preset], list[str]]:
        """All readable shipped presets, and one message per file that could not be read."""
        presets, errors = [], []
        for path in sorted(self.shipped_dir.glob("*.json")):
            try:
                presets.append(parse_preset(path.read_text(encoding="utf-8"), source="shipped"))
            except (ValidationError, OSError, UnicodeDecodeError) as exc:
                errors.append(f"{path.name}: {exc}")
        return presets, errors

    def user(self) -> list[Preset]:
        out = []
        for row in self.history.presets():
            try:
                out.append(parse_preset({
                    "name": row.name, "modality": row.modality, "model": row.model,
                    "params": row.params or {}, "methods": row.methods or [], "description": row.description or "",
                }))
            except ValidationError:
                continue  # a method that no longer exists: hide, do not crash
        return out

    def all(self, modality: str | None = None) -> tuple[list[Preset], list[str]]:
        shipped, errors = self.shipped()
        presets = [p for p in shipped + self.user() if modality is None or p.modality == modality]
        return presets, errors

    def get(self, name: str) -> Preset:
        presets, _ = self.all()
        for preset in reversed(presets):  # a user preset shadows a shipped one of the same name
            if preset.name == name:
                return preset
        raise ValidationError(f"no preset named '{name}'")

    def save(self, preset: Preset) -> Preset:
        preset = parse_preset(preset.to_dict())
        self.history.save_preset(
            preset.name, preset.modality, preset.model, preset.params,
            [m.to_dict() for m in preset.methods], preset.description,
        )
        return preset

    def rename(self, old: str, new: str) -> None:
        new = validate_preset_name(new)
        if not self.history.rename_preset(old, new):
            raise ValidationError(f"no user preset named {shown(old)} (shipped presets cannot be renamed)")

    def delete(self, name: str) -> None:
        if not self.history.delete_preset(name):
            raise ValidationError(f"no user preset named '{name}' (shipped presets cannot be deleted)")

    def import_file(self, path: str | Path) -> list[Preset]:
        """Import a preset file, refusing an oversized one from its size alone, before a
        byte of it is read into memory."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError:
            raise ValidationError("the uploaded preset file could not be read") from None
        if size > MAX_IMPORT_BYTES:
            raise ValidationError(f"the preset file is {size / 2**20:.1f} MiB; the limit is "
                                  f"{MAX_IMPORT_BYTES // 2**20} MiB")
        with path.open("rb") as handle:
            data = handle.read(MAX_IMPORT_BYTES + 1)  # the file may grow between stat and read
        return self.import_json(data)

    def import_json(self, text: str | bytes) -> list[Preset]:
        """Import one preset object or a list of them; all are checked before any is saved."""
        if len(text) > MAX_IMPORT_BYTES:
            raise ValidationError(f"the presets are larger than {MAX_IMPORT_BYTES // 2**20} MiB")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            message = exc.msg if isinstance(exc, json.JSONDecodeError) else "cannot be decoded"
            raise ValidationError(f"not valid JSON: {message}") from None
        items = data if isinstance(data, list) else [data]
        for number, item in enumerate(items, 1):
            if len(json.dumps(item)) > MAX_PRESET_BYTES:
                raise ValidationError(f"preset #{number} is larger than {MAX_PRESET_BYTES // 1024} KiB")
        presets = [parse_preset(item) for item in items]
        return [self.save(p) for p in presets]

    def export_json(self, names: list[str] | None = None) -> str:
        presets, _ = self.all()
        chosen = [p.to_dict() for p in presets if names is None or p.name in names]
        return json.dumps(chosen, indent=2)


def method_preset(cls) -> Preset:
    """The shipped preset of one method: the defaults of its Config (the paper's settings,
    except where a field says otherwise), for the method's first modality."""
    spec = cls.spec
    params = spec.defaults()
    differ = [p for p in spec.params if p.paper is not None]
    settings = spec.defaults_note or ("its default settings" if differ else "the settings its paper recommends")
    note = f"{spec.title} with {settings}."
    if differ:
        note += " The paper's settings: " + ", ".join(f"{p.name} {p.paper}" for p in differ) + "."
    if spec.paper:
        note += f" Paper: {spec.paper}."
    return Preset(f"{spec.name} (paper defaults)", spec.modalities[0], None, {},
                  [MethodChoice(spec.name, params)], note, source="shipped")


def write_method_presets(directory: Path = SHIPPED_DIR) -> list[Path]:
    """Regenerate presets/method-*.json from the registered specs (run after a spec change:
    ``python -m studio.presets``); a test checks the files match the specs."""
    from backends.accel.base import all_methods

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cls in sorted(all_methods().items()):
        path = directory / f"method-{name}.json"
        path.write_text(json.dumps(method_preset(cls).to_dict(), indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in write_method_presets():
        print(written_path)
