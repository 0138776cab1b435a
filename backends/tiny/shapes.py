"""The synthetic "shapes" world of the bundled image models, and the checker that grades them.

One coloured shape on a plain background, described by an 8-word prompt
("a red circle at top left on white"). The vocabulary is closed (3 shapes x 4 colours x
4 positions x 2 backgrounds = 96 specs), so a tiny diffusion model can learn it on CPU in
minutes and a tiny CNN can tell, for any generated image, whether it followed its prompt.
That makes "prompt adherence" a number: ``score_images(images, prompts)``.

Train the checker: ``python -m backends.tiny.train shapes-classifier`` (~2 min on CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}
ATTRIBUTES = ("shape", "color", "position", "background")
VOCAB = {"shape": SHAPES, "color": tuple(COLORS), "position": POSITIONS, "background": tuple(BACKGROUNDS)}

ASSETS = Path(__file__).resolve().parents[2] / "assets"
CLASSIFIER_DIR = ASSETS / "shapes-classifier"


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    color: str
    position: str
    background: str


def all_specs() -> list[ShapeSpec]:
    return [ShapeSpec(s, c, p, b) for s in SHAPES for c in COLORS for p in POSITIONS for b in BACKGROUNDS]


def random_spec(rng: random.Random) -> ShapeSpec:
    return ShapeSpec(rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(POSITIONS), rng.choice(tuple(BACKGROUNDS)))


def prompt_for(spec: ShapeSpec) -> str:
    return f"a {spec.color} {spec.shape} at {spec.position} on {spec.background}"


def parse_prompt(prompt: str) -> ShapeSpec | None:
    """Find shape, colour, position and background words anywhere in ``prompt``.

    Tolerant of extra words and word order; returns None unless all four are named.
    """
    text = " " + " ".join(prompt.lower().replace(",", " ").split()) + " "
    found = {}
    for attr, words in VOCAB.items():
        hits = [w for w in words if f" {w} " in text]
        if len(hits) != 1:
            return None
        found[attr] = hits[0]
    return ShapeSpec(**found)


def render(spec: ShapeSpec, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """Draw ``spec``; with ``rng`` the shape's size and centre jitter a little (data augmentation)."""
    img = Image.new("RGB", (size, size), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(img)
    half = size * 0.17  # half-width of the shape: ~11 px at 64
    cx = size * (0.27 if "left" in spec.position else 0.73)
    cy = size * (0.27 if "top" in spec.position else 0.73)
    if rng is not None:
        half *= rng.uniform(0.85, 1.15)
        cx += rng.uniform(-0.05, 0.05) * size
        cy += rng.uniform(-0.05, 0.05) * size
    fill = COLORS[spec.color]
    box = (cx - half, cy - half, cx + half, cy + half)
    if spec.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif spec.shape == "square":
        s = half * 0.88  # same visual area as the circle, roughly
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        h = half * 1.1
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)
    return img


def image_to_tensor(img: Image.Image, size: int = 64) -> torch.Tensor:
    """PIL -> float tensor (3, size, size) in [-1, 1]."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


# ----------------------------------------------------------------------------- classifier


@dataclass
class ClassifierConfig:
    size: int = 64
    width: int = 32
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3
    minutes: float = 3.0
    seed: int = 0


class AttributeCNN(nn.Module):
    """Four small conv stages, the 4x4 map kept (not a global pool: position - or, on a
    spectrogram, pitch - lives in where the activations are), one linear head per
    attribute. Shared by the shapes and audio classifiers."""

    def __init__(self, in_channels: int, head_sizes: dict[str, int], width: int = 32):
        super().__init__()
        w = width
        layers, c_in = [], in_channels
        for c_out in (w, w, 2 * w, 2 * w):  # 64 -> 32 -> 16 -> 8 -> 4
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(c_in * 16, 128), nn.ReLU())
        self.heads = nn.ModuleDict({a: nn.Linear(128, n) for a, n in head_sizes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.trunk(self.features(x))
        return {a: head(h) for a, head in self.heads.items()}


class ShapesClassifier(AttributeCNN):
    """Shape / colour / position / background of a 64x64 RGB render."""

    def __init__(self, width: int = 32):
        super().__init__(3, {a: len(VOCAB[a]) for a in ATTRIBUTES}, width)


def _labels(spec: ShapeSpec) -> list[int]:
    return [VOCAB[a].index(getattr(spec, a)) for a in ATTRIBUTES]


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and colour drift so the checker grades imperfect generated images fairly."""
    b = x.shape[0]
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.25
    blur = torch.rand(b, generator=gen) < 0.5
    if blur.any():
        x[blur] = F.avg_pool2d(x[blur], 3, stride=1, padding=1, count_include_pad=False)
    x = x * (1 + 0.15 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)) + 0.15 * (torch.rand(b, 3, 1, 1, generator=gen) - 0.5)
    return x.clamp(-1.2, 1.2)


def train_classifier_main(argv: list[str] | None = None) -> int:
    cfg = ClassifierConfig()
    p = argparse.ArgumentParser(prog="shapes-classifier", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--steps", type=int, default=cfg.steps)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    args = p.parse_args(argv)
    cfg.minutes, cfg.steps = args.minutes, args.steps
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rng, gen = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    model = ShapesClassifier(cfg.width)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    t0, step = time.time(), 0
    while step < cfg.steps and time.time() - t0 < cfg.minutes * 60:
        lr = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        specs = [random_spec(rng) for _ in range(cfg.batch_size)]
        x = torch.stack([image_to_tensor(render(s, cfg.size, rng), cfg.size) for s in specs])
        x = _augment(x, gen)
        y = torch.tensor([_labels(s) for s in specs])
        out = model(x)
        loss = sum(F.cross_entropy(out[a], y[:, i]) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        step += 1
    model.eval()
    save_classifier(model, args.out, {"width": cfg.width, "size": cfg.size, "steps": step})
    _load_cached.cache_clear()
    rng_eval = random.Random(123)
    specs = [random_spec(rng_eval) for _ in range(256)]
    scores = score_images([render(s, cfg.size, rng_eval) for s in specs], [prompt_for(s) for s in specs], args.out)
    print(f"trained {step} steps in {time.time() - t0:.0f}s; clean-render scores {scores}")
    return 0


def save_classifier(model: ShapesClassifier, out: Path, config: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({**config, "attributes": {a: list(VOCAB[a]) for a in ATTRIBUTES}}, indent=2))


@functools.lru_cache(maxsize=4)
def _load_cached(path: str) -> tuple[ShapesClassifier, int]:
    from safetensors.torch import load_file

    cfg = json.loads((Path(path) / "config.json").read_text())
    model = ShapesClassifier(cfg["width"])
    model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
    return model.eval(), cfg["size"]


def load_classifier(path: str | Path | None = None) -> ShapesClassifier:
    """The trained checker (cached per path); default ``assets/shapes-classifier``."""
    return _load_cached(str(path or CLASSIFIER_DIR))[0]


@torch.no_grad()
def score_images(images: list[Image.Image], prompts: list[str], path: str | Path | None = None) -> dict:
    """Fraction of images whose predicted attributes match their prompt.

    Returns ``{"shape", "color", "position", "background", "all", "n"}``; ``all`` means
    shape, colour and position all right. Prompts that do not parse are skipped.
    """
    model, size = _load_cached(str(path or CLASSIFIER_DIR))
    pairs = [(img, parse_prompt(p)) for img, p in zip(images, prompts)]
    pairs = [(img, s) for img, s in pairs if s is not None]
    if not pairs:
        return {a: 0.0 for a in (*ATTRIBUTES, "all")} | {"n": 0}
    x = torch.stack([image_to_tensor(img, size) for img, _ in pairs])
    out = model(x)
    y = torch.tensor([_labels(s) for _, s in pairs])
    ok = {a: out[a].argmax(-1) == y[:, i] for i, a in enumerate(ATTRIBUTES)}
    res = {a: round(ok[a].float().mean().item(), 4) for a in ATTRIBUTES}
    res["all"] = round((ok["shape"] & ok["color"] & ok["position"]).float().mean().item(), 4)
    res["n"] = len(pairs)
    return res
