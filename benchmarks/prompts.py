"""Default prompts of the bundled models, reproducible from a seed."""

from __future__ import annotations

import random

CODE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\n\nclass Config:\n    def __init__(self",
    "for i in range(",
    "def read_lines(path):\n    with open(path) as f:\n",
]

# Code-editing prompts: the answer copies much of the prompt, which prompt lookup exploits.
EDIT_PROMPTS = [
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
    "# The same two functions with docstrings:\ndef add(a, b):\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
    "    def __repr__(self):\n        return 'Point(%r, %r)' % (self.x, self.y)\n\n\n"
    "class Point3:\n    def __init__(self, x, y, z):\n        self.x = x\n",
    "def parse(line):\n    key, _, value = line.partition('=')\n    return key.strip(), value.strip()\n\n\n"
    "def parse_all(lines):\n    result = {}\n    for line in lines:\n        key, value = parse(line)\n"
    "        result[key] = value\n    return result\n\n\n# copy of parse_all\ndef parse_all_copy(lines):\n",
]


def image_prompts(n: int, seed: int = 0) -> list[str]:
    """Shape prompts the bundled image models were trained on, with their classifier."""
    from backends.tiny.shapes import prompt_for, random_spec

    rng = random.Random(seed)
    return [prompt_for(random_spec(rng)) for _ in range(n)]


PROMPT_KINDS = ("mixed", "code", "edit")  # the text prompt pools: code completion, code edits, both


def default_prompts(modality: str, n: int, kind: str = "mixed", seed: int = 0) -> list[str]:
    if modality == "image":
        return image_prompts(n, seed)
    if modality == "text":
        pool = {"code": CODE_PROMPTS, "edit": EDIT_PROMPTS, "mixed": CODE_PROMPTS + EDIT_PROMPTS}[kind]
        return [pool[i % len(pool)] for i in range(n)]
    if modality == "audio":
        from backends.tiny.audio_data import audio_prompts

        return audio_prompts(n, seed)
    if modality == "video":
        from backends.tiny.video_models import eval_clip_prompts

        return eval_clip_prompts(n, seed)
    return ["a short clip"] * n
