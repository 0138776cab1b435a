"""Bundled models and how a model id becomes something loadable.

A model id is one of: a bundled name (``tiny-sd-shapes``: a folder under assets/), a
local folder, or a hub id (``stabilityai/sd-turbo``). All three go through the same
``from_pretrained`` call; only the source string differs.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from backends.types import ModelLoadError

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class BundledModel:
    name: str
    modality: str
    title: str
    description: str
    draft: str | None = None  # text, AR image: the paired draft model for speculative decoding
    # image: the smaller sibling (same latents, prompt encoding and schedule) that runs the early
    # denoising steps under T-Stitch (``backends.accel.t_stitch``)
    sibling: str | None = None
    default_size: tuple[int, int] | None = None  # image: (height, width) it was trained at
    # the sampling settings the model was trained and evaluated with (its training_report.json's
    # eval call): the UI starts from these so a first run looks like the reported quality
    recommended: tuple[tuple[str, float], ...] = ()
    # the task grader of its outputs (a key of ``studio.metrics.TASK_GRADERS``): the small
    # classifier trained beside it scores prompt adherence; None = no task score
    grader: str | None = None
    # text: "diffusion-lm" for a masked-diffusion LM (LLaDA-style decoding; never a draft);
    # image: "ar-image" for an autoregressive token model (its drafts are of that family too)
    family: str | None = None

    @property
    def path(self) -> Path:
        return ASSETS_DIR / self.name

    @property
    def available(self) -> bool:
        return self.path.is_dir()


BUNDLED: tuple[BundledModel, ...] = (
    BundledModel("tiny-sd-shapes", "image", "Tiny SD (UNet) - shapes",
                 "Stable Diffusion layout UNet trained here on rendered coloured shapes.",
                 recommended=(("steps", 25), ("guidance", 4.0)), grader="shapes", sibling="tiny-sd-shapes-small"),
    BundledModel("tiny-sd-shapes-small", "image", "Tiny SD small (UNet) - shapes",
                 "Half-width sibling of Tiny SD (about 4x fewer FLOPs per step) sharing its VAE, text encoder and "
                 "schedule: T-Stitch runs it for the early steps.",
                 recommended=(("steps", 25), ("guidance", 4.0)), grader="shapes"),
    BundledModel("tiny-flux-shapes", "image", "Tiny FLUX (DiT) - shapes",
                 "FLUX layout transformer trained here on rendered coloured shapes.", default_size=(64, 64),
                 recommended=(("steps", 25), ("guidance", 4.0)), grader="shapes"),
    BundledModel("tiny-ar-shapes", "image", "Tiny LlamaGen (AR tokens) - shapes",
                 "Autoregressive Llama over an 8x8 grid of VQ tokens (LlamaGen layout) trained here on rendered "
                 "coloured shapes; guidance is CFG over a null prompt, steps do not apply.",
                 default_size=(64, 64), recommended=(("guidance", 1.5),), grader="shapes", draft="tiny-ar-shapes-draft",
                 family="ar-image"),
    BundledModel("tiny-ar-shapes-draft", "image", "Tiny LlamaGen draft (1 layer) - shapes",
                 "1-layer model of tiny-ar-shapes' layout and tokenizer, distilled from it: the draft of its "
                 "speculative decoding.", default_size=(64, 64), recommended=(("guidance", 1.5),), family="ar-image"),
    BundledModel("tiny-video-shapes", "video", "Tiny Wan (video DiT) - moving shapes",
                 "Wan layout video transformer (3-D attention) trained here on rendered moving, growing and colour-changing shapes.",
                 recommended=(("steps", 25), ("guidance", 3.0)), grader="moving-shapes"),
    BundledModel("tiny-code-llama", "text", "Tiny code Llama (12 layers)",
                 "Llama layout LM trained here on Python's standard library.", draft="tiny-code-draft"),
    BundledModel("tiny-code-dllm", "text", "Tiny code diffusion LM (masked, 12 layers)",
                 "LLaDA-style masked-diffusion LM adapted here from tiny-code-llama (bidirectional, denoising "
                 "steps over blocks).", recommended=(("max_new_tokens", 64), ("steps", 64), ("block_length", 32)), family="diffusion-lm"),
    BundledModel("tiny-code-draft", "text", "Tiny code draft (1 layer)",
                 "1-layer draft with the same tokenizer, for speculative decoding."),
    BundledModel("tiny-audio-synth", "audio", "Tiny audio UNet - synth sounds",
                 "Spectrogram UNet trained here on synthesised tones, chords, arpeggios, drums and noise.",
                 recommended=(("steps", 25), ("guidance", 3.0)), grader="synth-sounds"),
)


def bundled(modality: str | None = None, available_only: bool = True) -> list[BundledModel]:
    return [
        m for m in BUNDLED
        if (modality is None or m.modality == modality) and (m.available or not available_only)
    ]


def find_bundled(name: str) -> BundledModel | None:
    return next((m for m in BUNDLED if m.name == name), None)


# hub models whose own settings the studio knows (lower-case ids: the hub ignores case).
# The Image tab's guidance slider always sends a value, so a model's own default guidance
# reaches a run only from here. Janus-Pro: its generation config's guidance_scale (5) and
# its 384 px (24 x 24 tokens, backends/janus.py)
HUB_RECOMMENDED: dict[str, tuple[tuple[str, float], ...]] = {
    "deepseek-community/janus-pro-1b": (("guidance", 5.0), ("width", 384), ("height", 384)),
    "deepseek-community/janus-pro-7b": (("guidance", 5.0), ("width", 384), ("height", 384)),
    # Emu3-Gen: BAAI's example's guidance (3) and its 720 px (90 x 90 codes, backends/emu3.py)
    "baai/emu3-gen-hf": (("guidance", 3.0), ("width", 720), ("height", 720)),
}


def recommended_params(model_id: str) -> dict[str, float]:
    """The sampling settings a bundled or known hub model is meant to run with ({} for any other model)."""
    model_id = (model_id or "").strip()
    entry = find_bundled(model_id)
    if entry is not None:
        return dict(entry.recommended)
    return dict(HUB_RECOMMENDED.get(model_id.lower(), ()))


def resolve_source(model_id: str, allowed_roots: list[Path] | None = None) -> str:
    """Map a model id to the string handed to ``from_pretrained``.

    ``allowed_roots``: when set (a shared app), local folders must lie inside one of
    them, so a text field cannot be used to read arbitrary files on the server.
    """
    model_id = (model_id or "").strip()
    if not model_id:
        raise ModelLoadError("no model given: pick a bundled model or type a hub id / local folder")
    entry = find_bundled(model_id)
    if entry is not None:
        if not entry.available:
            raise ModelLoadError(
                f"bundled model '{model_id}' is missing from the studio's assets folder; rebuild it with "
                f"`python -m backends.tiny.train` or check out the assets folder"
            )
        return str(entry.path)
    path = Path(os.path.expanduser(model_id))
    looks_local = path.is_absolute() or model_id.startswith((".", "~")) or path.exists()
    if looks_local:
        resolved = path.resolve()
        if allowed_roots is not None and not any(_inside(resolved, root) for root in allowed_roots):
            # the allowed folder is named relative to the data dir: server paths stay on the server
            raise ModelLoadError("local model folders must be inside the data dir's models/ folder "
                                 "(or start the studio with --allow-local-models)")
        if not resolved.is_dir():
            raise ModelLoadError(f"no model folder at {model_id}")
        return str(resolved)
    if not HUB_ID.match(model_id):
        raise ModelLoadError(
            f"unknown model '{model_id}': not a bundled model, an existing folder, or a hub id like 'owner/name'"
        )
    return model_id


def local_model_type(source: str) -> str | None:
    """``model_type`` from a local transformers folder's config.json: None when there is
    no such file, "" when it cannot be read."""
    config = Path(source) / "config.json"
    if not config.is_file():
        return None
    try:
        return str(json.loads(config.read_text()).get("model_type") or "")
    except (OSError, ValueError):
        return ""


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root.resolve())
        return True
    except ValueError:
        return False
