"""``python -m backends.tiny.train NAME [recipe args]``: reproduce a bundled model.

Each recipe lives in its own module and exposes ``main(argv)``; this file only maps the
public names to them, so ``--help`` lists what can be rebuilt.
"""

from __future__ import annotations

import importlib
import sys

RECIPES: dict[str, str] = {
    # name -> "module:function"; each writes its folder under assets/
    "shapes-vae": "backends.tiny.image_models:train_vae_main",
    "shapes-unet": "backends.tiny.image_models:train_unet_main",
    "shapes-dit": "backends.tiny.image_models:train_dit_main",
    "shapes-classifier": "backends.tiny.shapes:train_classifier_main",
    "shapes-video": "backends.tiny.video_models:train_video_main",
    "code-lm": "backends.tiny.text_models:train_main",
    "code-dllm": "backends.tiny.dllm_models:train_main",
    "synth-audio": "backends.tiny.audio_models:train_audio_main",
    "synth-audio-classifier": "backends.tiny.audio_data:train_audio_classifier_main",
    "shapes-vq": "backends.tiny.ar_image_train:train_vq_main",
    "shapes-ar": "backends.tiny.ar_image_train:train_ar_main",
    "shapes-ar-draft": "backends.tiny.ar_image_train:train_ar_draft_main",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in RECIPES:
        print("usage: python -m backends.tiny.train NAME [args]\n\nrecipes:")
        for name, target in RECIPES.items():
            print(f"  {name:20s} {target}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module_name, func_name = RECIPES[argv[0]].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
