"""Recipes for ``assets/tiny-ar-shapes`` (see ``backends/tiny/ar_image.py``), one process at a time:

    python -m backends.tiny.train shapes-vq --minutes 12   # tokenizer -> assets/tiny-ar-shapes/tokenizer
    python -m backends.tiny.train shapes-ar --minutes 12   # transformer + training_report.json
    python -m backends.tiny.train shapes-ar-draft --minutes 12   # 1-layer draft -> assets/tiny-ar-shapes-draft

Data: the same jittered shapes renders and 8-word prompts as tiny-sd-shapes, drawn at 32x32.
VQ: L1 + MSE reconstruction, codebook loss + 0.25 commitment (straight-through), codes
that fall out of use restarted on encoder outputs. AR: next-token cross-entropy on the
image tokens only, 10% of prompts replaced by nulls so classifier-free guidance works.
Both budgets are wall-clock (one thread), with a cosine schedule sized to the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from backends.tiny.ar_image import (
    AR_DIR,
    ARImagePipeline,
    ShapesVQ,
    TokenLayout,
    VQConfig,
    llama_config,
    prompt_words,
)
from backends.tiny.image_models import eval_prompts, folder_mb, lr_at, render_batch, save_grid
from backends.tiny.shapes import prompt_for, random_spec, score_images

IMAGE_SIZE = 32


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("FASTGEN_TRAIN_THREADS", "1")))  # 1: trainings share the CPU


def _set_lr(opt: torch.optim.Optimizer, progress: float, peak: float) -> None:
    """The cosine schedule at ``progress`` (0..1 of the budget) for every parameter group."""
    for g in opt.param_groups:
        g["lr"] = lr_at(int(1000 * progress), 1000, peak, warmup=30)


# ----------------------------------------------------------------------------- VQ


@dataclass
class VQTrainConfig:
    minutes: float = 12.0
    max_steps: int = 20000
    batch_size: int = 32
    lr: float = 2e-3
    commitment: float = 0.25
    restart_every: int = 100
    seed: int = 0


def _vq_losses(vq: ShapesVQ, x: torch.Tensor, commitment: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z, idx = vq.encode(x)
    q = vq.lookup(idx)
    code_loss = F.mse_loss(q, z.detach()) + commitment * F.mse_loss(z, q.detach())
    rec = vq.decoder(z + (q - z).detach())
    rec_loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
    return rec_loss, code_loss, idx


@torch.no_grad()
def _restart_dead_codes(vq: ShapesVQ, usage: torch.Tensor, z_pool: torch.Tensor, gen: torch.Generator) -> int:
    dead = (usage < 0.05).nonzero().flatten()
    if len(dead) and len(z_pool):
        pick = torch.randint(0, len(z_pool), (len(dead),), generator=gen)
        vq.codebook.weight[dead] = z_pool[pick]
        usage[dead] = 1.0
    return len(dead)


def train_vq_main(argv: list[str] | None = None) -> int:
    cfg = VQTrainConfig()
    p = argparse.ArgumentParser(prog="shapes-vq")
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--max-steps", type=int, default=cfg.max_steps)
    p.add_argument("--out", type=Path, default=AR_DIR)
    p.add_argument("--resume", action="store_true",
                   help="continue from the tokenizer already in --out (a second budget on a busy machine)")
    args = p.parse_args(argv)
    cfg.minutes, cfg.max_steps = args.minutes, args.max_steps
    _threads()
    previous = _previous_runs(args.out / "tokenizer") if args.resume else []
    torch.manual_seed(cfg.seed + len(previous))
    rng, gen = random.Random(cfg.seed + len(previous)), torch.Generator().manual_seed(cfg.seed + len(previous))
    if args.resume:
        vq = ShapesVQ.from_pretrained(args.out / "tokenizer").train().requires_grad_(True)
    else:
        vq = ShapesVQ(VQConfig(image_size=IMAGE_SIZE))
    opt = torch.optim.AdamW(vq.parameters(), lr=cfg.lr, weight_decay=0.0)
    usage = torch.ones(vq.cfg.codebook_size)
    t0, step, budget = time.time(), 0, cfg.minutes * 60
    while step < cfg.max_steps and time.time() - t0 < budget:
        progress = max(step / cfg.max_steps, (time.time() - t0) / budget)  # by the clock (see train_ar_main)
        _set_lr(opt, progress, cfg.lr)
        x = render_batch([random_spec(rng) for _ in range(cfg.batch_size)], rng, IMAGE_SIZE)
        rec_loss, code_loss, idx = _vq_losses(vq, x, cfg.commitment)
        loss = rec_loss + code_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        usage.mul_(0.99).add_(torch.bincount(idx.flatten(), minlength=len(usage)).float() / idx.numel() * 0.01 * len(usage))
        if step % cfg.restart_every == 0 and progress < 0.8:
            with torch.no_grad():
                z = F.normalize(vq.encoder(x), dim=1).permute(0, 2, 3, 1).reshape(-1, vq.cfg.code_dim)
            restarted = _restart_dead_codes(vq, usage, z, gen)
        else:
            restarted = 0
        if step % 50 == 0:
            print(f"vq step {step} ({progress:.0%}) rec {rec_loss.item():.4f} code {code_loss.item():.4f} "
                  f"used {(usage > 0.01).sum().item()} restarted {restarted} {time.time() - t0:.0f}s", flush=True)
        step += 1
    vq.eval()
    with torch.no_grad():
        x = render_batch([random_spec(rng) for _ in range(256)], rng, IMAGE_SIZE)
        _, idx = vq.encode(x)
        rec = vq.decode_indices(idx)
        mse = F.mse_loss(rec, x).item()
    vq.save(args.out / "tokenizer")
    report = dict(recipe="shapes-vq", config=asdict(cfg), steps=step, minutes=round((time.time() - t0) / 60, 2),
                  heldout_mse=round(mse, 5), codes_used=int(idx.unique().numel()),
                  params=sum(p.numel() for p in vq.parameters()), previous_runs=previous)
    (args.out / "tokenizer" / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return 0


def _previous_runs(folder: Path) -> list[dict]:
    """The reports of the runs a resumed tokenizer already had (oldest first)."""
    report = json.loads((folder / "training_report.json").read_text())
    earlier = report.pop("previous_runs", [])
    return [*earlier, report]


# ----------------------------------------------------------------------------- AR transformer


@dataclass
class ARRecipeConfig:
    """What the AR recipes (the transformer and its draft) share: a wall-clock budget, the
    token pool and its CFG null-prompt dropout, AdamW, and the Llama's shape."""

    minutes: float = 12.0
    max_steps: int = 50000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    p_uncond: float = 0.1
    pool_size: int = 20000
    hidden: int = 128
    layers: int = 4
    heads: int = 4


@dataclass
class ARTrainConfig(ARRecipeConfig):
    seed: int = 0
    eval_guidance: float = 1.5
    eval_temperature: float = 1.0
    eval_top_k: int = 0


@torch.no_grad()
def _token_pool(vq: ShapesVQ, layout: TokenLayout, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids (n, 8), image tokens (n, 64)) of ``n`` jittered renders."""
    rng = random.Random(seed)
    specs = [random_spec(rng) for _ in range(n)]
    tokens = []
    for i in range(0, n, 256):
        x = render_batch(specs[i : i + 256], rng, IMAGE_SIZE)
        tokens.append(vq.encode(x)[1].flatten(1))
    prompts = torch.tensor([layout.prompt_ids(prompt_for(s)) for s in specs])
    return prompts, torch.cat(tokens)


def _parse_budget(p: argparse.ArgumentParser, cfg: ARRecipeConfig, argv: list[str] | None) -> argparse.Namespace:
    """Add the budget options the AR recipes share (wall clock, steps, token pool), parse
    ``argv`` and set them on ``cfg``."""
    p.add_argument("--minutes", type=float, default=cfg.minutes)
    p.add_argument("--max-steps", type=int, default=cfg.max_steps)
    p.add_argument("--pool-size", type=int, default=cfg.pool_size)
    args = p.parse_args(argv)
    cfg.minutes, cfg.max_steps, cfg.pool_size = args.minutes, args.max_steps, args.pool_size
    return args


def _adamw(model: torch.nn.Module, cfg: ARRecipeConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the matrices only (not on norms and biases)."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


def _guided_batch(prompts: torch.Tensor, tokens: torch.Tensor, null: torch.Tensor, cfg: ARRecipeConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """A batch of (prompt, image tokens) rows from the pool, with ``cfg.p_uncond`` of the
    prompts replaced by the null prompt so that classifier-free guidance has an unconditional
    model to mix with."""
    pick = torch.randint(0, len(tokens), (cfg.batch_size,), generator=gen)
    prefix = prompts[pick].clone()
    prefix[torch.rand(cfg.batch_size, generator=gen) < cfg.p_uncond] = null
    return torch.cat([prefix, tokens[pick]], dim=1)


def _save_report(report: dict, out: Path) -> None:
    report["folder_mb"] = folder_mb(out)
    (out / "training_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)


def train_ar_main(argv: list[str] | None = None) -> int:
    from transformers import LlamaForCausalLM

    cfg = ARTrainConfig()
    p = argparse.ArgumentParser(prog="shapes-ar")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--out", type=Path, default=AR_DIR)
    args = _parse_budget(p, cfg, argv)
    _threads()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    vq = ShapesVQ.from_pretrained(args.out / "tokenizer")
    layout = TokenLayout(vq.cfg.codebook_size, tuple(prompt_words()), vq.cfg.grid)
    prompts, tokens = _token_pool(vq, layout, cfg.pool_size, cfg.seed + 1)
    print(f"token pool {tuple(tokens.shape)} in {time.time() - t0:.0f}s", flush=True)
    model = LlamaForCausalLM(llama_config(layout, cfg.hidden, cfg.layers, cfg.heads))
    opt = _adamw(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    null = torch.tensor(layout.null_ids())
    t1, step, budget = time.time(), 0, cfg.minutes * 60 - (time.time() - t0)
    while step < cfg.max_steps and time.time() - t1 < budget:
        # the schedule follows the clock, not a step estimate: the shared CPU's speed varies 3x
        progress = max(step / cfg.max_steps, (time.time() - t1) / budget)
        _set_lr(opt, progress, cfg.lr)
        ids = _guided_batch(prompts, tokens, null, cfg, gen)
        labels = ids.clone()
        labels[:, : prompts.shape[1]] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"ar step {step} ({progress:.0%}) loss {loss.item():.4f} {time.time() - t1:.0f}s", flush=True)
        step += 1
    model.eval()
    pipe = ARImagePipeline(vq, model, layout)
    pipe.save_pretrained(args.out)  # saved before the evaluation: a failing eval never loses the weights
    report = dict(recipe="shapes-ar", config=asdict(cfg), steps=step, minutes=round((time.time() - t0) / 60, 2),
                  samples_seen=step * cfg.batch_size, final_loss=round(loss.item(), 5),
                  transformer_params=sum(p.numel() for p in model.parameters()),
                  tokenizer=json.loads((args.out / "tokenizer" / "training_report.json").read_text()))
    report.update(evaluate(pipe, cfg, args.eval_samples, args.out))
    _save_report(report, args.out)
    return 0


def evaluate(pipe: ARImagePipeline, cfg: ARTrainConfig, n: int, out: Path) -> dict:
    """Sample ``n`` fixed prompts (seed i for prompt i) and grade them with the shapes checker."""
    from backends.accel._ar_decoding import ARSampling, sample_plain

    t0 = time.time()
    prompts = eval_prompts(n)
    sampling = ARSampling(guidance=cfg.eval_guidance, temperature=cfg.eval_temperature, top_k=cfg.eval_top_k)
    images = []
    for i, prompt in enumerate(prompts):
        tokens, _ = sample_plain(pipe, prompt, sampling, seed=i)
        images += pipe.decode(tokens, size=64)
    save_grid(images[:16], prompts[:16], out / "samples.png")
    return dict(eval_sampling=asdict(sampling), eval_samples=n, scores=score_images(images, prompts),
                eval_seconds=round(time.time() - t0, 1))


# ----------------------------------------------------------------------------- 1-layer draft


DRAFT_DIR = AR_DIR.parent / "tiny-ar-shapes-draft"


@dataclass
class ARDraftTrainConfig(ARRecipeConfig):
    """The draft distils the 4-layer target (see ``train_ar_draft_main``). Its ``hidden`` and
    ``heads`` are the target's: the target's embeddings, first layer and head are the draft's
    starting point."""

    pool_size: int = 10000
    layers: int = 1
    distill_weight: float = 1.0  # KL(target || draft) on the image positions
    data_weight: float = 0.1  # plus a little next-token cross-entropy on the real tokens
    seed: int = 0


def _draft_from_target(target, layout: TokenLayout, cfg: ARDraftTrainConfig):
    """A 1-layer Llama started from the target's embeddings, first layer, final norm and head:
    the draft begins in the target's representation, so distillation only has to fold the
    other three layers' work into one."""
    from transformers import LlamaForCausalLM

    draft = LlamaForCausalLM(llama_config(layout, cfg.hidden, cfg.layers, cfg.heads))
    own = draft.state_dict()
    shared = {k: v for k, v in target.state_dict().items() if k in own and own[k].shape == v.shape}
    draft.load_state_dict(shared, strict=False)
    return draft, len(shared)


def train_ar_draft_main(argv: list[str] | None = None) -> int:
    """Distil ``assets/tiny-ar-shapes`` into a 1-layer draft for speculative decoding.

    Why distillation rather than the shapes-ar token data alone: speculative sampling accepts
    a draft token with probability min(1, p/q), so the expected acceptance is 1 - TV(p, q):
    what matters is matching the target's full next-token distribution (conditional and null
    prompt alike, as CFG mixes both), which the KL to the target's soft labels trains for
    directly and with more signal per sample than the one-hot data tokens.
    """
    cfg = ARDraftTrainConfig()
    p = argparse.ArgumentParser(prog="shapes-ar-draft")
    p.add_argument("--target", type=Path, default=AR_DIR)
    p.add_argument("--out", type=Path, default=DRAFT_DIR)
    args = _parse_budget(p, cfg, argv)
    _threads()
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    target_pipe = ARImagePipeline.from_pretrained(args.target)
    target = target_pipe.transformer.requires_grad_(False)
    layout = target_pipe.layout
    prompts, tokens = _token_pool(target_pipe.vq, layout, cfg.pool_size, cfg.seed + 2)
    print(f"token pool {tuple(tokens.shape)} in {time.time() - t0:.0f}s", flush=True)
    draft, copied = _draft_from_target(target, layout, cfg)
    print(f"draft starts from {copied} target tensors", flush=True)
    opt = _adamw(draft, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    null = torch.tensor(layout.null_ids())
    n_prefix = len(layout.null_ids())
    t1, step, budget = time.time(), 0, cfg.minutes * 60 - (time.time() - t0)
    while step < cfg.max_steps and time.time() - t1 < budget:
        progress = max(step / cfg.max_steps, (time.time() - t1) / budget)  # by the clock (see train_ar_main)
        _set_lr(opt, progress, cfg.lr)
        ids = _guided_batch(prompts, tokens, null, cfg, gen)
        span = slice(n_prefix - 1, ids.shape[1] - 1)  # the positions that predict image tokens
        with torch.no_grad():
            teacher = F.log_softmax(target(input_ids=ids).logits[:, span].float(), dim=-1)
        student = F.log_softmax(draft(input_ids=ids).logits[:, span].float(), dim=-1)
        kl = F.kl_div(student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean")
        ce = F.nll_loss(student.flatten(0, 1), ids[:, n_prefix:].flatten())
        loss = cfg.distill_weight * kl + cfg.data_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"draft step {step} ({progress:.0%}) kl {kl.item():.4f} ce {ce.item():.4f} "
                  f"{time.time() - t1:.0f}s", flush=True)
        step += 1
    draft.eval()
    # a whole pipeline (the target's tokenizer and layout): the draft loads through the same
    # from_pretrained path and runs on its own like any bundled model (as tiny-code-draft does)
    ARImagePipeline(target_pipe.vq, draft, layout).save_pretrained(args.out)  # saved before the evaluation
    report = dict(recipe="shapes-ar-draft", target=args.target.name, config=asdict(cfg), steps=step,
                  minutes=round((time.time() - t0) / 60, 2), samples_seen=step * cfg.batch_size,
                  final_kl=round(kl.item(), 5), final_ce=round(ce.item(), 5), copied_from_target=copied,
                  transformer_params=sum(p.numel() for p in draft.parameters()))
    report.update(_draft_agreement(target_pipe, draft, *_token_pool(target_pipe.vq, layout, 512, cfg.seed + 3)))
    _save_report(report, args.out)
    return 0


@torch.no_grad()
def _draft_agreement(target_pipe: ARImagePipeline, draft, prompts: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Teacher-forced agreement on held-out renders (their own seed): 1 - TV(p, q) is the expected
    speculative acceptance per token (temperature 1, no guidance), argmax agreement the greedy one."""
    ids = torch.cat([prompts, tokens], dim=1)
    span = slice(prompts.shape[1] - 1, ids.shape[1] - 1)
    p = F.softmax(target_pipe.transformer(input_ids=ids).logits[:, span].float(), -1)
    q = F.softmax(draft(input_ids=ids).logits[:, span].float(), -1)
    return dict(expected_acceptance=round(1 - 0.5 * (p - q).abs().sum(-1).mean().item(), 4),
                argmax_agreement=round((p.argmax(-1) == q.argmax(-1)).float().mean().item(), 4))
