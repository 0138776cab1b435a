"""Recipe of the bundled offline audio model: a tiny text-to-spectrogram UNet ("tiny-audio-synth").

    python -m backends.tiny.train synth-audio-classifier --minutes 4   # assets/audio-classifier
    python -m backends.tiny.train synth-audio --minutes 20             # assets/tiny-audio-synth

- Data: ``backends.tiny.audio_data`` synthesises ~1 s clips (tones, chords, arpeggios,
  drum patterns, noise) with their prompts; the model learns their 64-mel x 64-frame
  log-mel spectrograms, pixel space (no VAE), plus a constant mel-position channel.
- Model: ``UNet2DConditionModel`` with four levels (64, 32, 16, 8 px) and skip
  connections (so DeepCache's shallow branch is the cheap 64x64 level), cross-attention at
  8x8 and in the mid block on a tiny ``CLIPTextModel`` trained jointly with it; the
  tokenizer is built from the closed prompt vocabulary (one token per word).
- Training: v-prediction on a cosine schedule (as the tiny SD), AdamW with warm-up and
  cosine decay, EMA; 10% prompts dropped for classifier-free guidance. Sampling: DDIM.
- Output: ``SynthAudioPipeline`` (``backends.tiny.audio_pipeline``), Griffin-Lim vocoder.
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

from backends.tiny import audio_data as ad
from backends.tiny.audio_pipeline import unet_input
from backends.tiny.image_models import (
    drop_prompts,
    ema_update,
    folder_mb,
    load_unet_into,
    lr_at,
    make_ddim_scheduler,
    tiny_clip_text_model,
    write_report,
)

AUDIO_DIR = ad.ASSETS / "tiny-audio-synth"
MAX_TOKENS = 16  # "<bos> a high major arpeggio going up on a square wave <eos>" is 12 tokens
AUDIO_CALL = dict(num_inference_steps=25, guidance_scale=3.0)


def build_word_tokenizer(words: list[str], max_tokens: int = MAX_TOKENS):
    """A ``CLIPTokenizer`` that spells each of ``words`` as one token (shared builder)."""
    from backends.tiny.word_tokenizer import build_word_tokenizer as build

    return build(words, max_tokens)


def build_audio_tokenizer():
    return build_word_tokenizer(ad.prompt_words())


@dataclass
class AudioUNetConfig:
    minutes: float = 20.0
    max_steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-3
    text_lr: float = 1e-3
    ema_decay: float = 0.995
    p_uncond: float = 0.1
    pool_size: int = 4096
    block_out_channels: tuple = (16, 32, 64, 128)
    cross_attention_dim: int = 64
    text_film: bool = True  # prompt added to the time embedding (see image_models.make_tiny_unet)
    seed: int = 0


def make_audio_unet(cfg: AudioUNetConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=ad.N_MELS, in_channels=2, out_channels=1, layers_per_block=1,
        block_out_channels=cfg.block_out_channels,
        # cross-attention at 8x8 and in the mid block only: self-attention over the 256
        # tokens of the 16x16 level cost ~45% of a training step on CPU
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=cfg.cross_attention_dim, attention_head_dim=32, norm_num_groups=8,
        **(dict(addition_embed_type="text", addition_embed_type_num_heads=2) if cfg.text_film else {}),
    )


def make_pipeline(unet, text_encoder, tokenizer, scheduler=None):
    from backends.tiny.audio_pipeline import SynthAudioPipeline

    return SynthAudioPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                              scheduler=scheduler or make_ddim_scheduler())


def save_pipeline(unet, text_encoder, tokenizer, scheduler, out: Path) -> None:
    unet = copy.deepcopy(unet).to(memory_format=torch.contiguous_format)
    make_pipeline(unet, text_encoder, tokenizer, scheduler).save_pretrained(out)


@torch.no_grad()
def spectrogram_pool(n: int, seed: int, batch: int = 256) -> tuple[torch.Tensor, list[str]]:
    """``n`` synthesised clips as scaled log-mels [n, 1, 64, 64] with their prompts (cached in /tmp)."""
    cache = Path("/tmp") / f"audio_pool_{n}_{seed}_v1.pt"
    if cache.exists():
        saved = torch.load(cache)
        return saved["x"], saved["prompts"]
    rng = random.Random(seed)
    specs = [ad.random_spec(rng) for _ in range(n)]
    x = torch.cat([ad.audio_to_spec(ad.synth_batch(specs[i : i + batch], rng)) for i in range(0, n, batch)])
    prompts = [ad.prompt_for(s) for s in specs]
    torch.save({"x": x, "prompts": prompts}, cache)
    return x, prompts


def _ids(tok, prompts: list[str]) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def eval_prompts(n: int = 64, seed: int = 1234) -> list[str]:
    """Covers every spec once before repeating (67 specs)."""
    specs = ad.all_specs()
    random.Random(seed).shuffle(specs)
    return [ad.prompt_for(specs[i % len(specs)]) for i in range(n)]


@torch.no_grad()
def generate(pipe, prompts: list[str], call: dict, batch: int = 16, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    out = [pipe(prompts[i : i + batch], generator=gen, **call).audios for i in range(0, len(prompts), batch)]
    return np.concatenate(out)


def save_spectrograms(waves: np.ndarray, prompts: list[str], path: str | Path) -> None:
    """Spectrogram pictures: generated clips on top (prompt as title), a clean synthesis of
    the same prompt below for reference; low frequencies at the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = random.Random(0)
    refs = np.stack([ad.synthesize(ad.parse_prompt(p), rng) for p in prompts])
    rows = [("generated", ad.audio_to_spec(waves)[:, 0].numpy()), ("clean synth", ad.audio_to_spec(refs)[:, 0].numpy())]
    fig, axes = plt.subplots(2, len(waves), figsize=(3.2 * len(waves), 6.4), squeeze=False)
    for r, (label, spec) in enumerate(rows):
        for ax, s, p in zip(axes[r], spec, prompts):
            ax.imshow(s, origin="lower", aspect="auto", cmap="magma", vmin=-1, vmax=1.2)
            words = p.split()
            title = " ".join(words[:5]) + ("\n" + " ".join(words[5:]) if len(words) > 5 else "")
            ax.set_title(f"{label}: {title}" if r == 0 else label, fontsize=8)
            ax.set_xlabel("frame")
            ax.set_ylabel("mel band")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def train_audio_main(argv: list[str] | None = None) -> int:
    """Train the tiny spectrogram UNet + CLIP text encoder, save the pipeline, reload it and grade it."""
    cfg = AudioUNetConfig()
    p = argparse.ArgumentParser(prog="synth-audio")
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--max-steps", type=int, default=cfg.max_steps)
    p.add_argument("--out", type=Path, default=AUDIO_DIR)
    p.add_argument("--init", type=Path, default=None, help="continue from a saved tiny-audio-synth folder")
    p.add_argument("--eval-n", type=int, default=64)
    p.add_argument("--spec-png", default="/tmp/audio_spec.png")
    p.add_argument("--checkpoint-minutes", type=float, default=5.0,
                   help="save the EMA pipeline this often, so a cut-short run still leaves a model")
    args = p.parse_args(argv)
    cfg.minutes, cfg.max_steps = args.minutes, args.max_steps
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    tok = build_audio_tokenizer()
    text = tiny_clip_text_model(len(tok), cfg.cross_attention_dim)
    unet = make_audio_unet(cfg)
    if args.init:
        from transformers import CLIPTextModel

        unet = load_unet_into(cfg, args.init / "unet", make_audio_unet)
        text = CLIPTextModel.from_pretrained(args.init / "text_encoder")
    sched = make_ddim_scheduler()
    t0 = time.time()
    n_pool = cfg.pool_size if cfg.minutes >= 2 else 256
    x_pool, prompts = spectrogram_pool(n_pool, cfg.seed)
    print(f"pool of {len(x_pool)} spectrograms in {time.time() - t0:.0f}s, mean {x_pool.mean():.3f} "
          f"std {x_pool.std():.3f}", flush=True)

    unet.to(memory_format=torch.channels_last)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text).requires_grad_(False)
    opt = torch.optim.AdamW([
        {"params": unet.parameters(), "lr": cfg.lr, "base": cfg.lr},
        {"params": text.parameters(), "lr": cfg.text_lr, "base": cfg.text_lr},
    ], weight_decay=0.01)
    params = list(unet.parameters()) + list(text.parameters())
    t0, step, budget, est_total, losses = time.time(), 0, cfg.minutes * 60, cfg.max_steps, []
    last_ckpt = t0
    while step < cfg.max_steps and time.time() - t0 < budget:
        if step == 20:  # how many steps fit the budget, so the cosine decay ends on time
            est_total = min(cfg.max_steps, int(budget / ((time.time() - t0) / 20)))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, est_total, g["base"], warmup=min(100, max(1, est_total // 10)))
        idx = torch.randint(0, len(x_pool), (cfg.batch_size,))
        x0 = x_pool[idx]
        cond = text(_ids(tok, drop_prompts([prompts[i] for i in idx], rng, cfg.p_uncond)))[0]
        t = torch.randint(0, 1000, (cfg.batch_size,))
        noise = torch.randn_like(x0)
        xt = sched.add_noise(x0, noise, t)  # sqrt(a) x0 + sqrt(1 - a) noise
        v = sched.get_velocity(x0, noise, t)  # the v-prediction target
        pred = unet(unet_input(xt).contiguous(memory_format=torch.channels_last), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, cfg.ema_decay if step > 100 else 0.0)
        ema_update(ema_text, text, cfg.ema_decay if step > 100 else 0.0)
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"audio step {step}/{est_total} loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        step += 1
        if args.checkpoint_minutes and time.time() - last_ckpt > args.checkpoint_minutes * 60:
            save_pipeline(ema_unet, ema_text, tok, sched, args.out)
            print(f"checkpoint at step {step} -> {args.out}", flush=True)
            last_ckpt = time.time()
    train_s = time.time() - t0

    save_pipeline(ema_unet, ema_text, tok, sched, args.out)
    finish_report(args, cfg, step, train_s, losses, params=sum(p.numel() for p in ema_unet.parameters()))
    return 0


def finish_report(args, cfg, step: int, train_s: float, losses: list[float], params: int) -> None:
    """Reload the saved folder as users will, grade ``eval_n`` clips, write training_report.json."""
    from backends.tiny.audio_pipeline import SynthAudioPipeline

    pipe = SynthAudioPipeline.from_pretrained(args.out)
    pipe.set_progress_bar_config(disable=True)
    t0 = time.time()
    prompts = eval_prompts(args.eval_n)
    waves = generate(pipe, prompts, AUDIO_CALL)
    gen_s = time.time() - t0
    scores = ad.score_audio(waves, pipe.sampling_rate, prompts) if (ad.CLASSIFIER_DIR / "config.json").exists() else {}
    if args.spec_png:
        save_spectrograms(waves[:4], prompts[:4], args.spec_png)
    write_report(args.out, dict(
        recipe="synth-audio", config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        steps=step, minutes=round(train_s / 60, 2), samples_seen=step * cfg.batch_size,
        final_loss=round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5), denoiser_params=params,
        eval_call=AUDIO_CALL, eval_samples=len(prompts), scores=scores,
        eval_seconds=round(gen_s, 1), real_time_factor=round(len(prompts) * ad.N_SAMPLES / ad.SAMPLE_RATE / gen_s, 3),
        folder_mb=folder_mb(args.out),
    ))
