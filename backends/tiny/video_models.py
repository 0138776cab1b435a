"""Recipe for the bundled offline video model: a tiny Wan-layout video DiT on moving shapes.

The clips extend the "shapes" world of ``backends.tiny.shapes`` in time: one coloured
shape on a plain background that moves (left/right/up/down), grows, shrinks or turns
into another colour over 8 frames of 32x32, described by a prompt such as
"a red circle moving right on white" or "a blue square turning yellow on black".
The vocabulary is closed (3 shapes x 4 colours x 9 motions x 2 backgrounds = 216
clip specs), so a tiny denoiser can learn it on CPU in minutes, and a rule-based checker
(``score_clips``: centroid trajectory, area growth, colour of the first and last frames,
fill ratio for the shape) tells whether a generated clip followed its prompt.

    python -m backends.tiny.train shapes-video --minutes 60   # assets/tiny-video-shapes

- Pixel space, not the shared 2x ``AutoencoderKL``: at 32x32 its reconstructions blur the
  shapes until circle and triangle look alike (checker shape score 50% on reconstructions).
- Denoiser: diffusers' Wan video DiT (full 3-D self-attention over frames x patches,
  cross-attention to the prompt, rotary position in t/h/w) as ``FiLMWanTransformer3DModel``
  (``backends/tiny/film_wan.py``): the pooled prompt is also added to the time embedding,
  so every block's adaLN modulation carries it; with cross-attention alone the first model
  got colour half the time and motion 17%. Patch (2, 4, 4): 4 x 8 x 8 = 256 tokens per
  clip, width 96 (3 heads), 4 blocks. Rectified flow with x-prediction (the pipeline turns
  it into a velocity): a narrow token cannot emit the full-rank 96-pixel noise a velocity
  target needs (JiT, Li & He 2025); the loss is on the clean clip weighted 1 + min(SNR, 5).
- Sampling: the saved scheduler uses shift 3 (more of the 25 steps at high noise, as Wan
  does): from pure noise the clean-clip guess decides layout and motion, and with the
  uniform schedule (shift 1) shapes often vanished half-way through a clip. Same weights,
  shift 1 -> 3: motion 52% -> 73%. Guidance 3 beats 5 here (all attributes 62% vs 50%).
- Text: a tiny ``CLIPTextModel`` (hidden states are the Wan ``text_dim`` input) and a
  ``CLIPTokenizer`` with one token per prompt word, trained jointly; 10% of prompts are
  dropped to "" so classifier-free guidance works.
- Saved as a ``ShapesVideoPipeline`` folder (``backends/tiny/video_pipeline.py``);
  ``backends/video.py`` loads it through that class.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from backends.tiny.shapes import ASSETS, BACKGROUNDS, COLORS, SHAPES

VIDEO_DIR = ASSETS / "tiny-video-shapes"
VAE_DIR = ASSETS / "shapes-vae"
SIZE, FRAMES = 32, 8
MAX_TOKENS = 12  # "<bos> a red circle turning blue on white <eos>" is 9 tokens
DIRECTIONS = ("left", "right", "up", "down")
ACTIONS = tuple(f"moving {d}" for d in DIRECTIONS) + ("growing", "shrinking") + tuple(f"turning {c}" for c in COLORS)
VIDEO_CALL = dict(num_inference_steps=25, guidance_scale=3.0)


# ----------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class ClipSpec:
    shape: str
    color: str
    action: str  # one of ACTIONS; "turning <colour>" never names the start colour
    background: str


def all_clip_specs() -> list[ClipSpec]:
    return [
        ClipSpec(s, c, a, b)
        for s in SHAPES for c in COLORS for a in ACTIONS for b in BACKGROUNDS
        if a != f"turning {c}"
    ]


def random_clip_spec(rng: random.Random) -> ClipSpec:
    shape, color, bg = rng.choice(SHAPES), rng.choice(tuple(COLORS)), rng.choice(tuple(BACKGROUNDS))
    # motions (4), size changes (2) and colour changes (1 of 3 targets) equally often per kind
    kind = rng.choice(("move", "move", "size", "turn"))
    if kind == "move":
        action = f"moving {rng.choice(DIRECTIONS)}"
    elif kind == "size":
        action = rng.choice(("growing", "shrinking"))
    else:
        action = f"turning {rng.choice([c for c in COLORS if c != color])}"
    return ClipSpec(shape, color, action, bg)


def clip_prompt(spec: ClipSpec) -> str:
    return f"a {spec.color} {spec.shape} {spec.action} on {spec.background}"


def parse_clip_prompt(prompt: str) -> ClipSpec | None:
    """Shape, start colour, motion and background from a prompt; None unless all are found."""
    words = prompt.lower().replace(",", " ").split()
    shapes = [w for w in words if w in SHAPES]
    bgs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "on" and words[i + 1] in BACKGROUNDS]
    action = None
    for i, w in enumerate(words[:-1]):
        if w == "moving" and words[i + 1] in DIRECTIONS:
            action = f"moving {words[i + 1]}"
        elif w == "turning" and words[i + 1] in COLORS:
            action = f"turning {words[i + 1]}"
    if action is None:
        action = next((w for w in words if w in ("growing", "shrinking")), None)
    target = action.split()[1] if action and action.startswith("turning") else None
    colors = [w for w in words if w in COLORS and w != target] if target else [w for w in words if w in COLORS]
    if len(shapes) != 1 or len(bgs) != 1 or action is None or not colors:
        return None
    return ClipSpec(shapes[0], colors[0], action, bgs[0])


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    if shape == "circle":
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
    elif shape == "square":
        s = half * 0.88  # about the circle's area
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        h = half * 1.1
        draw.polygon([(cx, cy - h), (cx - h, cy + h * 0.8), (cx + h, cy + h * 0.8)], fill=fill)


def clip_geometry(spec: ClipSpec, frames: int = FRAMES, rng: random.Random | None = None) -> list[tuple]:
    """Per frame ``(cx, cy, half, rgb)`` in fractions of the frame size."""
    j = (lambda a: rng.uniform(-a, a)) if rng is not None else (lambda a: 0.0)
    ts = [i / (frames - 1) for i in range(frames)]
    base = COLORS[spec.color]
    half = 0.17 * (1 + j(0.12))
    if spec.action.startswith("moving"):
        d = spec.action.split()[1]
        start, end = 0.25 + j(0.03), 0.75 + j(0.03)
        if d in ("left", "up"):
            start, end = end, start
        other = 0.5 + j(0.15)
        path = [start + (end - start) * t for t in ts]
        xy = [(p, other) if d in ("left", "right") else (other, p) for p in path]
        return [(x, y, half, base) for x, y in xy]
    cx, cy = 0.5 + j(0.1), 0.5 + j(0.1)
    if spec.action in ("growing", "shrinking"):
        small, big = 0.09 * (1 + j(0.1)), 0.27 * (1 + j(0.05))
        a, b = (small, big) if spec.action == "growing" else (big, small)
        return [(cx, cy, a + (b - a) * t, base) for t in ts]
    target = COLORS[spec.action.split()[1]]
    return [(cx, cy, half, tuple(round(u + (v - u) * t) for u, v in zip(base, target))) for t in ts]


def render_clip(spec: ClipSpec, size: int = SIZE, frames: int = FRAMES, rng: random.Random | None = None) -> list[Image.Image]:
    """Draw the clip (4x supersampled, so edges are anti-aliased like the VAE's training renders)."""
    ss = 4
    out = []
    for cx, cy, half, rgb in clip_geometry(spec, frames, rng):
        img = Image.new("RGB", (size * ss, size * ss), BACKGROUNDS[spec.background])
        _draw_shape(ImageDraw.Draw(img), spec.shape, cx * size * ss, cy * size * ss, half * size * ss, rgb)
        out.append(img.resize((size, size), Image.BOX))
    return out


def clip_to_tensor(frames: list[Image.Image]) -> torch.Tensor:
    """Frames -> (F, 3, H, W) in [-1, 1]."""
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in frames]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- checker


def _nearest(rgb: np.ndarray, palette: dict) -> str:
    names = list(palette)
    dist = [np.abs(rgb - np.array(palette[n], dtype=np.float32)).sum() for n in names]
    return names[int(np.argmin(dist))]


def analyse_clip(frames: list[Image.Image]) -> dict:
    """What a clip shows: background, shape, start/end colour and the motion, from pixels alone.

    Foreground = pixels far from the background (the median of the border pixels). The
    motion is read from the first and last quarter of the frames: a colour change wins,
    then a centroid shift of more than 15% of the frame, then an area ratio beyond 1.6x.
    """
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) for f in frames])  # F,H,W,3
    n, h, w, _ = arr.shape
    border = np.concatenate([arr[:, 0], arr[:, -1], arr[:, :, 0], arr[:, :, -1]], axis=1).reshape(-1, 3)
    bg_rgb = np.median(border, axis=0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    diff = np.abs(arr - bg_rgb).sum(-1)  # F,H,W
    # half of the clip's own contrast: yellow on white differs by ~275, blue on white by ~390
    contrast = max(90.0, float(np.percentile(diff, 99.5)))
    mask, core = diff > 0.5 * contrast, diff > 0.8 * contrast
    ys, xs = np.mgrid[0:h, 0:w]
    stats = []
    for i in range(n):
        m = mask[i]
        area = int(m.sum())
        if area < 3:
            stats.append(None)
            continue
        cx, cy = xs[m].mean() / w, ys[m].mean() / h
        c = core[i] if core[i].sum() >= 2 else m
        color = arr[i][c].mean(0)
        y0, y1, x0, x1 = ys[m].min(), ys[m].max(), xs[m].min(), xs[m].max()
        fill = area / ((y1 - y0 + 1) * (x1 - x0 + 1))
        stats.append(dict(area=area, cx=cx, cy=cy, color=color, fill=fill))
    valid = [s for s in stats if s is not None]
    if len(valid) < max(2, n // 2):
        return dict(background=background, shape=None, color=None, action=None)
    q = max(1, n // 4)
    first = [s for s in stats[:q] if s is not None] or valid[:1]
    last = [s for s in stats[-q:] if s is not None] or valid[-1:]

    def avg(ss, k):
        return np.mean([s[k] for s in ss], axis=0)

    c0, c1 = _nearest(avg(first, "color"), COLORS), _nearest(avg(last, "color"), COLORS)
    dx, dy = avg(last, "cx") - avg(first, "cx"), avg(last, "cy") - avg(first, "cy")
    ratio = avg(last, "area") / max(1.0, avg(first, "area"))
    if c0 != c1:
        action = f"turning {c1}"
    elif max(abs(dx), abs(dy)) > 0.15:
        action = "moving " + (("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up"))
    elif ratio > 1.6:
        action = "growing"
    elif ratio < 1 / 1.6:
        action = "shrinking"
    else:
        action = "still"
    # fill ratio of the bounding box: square ~1, circle ~0.79, triangle ~0.5 (judged on the larger frames)
    big = sorted(valid, key=lambda s: -s["area"])[: max(1, len(valid) // 2)]
    fill = float(np.median([s["fill"] for s in big]))
    shape = "triangle" if fill < 0.64 else ("circle" if fill < 0.88 else "square")
    return dict(background=background, shape=shape, color=c0, action=action)


def score_clips(frames_list: list[list[Image.Image]], prompts: list[str]) -> dict:
    """Fraction of clips that follow their prompt: ``{"action", "color", "shape", "background", "all", "n"}``.

    ``action`` is the motion (direction / growing / shrinking / target colour); ``all``
    means action, start colour and shape all right. Prompts that do not parse are skipped.
    """
    keys = ("action", "color", "shape", "background")
    hits = {k: [] for k in keys}
    for frames, prompt in zip(frames_list, prompts):
        spec = parse_clip_prompt(prompt)
        if spec is None:
            continue
        seen = analyse_clip(list(frames))
        for k in keys:
            hits[k].append(seen[k] == getattr(spec, k))
    n = len(hits["action"])
    if n == 0:
        return {k: 0.0 for k in (*keys, "all")} | {"n": 0}
    res = {k: round(sum(v) / n, 4) for k, v in hits.items()}
    res["all"] = round(sum(a and c and s for a, c, s in zip(hits["action"], hits["color"], hits["shape"])) / n, 4)
    res["n"] = n
    return res


# ----------------------------------------------------------------------------- model + recipe


@dataclass
class VideoConfig:
    minutes: float = 25.0
    max_steps: int = 50000
    batch_size: int = 16  # on a shared CPU, more updates beat bigger batches
    lr: float = 1.5e-3
    text_lr: float = 1e-3
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    pool_size: int = 8192  # rendered clips, reused (rendering costs ~as much as a step)
    num_layers: int = 4
    heads: int = 3  # width 96: 64 (2 heads) learned slower at the same minutes
    head_dim: int = 32  # rotary split t/h/w = 12/10/10
    ffn_dim: int = 384
    text_width: int = 64
    patch_size: tuple = (2, 4, 4)  # 8x32x32 pixels -> 4x8x8 = 256 tokens
    # x-prediction: a token's output (2x4x4x3 = 96 pixels) is a linear map of a 64-wide state, so it
    # cannot carry the full-rank noise a velocity target needs; a clean clip it can (JiT, Li & He 2025).
    # The first run predicted velocity: loss stuck at 0.46 and samples kept per-pixel noise.
    prediction: str = "sample"
    sigma_shift: float = 0.5  # training noise levels lean to high noise, where the prompt decides the clip
    # extra share of samples at sigma in [0.9, 1] (logit-normal alone puts ~4% there). Tried at 0.15:
    # after the same 62 minutes, all-attributes adherence 38% vs 62% without, so it is off
    sigma_high_frac: float = 0.0
    # the saved scheduler's shift: sampling spends more steps at high noise, where the layout and
    # the motion are decided (Wan uses 3-5). Same weights, shift 1 -> 3: motion 52% -> 73%
    sample_shift: float = 3.0
    # the pooled prompt also modulates every block (FiLMWanTransformer3DModel): cross-attention alone
    # gave colour 52% and motion 17% after 32 minutes
    text_film: bool = True
    seed: int = 0


def _video_words() -> list[str]:
    words = set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(DIRECTIONS)
    return sorted(words | {"a", "on", "moving", "growing", "shrinking", "turning"})


def build_video_tokenizer():
    """A ``CLIPTokenizer`` that spells every prompt word as one token (shared builder)."""
    from backends.tiny.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(_video_words(), MAX_TOKENS)


def make_tiny_wan(cfg: VideoConfig):
    from diffusers import WanTransformer3DModel

    from backends.tiny.film_wan import FiLMWanTransformer3DModel

    cls = FiLMWanTransformer3DModel if cfg.text_film else WanTransformer3DModel
    return cls(
        patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.heads, attention_head_dim=cfg.head_dim,
        in_channels=3, out_channels=3, text_dim=cfg.text_width, freq_dim=128, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=64,
    )


def make_video_scheduler(shift: float = 1.0):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift, use_dynamic_shifting=False)


def render_pool(n: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` jittered clips as uint8 (n, 3, F, H, W) plus their prompts."""
    rng = random.Random(seed)
    specs = [random_clip_spec(rng) for _ in range(n)]
    arr = np.stack([np.stack([np.asarray(f) for f in render_clip(s, rng=rng)]) for s in specs])  # n,F,H,W,3
    return torch.from_numpy(arr).permute(0, 4, 1, 2, 3).contiguous(), [clip_prompt(s) for s in specs]


def build_pipeline(transformer, text_encoder, tokenizer, prediction: str = "sample", shift: float = 1.0):
    from backends.tiny.video_pipeline import ShapesVideoPipeline

    return ShapesVideoPipeline(transformer=transformer, text_encoder=text_encoder, tokenizer=tokenizer,
                               scheduler=make_video_scheduler(shift), vae=None, default_frames=FRAMES, default_size=SIZE,
                               prediction_type="sample" if prediction == "sample" else "flow")


def eval_clip_prompts(n: int = 48, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    specs = all_clip_specs()
    rng.shuffle(specs)
    return [clip_prompt(specs[i % len(specs)]) for i in range(n)]


STRIP_PROMPTS = ("a red circle moving right on white", "a blue square growing on black",
                 "a green triangle moving up on black", "a yellow circle turning blue on white")


def save_strip(clips: list[list[Image.Image]], prompts: list[str], path: str | Path, scale: int = 3) -> None:
    """Frames side by side, one clip per row, the prompt written at the left."""
    n_f, s, label = len(clips[0]), clips[0][0].size[0] * scale, 210
    strip = Image.new("RGB", (label + n_f * (s + 2), len(clips) * (s + 4)), (128, 128, 128))
    draw = ImageDraw.Draw(strip)
    for r, (clip, p) in enumerate(zip(clips, prompts)):
        y = r * (s + 4)
        draw.text((4, y + s // 2 - 6), p, fill=(0, 0, 0))
        for i, f in enumerate(clip):
            strip.paste(f.resize((s, s), Image.NEAREST), (label + i * (s + 2), y))
    strip.save(path)


@torch.no_grad()
def evaluate_video_pipeline(pipe, call: dict, n: int = 48, batch: int = 8, seed: int = 0,
                            strip: str | None = None) -> dict:
    """Generate ``n`` clips (fixed prompts and seed), grade them with ``score_clips``; optionally save a strip."""
    prompts, clips = eval_clip_prompts(n), []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch):
        clips += pipe(prompts[i : i + batch], generator=gen, **call).frames
    if strip:
        shown = list(STRIP_PROMPTS)
        save_strip(pipe(shown, generator=torch.Generator().manual_seed(seed), **call).frames, shown, strip)
    return score_clips(clips, prompts)


def override_config(cfg: VideoConfig, pairs: list[str]) -> None:
    """Apply ``FIELD=VALUE`` overrides, parsed by the field's current type (tuples comma-separated)."""
    for pair in pairs:
        name, _, raw = pair.partition("=")
        if not hasattr(cfg, name):
            raise SystemExit(f"unknown VideoConfig field {name!r}")
        cur = getattr(cfg, name)
        if isinstance(cur, bool):
            val = raw.lower() in ("1", "true", "yes")
        elif isinstance(cur, tuple):
            val = tuple(int(v) for v in raw.split(","))
        else:
            val = type(cur)(raw)
        setattr(cfg, name, val)


def train_video_main(argv: list[str] | None = None) -> int:
    """Train the tiny video DiT + CLIP text encoder with rectified flow; save, reload, grade."""
    from backends.tiny.image_models import drop_prompts, ema_update, folder_mb, lr_at, tiny_clip_text_model, write_report
    from backends.tiny.video_pipeline import ShapesVideoPipeline

    cfg = VideoConfig()
    p = argparse.ArgumentParser(prog="shapes-video", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--out", type=Path, default=VIDEO_DIR)
    p.add_argument("--strip", default="/tmp/video_strip.png")
    p.add_argument("--eval-n", type=int, default=48)
    p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints saved to --out")
    p.add_argument("--init", type=Path, default=None, help="continue from a saved tiny-video folder")
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="override VideoConfig fields, e.g. --set heads=3 ffn_dim=384 patch_size=1,4,4")
    args = p.parse_args(argv)
    cfg.minutes = args.minutes
    override_config(cfg, args.set)
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    tok = build_video_tokenizer()
    text = tiny_clip_text_model(len(tok), cfg.text_width)
    dit = make_tiny_wan(cfg)
    if args.init:
        init = ShapesVideoPipeline.from_pretrained(args.init)
        dit, text = init.transformer, init.text_encoder
    t0 = time.time()
    n_pool = cfg.pool_size if cfg.minutes >= 2 else 256
    pool, prompts = render_pool(n_pool, cfg.seed)
    print(f"rendered {n_pool} clips in {time.time() - t0:.0f}s", flush=True)
    # pixel space, not the shared VAE: at 32x32 its reconstructions blur the shapes so much
    # that circle/triangle can no longer be told apart (checker: shape 50% on reconstructions)

    ema_dit, ema_text = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": dit.parameters(), "lr": cfg.lr, "base": cfg.lr},
        {"params": text.parameters(), "lr": cfg.text_lr, "base": cfg.text_lr},
    ], weight_decay=0.01)
    params = [q for g in opt.param_groups for q in g["params"]]

    def save(path: Path) -> None:
        build_pipeline(ema_dit, ema_text, tok, cfg.prediction, cfg.sample_shift).save_pretrained(path)

    t0, step, budget, est_total, losses = time.time(), 0, cfg.minutes * 60, cfg.max_steps, []
    last_save = t0
    while step < cfg.max_steps and time.time() - t0 < budget:
        if step == 20:  # steps that fit the budget, so the cosine decay ends on time
            est_total = min(cfg.max_steps, int(budget / ((time.time() - t0) / 20)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, est_total, g["base"])
        idx = torch.randint(0, n_pool, (cfg.batch_size,))
        x0 = pool[idx].float() / 127.5 - 1.0
        ids = tok(drop_prompts([prompts[i] for i in idx], rng, cfg.p_uncond), padding="max_length",
                  max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
        cond = text(ids)[0]
        sigma = torch.sigmoid(torch.randn(cfg.batch_size) + cfg.sigma_shift)  # logit-normal around mid-high noise
        if cfg.sigma_high_frac:  # drawn only when on: the default run's random stream stays the shipped model's
            high = torch.rand(cfg.batch_size) < cfg.sigma_high_frac
            sigma = torch.where(high, 0.9 + 0.1 * torch.rand(cfg.batch_size), sigma)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = dit(hidden_states=xt, timestep=sigma * 1000, encoder_hidden_states=cond, return_dict=False)[0]
        if cfg.prediction == "sample":
            # loss on the clean clip, weighted 1 + min(SNR, 5): a pure velocity loss (weight 1/sigma^2)
            # spent everything on low noise, and sampling from pure noise ignored the prompt
            snr = ((1 - s) / s.clamp(min=0.02)) ** 2
            loss = ((1 + snr.clamp(max=5.0)) * (pred - x0) ** 2).mean()
        else:
            loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_dit, dit, cfg.ema_decay if step > 100 else 0.0)
        ema_update(ema_text, text, cfg.ema_decay if step > 100 else 0.0)
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"video step {step}/{est_total} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if time.time() - last_save > args.save_every * 60:
            save(args.out)
            last_save = time.time()
            print(f"checkpoint at step {step} -> {args.out}", flush=True)
        step += 1
    train_s = time.time() - t0
    save(args.out)

    pipe = ShapesVideoPipeline.from_pretrained(args.out)  # grade exactly what users load
    pipe.set_progress_bar_config(disable=True)
    t1 = time.time()
    scores = evaluate_video_pipeline(pipe, VIDEO_CALL, n=args.eval_n, strip=args.strip)
    rng_clean = random.Random(123)
    clean_specs = [random_clip_spec(rng_clean) for _ in range(256)]
    clean = score_clips([render_clip(s, rng=rng_clean) for s in clean_specs], [clip_prompt(s) for s in clean_specs])
    write_report(args.out, dict(
        recipe="shapes-video", config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        steps=step, minutes=round(train_s / 60, 2), samples_seen=step * cfg.batch_size,
        final_loss=round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5),
        denoiser_params=sum(q.numel() for q in ema_dit.parameters()),
        text_params=sum(q.numel() for q in ema_text.parameters()),
        eval_call=VIDEO_CALL, eval_samples=args.eval_n, scores=scores, clean_clip_scores=clean,
        eval_seconds=round(time.time() - t1, 1), folder_mb=folder_mb(args.out),
    ))
    return 0
