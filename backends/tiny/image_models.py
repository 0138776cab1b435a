"""Recipes for the bundled offline image models: a tiny Stable Diffusion and a tiny Flux.

Both are *real* diffusers pipeline folders (``DiffusionPipeline.from_pretrained`` loads
them offline), trained on CPU in minutes on the closed "shapes" world of
``backends.tiny.shapes``. They exist so that acceleration methods (DeepCache, block
caches, fewer steps) can be measured on genuine ``UNet2DConditionModel`` /
``FluxTransformer2DModel`` graphs, with prompt adherence graded by the shapes checker.

Order (one process at a time; each reads the previous one's output):

    python -m backends.tiny.train shapes-vae   --minutes 5    # assets/shapes-vae
    python -m backends.tiny.train shapes-unet  --minutes 25   # assets/tiny-sd-shapes
    python -m backends.tiny.train shapes-dit   --minutes 25   # assets/tiny-flux-shapes
    python -m backends.tiny.train shapes-unet --size small --minutes 12   # assets/tiny-sd-shapes-small

- VAE: ``AutoencoderKL`` with 2x downsampling, 64x64x3 -> 32x32x4; shared by both.
- SD: UNet (32, 64, 128) with cross-attention at 8x8 and the mid block plus the prompt,
  attention-pooled, added to the time embedding (``addition_embed_type="text"``), so
  every ResNet block sees it; v-prediction on a cosine schedule, DDIM; a tiny
  ``CLIPTextModel`` trained jointly with it.
- SD small (T-Stitch's sibling): the same UNet at half the width (16, 32, 64), ~4x fewer
  FLOPs per step, trained on the same latents and schedule with tiny-sd-shapes' text encoder
  frozen (so both UNets read the same prompt embeddings); 3/4 of its samples at t >= 400,
  the early steps it runs.
- Flux: 2 double + 4 single blocks, width 64 (256 image tokens), rectified flow; tiny CLIP (pooled) + tiny T5
  trained jointly. ``guidance_embeds=False``: guidance is true CFG with an empty negative.
- Tokenizers are built from the closed prompt vocabulary (one token per word); the text
  encoders' word embeddings start at N(0, 1) (see ``tiny_clip_text_model``).
- 10% of training prompts are dropped to "" so classifier-free guidance works.

The calls that work (diffusers 0.42.1)::

    pipe = DiffusionPipeline.from_pretrained("assets/tiny-sd-shapes")      # StableDiffusionPipeline
    pipe(prompt, num_inference_steps=25, guidance_scale=4.0, generator=g)  # 64x64 by default

    pipe = DiffusionPipeline.from_pretrained("assets/tiny-flux-shapes")    # FluxPipeline
    pipe(prompt, num_inference_steps=25, true_cfg_scale=4.0, negative_prompt="",
         height=64, width=64, max_sequence_length=16, generator=g)

Flux needs three explicit arguments. ``height``/``width``: FluxPipeline hard-codes
``default_sample_size = 128`` (so 256x256 with this 2x VAE, 4096 tokens: not the training
size). ``max_sequence_length``: the default 512 pads the T5 prompt to 512 tokens, which the
model never saw (16 = ``tokenizer_2.model_max_length``). ``true_cfg_scale > 1`` with a
``negative_prompt`` (``""`` counts) turns on real CFG: with ``guidance_embeds=False`` the
pipeline's ``guidance_scale`` is ignored. True CFG runs the transformer twice per step
(batch 1 each, cond then uncond), not one batch of 2.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backends.tiny.shapes import (
    ASSETS,
    VOCAB,
    all_specs,
    image_to_tensor,
    prompt_for,
    random_spec,
    render,
    score_images,
)

VAE_DIR = ASSETS / "shapes-vae"
SD_DIR = ASSETS / "tiny-sd-shapes"
FLUX_DIR = ASSETS / "tiny-flux-shapes"
MAX_TOKENS = 16  # "<bos> a red circle at top left on white <eos>" is 10 tokens

# The calls that work (documented in the pipelines' training_report.json as well).
SD_CALL = dict(num_inference_steps=25, guidance_scale=4.0)
FLUX_CALL = dict(
    num_inference_steps=25, true_cfg_scale=4.0, negative_prompt="", height=64, width=64, max_sequence_length=MAX_TOKENS
)


# ----------------------------------------------------------------------------- shared bits


def _words() -> list[str]:
    words = {w for ws in VOCAB.values() for phrase in ws for w in phrase.split()}
    return sorted(words | {"a", "at", "on"})


def build_clip_tokenizer():
    """A ``CLIPTokenizer`` that spells every prompt word as one token."""
    from backends.tiny.word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(_words(), MAX_TOKENS)


def build_t5_tokenizer():
    """A ``T5TokenizerFast`` (a Unigram ``tokenizer.json``): each word is one piece, characters are a fallback."""
    from transformers import T5TokenizerFast

    words, chars = _words(), sorted({c for w in _words() for c in w})
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, 0.0) for w in words] + [("\u2581", -5.0)] + [(c, -10.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def tiny_clip_text_model(vocab_size: int, width: int = 64, token_std: float = 1.0):
    """A 2-layer CLIP text encoder whose word embeddings start large (``token_std``).

    CLIP initialises token and position embeddings alike (std 0.02): after two pre-LN
    layers the hidden states of "top left" and "bottom right" prompts then differed by
    ~5% and, trained jointly, the denoisers learned colour but never position or shape.
    With N(0, 1) word embeddings (``nn.Embedding``'s own default) each word dominates its
    token's hidden state from the first step.
    """
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,  # pooled output = hidden state at the first <eos>
    )
    model = CLIPTextModel(cfg)
    torch.nn.init.normal_(model.get_input_embeddings().weight, std=token_std)
    return model


def tiny_t5_encoder(vocab_size: int, width: int = 64):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size, d_model=width, d_kv=width // 2, d_ff=2 * width, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, dropout_rate=0.0,
    )
    return T5EncoderModel(cfg)


def make_tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,  # 32x32 = 1024-token attention would dominate CPU time
        scaling_factor=1.0, shift_factor=0.0,  # scaling set from the data after training
    )


def render_batch(specs, rng: random.Random, size: int = 64) -> torch.Tensor:
    return torch.stack([image_to_tensor(render(s, size, rng), size) for s in specs])


@torch.no_grad()
def encode_pool(vae, n: int, seed: int = 0, batch: int = 128, cache: Path | None = None) -> tuple[torch.Tensor, list[str]]:
    """Pre-encode ``n`` jittered renders to scaled latents (the denoisers train on this pool).

    With ``cache`` (a file), the pool is reused by the next recipe: encoding costs minutes on a busy CPU.
    """
    if cache is not None and cache.exists():
        saved = torch.load(cache)
        return saved["z"], saved["prompts"]
    z, prompts = _encode_pool(vae, n, seed, batch)
    if cache is not None:
        torch.save({"z": z, "prompts": prompts}, cache)
    return z, prompts


def _pool_cache(vae_dir: Path, n: int, seed: int) -> Path:
    weights = Path(vae_dir) / "diffusion_pytorch_model.safetensors"
    return Path("/tmp") / f"shapes_pool_{n}_{seed}_{int(weights.stat().st_mtime)}.pt"


@torch.no_grad()
def _encode_pool(vae, n: int, seed: int, batch: int) -> tuple[torch.Tensor, list[str]]:
    rng = random.Random(seed)
    specs = [random_spec(rng) for _ in range(n)]
    lat = []
    for i in range(0, n, batch):
        x = render_batch(specs[i : i + batch], rng)
        lat.append(vae.encode(x).latent_dist.mode())
    z = torch.cat(lat) * vae.config.scaling_factor
    return z, [prompt_for(s) for s in specs]


def lr_at(step: int, total: int, base: float, warmup: int = 50, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def drop_prompts(prompts: list[str], rng: random.Random, p: float) -> list[str]:
    return ["" if rng.random() < p else q for q in prompts]


def save_grid(images, prompts, path: str | Path, cols: int = 4) -> None:
    """4x4 grid with each prompt written under its image (2x upscaled for legibility)."""
    from PIL import Image, ImageDraw

    s, pad = 128, 26
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * s, rows * (s + pad)), (128, 128, 128))
    draw = ImageDraw.Draw(grid)
    for i, (img, p) in enumerate(zip(images, prompts)):
        x, y = (i % cols) * s, (i // cols) * (s + pad)
        grid.paste(img.resize((s, s), Image.NEAREST), (x, y))
        words = p.removeprefix("a ").split(" at ")
        draw.text((x + 2, y + s + 1), words[0], fill=(0, 0, 0))
        draw.text((x + 2, y + s + 13), words[-1] if len(words) > 1 else "", fill=(0, 0, 0))
    grid.save(path)


def eval_prompts(n: int = 64, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    specs = all_specs()
    rng.shuffle(specs)
    return [prompt_for(specs[i % len(specs)]) for i in range(n)]


@torch.no_grad()
def evaluate_pipeline(pipe, call: dict, n: int = 64, batch: int = 16, seed: int = 0, grid: str | None = None) -> dict:
    """Generate ``n`` images (fixed prompts and seed) and grade them with the shapes checker."""
    prompts, images = eval_prompts(n), []
    gen = torch.Generator().manual_seed(seed)
    for i in range(0, n, batch):
        chunk = prompts[i : i + batch]
        kw = dict(call)
        if "negative_prompt" in kw:
            kw["negative_prompt"] = [kw["negative_prompt"]] * len(chunk)
        images += pipe(chunk, generator=gen, **kw).images
    if grid:
        save_grid(images[:16], prompts[:16], grid)
    return score_images(images, prompts)


def write_report(out: Path, report: dict) -> None:
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)


def folder_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)


# ----------------------------------------------------------------------------- VAE


@dataclass
class VAEConfig:
    minutes: float = 5.0
    max_steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    kl_weight: float = 1e-6
    seed: int = 0


def train_vae_main(argv: list[str] | None = None) -> int:
    """Train the shared 2x AutoencoderKL on renders (L1 + MSE, tiny KL); set scaling_factor = 1/std."""
    cfg = VAEConfig()
    p = argparse.ArgumentParser(prog="shapes-vae")
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--out", type=Path, default=VAE_DIR)
    args = p.parse_args(argv)
    cfg.minutes = args.minutes
    torch.set_num_threads(int(os.environ.get("FASTGEN_TRAIN_THREADS", "1")))  # 1: trainings share the CPU
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    vae = make_tiny_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    t0, step, budget = time.time(), 0, cfg.minutes * 60
    est_total = cfg.max_steps
    while step < cfg.max_steps and time.time() - t0 < budget:
        if step == 20:  # estimate how many steps fit the budget, so the cosine decay ends on time
            est_total = min(cfg.max_steps, int(budget / ((time.time() - t0) / 20)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, est_total, cfg.lr, warmup=50)
        x = render_batch([random_spec(rng) for _ in range(cfg.batch_size)], rng)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        loss = rec_loss + cfg.kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"vae step {step}/{est_total} rec {rec_loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        step += 1
    vae.eval()
    z, _ = encode_pool(vae, 1024, seed=99)
    std = z.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    with torch.no_grad():
        x = render_batch([random_spec(rng) for _ in range(64)], rng)
        mse = F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x).item()
    args.out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(args.out)
    report = dict(recipe="shapes-vae", config=asdict(cfg), steps=step, minutes=round((time.time() - t0) / 60, 2),
                  final_rec_loss=round(rec_loss.item(), 5), heldout_mse=round(mse, 5),
                  latent_mean=round(z.mean().item(), 4), latent_std=round(std, 4),
                  scaling_factor=vae.config.scaling_factor, params=sum(p.numel() for p in vae.parameters()))
    write_report(args.out, report)
    return 0


def load_vae(path: Path = VAE_DIR):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)


# ----------------------------------------------------------------------------- SD (UNet)


@dataclass
class UNetConfig:
    minutes: float = 25.0
    max_steps: int = 20000
    batch_size: int = 48
    lr: float = 2e-3
    text_lr: float = 1e-3
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    pool_size: int = 8192
    block_out_channels: tuple = (32, 64, 128)
    cross_attention_dim: int = 64
    text_film: bool = True
    # size "small": the T-Stitch sibling (half the channels, ~4x fewer FLOPs per step), trained
    # on the same latents, schedule and (frozen) text encoder as the full model
    size: str = "full"
    # share of training timesteps drawn from the high-noise range [high_noise_t, 999]; the rest
    # uniform. 0 for the full model; the sibling only runs the early (high-noise) steps.
    high_noise_share: float = 0.0
    high_noise_t: int = 400
    seed: int = 0


# The smaller sibling of tiny-sd-shapes (T-Stitch): same layout, half the width per block.
SMALL_UNET_CHANNELS = (16, 32, 64)
SD_SMALL_DIR = ASSETS / "tiny-sd-shapes-small"


def make_tiny_unet(cfg: UNetConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=cfg.block_out_channels,
        # cross-attention at 8x8 and in the mid block only (16x16 costs ~1.5x per step)
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=32, norm_num_groups=16,
        # The prompt, attention-pooled, is added to the time embedding, so every ResNet block at
        # every resolution is conditioned on it (FiLM). With cross-attention at 8x8 only, the
        # model learned colour but not shape or position in ~1,400 CPU steps.
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=2) if cfg.text_film else {}),
    )


def load_unet_into(cfg, folder: Path, build=None):
    """Continue from a saved UNet (built by ``build(cfg)``, default ``make_tiny_unet``),
    adding the prompt-to-time-embedding path if it lacks one.

    The new path starts silent (its output LayerNorm zeroed), so the loaded model's behaviour
    is unchanged at step 0 and training grows the new conditioning from there.
    """
    from diffusers import UNet2DConditionModel

    old = UNet2DConditionModel.from_pretrained(folder)
    if old.config.get("addition_embed_type") == ("text" if cfg.text_film else None):
        return old
    unet = (build or make_tiny_unet)(cfg)
    missing, unexpected = unet.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("add_embedding.") for k in missing), (missing, unexpected)
    if cfg.text_film:
        torch.nn.init.zeros_(unet.add_embedding.norm2.weight)
        torch.nn.init.zeros_(unet.add_embedding.norm2.bias)
    return unet


def make_ddim_scheduler():
    from diffusers import DDIMScheduler

    # cosine schedule reaches ~zero SNR at t=999; v-prediction keeps that end well posed
    return DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
    )


def _clip_ids(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids


def _denoiser_args(prog: str, cfg, out: Path, grid: str, what: str, argv: list[str] | None):
    """The options both denoiser recipes take; also sets threads and the seed."""
    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--out", type=Path, default=out)
    p.add_argument("--vae", type=Path, default=VAE_DIR)
    p.add_argument("--grid", default=grid)
    p.add_argument("--init", type=Path, default=None, help=f"continue from a saved {what} folder")
    p.add_argument("--eval-n", type=int, default=64)
    args = p.parse_args(argv)
    cfg.minutes = args.minutes
    torch.set_num_threads(int(os.environ.get("FASTGEN_TRAIN_THREADS", "1")))  # 1: trainings share the CPU
    torch.manual_seed(cfg.seed)
    return args


def _size_args(argv: list[str] | None) -> tuple[str, list[str]]:
    """Split ``--size {full,small}`` off the recipe's arguments (the other options are shared)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--size", choices=("full", "small"), default="full")
    known, rest = p.parse_known_args(argv)
    return known.size, rest


def _apply_size(cfg: UNetConfig, size: str) -> None:
    """The small sibling: half the channels; 3/4 of its samples at high noise, where T-Stitch runs it."""
    cfg.size = size
    if size == "small":
        cfg.block_out_channels = SMALL_UNET_CHANNELS
        cfg.minutes = 12.0
        cfg.high_noise_share = 0.75


def _sample_timesteps(cfg: UNetConfig, n: int) -> torch.Tensor:
    t = torch.randint(0, 1000, (n,))
    if cfg.high_noise_share > 0:
        high = torch.rand(n) < cfg.high_noise_share
        t = torch.where(high, torch.randint(cfg.high_noise_t, 1000, (n,)), t)
    return t


def train_unet_main(argv: list[str] | None = None) -> int:
    """Train the tiny SD: UNet + CLIP text encoder on VAE latents, then save, reload and grade.

    ``--size small`` trains the T-Stitch sibling instead: a narrower UNet on the same latents and
    schedule, conditioned by the full model's text encoder, frozen (from tiny-sd-shapes), so both
    UNets read the same prompt embeddings and can be stitched mid-trajectory.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    size, argv = _size_args(argv)
    cfg = UNetConfig()
    _apply_size(cfg, size)
    small = size == "small"
    args = _denoiser_args("shapes-unet", cfg, SD_SMALL_DIR if small else SD_DIR,
                          "/tmp/grid_sd_small.png" if small else "/tmp/grid_sd.png", "tiny-sd", argv)
    rng = random.Random(cfg.seed)

    vae = load_vae(args.vae)
    tok = build_clip_tokenizer()
    text = tiny_clip_text_model(len(tok), cfg.cross_attention_dim)
    if small:  # the full model's prompt encoding, frozen
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(SD_DIR / "tokenizer")
        text = CLIPTextModel.from_pretrained(SD_DIR / "text_encoder").eval().requires_grad_(False)
    unet = make_tiny_unet(cfg)
    prior_steps, prior_s = 0, 0.0
    if args.init:  # continue training (e.g. when a busy CPU cut the first run short)
        from transformers import CLIPTextModel

        unet = load_unet_into(cfg, args.init / "unet")
        prior_steps, prior_s = _prior_training(args.init)
        text = CLIPTextModel.from_pretrained(args.init / "text_encoder")
    sched = make_ddim_scheduler()
    t0 = time.time()
    n_pool = cfg.pool_size if cfg.minutes >= 2 else 512
    z, prompts = encode_pool(vae, n_pool, seed=cfg.seed, cache=_pool_cache(args.vae, n_pool, cfg.seed))
    print(f"encoded {len(z)} latents in {time.time() - t0:.0f}s, std {z.std():.3f}", flush=True)

    unet.to(memory_format=torch.channels_last)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": cfg.lr, "base": cfg.lr},
        *([{"params": text.parameters(), "lr": cfg.text_lr, "base": cfg.text_lr}] if not small else []),
    ], weight_decay=0.01)
    t0, step, budget, est_total, losses = time.time(), 0, cfg.minutes * 60, cfg.max_steps, []
    while step < cfg.max_steps and time.time() - t0 < budget:
        if step == 20:
            est_total = min(cfg.max_steps, int(budget / ((time.time() - t0) / 20)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, est_total, g["base"], warmup=20 if args.init else 50)
        idx = torch.randint(0, len(z), (cfg.batch_size,))
        x0 = z[idx]
        with torch.set_grad_enabled(not small):
            cond = text(_clip_ids(tok, drop_prompts([prompts[i] for i in idx], rng, cfg.p_uncond)))[0]
        t = _sample_timesteps(cfg, cfg.batch_size)
        noise = torch.randn_like(x0)
        xt = sched.add_noise(x0, noise, t)  # sqrt(a) x0 + sqrt(1 - a) noise
        v = sched.get_velocity(x0, noise, t)  # the v-prediction target
        pred = unet(xt.contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        ema_update(ema_unet, unet, cfg.ema_decay if step > 100 else 0.0)
        if not small:
            ema_update(ema_text, text, cfg.ema_decay if step > 100 else 0.0)
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"unet step {step}/{est_total} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        step += 1
    train_s = time.time() - t0

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=ema_text, tokenizer=tok, unet=ema_unet.to(memory_format=torch.contiguous_format),
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(args.out)
    finish_report(args, "shapes-unet", cfg, step + prior_steps, train_s + prior_s, losses, SD_CALL,
                  params=sum(p.numel() for p in ema_unet.parameters()))
    return 0


def _prior_training(folder: Path) -> tuple[int, float]:
    """Steps and seconds already in a folder we continue from (so the report counts the total)."""
    try:
        rep = json.loads((Path(folder) / "training_report.json").read_text())
        return int(rep["steps"]), float(rep["minutes"]) * 60
    except (OSError, KeyError, ValueError):
        return 0, 0.0


def finish_report(args, recipe: str, cfg, step: int, train_s: float, losses: list[float], call: dict, params: int) -> None:
    """Reload the saved folder exactly as users will, grade 64 samples, write training_report.json."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(args.out)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    scores = evaluate_pipeline(pipe, call, n=args.eval_n, grid=args.grid)
    write_report(args.out, dict(
        recipe=recipe, config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        steps=step, minutes=round(train_s / 60, 2), samples_seen=step * cfg.batch_size,
        final_loss=round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5), denoiser_params=params,
        eval_call={k: v for k, v in call.items()}, eval_samples=args.eval_n, scores=scores,
        eval_seconds=round(time.time() - t0, 1), folder_mb=folder_mb(args.out),
    ))


# ----------------------------------------------------------------------------- Flux (DiT)


@dataclass
class DiTConfig:
    minutes: float = 25.0
    max_steps: int = 20000
    batch_size: int = 24  # on a shared CPU, more updates beat bigger batches
    lr: float = 1.5e-3
    text_lr: float = 1e-3
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    pool_size: int = 8192
    num_layers: int = 2  # double-stream (MMDiT) blocks
    num_single_layers: int = 4
    # width 64: at 128 a step cost ~3x more (256 image tokens) and the DiT saw too few samples
    heads: int = 2
    head_dim: int = 32
    text_width: int = 64
    seed: int = 0


def make_tiny_flux_transformer(cfg: DiTConfig):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=cfg.num_layers, num_single_layers=cfg.num_single_layers,
        attention_head_dim=cfg.head_dim, num_attention_heads=cfg.heads,
        joint_attention_dim=cfg.text_width, pooled_projection_dim=cfg.text_width, guidance_embeds=False,
        axes_dims_rope=(4, 14, 14),  # (text index, row, col): most of the rotary budget goes to 2-D position
    )


def make_flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def train_dit_main(argv: list[str] | None = None) -> int:
    """Train the tiny Flux: transformer + CLIP (pooled) + T5 with rectified flow, then save, reload and grade."""
    from diffusers import FluxPipeline

    cfg = DiTConfig()
    args = _denoiser_args("shapes-dit", cfg, FLUX_DIR, "/tmp/grid_flux.png", "tiny-flux", argv)
    rng = random.Random(cfg.seed)

    vae = load_vae(args.vae)
    tok, tok2 = build_clip_tokenizer(), build_t5_tokenizer()
    clip = tiny_clip_text_model(len(tok), cfg.text_width)
    t5 = tiny_t5_encoder(len(tok2), cfg.text_width)
    dit = make_tiny_flux_transformer(cfg)
    prior_steps, prior_s = 0, 0.0
    if args.init:
        from diffusers import FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        dit = FluxTransformer2DModel.from_pretrained(args.init / "transformer")
        prior_steps, prior_s = _prior_training(args.init)
        clip = CLIPTextModel.from_pretrained(args.init / "text_encoder")
        t5 = T5EncoderModel.from_pretrained(args.init / "text_encoder_2")
    t0 = time.time()
    n_pool = cfg.pool_size if cfg.minutes >= 2 else 512
    z, prompts = encode_pool(vae, n_pool, seed=cfg.seed, cache=_pool_cache(args.vae, n_pool, cfg.seed))
    print(f"encoded {len(z)} latents in {time.time() - t0:.0f}s", flush=True)
    _, c, h, w = z.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32)
    txt_ids = torch.zeros(MAX_TOKENS, 3)

    ema = [copy.deepcopy(m).requires_grad_(False) for m in (dit, clip, t5)]
    opt = torch.optim.AdamW([
        {"params": dit.parameters(), "lr": cfg.lr, "base": cfg.lr},
        {"params": list(clip.parameters()) + list(t5.parameters()), "lr": cfg.text_lr, "base": cfg.text_lr},
    ], weight_decay=0.01)
    params = [q for g in opt.param_groups for q in g["params"]]
    t0, step, budget, est_total, losses = time.time(), 0, cfg.minutes * 60, cfg.max_steps, []
    while step < cfg.max_steps and time.time() - t0 < budget:
        if step == 20:
            est_total = min(cfg.max_steps, int(budget / ((time.time() - t0) / 20)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, est_total, g["base"])
        idx = torch.randint(0, len(z), (cfg.batch_size,))
        x0 = z[idx]
        batch_prompts = drop_prompts([prompts[i] for i in idx], rng, cfg.p_uncond)
        # exactly what FluxPipeline.encode_prompt does: CLIP pooled + T5 last hidden state
        pooled = clip(_clip_ids(tok, batch_prompts)).pooler_output
        t5_ids = tok2(batch_prompts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                      return_tensors="pt").input_ids
        seq = t5(t5_ids)[0]
        sigma = torch.sigmoid(torch.randn(cfg.batch_size))  # logit-normal: most steps at mid noise
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        packed = FluxPipeline._pack_latents(xt, cfg.batch_size, c, h, w)
        pred = dit(hidden_states=packed, timestep=sigma, guidance=None, pooled_projections=pooled,
                   encoder_hidden_states=seq, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        target = FluxPipeline._pack_latents(noise - x0, cfg.batch_size, c, h, w)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for e, m in zip(ema, (dit, clip, t5)):
            ema_update(e, m, cfg.ema_decay if step > 100 else 0.0)
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"dit step {step}/{est_total} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        step += 1
    train_s = time.time() - t0

    pipe = FluxPipeline(scheduler=make_flow_scheduler(), vae=vae, text_encoder=ema[1], tokenizer=tok,
                        text_encoder_2=ema[2], tokenizer_2=tok2, transformer=ema[0])
    pipe.save_pretrained(args.out)
    finish_report(args, "shapes-dit", cfg, step + prior_steps, train_s + prior_s, losses, FLUX_CALL,
                  params=sum(p.numel() for p in ema[0].parameters()))
    return 0
