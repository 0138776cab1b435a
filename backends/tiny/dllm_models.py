"""Tiny masked-diffusion code model (LLaDA / Dream style), adapted from tiny-code-llama.

A masked-diffusion language model (Nie et al. 2025, "Large Language Diffusion Models",
LLaDA; Sahoo et al. 2024, MDLM) is a bidirectional transformer that predicts the tokens
hidden behind a mask token. Training draws a mask ratio t ~ U(0, 1) per sequence, hides
each token with probability t and minimises the cross-entropy on the hidden tokens,
weighted 1/t (an upper bound on the negative log-likelihood). Generation starts from a
fully masked answer and unmasks it over a number of denoising steps.

One core and a 15-minute budget cannot train such a model from scratch to write code, so
the recipe adapts the trained autoregressive tiny-code-llama instead, as Dream 7B was
adapted from Qwen2.5 (Ye et al. 2025) and DiffuLLaMA from LLaMA (Gong et al. 2025): same
weights, same byte-level BPE tokenizer plus a ``<|mask|>`` token, attention made
bidirectional, and Dream's *shifted* prediction kept (the logits at position i predict
token i + 1), so the head keeps the meaning it had in the AR model.

    python -m backends.tiny.train code-dllm --minutes 14 --threads 1
    python -m backends.tiny.train code-dllm --minutes 14 --threads 1 --resume   # continue the bundled one
    python -m backends.tiny.train code-dllm --minutes 0.2 --out runs/dllm-smoke   # smoke test

Output: ``assets/tiny-code-dllm/``, a ``LlamaForCausalLM`` folder whose config.json holds a
``diffusion_lm`` entry (mask token, shift, bidirectional attention) that
``backends/diffusion_lm.py`` reads; weights float16 on disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.tiny.text_models import (
    REPO_ROOT, encode_files, repeated_line_fraction, save_model, stdlib_files,
)

MASK = "<|mask|>"
SAMPLE_PROMPTS = [
    "def fibonacci(n):\n",
    "import os\n\nclass Config:\n    def __init__(self",
    "for i in range(",
]


@dataclass
class DLLMConfig:
    """The recipe.

    init_from: the AR model whose weights and tokenizer are adapted (tiny-code-llama).
    context: training window in tokens.
    batch_size / lr / warmup_steps / min_lr_frac / weight_decay / grad_clip: AdamW as in
        the AR recipe, with a lower peak rate since the weights start trained.
    min_mask_ratio: t is drawn from U(min_mask_ratio, 1) (LLaDA's eps) so 1/t stays bounded.
    prefix_prob: share of windows whose random-length prefix is never masked, so the model
        also sees the generation case (a clean prompt followed by a masked answer).
    minutes: wall-clock budget of the optimisation loop (evaluation and saving on top).
    """

    name: str = "tiny-code-dllm"
    init_from: str = "tiny-code-llama"
    context: int = 256
    batch_size: int = 8
    lr: float = 6e-4
    min_lr_frac: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    min_mask_ratio: float = 1e-3
    prefix_prob: float = 0.5
    minutes: float = 14.0
    checkpoint_minutes: float = 5.0
    bf16_autocast: bool = True
    seed: int = 0


def bidirectional_mask(batch: int, q_len: int, kv_len: int) -> torch.Tensor:
    """A 4D all-True boolean mask: transformers uses a 4D mask as given, so the Llama
    layers attend both ways instead of building their causal mask."""
    return torch.ones(batch, 1, q_len, kv_len, dtype=torch.bool)


def add_mask_token(tok, model) -> int:
    """Add ``<|mask|>`` to the tokenizer and the (tied) embedding; its row starts as the
    mean embedding, a neutral input the model learns to read as 'unknown'."""
    if MASK in tok.get_vocab():  # resuming from a model that already has it
        return tok.convert_tokens_to_ids(MASK)
    tok.add_special_tokens({"additional_special_tokens": [MASK]})
    mask_id = tok.convert_tokens_to_ids(MASK)
    with torch.no_grad():
        mean = model.get_input_embeddings().weight.mean(0)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        model.get_input_embeddings().weight[mask_id] = mean
    return mask_id


def corrupt(x0: torch.Tensor, mask_id: int, cfg: DLLMConfig, gen: torch.Generator):
    """Forward process: per row t ~ U(eps, 1), each token hidden with probability t.
    Position 0 is never hidden (with shifted prediction nothing predicts it); in
    ``prefix_prob`` of the rows a random-length prefix stays clean too."""
    b, n = x0.shape
    t = cfg.min_mask_ratio + (1 - cfg.min_mask_ratio) * torch.rand(b, 1, generator=gen)
    hidden = torch.rand(b, n, generator=gen) < t
    keep = torch.ones(b, 1, dtype=torch.long)
    with_prefix = torch.rand(b, 1, generator=gen) < cfg.prefix_prob
    prefix_len = torch.randint(1, n // 2, (b, 1), generator=gen)
    keep = torch.where(with_prefix, prefix_len, keep)
    hidden &= torch.arange(n).unsqueeze(0) >= keep
    return torch.where(hidden, torch.full_like(x0, mask_id), x0), hidden, t


def masked_diffusion_loss(model, x0, xt, hidden, t) -> torch.Tensor:
    """LLaDA's objective with Dream's shift: sum over hidden tokens of CE / t, over B*L."""
    b, n = x0.shape
    logits = model(input_ids=xt, attention_mask=bidirectional_mask(b, n, n)).logits
    logits, target, sel = logits[:, :-1].float(), x0[:, 1:], hidden[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                           reduction="none").view(b, n - 1)
    return (ce * sel / t).sum() / (b * n)


@torch.no_grad()
def heldout_masked_nll(model, ids: torch.Tensor, mask_id: int, context: int = 256,
                       ratios=(0.15, 0.5, 0.85), max_windows: int = 48) -> dict:
    """Mean CE per hidden token on held-out windows at fixed mask ratios (seeded)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    n = min((len(ids) - 1) // context, max_windows)
    x0 = torch.stack([ids[r * context: (r + 1) * context] for r in range(n)])
    out = {}
    for ratio in ratios:
        hidden = torch.rand(x0.shape, generator=gen) < ratio
        hidden[:, 0] = False
        xt = torch.where(hidden, torch.full_like(x0, mask_id), x0)
        total, count = 0.0, 0
        for s in range(0, n, 16):
            logits = model(input_ids=xt[s:s + 16],
                           attention_mask=bidirectional_mask(min(16, n - s), context, context)).logits
            sel = hidden[s:s + 16, 1:]
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), x0[s:s + 16, 1:].reshape(-1),
                reduction="none").view(sel.shape)
            total += (ce * sel).sum().item()
            count += sel.sum().item()
        out[f"t={ratio}"] = round(total / max(count, 1), 4)
    return out


@torch.no_grad()
def sample(model, tok, mask_id: int, prompt: str, gen_length: int = 64, steps: int = 64) -> str:
    """Plain LLaDA decoding (one block, low-confidence remasking, greedy) for the report;
    the studio's decoder with blocks and caches is ``backends/diffusion_lm.py``."""
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    p = ids.shape[1]
    x = torch.cat([ids, torch.full((1, gen_length), mask_id)], 1)
    per_step = [gen_length // steps + (i < gen_length % steps) for i in range(steps)]
    for k in per_step:
        n = x.shape[1]
        logits = model(input_ids=x, attention_mask=bidirectional_mask(1, n, n)).logits
        logits = torch.cat([logits[:, :1], logits[:, :-1]], 1)  # shift: position i from i - 1
        conf, pred = logits.float().softmax(-1).max(-1)
        masked = x == mask_id
        conf = torch.where(masked, conf, torch.full_like(conf, -1.0))
        idx = conf[0].topk(k).indices
        x[0, idx] = pred[0, idx]
    return tok.decode(x[0, p:])


def lr_at(cfg: DLLMConfig, step: int, time_frac: float) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * min(time_frac, 1.0)))
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * cos)


def _earlier_run(source: Path) -> dict | None:
    """The figures of the run a resumed training continues, kept in its report so the
    total optimisation behind the weights stays on record."""
    path = source / "training_report.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    keys = ("adapted_from", "steps", "tokens_seen", "train_minutes", "heldout_masked_ce")
    return {k: old.get(k) for k in keys} | ({"continued_from": old["continued_from"]}
                                           if "continued_from" in old else {})


def _flatten_runs(earlier: dict | None) -> list[dict]:
    """Every earlier run behind the weights, oldest first, from the nested
    ``continued_from`` chain (one entry per training chunk)."""
    runs, node = [], earlier
    while node:
        runs.append({k: node.get(k) for k in ("steps", "tokens_seen", "train_minutes",
                                               "heldout_masked_ce")})
        node = node.get("continued_from")
    return runs[::-1]


def _history(earlier: dict | None, steps: int, tokens: int, minutes: float, nll: dict) -> dict:
    """Per-chunk figures and the cumulative optimisation behind the saved weights."""
    runs = _flatten_runs(earlier) + [{"steps": steps, "tokens_seen": tokens,
                                      "train_minutes": round(minutes, 2), "heldout_masked_ce": nll}]
    return {"runs": runs,
            "cumulative_steps": sum(r["steps"] or 0 for r in runs),
            "cumulative_tokens_seen": sum(r["tokens_seen"] or 0 for r in runs),
            "cumulative_train_minutes": round(sum(r["train_minutes"] or 0 for r in runs), 2)}


def train(cfg: DLLMConfig, source: Path, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    earlier = _earlier_run(source) if cfg.init_from == cfg.name else None
    if earlier:  # a fresh data/mask stream per resumed chunk, not a replay of the first one
        cfg = dataclasses.replace(cfg, seed=cfg.seed + len(_flatten_runs(earlier)))
    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    mask_id = add_mask_token(tok, model)
    train_files, held_files = stdlib_files()
    train_ids, held_ids = encode_files(tok, train_files), encode_files(tok, held_files)
    n_params = sum(p.numel() for p in model.parameters())
    before = heldout_masked_nll(model, held_ids, mask_id, cfg.context, max_windows=16)
    print(f"[{cfg.name}] {n_params / 1e6:.2f} M params, {len(train_ids)} train tokens, "
          f"mask id {mask_id}, held-out masked CE before: {before}", flush=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    budget = cfg.minutes * 60
    start = last_ckpt = time.perf_counter()
    step, tokens_seen, ema = 0, 0, None

    def report(status: str, sec: float, nll: dict) -> dict:
        return {
            "status": status, "model": cfg.name, "config": dataclasses.asdict(cfg),
            "objective": "masked diffusion (LLaDA): t~U(eps,1), CE on masked tokens weighted 1/t; "
                         "Dream-style shifted prediction; bidirectional attention",
            "adapted_from": cfg.init_from, "mask_token": MASK, "mask_token_id": mask_id,
            "params": n_params, "tokens_seen": tokens_seen, "steps": step,
            "train_minutes": round(sec / 60, 2), "train_loss_ema": round(ema or 0, 4),
            "heldout_masked_ce_before": before, "heldout_masked_ce": nll,
            "heldout_tokens": len(held_ids), "train_corpus_tokens": len(train_ids),
            "corpus": "CPython stdlib *.py (tests excluded), every 20th file held out",
            "weights_dtype": "float16 on disk, float32 on load",
        } | ({"continued_from": earlier} if earlier else {}) | _history(
            earlier, step, tokens_seen, sec / 60, nll)

    def save(status: str, nll: dict, extra: dict | None = None) -> None:
        rep = report(status, time.perf_counter() - start, nll) | (extra or {})
        save_model(model, tok, folder, rep)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        config["diffusion_lm"] = {"mask_token_id": mask_id, "logits_shift": True,
                                  "attention": "bidirectional", "kind": "masked-diffusion"}
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    while (elapsed := time.perf_counter() - start) < budget:
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step, elapsed / budget)
        starts = torch.randint(0, len(train_ids) - cfg.context - 1, (cfg.batch_size,), generator=gen)
        x0 = torch.stack([train_ids[s: s + cfg.context] for s in starts.tolist()])
        xt, hidden, t = corrupt(x0, mask_id, cfg, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16_autocast):
            loss = masked_diffusion_loss(model, x0, xt, hidden, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        tokens_seen += x0.numel()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 25 == 0:
            print(f"[{cfg.name}] step {step} {elapsed / 60:.1f} min loss {ema:.3f} "
                  f"lr {opt.param_groups[0]['lr']:.2e}", flush=True)
        if time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
            nll = heldout_masked_nll(model, held_ids, mask_id, cfg.context, max_windows=16)
            save("checkpoint", nll)
            print(f"[{cfg.name}] checkpoint, held-out masked CE {nll}", flush=True)
            last_ckpt = time.perf_counter()

    model.half().float()  # evaluate exactly the weights that get stored
    nll = heldout_masked_nll(model, held_ids, mask_id, cfg.context)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        text = sample(model, tok, mask_id, prompt)
        samples.append({"prompt": prompt, "completion": text,
                        "repeated_line_fraction": repeated_line_fraction(text)})
    save("done", nll, {"samples": samples})
    print(f"[{cfg.name}] done: {step} steps, held-out masked CE {nll}", flush=True)
    for s in samples:
        print(f"--- {s['prompt']!r}\n{s['completion']}", flush=True)
    return report("done", 0, nll)


def train_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m backends.tiny.train code-dllm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=DLLMConfig.minutes)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "assets")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--resume", action="store_true",
                   help="continue from the bundled tiny-code-dllm instead of adapting tiny-code-llama "
                        "(a fresh optimiser and schedule; the report adds the earlier run's steps)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))
    cfg = DLLMConfig(minutes=args.minutes,
                     checkpoint_minutes=min(DLLMConfig.checkpoint_minutes, max(args.minutes / 2, 0.05)),
                     **({"init_from": DLLMConfig.name} if args.resume else {}))
    train(cfg, args.out / cfg.init_from if (args.out / cfg.init_from).exists()
          else REPO_ROOT / "assets" / cfg.init_from, args.out / cfg.name)
    return 0
